"""Pictures of optical flow results: the image pair, ground truth and predicted flow in the standard flow colour
wheel (Baker et al., "A Database and Evaluation Methodology for Optical Flow", IJCV 2011; hue = direction, saturation
= magnitude, through ``torchvision.utils.flow_to_image``), and the solver's residual per iteration."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torchvision.utils import flow_to_image


def flow_colors(flows: Sequence[Tensor], valid: Tensor | None = None) -> list[Tensor]:
    """Flows ``(2, H, W)`` as RGB uint8 images ``(3, H, W)``, all normalised by the largest magnitude among them (so
    ground truth and prediction are comparable); pixels where ``valid`` (``(H, W)`` bool) is False are black."""
    scale = max(float(torch.linalg.vector_norm(f.float(), dim=0).max()) for f in flows) + 1e-6
    images = []
    for flow in flows:
        # flow_to_image normalises by the image's own largest magnitude: pin it with one pixel of magnitude `scale`.
        padded = torch.cat([flow.float(), torch.tensor([scale, 0.0]).view(2, 1, 1).expand(2, flow.shape[1], 1)], 2)
        image = flow_to_image(padded)[..., :-1]
        if valid is not None:
            image = image * valid.to(image.dtype)
        images.append(image)
    return images


def save_flow_figure(
    path: str | Path,
    image1: Tensor,
    image2: Tensor,
    flows: Mapping[str, Tensor],
    *,
    valid: Tensor | None = None,
    title: str | None = None,
) -> Path:
    """One row per call: frame 1, frame 2 (``(3, H, W)`` in [−1, 1]) and each named flow ``(2, H, W)`` (e.g.
    ``{"ground truth": gt, "DEQ-Flow, EPE 1.2": pred}``) in the flow colour wheel, on a common scale. Returns the
    path of the PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = flow_colors(list(flows.values()), valid)
    panels = [("frame 1", _rgb(image1)), ("frame 2", _rgb(image2))]
    panels += [(name, image.permute(1, 2, 0).numpy()) for name, image in zip(flows, colors)]
    figure, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.0), squeeze=False)
    for axis, (name, picture) in zip(axes[0], panels):
        axis.imshow(picture)
        axis.set_title(name, fontsize=9)
        axis.axis("off")
    if title:
        figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    return _save(figure, path)


def save_residual_curves(
    path: str | Path, curves: Mapping[str, tuple[Sequence[int], Tensor]], *, ylabel: str = "residual"
) -> Path:
    """Residual against f-evaluations, one line per example and a colour per named curve set (e.g. before and after
    training): ``curves[name] = (nfe_at_each_check, trace)`` with ``trace`` of shape ``(checks, B)`` (an
    :class:`implicit.SolverResult`'s ``trace_nfe`` and ``trace``). Log scale. Returns the path of the PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(5.5, 3.8))
    for color, (name, (nfe, trace)) in zip(plt.rcParams["axes.prop_cycle"].by_key()["color"], curves.items()):
        values = trace.detach().float().cpu()
        for example in range(values.shape[1]):
            axis.plot(list(nfe), values[:, example], color=color, alpha=0.6, label=name if example == 0 else None)
    axis.set_yscale("log")
    axis.set_xlabel("f-evaluations")
    axis.set_ylabel(ylabel)
    axis.grid(True, which="both", alpha=0.3)
    axis.legend()
    figure.tight_layout()
    return _save(figure, path)


def save_curves(
    path: str | Path,
    series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    *,
    xlabel: str,
    ylabel: str,
    log: bool = False,
) -> Path:
    """Named ``(x, y)`` series on one plot (training loss, validation EPE against steps). Returns the PNG's path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(5.5, 3.8))
    for name, (x, y) in series.items():
        axis.plot(list(x), list(y), marker="o" if len(x) < 30 else None, label=name)
    if log:
        axis.set_yscale("log")
    axis.set_xlabel(xlabel)
    axis.set_ylabel(ylabel)
    axis.grid(True, alpha=0.3)
    axis.legend()
    figure.tight_layout()
    return _save(figure, path)


def _rgb(image: Tensor) -> Any:
    return ((image.detach().float().cpu().clamp(-1, 1) + 1) / 2).permute(1, 2, 0).numpy()


def _save(figure: Any, path: str | Path) -> Path:
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
