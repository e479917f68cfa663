"""Exact gradients by implicit differentiation (algorithms.md §2.1)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ..result import ImplicitInfo
from ..solvers import solve
from .base import BackwardMode, Problem, report_divergence


class _Adjoint:
    """Everything the backward pass of one call needs (kept off the module: each call has its own)."""

    def __init__(self, problem: Problem, z_star: Tensor, info: ImplicitInfo) -> None:
        self.problem, self.z_star, self.info = problem, z_star, info

    def solve(self, v: Tensor) -> Tensor:
        """``u = v (I − J)⁻¹`` at z*, i.e. the fixed point of ``u ↦ v + u J``, warm-started at ``u = v``."""
        options = self.problem.options
        with torch.enable_grad():
            z = self.z_star.detach().requires_grad_()
            fz = self.problem.fn(z)

        def v_plus_u_jacobian(u: Tensor) -> Tensor:
            (u_jac,) = torch.autograd.grad(fz, z, u, retain_graph=True, allow_unused=True)
            return v if u_jac is None else v + u_jac

        with torch.no_grad():
            result = solve(v_plus_u_jacobian, v, **options.backward_solver_kwargs())
        self.info.backward = result
        report_divergence(result, "backward", options.on_divergence)
        return result.z


class _ImplicitGradient(torch.autograd.Function):
    """Identity on the solved state z* whose backward maps the cotangent v to ``u = v (I − J)⁻¹`` and sends it into
    the graph of one tracked call ``f(z*)`` (parameters, injection, closures). A ``z0`` input gets a zero gradient:
    at an equilibrium z* does not depend on where the solve started."""

    @staticmethod
    def forward(ctx: Any, tracked_fz: Tensor, z0: Tensor, adjoint: _Adjoint) -> Tensor:
        ctx.adjoint = adjoint
        ctx.z0_shape = z0.shape
        return adjoint.z_star.clone()

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, v: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        u = ctx.adjoint.solve(v) if ctx.needs_input_grad[0] else None
        z0_grad = v.new_zeros(ctx.z0_shape) if ctx.needs_input_grad[1] else None
        return u, z0_grad, None


class Implicit(BackwardMode):
    """Exact implicit-function-theorem gradient.

    Forward: graph-free solve, then one tracked call ``f(z*)`` whose graph carries the gradients to parameters,
    injection and closed-over tensors. Backward: the adjoint ``u = v + u J`` is solved at z* with the backward
    solver (its own tol / max_iter / options), each iteration one vector-Jacobian product of a re-evaluated
    ``f(z*)``; stats land in ``info.backward``. Hook-free: every call has its own autograd node, so calling the layer
    twice before one ``backward()``, using its output twice, and ``eval()``-mode gradients all work.
    """

    name = "implicit"

    def run(self, problem: Problem) -> tuple[Tensor, ImplicitInfo]:
        result = problem.solve_forward()
        info = ImplicitInfo(forward=result, backward_mode=self.name)
        z_star = result.z
        if not torch.is_grad_enabled():
            return z_star, info
        tracked_fz = problem.fn(z_star)
        info.tracked_nfe = 1
        if not (tracked_fz.requires_grad or problem.z0.requires_grad):
            return z_star, info  # nothing to differentiate
        return _ImplicitGradient.apply(tracked_fz, problem.z0, _Adjoint(problem, z_star, info)), info
