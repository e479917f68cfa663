"""Optical-flow metrics and RAFT's training loss.

* Endpoint error (EPE), the Euclidean distance between predicted and true flow per pixel (Baker et al., "A Database
  and Evaluation Methodology for Optical Flow", IJCV 2011), averaged over all pixels (Sintel, FlyingChairs), with the
  fractions of pixels under 1, 3 and 5 px.
* KITTI 2015 (Menze and Geiger, "Object Scene Flow for Autonomous Vehicles", CVPR 2015): EPE over the valid pixels
  of each image, averaged over images, and F1-all, the percentage of valid pixels whose error exceeds both 3 px and
  5 % of the true flow's length.
* The sequence loss of RAFT (Teed and Deng, ECCV 2020, eq. 7), which DEQ-Flow (Bai, Chen and Kolter, CVPR 2022, §3.3)
  puts on the states of its sparse fixed-point correction.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from implicit.correction import correction_loss

THRESHOLDS = (1, 3, 5)  # px, for the "1px", "3px", "5px" keys


def _check_pair(pred: Tensor, gt: Tensor) -> None:
    if pred.dim() != 4 or pred.shape[1] != 2 or pred.shape != gt.shape:
        raise ValueError(
            f"expected prediction and ground truth of one shape (B, 2, H, W), got {tuple(pred.shape)} "
            f"and {tuple(gt.shape)}"
        )


def _mask(valid: Tensor, gt: Tensor) -> Tensor:
    """A validity mask ``(B, H, W)`` as bool (non-bool masks: ``valid ≥ 0.5``), checked against ``gt``."""
    if valid.shape != (gt.shape[0], *gt.shape[2:]):
        raise ValueError(f"valid must be (B, H, W) = {(gt.shape[0], *gt.shape[2:])}, got {tuple(valid.shape)}")
    return valid if valid.dtype == torch.bool else valid >= 0.5


def endpoint_error(pred: Tensor, gt: Tensor) -> Tensor:
    """The per-pixel endpoint error ``‖pred − gt‖₂`` ``(B, H, W)`` of flows ``(B, 2, H, W)``."""
    _check_pair(pred, gt)
    return torch.linalg.vector_norm(pred - gt, dim=1)


class FlowMetrics:
    """Accumulates flow metrics over batches; :meth:`compute` gives

    * ``"epe"``: the mean endpoint error over all pixels of all images, without a validity mask (Sintel, Chairs);
    * ``"1px"``, ``"3px"``, ``"5px"``: the percentage of those pixels with an error below 1, 3, 5 px;
    * when every batch came with a validity mask: ``"kitti_epe"``, the mean error over each image's valid pixels,
      averaged over the images (images without valid pixels are skipped), and ``"f1_all"``, the percentage of the
      valid pixels of all images whose error exceeds 3 px and 5 % of ``‖gt‖``.

    Sums are kept in float64 on the inputs' device; only :meth:`compute` synchronises with it.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Forget every batch."""
        self._sums: dict[str, Tensor] = {}
        self._masked: bool | None = None

    def update(self, pred: Tensor, gt: Tensor, valid: Tensor | None = None) -> None:
        """Add a batch: flows ``(B, 2, H, W)``, ``valid`` ``(B, H, W)`` bool (or ≥ 0.5) or None."""
        _check_pair(pred, gt)
        if self._masked is not None and self._masked != (valid is not None):
            raise ValueError("FlowMetrics: give a validity mask with every batch or with none")
        self._masked = valid is not None
        pred, gt = pred.detach().double(), gt.detach().double()
        epe = endpoint_error(pred, gt)
        batch = {"pixels": torch.tensor(float(epe.numel()), dtype=torch.float64, device=epe.device), "epe": epe.sum()}
        for t in THRESHOLDS:
            batch[f"{t}px"] = (epe < t).sum(dtype=torch.float64)
        if valid is not None:
            mask = _mask(valid, gt)
            per_image = mask.sum((1, 2), dtype=torch.float64)
            batch["kitti_epe"] = ((epe * mask).sum((1, 2)) / per_image.clamp(min=1)).sum()
            batch["kitti_images"] = (per_image > 0).sum(dtype=torch.float64)
            outlier = (epe > 3) & (epe > 0.05 * torch.linalg.vector_norm(gt, dim=1))
            batch["f1_all"] = (outlier & mask).sum(dtype=torch.float64)
            batch["f1_pixels"] = per_image.sum()
        for key, value in batch.items():
            self._sums[key] = self._sums[key] + value if key in self._sums else value

    def compute(self) -> dict[str, float]:
        """The metrics of every batch since construction or :meth:`reset` (one host synchronisation)."""
        if not self._sums:
            raise RuntimeError("FlowMetrics.compute: no batch was added")
        sums = dict(zip(self._sums, torch.stack(list(self._sums.values())).tolist()))
        pixels = sums["pixels"]
        metrics = {"epe": sums["epe"] / pixels, **{f"{t}px": 100 * sums[f"{t}px"] / pixels for t in THRESHOLDS}}
        if self._masked:
            metrics["kitti_epe"] = sums["kitti_epe"] / sums["kitti_images"] if sums["kitti_images"] else float("nan")
            metrics["f1_all"] = 100 * sums["f1_all"] / sums["f1_pixels"] if sums["f1_pixels"] else float("nan")
        return metrics


def sequence_loss(
    flows: Sequence[Tensor],
    gt: Tensor,
    valid: Tensor | None,
    *,
    gamma: float = 0.8,
    max_flow: float = 400.0,
) -> Tensor:
    """RAFT's sequence loss ``Σ_i γ^(n−i−1) mean(mask·|flow_i − gt|)`` over predictions ``(B, 2, H, W)``, earliest
    first, with ``mask = valid & (‖gt‖ < max_flow)`` per pixel and the mean over all ``B·2·H·W`` elements; the
    weighting is :func:`implicit.correction.correction_loss`'s ``"exp"``. ``valid``: ``(B, H, W)`` bool (or ≥ 0.5)
    or None (every pixel)."""
    if not flows:
        raise ValueError("sequence_loss needs at least one prediction")
    for flow in flows:
        _check_pair(flow, gt)
    mask = torch.linalg.vector_norm(gt, dim=1) < max_flow
    if valid is not None:
        mask = mask & _mask(valid, gt)
    weight = mask[:, None].to(gt.dtype)
    return correction_loss([(weight * (flow - gt).abs()).mean() for flow in flows], weighting="exp", gamma=gamma)
