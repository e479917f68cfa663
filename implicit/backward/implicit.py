"""Exact gradients by implicit differentiation (algorithms.md §2.1)."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from ..solvers import get_solver_class, solve
from .base import BackwardMode, Tracked, report_divergence


def solve_adjoint(tracked: Tracked, v: Tensor, u0: Tensor, **overrides: Any) -> Tensor:
    """Solve ``u = v + u J`` at z* from ``u0`` with the call's backward solver settings (``overrides`` replace
    entries of :meth:`ImplicitOptions.backward_solver_kwargs`). Records the solve in ``info.backward``."""
    options = tracked.problem.options
    kwargs = {**options.backward_solver_kwargs(), **overrides}
    if get_solver_class(kwargs["solver"]).linear_only:
        kwargs["state"] = {"offset": v}  # the affine map's value at 0, known for free

    def v_plus_u_jacobian(u: Tensor) -> Tensor:
        return v + tracked.vjp(u)

    result = solve(v_plus_u_jacobian, u0, **kwargs)
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

    def __init__(self) -> None:
        pass

    def adjoint(self, v: Tensor, tracked: Tracked) -> Tensor:
        return solve_adjoint(tracked, v, v)
