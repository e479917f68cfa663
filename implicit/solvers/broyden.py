"""Limited-memory ("good") Broyden root finding on g(z) = f(z) − z (algorithms.md §1.3)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .base import Solver


def _rows_dot(a: Tensor, b: Tensor) -> Tensor:
    """Per-sample dot products of ``(B, N)`` rows -> ``(B,)``."""
    return torch.linalg.vecdot(a, b)


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

    def start(self, z0: Tensor, differentiable: bool) -> None:
        super().start(z0, differentiable)
        batch, n = z0.shape
        self.U = z0.new_zeros(batch, self.memory, n)
        self.V = z0.new_zeros(batch, self.memory, n)
        self.count = 0
        self.prev_g: Tensor | None = None
        self.prev_step: Tensor | None = None

    def _store(self, u: Tensor, v: Tensor) -> None:
        if self.differentiable:
            self.U, self.V = self.U.clone(), self.V.clone()
        self.U[:, self.count] = u
        self.V[:, self.count] = v
        self.count += 1

    def step(self, z: Tensor, fz: Tensor) -> Tensor:
        g = fz - z
        if self.prev_g is None:  # H_0 = −I: the first step is plain iteration
            step = g
        else:
            s, y = self.prev_step, g - self.prev_g
            r = self.count
            if r == self.memory:  # restart: H ← −I, then add this pair computed against −I
                self.count = r = 0
            if r:
                U, V = self.U[:, :r], self.V[:, :r]
                h_y = torch.bmm(torch.bmm(V, y[:, :, None]).transpose(1, 2), U)[:, 0] - y
                v = torch.bmm(torch.bmm(U, s[:, :, None]).transpose(1, 2), V)[:, 0] - s
                h_g = h_y - s  # H g = H g_prev + H y and H g_prev = −s (the previous step)
            else:
                h_y, v, h_g = -y, -s, -g
            inv = 1.0 / _rows_dot(v, y)
            ok = torch.isfinite(inv)
            inv = torch.where(ok, inv, 0.0)
            u = (s - h_y) * inv[:, None]
            v = torch.where(ok[:, None], v, 0.0)
            self._store(u, v)
            # H_new g = H g + u (v·g)
            step = -torch.addcmul(h_g, u, _rows_dot(v, g)[:, None])
        self.prev_g, self.prev_step = g, step
        return z + step

    def export_state(self) -> dict[str, Any]:
        return {"U": self.U[:, : self.count], "V": self.V[:, : self.count]}
