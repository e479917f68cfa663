"""The solver interface and the shared driver loop.

Every solver finds ``z = fn(z)`` for a batched flat map ``fn: (B, N) -> (B, N)`` that does not mix samples. A solver
only proposes the next point (:meth:`Solver.step`); :func:`iterate` owns the loop and everything that is the same for
all solvers: f-evaluation counting, per-sample stopping, best-iterate tracking, divergence guards and the trace.

Loop contract (algorithms.md §1.0):

* iteration ``k = 0 … max_iter`` evaluates ``fn`` at the current point ``z_k``; ``z_k`` is measured (residual,
  best iterate, stopping) when ``k`` is a multiple of ``check_every`` and at ``k = max_iter``; then the solver
  proposes ``z_{k+1}``. So ``max_iter`` solver steps cost at most ``max_iter + 1`` f-evaluations, the last one
  measuring the final point: the reported residual is always that of the returned point.
* a sample stops (is frozen) at the first check where its best residual is ≤ tol, or its residual is non-finite or
  exceeds ``explode`` times its first measured absolute residual. Its returned point then never changes.
  Every sample still goes through ``fn`` (shapes never change); what it computes is ignored.
* the host reads a device value only at checks (``active.any()``), i.e. once per ``check_every`` iterations.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..configurable import Configurable
from ..result import SolverResult

FlatMap = Callable[[Tensor], Tensor]

STOP_MODES = ("abs", "rel")


class Solver(Configurable):
    """Base class of the fixed-point solvers. Subclasses declare their options as keyword-only ``__init__`` arguments
    with defaults, and implement :meth:`start` and :meth:`step` (the shared loop :func:`iterate` does the rest), or
    override :meth:`run` when their iteration does not fit a one-evaluation step (GMRES, ODE integration).

    A solver object holds the buffers of one solve.
    """

    kind: ClassVar[str] = "solver"
    #: True for solvers that only solve affine maps ``z ↦ b + zA`` (usable for the backward linear system only).
    linear_only: ClassVar[bool] = False
    #: True for solvers that differentiate f themselves (not usable for the backward system, whose map is a VJP).
    forward_only: ClassVar[bool] = False

    def start(self, z0: Tensor, differentiable: bool, state: dict[str, Any] | None = None) -> None:
        """Allocate per-solve state for ``z0`` of shape ``(B, N)``. With ``differentiable`` the steps must be
        differentiable by autograd (no in-place writes into tensors autograd saved). ``state`` warm-starts solver
        internals (e.g. Broyden factors); solvers without such internals reject it."""
        self.differentiable = differentiable
        if state:
            raise ValueError(f"solver {self.name!r} takes no warm-start state, got {sorted(state)}")

    def step(self, z: Tensor, fz: Tensor) -> Tensor:
        """Given the current point ``z`` and ``fz = fn(z)`` (both ``(B, N)``), return the next point."""
        raise NotImplementedError

    def export_state(self) -> dict[str, Any]:
        """Solver internals worth handing on (e.g. to a backward mode). Default: nothing."""
        return {}

    def run(self, fn: FlatMap, z0: Tensor, **loop: Any) -> SolverResult:
        """Solve ``z = fn(z)`` from ``z0``; keyword arguments as for :func:`iterate`."""
        return iterate(self, fn, z0, **loop)


class Monitor:
    """Per-sample bookkeeping shared by every solver loop: residuals of measured points, the best iterate, stopping
    (converged / diverged) and the trace. Everything stays on the device; :meth:`any_active` is the only host read.

    Args:
        z0: ``(B, N)`` starting point (the best iterate until a measured point beats it).
        tol, stop_mode, explode: the stopping rule (see :func:`iterate`).
        initial_active: ``(B,)`` bool; samples marked False are measured once, then never updated.
    """

    def __init__(
        self,
        z0: Tensor,
        *,
        tol: float,
        stop_mode: str,
        explode: float = 1e6,
        initial_active: Tensor | None = None,
    ) -> None:
        batch, n = z0.shape
        self.tol, self.stop_mode, self.explode = tol, stop_mode, explode
        self.use_rel = stop_mode == "rel"
        self.inv_sqrt_n = 1.0 / math.sqrt(n)
        self.eps = torch.finfo(z0.dtype).tiny ** 0.5
        self.best_z = z0
        self.best_abs = self.best_rel = torch.full((batch,), math.inf, dtype=z0.dtype, device=z0.device)
        self.limit = self.best_abs  # explosion threshold, set at the first check
        self.active = torch.ones(batch, dtype=torch.bool, device=z0.device)
        self.initial_active = initial_active
        self.nstep = torch.zeros(batch, dtype=torch.long, device=z0.device)
        self.trace: list[Tensor] = []
        self.trace_nfe: list[int] = []

    @property
    def best_r(self) -> Tensor:
        """``(B,)`` residual of the best iterate in the stopping mode."""
        return self.best_rel if self.use_rel else self.best_abs

    def observe(self, z: Tensor, fz: Tensor, nfe: int) -> None:
        """Measure the point ``z`` given ``fz = fn(z)``; ``nfe`` is the f-evaluation count so far."""
        gnorm = torch.linalg.vector_norm(fz - z, dim=1)
        r_abs = gnorm * self.inv_sqrt_n
        r_rel = gnorm / (torch.linalg.vector_norm(fz, dim=1) + self.eps)
        r = r_rel if self.use_rel else r_abs
        active = self.active
        first = not self.trace
        if first:  # explosion: beyond `explode` × the first residual (no limit when that was exactly 0)
            limit = torch.where(r_abs > 0, self.explode * r_abs.detach(), torch.finfo(r_abs.dtype).max)
            self.limit = limit
        better = active & (r < self.best_r)  # False for NaN
        self.best_abs = torch.where(better, r_abs, self.best_abs)
        self.best_rel = torch.where(better, r_rel, self.best_rel)
        self.best_z = torch.where(better[:, None], z, self.best_z)
        # A sample goes on while its residual is finite and below the explosion limit (False for NaN/Inf) and its
        # best residual is above tol. Whether it stopped by converging or by diverging is read off at the end.
        keep = active & (r_abs <= self.limit)
        if self.tol > 0:
            keep = keep & (self.best_r > self.tol)
        if first and self.initial_active is not None:
            keep = keep & self.initial_active
        self.nstep = self.nstep.add_(active, alpha=nfe - (self.trace_nfe[-1] if self.trace_nfe else 0))
        self.active = keep
        self.trace.append(r.detach())
        self.trace_nfe.append(nfe)

    def any_active(self) -> bool:
        """Whether a sample still iterates (one host read)."""
        return bool(self.active.any())

    def result(self, nfe: int, state: dict[str, Any] | None = None) -> SolverResult:
        tol = self.tol
        converged = self.best_r <= tol if tol > 0 else self.best_r == 0
        # Stopped, not converged and not frozen from the start: a non-finite or exploding residual stopped it.
        diverged = ~self.active & ~converged
        if self.initial_active is not None:
            diverged = diverged & self.initial_active
        return SolverResult(
            z=self.best_z,
            abs=self.best_abs,
            rel=self.best_rel,
            nstep=self.nstep,
            nfe=nfe,
            converged=converged,
            diverged=diverged,
            trace=torch.stack(self.trace) if self.trace else self.best_r.new_empty(0, self.best_r.numel()),
            trace_nfe=self.trace_nfe,
            stop_mode=self.stop_mode,
            tol=tol,
            state=state or {},
        )


@dataclass(frozen=True)
class Loop:
    """How a solve runs; the keyword arguments of :func:`iterate`, :meth:`Solver.run` and :func:`implicit.solve`.

    Attributes:
        tol: stop a sample when its residual (``stop_mode``) is ≤ tol; 0 runs the whole budget (a sample is then
            reported converged only if its residual is exactly 0).
        max_iter: solver steps at most (f-evaluations ≤ max_iter + 1).
        stop_mode: ``"abs"`` (‖f(z) − z‖/√N) or ``"rel"`` (‖f(z) − z‖/‖f(z)‖).
        check_every: iterations between residual measurements and host reads.
        differentiable: keep the iterations differentiable (the ``"unrolled"`` backward mode).
        explode: a sample whose absolute residual exceeds ``explode`` × its first one is stopped as diverged.
        record_at: solver steps t (0 ≤ t ≤ max_iter) at which to record the best iterate so far (a check is made
            there); steps after the solve stopped record the final best. Returned in ``result.trajectory``.
        initial_active: ``(B,)`` bool; samples marked False are measured at ``z0`` and never moved.
        state: warm-start state for the solver's internals (see :meth:`Solver.start`).
    """

    tol: float
    max_iter: int
    stop_mode: str = "rel"
    check_every: int = 4
    differentiable: bool = False
    explode: float = 1e6
    record_at: Sequence[int] = ()
    initial_active: Tensor | None = None
    state: dict[str, Any] | None = None

    def monitor(self, z0: Tensor) -> Monitor:
        """The per-sample bookkeeping of a solve from ``z0`` under this loop's stopping rule."""
        return Monitor(
            z0, tol=self.tol, stop_mode=self.stop_mode, explode=self.explode, initial_active=self.initial_active
        )

    def require(self, solver: str, *, differentiable: bool = True, record: bool = True) -> None:
        """Reject loop features a solver does not support."""
        if self.differentiable and not differentiable:
            raise ValueError(f"{solver} is not differentiable: use a backward mode other than 'unrolled'")
        if self.record_at and not record:
            raise ValueError(f"{solver} does not record trajectories (correction needs a discrete solver)")


def iterate(solver: Solver, fn: FlatMap, z0: Tensor, **loop: Any) -> SolverResult:
    """Run ``solver``'s steps on ``z = fn(z)`` from ``z0`` (``(B, N)``) and return the per-sample best iterates;
    ``loop`` holds the :class:`Loop` settings."""
    settings = Loop(**loop)
    max_iter, check_every = settings.max_iter, settings.check_every
    differentiable, record_at = settings.differentiable, settings.record_at
    if z0.dim() != 2:
        raise ValueError(f"iterate expects a flat (B, N) state, got shape {tuple(z0.shape)}")
    record_steps = sorted(set(record_at))
    if record_steps and not 0 <= record_steps[0] <= record_steps[-1] <= max_iter:
        raise ValueError(f"record_at steps must lie in [0, max_iter={max_iter}], got {list(record_at)}")
    checks = set(range(0, max_iter + 1, check_every)) | {max_iter} | set(record_steps)
    monitor = settings.monitor(z0)
    recorded: dict[int, Tensor] = {}

    record_set = set(record_steps)
    with torch.set_grad_enabled(differentiable and torch.is_grad_enabled()):  # graph-free unless differentiable
        solver.start(z0, differentiable, settings.state)
        z = z0
        nfe = 0
        for k in range(max_iter + 1):
            fz = fn(z)
            nfe += 1
            if k in checks:
                monitor.observe(z, fz, nfe)
                if k in record_set:
                    recorded[k] = monitor.best_z
                if k == max_iter or not monitor.any_active():
                    break
            z = solver.step(z, fz)

    result = monitor.result(nfe, solver.export_state())
    result.trajectory = [recorded.get(t, monitor.best_z) for t in record_steps]
    return result
