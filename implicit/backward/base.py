"""The interface of a backward mode (gradient estimator) and the autograd node every mode shares.

Every mode except ``"unrolled"`` works the same way: the forward solve runs without a graph; then the mode records a
small tracked computation at the solution (``f(z*)`` for most modes, ``k`` damped steps for the unrolled phantom
gradient) and an *adjoint rule* mapping the cotangent ``v = ∂ℓ/∂z*`` to the vector ``u`` sent into that computation's
graph. :class:`AttachGradient` ties both to the returned state, whose value is always the solver's ``z*``: the
backward mode changes the gradient, never the forward value.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ..graph import depends_on_more_than
from ..problem import Problem
from ..registry import Configurable
from ..regularization import JacobianRegularizer
from ..result import ImplicitInfo, SolverResult


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


class AttachGradient(torch.autograd.Function):
    """Returns the solved state ``z*``; its backward maps the cotangent v through the mode's adjoint rule and sends
    the result into the tracked computation's graph. A ``z0`` input gets a zero gradient: an equilibrium does not
    depend on where the solve started."""

    @staticmethod
    def forward(ctx: Any, out: Tensor, z0: Tensor, z_star: Tensor, mode: BackwardMode, tracked: Tracked) -> Tensor:
        ctx.mode, ctx.tracked, ctx.z0_shape = mode, tracked, z0.shape
        layout = tracked.problem.layout
        # A single-leaf state leaves in its own shape, a fresh tensor (not a view: FSDP and in-place friendly).
        if layout.single and z_star.shape != layout.shapes[0]:
            z_star = z_star.reshape(layout.shapes[0])
        return z_star.clone()

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, v: Tensor) -> tuple[Tensor | None, Tensor | None, None, None, None]:
        v = v.reshape(ctx.z0_shape)
        u = ctx.mode.adjoint(v, ctx.tracked) if ctx.needs_input_grad[0] else None
        z0_grad = torch.zeros_like(v) if ctx.needs_input_grad[1] else None
        return u, z0_grad, None, None, None


class BackwardMode(Configurable):
    """A gradient estimator for the equilibrium. Options are keyword-only constructor arguments (passed as
    ``backward_options``, values checked there). Subclasses implement :meth:`adjoint` and, when they track something
    other than one call ``f(z*)``, :meth:`track`, and declare what they are with the attributes below; option
    validation, the gradient checker, the hypothesis strategies and the generic tests read them.
    """

    kind: ClassVar[str] = "backward mode"
    #: the gradient is exact up to the solves' tolerances (else it approximates ``(I − J)⁻¹`` by design).
    exact: ClassVar[bool] = False
    #: capabilities the forward solver must have (attribute names of :class:`~implicit.solvers.Solver`).
    requires: ClassVar[tuple[str, ...]] = ()
    #: the gradient flows through the forward solver's iterations (the solve records a graph); intermediate states of
    #: sparse fixed-point correction then carry their gradient as they are.
    differentiates_iterations: ClassVar[bool] = False
    #: one sentence: what the mode replaces ``(I − J)⁻¹`` by (approximate modes).
    approximates: ClassVar[str] = ""

    #: whether :meth:`adjoint` uses vector-Jacobian products at z* (then the tracked z requires grad).
    needs_vjp: bool = True
    #: whether the mode solves the linear system ``u = v + u J`` with ``backward_solver`` and its settings.
    uses_backward_solver: bool = False

    @property
    def approximation(self) -> str | None:
        """Why this configuration's gradient is approximate (``None`` when it is exact)."""
        return None if self.exact else self.approximates

    @property
    def tracks_one_call(self) -> bool:
        """Whether the tracked computation is one call ``out = f(z*)`` (the default :meth:`track`): Jacobian
        regularisation then takes its vector-Jacobian products through that call, recorded from a z* that requires
        grad, instead of calling f again. A mode overriding :meth:`track` says whether it still does by overriding
        this."""
        return type(self).track is BackwardMode.track

    def attach(
        self,
        problem: Problem,
        result: SolverResult,
        info: ImplicitInfo,
        z: Tensor | None = None,
        *,
        regularizer: JacobianRegularizer | None = None,
    ) -> Tensor:
        """The state ``z`` (default ``result.z``, ``(B, N)``) carrying this mode's gradient when autograd needs one.

        With ``regularizer`` (this call's Jacobian regularisation) and a mode that :attr:`tracks_one_call`, the call
        is recorded from a z* that requires grad (also when the mode needs no vector-Jacobian products: its backward
        then computes an unused gradient w.r.t. z*, cheaper than a call of f of its own) and the regulariser's
        estimate taken from it, in ``info.jac_loss`` (one f-evaluation fewer); otherwise ``info.jac_loss`` is left to
        the caller.
        """
        z_star = result.z if z is None else z
        if not torch.is_grad_enabled():
            return z_star
        if regularizer is not None and self.tracks_one_call:
            with regularizer.recording():  # the call is differentiated twice: attention without fused kernels
                tracked = self.track(problem, z_star.detach().requires_grad_(), result, info)
            info.jac_loss = regularizer.from_call(tracked.z, tracked.out)
        else:
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
