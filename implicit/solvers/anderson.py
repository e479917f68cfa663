"""Anderson acceleration with a scale-free regulariser (algorithms.md §1.2)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .base import Solver


class Anderson(Solver):
    """Anderson acceleration (type II) over a window of the last ``m`` iterates.

    Per sample it solves ``min_α ‖Σ α_i g_i‖² + λ_eff ‖α‖²`` subject to ``Σ α_i = 1`` with ``g_i = f(x_i) − x_i``,
    via ``w = (GGᵀ/s + λ I)⁻¹ 1``, ``α = w / Σw``, where ``s`` is the mean squared residual of the window: the
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

    def start(self, z0: Tensor, differentiable: bool) -> None:
        super().start(z0, differentiable)
        batch, n = z0.shape
        m = self.m
        # Y holds the mixed values (1 − β) x_i + β f(x_i), G the residuals f(x_i) − x_i; ring buffers over m slots.
        self.Y = z0.new_empty(batch, m, n)
        self.G = z0.new_empty(batch, m, n)
        self.gram = z0.new_zeros(batch, m, m)
        self.eye = torch.eye(m, dtype=z0.dtype, device=z0.device)
        self.ones = z0.new_ones(batch, m, 1)
        self.tiny = torch.finfo(z0.dtype).tiny
        self.k = 0

    def step(self, z: Tensor, fz: Tensor) -> Tensor:
        slot = self.k % self.m
        n = min(self.k + 1, self.m)
        self.k += 1
        if self.differentiable:  # fresh buffers: autograd saved the old ones
            self.Y, self.G, self.gram = self.Y.clone(), self.G.clone(), self.gram.clone()
            self.G[:, slot] = fz - z
            self.Y[:, slot] = fz if self.beta == 1.0 else torch.lerp(z, fz, self.beta)
        else:
            torch.sub(fz, z, out=self.G[:, slot])
            if self.beta == 1.0:
                self.Y[:, slot].copy_(fz)
            else:
                torch.lerp(z, fz, self.beta, out=self.Y[:, slot])
        window_g = self.G[:, :n]
        # New Gram row g·G_iᵀ; (B, 1, N) @ (B, N, n) streams the window once.
        row = torch.bmm(self.G[:, slot : slot + 1], window_g.transpose(1, 2))[:, 0]
        self.gram[:, slot, :n] = row
        self.gram[:, :n, slot] = row
        gram = self.gram[:, :n, :n]
        scale = gram.diagonal(dim1=1, dim2=2).mean(dim=1) + self.tiny
        system = torch.add(gram / scale[:, None, None], self.eye[:n, :n], alpha=self.lam)
        w = torch.linalg.solve_ex(system, self.ones[:, :n]).result
        alpha = w / w.sum(dim=1, keepdim=True)
        return torch.bmm(alpha.transpose(1, 2), self.Y[:, :n])[:, 0]
