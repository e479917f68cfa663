"""Adjoint Broyden: an inverse-Jacobian estimate that is accurate for the products ``v H`` a backward pass needs
(Schlenkrich, Griewank and Walther, "On the local convergence of adjoint Broyden methods", Math. Prog. 2010; with the
outer-problem-awareness updates of Ramzi et al., "SHINE: SHaring the INverse Estimate from the forward pass for
bi-level optimization and implicit models", ICLR 2022)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..lowrank import LowRankInverse
from ..result import SolverResult
from ..types import FlatMap
from .base import Loop, Solver, iterate


class AdjointBroyden(Solver):
    """Root finding on ``g(z) = f(z) − z`` with ``H ≈ (J − I)⁻¹ = −I + Σ u_i v_iᵀ`` updated by the adjoint secant
    condition ``σᵀ J_g H₊ = σᵀ`` along ``σ`` = the new residual (type C of Schlenkrich–Griewank–Walther): with
    ``a = Hσ``, ``bᵀ = (σᵀ J_g) H``, the new pair is ``(a, (σ − b)/(bᵀσ))``. Each step costs one f-evaluation with
    autograd recording and one vector-Jacobian product.

    OPA (Ramzi et al.): with ``opa_every = q > 0`` and a direction ``d`` (typically ``∂ℓ/∂z``) given as
    ``state={"opa_direction": d}`` (``(B, N)``), every q steps one extra update along ``σ = Hᵀ d`` (scaled to the
    residual's norm), so that ``d H`` — SHINE's backward product — becomes accurate. One more VJP per such update.

    Args:
        memory: stored pairs at most (restart when full, as :class:`Broyden`; a restart also drops the OPA pairs,
            so for SHINE choose a memory that covers the solve — measured: with memory 30 instead of 300 SHINE's
            cosine with the exact adjoint fell from 1.0000 to 0.94 / 0.79 on benchmarks/RESULTS.md's sym / orth).
        opa_every: steps between OPA updates (0: none).

    The estimate is exported as ``result.inverse_jacobian`` for ``backward="shine"``. Not differentiable, and not a
    backward solver (it needs the autograd graph of the map it solves).
    """

    name = "adjoint_broyden"
    forward_only = True
    differentiable_steps = False
    capturable = False
    provides_inverse_jacobian = True

    def __init__(self, *, memory: int = 30, opa_every: int = 0) -> None:
        if not (isinstance(memory, int) and memory >= 1):
            raise ValueError(f"adjoint_broyden: memory must be an integer ≥ 1, got {memory!r}")
        if not (isinstance(opa_every, int) and opa_every >= 0):
            raise ValueError(f"adjoint_broyden: opa_every must be an integer ≥ 0, got {opa_every!r}")
        self.memory, self.opa_every = memory, opa_every

    @classmethod
    def option_strategies(cls, st: Any) -> dict[str, Any]:
        return {"memory": st.integers(2, 30)}

    def start(self, z0: Tensor, differentiable: bool, state: dict[str, Any] | None = None) -> None:
        if differentiable:
            raise ValueError("adjoint_broyden is not differentiable: use a backward mode other than 'unrolled'")
        super().start(z0, differentiable)
        state = dict(state or {})
        self.direction = state.pop("opa_direction", None)
        if state:
            raise ValueError(f"adjoint_broyden: warm-start state takes only 'opa_direction', got {sorted(state)}")
        if self.opa_every and self.direction is None:
            raise ValueError("adjoint_broyden: opa_every > 0 needs state={'opa_direction': d}")
        batch, n = z0.shape
        self.U = z0.new_empty(batch, self.memory, n)  # rows [:count] are the only ones read
        self.V = z0.new_empty(batch, self.memory, n)
        self.count = 0
        self.k = 0
        self.graph: tuple[Tensor, Tensor] | None = None

    def run(self, fn: FlatMap, z0: Tensor, loop: Loop) -> SolverResult:
        solver = self.fresh()

        def recorded(z: Tensor) -> Tensor:
            with torch.enable_grad():
                leaf = z.detach().requires_grad_()
                out = fn(leaf)
            solver.graph = (leaf, out)
            return out.detach()

        return iterate(solver, recorded, z0, loop)

    def inverse_jacobian(self) -> LowRankInverse:
        return LowRankInverse(self.U[:, : self.count], self.V[:, : self.count])

    def _update(self, sigma: Tensor) -> None:
        """Add the pair enforcing ``σᵀ J_g H₊ = σᵀ`` at the current point (one VJP)."""
        if self.graph is None:
            raise RuntimeError("adjoint_broyden steps need the map's graph: run the solver through run()")
        leaf, out = self.graph
        (vjp,) = torch.autograd.grad(out, leaf, sigma, retain_graph=True, allow_unused=True)
        sigma_jg = (torch.zeros_like(sigma) if vjp is None else vjp) - sigma
        if self.count == self.memory:
            self.count = 0
        estimate = self.inverse_jacobian()
        a = estimate.matvec(sigma)
        b = estimate.rmatvec(sigma_jg)  # (σᵀ J_g) H as a row
        inv = torch.nan_to_num(torch.linalg.vecdot(b, sigma).reciprocal_(), nan=0.0, posinf=0.0, neginf=0.0)
        self.U[:, self.count] = a
        self.V[:, self.count] = (sigma - b) * inv[:, None]
        self.count += 1

    def step(self, z: Tensor, fz: Tensor) -> Tensor:
        g = fz - z
        self.k += 1
        if self.k > 1:  # the first step is plain iteration (H = −I), like good Broyden
            self._update(g)
            if self.opa_every and self.k % self.opa_every == 0:
                sigma = self.inverse_jacobian().rmatvec(self.direction)
                scale = torch.linalg.vector_norm(g, dim=1) / torch.linalg.vector_norm(sigma, dim=1)
                self._update(sigma * torch.nan_to_num(scale, nan=0.0, posinf=0.0)[:, None])
        return z + self.inverse_jacobian().matvec(g, negate=True)
