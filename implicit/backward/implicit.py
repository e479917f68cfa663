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
    """Everything the backward pass of one call needs (kept off the module: each call has its own).

    ``fz = f(z)`` is the forward's tracked call at ``z = z*`` (a leaf requiring grad): its graph gives the
    vector-Jacobian products ``u ↦ u J`` of the backward solve and then carries ``u`` to parameters, injection and
    closed-over tensors, so forward and backward see the very same f (same weights, same dropout masks).
    """

    def __init__(self, problem: Problem, z: Tensor, fz: Tensor, info: ImplicitInfo) -> None:
        self.problem, self.z, self.fz, self.info = problem, z, fz, info

    def solve(self, v: Tensor) -> Tensor:
        """``u = v (I − J)⁻¹`` at z*, i.e. the fixed point of ``u ↦ v + u J``, warm-started at ``u = v``."""
        options = self.problem.options

        def v_plus_u_jacobian(u: Tensor) -> Tensor:
            (u_jac,) = torch.autograd.grad(self.fz, self.z, u, retain_graph=True, allow_unused=True)
            return v if u_jac is None else v + u_jac

        with torch.no_grad():
            result = solve(v_plus_u_jacobian, v, **options.backward_solver_kwargs())
        self.info.backward = result
        report_divergence(result, "backward", options.on_divergence)
        return result.z


def depends_on_more_than(output: Tensor, leaf: Tensor) -> bool:
    """Whether ``output``'s autograd graph reaches a tensor requiring grad other than ``leaf`` (parameters,
    injection, closures). Walks the graph until the first such tensor."""
    stack = [output.grad_fn] if output.grad_fn is not None else []
    seen: set[int] = set()
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        variable = getattr(node, "variable", None)  # AccumulateGrad nodes hold their leaf
        if variable is not None:
            if variable is not leaf:
                return True
            continue
        stack.extend(next_node for next_node, _ in node.next_functions if next_node is not None)
    return False


class _ImplicitGradient(torch.autograd.Function):
    """Identity on the solved state z* whose backward maps the cotangent v to ``u = v (I − J)⁻¹`` and sends it into
    the graph of the tracked call ``f(z*)``. A ``z0`` input gets a zero gradient: at an equilibrium z* does not
    depend on where the solve started."""

    @staticmethod
    def forward(ctx: Any, tracked_fz: Tensor, z0: Tensor, z_star: Tensor, adjoint: _Adjoint) -> Tensor:
        ctx.adjoint = adjoint
        ctx.z0_shape = z0.shape
        layout = adjoint.problem.layout
        # A single-leaf state leaves in its own shape, a fresh tensor (not a view: FSDP and in-place friendly).
        return (z_star.reshape(layout.shapes[0]) if layout.single else z_star).clone()

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, v: Tensor) -> tuple[Tensor | None, Tensor | None, None, None]:
        v = v.reshape(ctx.z0_shape)
        u = ctx.adjoint.solve(v) if ctx.needs_input_grad[0] else None
        z0_grad = torch.zeros_like(v) if ctx.needs_input_grad[1] else None
        return u, z0_grad, None, None


class Implicit(BackwardMode):
    """Exact implicit-function-theorem gradient.

    Forward: graph-free solve, then one tracked call ``f(z*)`` with z* a leaf requiring grad. Backward: the adjoint
    ``u = v + u J`` is solved with the backward solver (its own tol / max_iter / options), each iteration one
    vector-Jacobian product through that call's graph; then ``u`` flows through the same graph to everything f used.
    Stats land in ``info.backward``. Hook-free: every call has its own autograd node, so calling the layer twice
    before one ``backward()``, using its output twice, and ``eval()``-mode gradients all work.
    """

    name = "implicit"

    def run(self, problem: Problem) -> tuple[Tensor, ImplicitInfo]:
        result = problem.solve_forward()
        info = ImplicitInfo(forward=result, backward_mode=self.name)
        z_star = result.z
        if not torch.is_grad_enabled():
            return z_star, info
        z = z_star.detach().requires_grad_()
        tracked_fz = problem.fn(z)
        info.tracked_nfe = 1
        if not depends_on_more_than(tracked_fz, z):
            if not problem.z0.requires_grad:
                return z_star, info  # nothing to differentiate
            tracked_fz = tracked_fz.detach()
        adjoint = _Adjoint(problem, z, tracked_fz, info)
        return _ImplicitGradient.apply(tracked_fz, problem.z0, z_star, adjoint), info
