"""Diagnostics of an equilibrium: the spectral radius of the block's Jacobian at the solution (Bai, Koltun and Kolter,
"Stabilizing Equilibrium Models by Jacobian Regularization", ICML 2021).

ρ(J) < 1 at z* means damped iteration converges locally and the implicit backward's fixed-point iteration converges;
a DEQ whose ρ(J) drifts towards 1 during training is becoming unstable (the signal Jacobian regularisation acts on).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .krylov import normalize, orthogonalize
from .pytree import StateLayout
from .types import State

METHODS = ("arnoldi", "power")


def spectral_radius(
    f: Any,
    x: Any,
    z: State,
    *,
    iters: int = 20,
    method: str = "arnoldi",
    generator: torch.Generator | None = None,
) -> Tensor:
    """Per-sample estimate of ρ(∂f/∂z) at ``z`` (usually the solved state), ``(B,)``.

    Args:
        f: the block, called as ``f(z, x)`` (e.g. ``layer.block_forward``).
        x: the injection.
        z: the state (tensor or pytree, batch first); only its value is used.
        iters: vector-Jacobian products.
        method: ``"arnoldi"`` — the largest |Ritz value| of an ``iters``-step Arnoldi process on ``u ↦ u J``,
            exact for complex dominant pairs (recommended); ``"power"`` — power iteration with the Rayleigh
            quotient ``|(uJ)·u| / (u·u)``, which converges at rate |λ₂/λ₁| for a real dominant eigenvalue but
            oscillates when the dominant eigenvalues are a complex pair.
        generator: for the random start.

    Works under ``torch.no_grad()``; the result carries no graph.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")
    if not (isinstance(iters, int) and iters >= 1):
        raise ValueError(f"iters must be an integer ≥ 1, got {iters!r}")
    layout = StateLayout(z)
    with torch.enable_grad():
        zf = layout.flatten(z).detach().requires_grad_()
        fz = layout.flatten(f(layout.unflatten(zf), x), what="the block's output")

    def vjp(u: Tensor) -> Tensor:
        (out,) = torch.autograd.grad(fz, zf, u, retain_graph=True, allow_unused=True)
        return torch.zeros_like(u) if out is None else out

    start = torch.randn(zf.shape, dtype=zf.dtype, device=zf.device, generator=generator)
    with torch.no_grad():
        return _arnoldi(vjp, start, iters) if method == "arnoldi" else _power(vjp, start, iters)


def _power(vjp: Any, u: Tensor, iters: int) -> Tensor:
    u, _ = normalize(u)
    estimate = u.new_zeros(u.shape[0])
    for _ in range(iters):
        w = vjp(u)
        estimate = torch.linalg.vecdot(w, u).abs()  # u has unit norm
        u, _ = normalize(w)
    return estimate


def _arnoldi(vjp: Any, u: Tensor, iters: int) -> Tensor:
    batch, n = u.shape
    steps = min(iters, n)
    basis = u.new_zeros(batch, steps + 1, n)
    hessenberg = u.new_zeros(batch, steps + 1, steps)
    basis[:, 0], _ = normalize(u)
    # Breakdown: the Krylov space of a sample is invariant (e.g. J = cI after one step) when the orthogonalised
    # product is round-off; normalising that noise would give a basis vector that is not orthogonal and a wrong H.
    # Its next vector is set to zero instead: the remaining columns of H are zero and its spectrum is the invariant
    # block's plus zeros.
    breakdown = 10 * torch.finfo(u.dtype).eps * math.sqrt(n)
    for j in range(steps):
        product = vjp(basis[:, j])
        w, h = orthogonalize(product, basis[:, : j + 1])
        unit, h_next = normalize(w)
        invariant = h_next <= breakdown * torch.linalg.vector_norm(product, dim=1)
        basis[:, j + 1] = torch.where(invariant[:, None], 0.0, unit)
        hessenberg[:, : j + 1, j] = h
        hessenberg[:, j + 1, j] = torch.where(invariant, 0.0, h_next)
    return torch.linalg.eigvals(hessenberg[:, :steps, :steps]).abs().amax(dim=1).to(u.dtype)
