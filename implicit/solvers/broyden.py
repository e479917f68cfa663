"""Limited-memory ("good") Broyden root finding on g(z) = f(z) − z (algorithms.md §1.3)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .base import Solver


def _inverse_or_zero(denominator: Tensor, differentiable: bool) -> Tensor:
    """``1 / d``, and 0 where d is zero or not finite. Differentiable: the masked entries get zero gradient
    (``nan_to_num`` of an infinite reciprocal would backpropagate 0 · ∞ = NaN)."""
    if not differentiable:
        return torch.nan_to_num(denominator.reciprocal(), nan=0.0, posinf=0.0, neginf=0.0)
    ok = (denominator.abs() > torch.finfo(denominator.dtype).tiny) & torch.isfinite(denominator)
    return torch.where(ok, 1.0 / torch.where(ok, denominator, 1.0), 0.0)


class Broyden(Solver):
    """Good Broyden with a low-rank inverse Jacobian ``H ≈ (J − I)⁻¹ = −I + Σ_i u_i v_iᵀ``.

    Step ``Δ = −H g``; after each step the pair from ``s = z_{k+1} − z_k``, ``y = g_{k+1} − g_k`` is
    ``vᵀ = sᵀH``, ``u = (s − H y) / (vᵀ y)`` (Sherman–Morrison form of Broyden's update). A pair whose denominator is
    zero or non-finite is stored as zeros. At most ``memory`` pairs are kept: when full, all are dropped (restart,
    ``H ← −I``) and the new pair is computed against ``−I`` — memory never grows with ``max_iter``.

    Args:
        memory: stored pairs at most.

    Cost per step: one f-evaluation and four passes over the stored factors; memory ``2 · memory · N`` per sample.
    The factors (``U``, ``V``, ``count``) are exported in the result's ``state`` so a backward mode can reuse them.
    """

    name = "broyden"

    def __init__(self, *, memory: int = 10) -> None:
        if not (isinstance(memory, int) and memory >= 1):
            raise ValueError(f"broyden: memory must be an integer ≥ 1, got {memory!r}")
        self.memory = memory

    def start(self, z0: Tensor, differentiable: bool, state: dict[str, Any] | None = None) -> None:
        """``state`` may hold initial factors ``{"U": (B, r, N), "V": (B, r, N)}`` (``H_0 = −I + Σ u_i v_iᵀ``),
        e.g. a transposed forward estimate for a backward solve; the memory is raised to hold them plus one pair."""
        super().start(z0, differentiable)
        batch, n = z0.shape
        state = dict(state or {})
        u0, v0 = state.pop("U", None), state.pop("V", None)
        if state or (u0 is None) != (v0 is None):
            raise ValueError(f"broyden: warm-start state takes U and V (B, r, N) together, got {sorted(state)}")
        count = 0 if u0 is None else u0.shape[1]
        self.memory = max(self.memory, count + 1)
        # Only the first `count` rows are ever read: no need to zero-fill (costly for large memory × N).
        self.U = z0.new_empty(batch, self.memory, n)
        self.V = z0.new_empty(batch, self.memory, n)
        if count:
            self.U[:, :count] = u0
            self.V[:, :count] = v0
        self.count = count
        self.prev_g: Tensor | None = None
        self.prev_step: Tensor | None = None

    def _store(self, r: int, u: Tensor, v: Tensor) -> None:
        """Put the pair ``(u, v)`` (rows ``(B, 1, N)``) in slot r. Computed out of place and copied: an ``out=``
        into the factor buffers, which the same kernels read, takes PyTorch's slow overlapping-memory path."""
        if self.differentiable:  # autograd saved the old buffers: write into fresh ones
            self.U, self.V = self.U.clone(), self.V.clone()
        self.U[:, r : r + 1] = u
        self.V[:, r : r + 1] = v
        self.count = r + 1

    def step(self, z: Tensor, fz: Tensor) -> Tensor:
        g = fz - z
        if self.prev_g is None:  # −H_0 g = g − (g Vᵀ) U; plain iteration when H_0 = −I
            step = g
            if self.count:
                U, V = self.U[:, : self.count], self.V[:, : self.count]
                step = g - torch.bmm(torch.bmm(g[:, None], V.transpose(1, 2)), U)[:, 0]
        else:
            s = self.prev_step[:, None]  # rows (B, 1, N)
            y = (g - self.prev_g)[:, None]
            r = 0 if self.count == self.memory else self.count  # restart: H ← −I, this pair computed against −I
            if r:
                U, V = self.U[:, :r], self.V[:, :r]
                # H y = −y + (y Vᵀ) U and vᵀ = sᵀ H = −s + (s Uᵀ) V: one pass over a factor per product
                h_y = torch.baddbmm(y, torch.bmm(y, V.transpose(1, 2)), U, beta=-1)
                v = torch.baddbmm(s, torch.bmm(s, U.transpose(1, 2)), V, beta=-1)
                minus_h_g = s - h_y  # −H g = −(H g_prev + H y) and H g_prev = −s, the previous step
                direction = minus_h_g
            else:
                v = -s
                minus_h_g = g[:, None]
                direction = s + y
            # u = (s − H y) / (vᵀ y); a zero or non-finite denominator leaves a zero pair (no update)
            inv = _inverse_or_zero(torch.linalg.vecdot(v, y), self.differentiable)
            u = direction * inv[:, :, None]
            self._store(r, u, v)
            # −H_new g = −H g − u (v·g)
            step = torch.addcmul(minus_h_g, u, torch.linalg.vecdot(v, g[:, None])[:, :, None], value=-1)[:, 0]
        self.prev_g, self.prev_step = g, step
        return z + step

    def export_state(self) -> dict[str, Any]:
        return {"U": self.U[:, : self.count], "V": self.V[:, : self.count]}
