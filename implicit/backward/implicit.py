"""Exact gradients by implicit differentiation (Bai, Kolter and Koltun, "Deep Equilibrium Models", NeurIPS 2019,
eq. 8): ``∂ℓ/∂θ = v (I − J)⁻¹ ∂f/∂θ`` at the equilibrium, with ``v = ∂ℓ/∂z*`` and ``J = ∂f/∂z``."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from ..problem import report_divergence
from ..solvers import Solve
from .base import BackwardMode, Tracked


def solve_adjoint(tracked: Tracked, v: Tensor, u0: Tensor, *, solve: Solve | None = None, **changes: Any) -> Tensor:
    """Solve ``u = v + u J`` at z* from ``u0`` with the call's backward solve (``solve``: another
    :class:`~implicit.solvers.Solve` to use instead; ``changes``: loop settings for this solve only). Records the solve
    in ``info.backward``."""
    options = tracked.problem.options
    backward = options.backward_solve if solve is None else solve
    if backward.solver.linear_only:
        changes["state"] = {"offset": v}  # the affine map's value at 0, known for free

    def v_plus_u_jacobian(u: Tensor) -> Tensor:
        return v + tracked.vjp(u)

    result = backward.run(v_plus_u_jacobian, u0, **changes)
    tracked.info.backward = result
    tracked.info.backward_vjps += result.nfe
    report_divergence(result, "backward", options.on_divergence)
    return result.z


class Implicit(BackwardMode):
    """Exact implicit-function-theorem gradient: ``u = v (I − J)⁻¹``, the fixed point of ``u ↦ v + u J`` at z*,
    solved with the backward solver (``backward_solver``, its own tol / max_iter / options), warm-started at
    ``u = v``. Each iteration is one vector-Jacobian product through the tracked call ``f(z*)``, so forward and
    backward see the very same f (weights, dropout masks). Stats land in ``info.backward``.
    """

    name = "implicit"
    exact = True
    uses_backward_solver = True

    def __init__(self) -> None:
        pass

    def adjoint(self, v: Tensor, tracked: Tracked) -> Tensor:
        return solve_adjoint(tracked, v, v)
