"""Pictures of a classification run: the training curves per epoch, the per-example residual distribution of the
equilibrium solve, and the per-example asymptotic alignment split by correctness."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(figure: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    _pyplot().close(figure)
    return path


def save_training_curves(
    path: str | Path, history: Sequence[Mapping[str, float]], epochs: Sequence[Mapping[str, float]]
) -> Path:
    """Three panels: training loss per step (and per epoch), train / test accuracy per epoch, and for an MDEQ the
    relative residual and f-evaluations per example on the test set per epoch."""
    plt = _pyplot()
    has_solver = bool(epochs) and "test_residual" in epochs[0]
    figure, axes = plt.subplots(1, 3 if has_solver else 2, figsize=(13 if has_solver else 9, 3.4), squeeze=False)
    axis = axes[0][0]
    axis.plot([r["step"] for r in history], [r["loss"] for r in history], lw=0.6, alpha=0.6, label="training, per step")
    axis.set(xlabel="step", ylabel="cross-entropy", yscale="log", title="loss")
    axis.legend(fontsize=8)
    numbers = [e["epoch"] for e in epochs]
    axis = axes[0][1]
    axis.plot(numbers, [e["train_accuracy"] for e in epochs], "o-", label="training")
    axis.plot(numbers, [e["test_accuracy"] for e in epochs], "o-", label="test")
    axis.set(xlabel="epoch", ylabel="accuracy", title="accuracy")
    axis.legend(fontsize=8)
    if has_solver:
        axis = axes[0][2]
        axis.plot(numbers, [e["test_residual"] for e in epochs], "o-", label="mean rel. residual")
        axis.plot(numbers, [e["test_residual_max"] for e in epochs], "o--", label="largest rel. residual")
        axis.set(xlabel="epoch", ylabel="relative residual", yscale="log", title="test-set solve")
        twin = axis.twinx()
        twin.plot(numbers, [e["test_nfe"] for e in epochs], "s:", color="gray", label="NFE per example")
        twin.set_ylabel("f-evaluations per example")
        axis.legend(fontsize=8, loc="upper left")
        twin.legend(fontsize=8, loc="upper right")
    figure.tight_layout()
    return _save(figure, path)


def save_residual_distribution(
    path: str | Path, residuals: Mapping[str, Tensor], *, tol: float | None = None, title: str | None = None
) -> Path:
    """Histograms (log-spaced bins) of per-example relative residuals ``(N,)``, one per named set, and the
    tolerance as a vertical line."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(6, 3.6))
    values = torch.cat([r.flatten().double() for r in residuals.values()])
    positive = values[values > 0]
    low = float(positive.min()) if positive.numel() else 1e-12
    high = max(float(values.max()), low * 10)
    bins = torch.logspace(torch.log10(torch.tensor(low)).item() - 0.1, torch.log10(torch.tensor(high)).item() + 0.1, 40)
    for name, r in residuals.items():
        axis.hist(r.double().clamp_min(low).numpy(), bins=bins.numpy(), alpha=0.6, label=f"{name} ({r.numel()})")
    if tol is not None and tol > 0:
        axis.axvline(tol, color="black", ls="--", lw=1, label=f"tol {tol:g}")
    axis.set(xscale="log", xlabel="relative residual ‖f(z) − z‖ / ‖f(z)‖", ylabel="examples")
    axis.set_title(title or "per-example residual of the equilibrium", fontsize=10)
    axis.legend(fontsize=8)
    figure.tight_layout()
    return _save(figure, path)


def save_alignment_distribution(path: str | Path, scores: Tensor, correct: Tensor, *, title: str | None = None) -> Path:
    """Histograms of per-example misalignment ``1 − AA`` (``scores``: asymptotic alignment ``(N,)``; log scale,
    values below 1e-12 shown at 1e-12), correct and wrong predictions apart."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(6, 3.6))
    gap = (1 - scores.double()).clamp_min(1e-12)
    low, high = float(gap.min()), max(float(gap.max()), float(gap.min()) * 10)
    bins = torch.logspace(math.log10(low) - 0.1, math.log10(high) + 0.1, 40).numpy()
    for name, mask in (("correct", correct), ("wrong", ~correct)):
        if bool(mask.any()):
            axis.hist(gap[mask].numpy(), bins=bins, alpha=0.6, label=f"{name} ({int(mask.sum())})")
    axis.set(xscale="log", xlabel="1 − asymptotic alignment (0: the same fixed point from every start)")
    axis.set(ylabel="examples")
    axis.set_title(title or "path independence per example", fontsize=10)
    axis.legend(fontsize=8)
    figure.tight_layout()
    return _save(figure, path)
