"""Anderson acceleration (Anderson, "Iterative procedures for nonlinear integral equations", J. ACM 1965; Walker and
Ni, "Anderson acceleration for fixed-point iterations", SIAM J. Numer. Anal. 2011) with a scale-free regulariser."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
from torch import Tensor

from .base import Solver


class Anderson(Solver):
    """Anderson acceleration (type II) over a window of the last ``m`` iterates.

    Per sample it solves ``min_α ‖Σ α_i g_i‖² + λ_eff ‖α‖²`` subject to ``Σ α_i = 1`` with ``g_i = f(x_i) − x_i``,
    via ``w = (GGᵀ + λ s I)⁻¹ 1``, ``α = w / Σw``, where ``s`` is the mean squared residual of the window: the
    regulariser is relative (λ_eff = λ·s), so it neither vanishes for large residuals nor dominates small ones.
    The next iterate is ``Σ α_i ((1 − β) x_i + β f(x_i))``; the first step is a plain (β-damped) step.

    Args:
        m: window size (iterates kept).
        beta: mixing β ∈ (0, 1].
        lam: relative Tikhonov regulariser λ > 0.

    Cost per step: one f-evaluation, ``2m`` passes over ``(B, N)`` data and an ``m × m`` solve per sample;
    memory ``2 m N`` per sample.
    """

    name = "anderson"

    def __init__(self, *, m: int = 5, beta: float = 1.0, lam: float = 1e-4) -> None:
        if not (isinstance(m, int) and m >= 1):
            raise ValueError(f"anderson: m must be an integer ≥ 1, got {m!r}")
        if not (isinstance(beta, (int, float)) and 0 < beta <= 1):
            raise ValueError(f"anderson: beta must be in (0, 1], got {beta!r}")
        if not (isinstance(lam, (int, float)) and math.isfinite(lam) and lam > 0):
            raise ValueError(f"anderson: lam must be a finite number > 0, got {lam!r}")
        self.m, self.beta, self.lam = m, float(beta), float(lam)

    @classmethod
    def option_strategies(cls, st: Any) -> dict[str, Any]:
        return {"m": st.integers(1, 6), "beta": st.floats(0.5, 1.0), "lam": st.sampled_from((1e-4, 1e-6, 1e-8))}

    def start(self, z0: Tensor, differentiable: bool, state: dict[str, Any] | None = None) -> None:
        super().start(z0, differentiable, state)
        self.k = 0
        self.first: tuple[Tensor, Tensor, Tensor] | None = None  # the first entry, until the buffers exist
        self.views: dict[tuple[int, int], _Views] = {}

    def _allocate(self, z: Tensor, fz: Tensor, value: Tensor) -> None:
        """The window's storage, at the second step (a one-step solve never needs it), holding the first entry: the
        point ``z``, its value ``fz`` and the step taken from it."""
        g = fz - z
        # Floor of the regulariser's scale: keeps an all-zero window (an exact fixed point) well posed.
        self.floor = torch.finfo(g.dtype).tiny ** 0.5
        if self.traced:
            # One tensor per slot and the Gram matrix as (B,) entries: a step writes a slot without copying the others
            # (torch.compile turns a slot written into a buffer into a copy of the whole buffer).
            self.g_slots: list[Tensor] = [g]
            self.y_slots: list[Tensor] = [value]
            self.gram_entries: dict[tuple[int, int], Tensor] = {(0, 0): torch.linalg.vecdot(g, g)}
            return
        batch, n = g.shape
        # Ring buffers over m slots: Y the mixed values (1 − β) x_i + β f(x_i), G the residuals f(x_i) − x_i,
        # and their Gram matrix G Gᵀ, updated by one row per step.
        self.Y = g.new_empty(batch, self.m, n)
        self.G = g.new_empty(batch, self.m, n)
        self.gram = g.new_empty(batch, self.m, self.m)
        self.G[:, 0] = g
        self.Y[:, 0] = value
        if not self.differentiable:  # the differentiable path rebuilds the Gram matrix from G at every step
            self.gram[:, 0, 0] = torch.linalg.vecdot(g, g)

    def step(self, z: Tensor, fz: Tensor) -> Tensor:
        slot = self.k % self.m
        n = min(self.k + 1, self.m)
        self.k += 1
        if n == 1:  # the first step, or a window of one: α = 1, the plain (β-damped) step
            value = fz if self.beta == 1.0 else torch.lerp(z, fz, self.beta)
            if self.m > 1:  # the window's first entry, stored once the buffers exist (at the next step)
                self.first = (z, fz, value)
            return value
        if self.first is not None:
            self._allocate(*self.first)
            self.first = None
        if self.traced:
            return self._traced_step(z, fz, slot, n)
        if self.differentiable:  # fresh buffers (autograd saved the old ones) and a Gram matrix built out of place
            self.Y, self.G = self.Y.clone(), self.G.clone()
            self.G[:, slot] = fz - z
            self.Y[:, slot] = fz if self.beta == 1.0 else torch.lerp(z, fz, self.beta)
            window = self.G[:, :n]
            gram = torch.bmm(window, window.transpose(1, 2))
            alpha = self._mixing(gram, torch.eye(n, dtype=z.dtype, device=z.device), z.new_ones(z.shape[0], n, 1), n)
            return torch.bmm(alpha.transpose(1, 2), self.Y[:, :n])[:, 0]
        views = self.views.get((slot, n))
        if views is None:
            views = self.views[(slot, n)] = self._views(slot, n)
        torch.sub(fz, z, out=views.g_slot)
        if self.beta == 1.0:
            views.y_slot.copy_(fz)
        else:
            torch.lerp(z, fz, self.beta, out=views.y_slot)
        row = torch.bmm(views.g_row, views.window_t)[:, 0]  # g · G_iᵀ: one pass over the window
        views.gram_row.copy_(row)
        views.gram_col.copy_(row)
        alpha = self._mixing(views.gram, views.eye, views.ones, n)
        return torch.bmm(alpha.transpose(1, 2), views.values)[:, 0]

    def _traced_step(self, z: Tensor, fz: Tensor, slot: int, n: int) -> Tensor:
        """:meth:`step` for ``torch.compile`` (no writes into buffers): the same arithmetic on per-slot tensors,
        which the compiler fuses into a few passes over the window."""
        g = fz - z
        value = fz if self.beta == 1.0 else torch.lerp(z, fz, self.beta)
        if slot == len(self.g_slots):
            self.g_slots.append(g)
            self.y_slots.append(value)
        else:
            self.g_slots[slot], self.y_slots[slot] = g, value
        for i in range(n):
            entry = g if i == slot else self.g_slots[i]
            self.gram_entries[(slot, i)] = self.gram_entries[(i, slot)] = torch.linalg.vecdot(g, entry)
        alpha = self._traced_mixing(n)
        out = alpha[0][:, None] * self.y_slots[0]
        for i in range(1, n):
            out = out + alpha[i][:, None] * self.y_slots[i]
        return out

    def _traced_mixing(self, n: int) -> list[Tensor]:
        """:meth:`_mixing` on the ``(B,)`` Gram entries, for ``torch.compile``: the system ``GGᵀ + λ s I`` is
        symmetric positive definite, so an unrolled LDLᵀ factorisation (no pivoting) solves it in a few dozen
        element-wise operations that the compiler fuses into one kernel, instead of a batched LU call. Returns the
        weights α_i, each ``(B,)``."""
        entry = self.gram_entries
        total = entry[(0, 0)]
        for i in range(1, n):
            total = total + entry[(i, i)]
        shift = (total + self.floor) * (self.lam / n)
        d: list[Tensor] = []
        lower: dict[tuple[int, int], Tensor] = {}
        for j in range(n):
            d_j = entry[(j, j)] + shift
            for k in range(j):
                d_j = d_j - lower[(j, k)] * lower[(j, k)] * d[k]
            d.append(d_j)
            for i in range(j + 1, n):
                value = entry[(i, j)]
                for k in range(j):
                    value = value - lower[(i, k)] * lower[(j, k)] * d[k]
                lower[(i, j)] = value / d_j
        y: list[Tensor] = []  # L y = 1
        for i in range(n):
            value = torch.ones_like(total)
            for k in range(i):
                value = value - lower[(i, k)] * y[k]
            y.append(value)
        w: list[Tensor] = [total] * n  # D Lᵀ w = y, from the last row up
        for i in reversed(range(n)):
            value = y[i] / d[i]
            for k in range(i + 1, n):
                value = value - lower[(k, i)] * w[k]
            w[i] = value
        norm = w[0]
        for i in range(1, n):
            norm = norm + w[i]
        return [w_i / norm for w_i in w]

    def _mixing(self, gram: Tensor, eye: Tensor, ones: Tensor, n: int) -> Tensor:
        """The mixing weights α ``(B, n, 1)`` from the window's Gram matrix ``(B, n, n)``."""
        # (GGᵀ + λ s I) w = 1 with s the mean squared residual: the same α as (GGᵀ/s + λ I), scale-free.
        total = gram.diagonal(dim1=1, dim2=2).sum(dim=1).add_(self.floor)  # n · s (a sum is cheaper than a mean)
        system = torch.addcmul(gram, total[:, None, None], eye, value=self.lam / n)
        w = torch.linalg.solve_ex(system, ones).result
        return w / w.sum(dim=1, keepdim=True)

    def _views(self, slot: int, n: int) -> _Views:
        """Views of the buffers used by a step writing ``slot`` with ``n`` filled slots; built once per (slot, n)
        (at most 2m of them) since creating a view costs about as much as a small kernel."""
        return _Views(
            g_slot=self.G[:, slot],
            y_slot=self.Y[:, slot],
            g_row=self.G[:, slot : slot + 1],
            window_t=self.G[:, :n].transpose(1, 2),
            values=self.Y[:, :n],
            gram=self.gram[:, :n, :n],
            gram_row=self.gram[:, slot, :n],
            gram_col=self.gram[:, :n, slot],
            eye=torch.eye(n, dtype=self.G.dtype, device=self.G.device),
            ones=self.G.new_ones(self.G.shape[0], n, 1),
        )


class _Views(NamedTuple):
    g_slot: Tensor
    y_slot: Tensor
    g_row: Tensor
    window_t: Tensor
    values: Tensor
    gram: Tensor
    gram_row: Tensor
    gram_col: Tensor
    eye: Tensor
    ones: Tensor
