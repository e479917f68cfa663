"""Sparse fixed-point correction (Bai et al., "Deep Equilibrium Optical Flow Estimation", CVPR 2022, §3.3):
supervise several states of one solve, each with its own gradient, and combine their losses."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

WEIGHTINGS = ("exp", "linear", "const")


def correction_positions(spec: int | Sequence[int], max_iter: int) -> list[int]:
    """Solver steps whose best-so-far iterates are supervised, in increasing order, the last always ``max_iter``
    (the returned state).

    ``spec`` is the number of states n (``t_i = T − (n − 1 − i)⌊T/n⌋``, ``T = max_iter``: T=36, n=6 → 6, 12, …, 36;
    T=40, n=3 → 14, 27, 40) or explicit steps in ``[1, T]`` (``T`` is appended when absent).
    """
    if isinstance(spec, bool):
        raise ValueError(f"correction must be a number of states or a sequence of solver steps, got {spec!r}")
    if isinstance(spec, int):
        n = spec
        if not 1 <= n <= max_iter:
            raise ValueError(f"correction={n} states needs 1 ≤ n ≤ max_iter={max_iter}")
        gap = max_iter // n
        return [max_iter - (n - 1 - i) * gap for i in range(n)]
    steps = sorted(set(spec))
    if not steps or not all(isinstance(t, int) and 1 <= t <= max_iter for t in steps):
        raise ValueError(f"correction steps must be integers in [1, max_iter={max_iter}], got {list(spec)}")
    return steps if steps[-1] == max_iter else [*steps, max_iter]


def correction_weights(
    n: int, *, weighting: str = "exp", gamma: float = 0.8, bias: float = 0.0, const: float = 1.0
) -> list[float]:
    """Weights of the n state losses, the last state's first in importance:

    * ``"exp"``: ``γ^(n−1−i)`` (γ = 0.8 in DEQ-Flow);
    * ``"linear"``: ``1 − (n−1−i) γ / n + bias``;
    * ``"const"``: ``const`` for every state.
    """
    if weighting == "exp":
        return [gamma ** (n - 1 - i) for i in range(n)]
    if weighting == "linear":
        return [1.0 - (n - 1 - i) * gamma / n + bias for i in range(n)]
    if weighting == "const":
        return [float(const)] * n
    raise ValueError(f"unknown weighting {weighting!r}; valid: {', '.join(WEIGHTINGS)}")


def correction_loss(
    losses: Sequence[Tensor],
    *,
    weighting: str = "exp",
    gamma: float = 0.8,
    bias: float = 0.0,
    const: float = 1.0,
) -> Tensor:
    """``Σ_i w_i ℓ_i`` over the per-state losses (scalars, earliest state first), on the losses' device and dtype;
    weights from :func:`correction_weights`."""
    if not losses:
        raise ValueError("correction_loss needs at least one loss")
    weights = correction_weights(len(losses), weighting=weighting, gamma=gamma, bias=bias, const=const)
    total = torch.zeros((), dtype=losses[-1].dtype, device=losses[-1].device)
    for weight, loss in zip(weights, losses):
        if loss.dim() != 0:
            raise ValueError(f"correction_loss takes scalar losses, got shape {tuple(loss.shape)}")
        total = total + weight * loss
    return total
