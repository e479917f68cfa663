"""Result records: what a solve returns and what an implicit layer reports about its forward and backward passes."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any

from torch import Tensor

from .lowrank import LowRankInverse

if TYPE_CHECKING:
    from .pytree import StateLayout


@dataclass
class SolverResult:
    """Outcome of one batched fixed-point solve.

    Shapes: B samples, N elements per sample (the flat state), C checks.

    Attributes:
        z: ``(B, N)`` returned point, per sample the best measured iterate.
        abs: ``(B,)`` absolute residual of ``z``: ``‖f(z) − z‖ / √N`` (root mean square per element).
        rel: ``(B,)`` relative residual of ``z``: ``‖f(z) − z‖ / (‖f(z)‖ + eps)``.
        nstep: ``(B,)`` f-evaluations each sample used until it stopped (converged, diverged or budget).
        nfe: f-evaluations of the whole batched solve.
        converged: ``(B,)`` residual of ``z`` ≤ tol in the stopping mode.
        diverged: ``(B,)`` a non-finite or exploding residual stopped the sample; ``z`` is its last finite best.
        stalled: ``(B,)`` the stagnation rule (``stagnation=(window, factor)``) stopped the sample: its best residual,
            above tol, had improved by less than ``factor`` over ``window`` iterations (all False without the rule).
        trace: ``(C, B)`` residual (stopping mode) of the iterate measured at each check.
        trace_nfe: f-evaluation count at each check (length C).
        stop_mode, tol: the stopping rule used.
        inverse_jacobian: the solver's estimate of ``(J − I)⁻¹`` at ``z`` (Broyden and adjoint Broyden), which
            ``backward="shine"`` reuses; ``None`` for solvers that keep none.
        trajectory: ``(B, N)`` best iterates so far at the steps requested with ``record_at`` (in increasing order).
    """

    z: Tensor
    abs: Tensor
    rel: Tensor
    nstep: Tensor
    nfe: int
    converged: Tensor
    diverged: Tensor
    stalled: Tensor
    trace: Tensor
    trace_nfe: list[int]
    stop_mode: str
    tol: float
    inverse_jacobian: LowRankInverse | None = None
    trajectory: list[Tensor] = field(default_factory=list)

    @property
    def residual(self) -> Tensor:
        """``(B,)`` residual of ``z`` in the stopping mode."""
        return self.rel if self.stop_mode == "rel" else self.abs

    @property
    def status(self) -> str:
        """Human-readable summary, e.g. ``"converged (8/8)"`` or ``"3/8 converged, 1 diverged (...), 2 stalled (...),
        2 stopped at the iteration budget"``."""
        b = self.converged.numel()
        conv = int(self.converged.sum())
        div = int(self.diverged.sum())
        stall = int(self.stalled.sum())
        if conv == b:
            return f"converged ({b}/{b})"
        parts = [f"{conv}/{b} converged"]
        if div:
            parts.append(f"{div} diverged (non-finite or exploding residual)")
        if stall:
            parts.append(f"{stall} stalled (the best residual stopped improving: stagnation rule)")
        if b - conv - div - stall:
            parts.append(f"{b - conv - div - stall} stopped at the iteration budget")
        return ", ".join(parts)

    def __repr__(self) -> str:
        worst = float(self.residual.max()) if self.residual.numel() else float("nan")
        return (
            f"SolverResult({self.status}; nfe={self.nfe}, worst {self.stop_mode} residual {worst:.3g}, "
            f"tol {self.tol:g})"
        )


@dataclass
class ImplicitInfo:
    """What an implicit layer did in one call.

    Attributes:
        forward: the forward solve.
        backward_mode: the backward mode of this call.
        backward: the backward linear solve (``"implicit"``; ``"shine"`` with refinement or exact fallback), filled in
            when autograd runs this call's backward; ``None`` otherwise.
        tracked_nfe: f-evaluations recorded by autograd in the forward pass, beyond the solve (1 for one tracked
            call ``f(z*)``, k for the k-step unrolled phantom gradient, one more per correction state, one more for
            the Jacobian regulariser's own call when it cannot share the mode's tracked call ``f(z*)``).
        backward_vjps: vector-Jacobian products of f spent in the backward pass beyond the one through the tracked
            computation (0 before backward and for one-step / unrolled phantom).
        jac_loss: Hutchinson estimate of ``‖∂f/∂z‖_F² / N`` at z* (batch mean), when Jacobian regularisation ran
            this call (a scalar tensor differentiable for training), else ``None``.
        extras: mode-specific diagnostics (e.g. SHINE's per-sample fallback mask).
        state: the solution z* (the forward solve's best iterate), detached, in the state's structure and dtypes:
            pass it as ``z0`` to warm-start the next call on a related input (the next video frame, the next
            optimisation step).
    """

    forward: SolverResult
    backward_mode: str
    backward: SolverResult | None = None
    tracked_nfe: int = 0
    backward_vjps: int = 0
    jac_loss: Tensor | None = None
    extras: dict[str, Any] = field(default_factory=dict)
    layout: StateLayout | None = field(default=None, repr=False, compare=False)

    @cached_property
    def state(self) -> Any:
        """z*, detached, in the state's structure (built on first access from the flat solution)."""
        z = self.forward.z.detach()
        return z if self.layout is None else self.layout.unflatten(z)
