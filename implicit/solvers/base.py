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

import inspect
import math
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..result import SolverResult

FlatMap = Callable[[Tensor], Tensor]

STOP_MODES = ("abs", "rel")


class Solver:
    """Base class of the fixed-point solvers. Subclasses declare their options as keyword-only ``__init__`` arguments
    with defaults, and implement :meth:`start` and :meth:`step`.

    A solver object holds the buffers of one solve; :func:`iterate` calls ``start`` once, then ``step`` once per
    iteration.
    """

    name: ClassVar[str] = ""

    def start(self, z0: Tensor, differentiable: bool) -> None:
        """Allocate per-solve state for ``z0`` of shape ``(B, N)``. With ``differentiable`` the steps must be
        differentiable by autograd (no in-place writes into tensors autograd saved)."""
        self.differentiable = differentiable

    def step(self, z: Tensor, fz: Tensor) -> Tensor:
        """Given the current point ``z`` and ``fz = fn(z)`` (both ``(B, N)``), return the next point."""
        raise NotImplementedError

    def export_state(self) -> dict[str, Any]:
        """Solver internals worth handing on (e.g. to a backward mode). Default: nothing."""
        return {}

    @classmethod
    def option_names(cls) -> list[str]:
        params = inspect.signature(cls.__init__).parameters.values()
        return [p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY]

    @classmethod
    def check_options(cls, options: dict[str, Any], *, context: str = "solver_options") -> None:
        """Raise ``TypeError`` naming the valid options if ``options`` has a name the solver does not take."""
        valid = cls.option_names()
        unknown = [k for k in options if k not in valid]
        if unknown:
            raise TypeError(
                f"{context}: unknown option(s) {', '.join(map(repr, unknown))} for solver {cls.name!r}; "
                f"valid options: {', '.join(valid) if valid else '(none)'}"
            )


def iterate(
    solver: Solver,
    fn: FlatMap,
    z0: Tensor,
    *,
    tol: float,
    max_iter: int,
    stop_mode: str = "rel",
    check_every: int = 4,
    differentiable: bool = False,
    explode: float = 1e6,
) -> SolverResult:
    """Run ``solver`` on ``z = fn(z)`` from ``z0`` (``(B, N)``) and return the per-sample best iterates.

    Args:
        tol: stop a sample when its residual (``stop_mode``) is ≤ tol; 0 runs the whole budget (a sample is then
            reported converged only if its residual is exactly 0).
        max_iter: solver steps at most (f-evaluations ≤ max_iter + 1).
        stop_mode: ``"abs"`` (‖f(z) − z‖/√N) or ``"rel"`` (‖f(z) − z‖/‖f(z)‖).
        check_every: iterations between residual measurements and host reads.
        differentiable: keep the iterations differentiable (the ``"unrolled"`` backward mode).
        explode: a sample whose absolute residual exceeds ``explode`` × its first one is stopped as diverged.
    """
    if z0.dim() != 2:
        raise ValueError(f"iterate expects a flat (B, N) state, got shape {tuple(z0.shape)}")
    batch, n = z0.shape
    device, dtype = z0.device, z0.dtype
    checks = sorted(set(range(0, max_iter + 1, check_every)) | {max_iter})
    inv_sqrt_n = 1.0 / math.sqrt(n)
    eps = torch.finfo(dtype).tiny ** 0.5
    use_rel = stop_mode == "rel"

    solver.start(z0, differentiable)
    best_z = z0
    best_r = torch.full((batch,), math.inf, dtype=dtype, device=device)
    best_abs, best_rel = best_r, best_r
    first_abs = best_r
    active = torch.ones(batch, dtype=torch.bool, device=device)
    diverged = torch.zeros(batch, dtype=torch.bool, device=device)
    nstep = torch.zeros(batch, dtype=torch.long, device=device)
    trace = torch.empty(len(checks), batch, dtype=dtype, device=device)
    trace_nfe: list[int] = []

    z = z0
    nfe = 0
    next_check = 0
    for k in range(max_iter + 1):
        fz = fn(z)
        nfe += 1
        if k == checks[next_check]:
            gnorm = torch.linalg.vector_norm(fz - z, dim=1)
            r_abs = gnorm * inv_sqrt_n
            r_rel = gnorm / (torch.linalg.vector_norm(fz, dim=1) + eps)
            r = r_rel if use_rel else r_abs
            if next_check == 0:
                first_abs = r_abs.detach()
            better = active & (r < best_r)  # False for NaN
            best_r = torch.where(better, r, best_r)
            best_abs = torch.where(better, r_abs, best_abs)
            best_rel = torch.where(better, r_rel, best_rel)
            best_z = torch.where(better[:, None], z, best_z)
            bad = active & ~(r_abs <= explode * first_abs)  # True for NaN/Inf
            done = active & (best_r <= tol) if tol > 0 else torch.zeros_like(active)
            nstep = torch.where(active, nfe, nstep)
            diverged = diverged | (bad & ~done)
            active = active & ~done & ~bad
            trace[next_check] = r.detach()
            trace_nfe.append(nfe)
            next_check += 1
            if k == max_iter or not bool(active.any()):
                break
        z = solver.step(z, fz)

    return SolverResult(
        z=best_z,
        abs=best_abs,
        rel=best_rel,
        nstep=nstep,
        nfe=nfe,
        converged=best_r <= tol if tol > 0 else best_r == 0,
        diverged=diverged,
        trace=trace[: len(trace_nfe)],
        trace_nfe=trace_nfe,
        stop_mode=stop_mode,
        tol=tol,
        state=solver.export_state(),
    )
