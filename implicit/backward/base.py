"""What a backward mode receives, and the machinery every gradient estimator shares.

Every mode except ``"unrolled"`` works the same way: the forward solve runs without a graph; then the mode records a
small tracked computation at the solution (``f(z*)`` for most modes, ``k`` damped steps for the unrolled phantom
gradient) and an *adjoint rule* mapping the cotangent ``v = ∂ℓ/∂z*`` to the vector ``u`` sent into that computation's
graph. :class:`AttachGradient` ties both to the returned state, whose value is always the solver's ``z*``: the
backward mode changes the gradient, never the forward value.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ..configurable import Configurable
from ..options import ImplicitOptions
from ..pytree import StateLayout
from ..result import ImplicitInfo, SolverResult
from ..solvers import FlatMap, solve


class DivergenceError(RuntimeError):
    """A solve stopped samples on a non-finite or exploding residual and the policy is ``on_divergence="raise"``."""


@dataclass
class Problem:
    """One equilibrium problem in flat form.

    Attributes:
        fn: the flat map ``(B, N) -> (B, N)``, the block applied to the unflattened state with the injection bound.
            Calling it under grad mode records a graph to everything the block uses (parameters, injection, closures).
        z0: ``(B, N)`` initial point (may require grad).
        options: the validated options of this call.
        layout: the state's layout (structure, leaf shapes and dtypes).
        solver_state: warm-start state for the forward solver (e.g. adjoint Broyden's ``opa_direction``).
    """

    fn: FlatMap
    z0: Tensor
    options: ImplicitOptions
    layout: StateLayout
    solver_state: dict[str, Any] | None = None

    def solve_forward(self, *, differentiable: bool = False, record_at: Sequence[int] = ()) -> SolverResult:
        z0 = self.z0 if differentiable else self.z0.detach()
        kwargs = self.options.solver_kwargs()
        result = solve(
            self.fn, z0, differentiable=differentiable, record_at=record_at, state=self.solver_state, **kwargs
        )
        report_divergence(result, "forward", self.options.on_divergence)
        return result


def report_divergence(result: SolverResult, which: str, policy: str) -> None:
    """Apply the ``on_divergence`` policy to a finished solve (one host read)."""
    if policy == "ignore" or not bool(result.diverged.any()):
        return
    message = f"{which} solve: {result.status}; diverged samples keep their last finite best iterate"
    if policy == "raise":
        raise DivergenceError(message)
    warnings.warn(message, RuntimeWarning, stacklevel=4)


@dataclass
class Tracked:
    """A tracked computation at the solution: ``out`` was computed from ``z`` with autograd recording.

    ``z`` requires grad when the adjoint rule needs vector-Jacobian products of f at z* (then ``out = f(z)``).
    """

    z: Tensor
    out: Tensor
    problem: Problem
    result: SolverResult
    info: ImplicitInfo

    def vjp(self, u: Tensor) -> Tensor:
        """``u J`` with ``J = ∂f/∂z`` at z* (``(B, N)`` rows), through the tracked call's graph."""
        (u_jac,) = torch.autograd.grad(self.out, self.z, u, retain_graph=True, allow_unused=True)
        return torch.zeros_like(u) if u_jac is None else u_jac


def graph_leaves(output: Tensor) -> Iterator[Tensor]:
    """The leaf tensors requiring grad that ``output``'s autograd graph reaches, lazily, each once."""
    stack = [output.grad_fn] if output.grad_fn is not None else []
    seen: set[int] = set()
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        variable = getattr(node, "variable", None)  # AccumulateGrad nodes hold their leaf
        if variable is not None:
            yield variable
            continue
        stack.extend(next_node for next_node, _ in node.next_functions if next_node is not None)


def depends_on_more_than(output: Tensor, leaf: Tensor) -> bool:
    """Whether ``output``'s graph reaches a tensor requiring grad other than ``leaf`` (parameters, injection,
    closures); stops at the first one."""
    return any(variable is not leaf for variable in graph_leaves(output))


class AttachGradient(torch.autograd.Function):
    """Returns the solved state ``z*``; its backward maps the cotangent v through the mode's adjoint rule and sends
    the result into the tracked computation's graph. A ``z0`` input gets a zero gradient: an equilibrium does not
    depend on where the solve started."""

    @staticmethod
    def forward(ctx: Any, out: Tensor, z0: Tensor, z_star: Tensor, mode: BackwardMode, tracked: Tracked) -> Tensor:
        ctx.mode, ctx.tracked, ctx.z0_shape = mode, tracked, z0.shape
        layout = tracked.problem.layout
        # A single-leaf state leaves in its own shape, a fresh tensor (not a view: FSDP and in-place friendly).
        return (z_star.reshape(layout.shapes[0]) if layout.single else z_star).clone()

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, v: Tensor) -> tuple[Tensor | None, Tensor | None, None, None, None]:
        v = v.reshape(ctx.z0_shape)
        u = ctx.mode.adjoint(v, ctx.tracked) if ctx.needs_input_grad[0] else None
        z0_grad = torch.zeros_like(v) if ctx.needs_input_grad[1] else None
        return u, z0_grad, None, None, None


class BackwardMode(Configurable):
    """A gradient estimator for the equilibrium. Options are keyword-only constructor arguments (passed as
    ``backward_options``). Subclasses implement :meth:`adjoint` and, when they track something other than one call
    ``f(z*)``, :meth:`track`; ``"unrolled"`` overrides :meth:`run`.
    """

    kind: ClassVar[str] = "backward mode"
    #: whether :meth:`adjoint` uses vector-Jacobian products at z* (then the tracked z requires grad)
    needs_vjp: ClassVar[bool] = True

    def run(self, problem: Problem) -> tuple[Tensor, ImplicitInfo]:
        """Solve, then attach this mode's gradient at the solution. Returns the flat (or single-leaf shaped) state."""
        result = self.solve_forward(problem)
        info = ImplicitInfo(forward=result, backward_mode=self.name)
        return self.attach(problem, result, info), info

    def solve_forward(self, problem: Problem, record_at: Sequence[int] = ()) -> SolverResult:
        """The forward solve this mode needs (graph-free unless the mode differentiates the iterations)."""
        return problem.solve_forward(record_at=record_at)

    def attach(self, problem: Problem, result: SolverResult, info: ImplicitInfo, z: Tensor | None = None) -> Tensor:
        """The state ``z`` (default ``result.z``, ``(B, N)``) carrying this mode's gradient when autograd needs one."""
        z_star = result.z if z is None else z
        if not torch.is_grad_enabled():
            return z_star
        tracked = self.track(problem, z_star.detach(), result, info)
        out = tracked.out
        if not (out.requires_grad and depends_on_more_than(out, tracked.z)):
            if not problem.z0.requires_grad:
                return z_star  # nothing to differentiate
            out = out.detach()
        return AttachGradient.apply(out, problem.z0, z_star, self, tracked)

    def track(self, problem: Problem, z_star: Tensor, result: SolverResult, info: ImplicitInfo) -> Tracked:
        """Record the tracked computation at ``z_star``; default: one call ``f(z*)``."""
        z = z_star.requires_grad_() if self.needs_vjp else z_star
        info.tracked_nfe += 1
        return Tracked(z=z, out=problem.fn(z), problem=problem, result=result, info=info)

    def adjoint(self, v: Tensor, tracked: Tracked) -> Tensor:
        """Map the cotangent ``v`` (``(B, N)``) to the vector sent into ``tracked.out``'s graph."""
        raise NotImplementedError
