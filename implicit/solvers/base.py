"""The solver interface, what each solver can do, and the shared driver loop.

Every solver finds ``z = fn(z)`` for a batched flat map ``fn: (B, N) -> (B, N)`` that does not mix samples. A solver
only proposes the next point (:meth:`Solver.step`); :func:`iterate` owns the loop and everything that is the same for
all solvers: f-evaluation counting, per-sample stopping, best-iterate tracking, divergence guards and the trace.

Loop contract:

* iteration ``k = 0 … max_iter`` evaluates ``fn`` at the current point ``z_k``; ``z_k`` is measured (residual,
  best iterate, stopping) when ``k`` is a multiple of ``check_every`` and at ``k = max_iter``; then the solver
  proposes ``z_{k+1}``. So ``max_iter`` solver steps cost at most ``max_iter + 1`` f-evaluations, the last one
  measuring the final point: the reported residual is always that of the returned point.
* a sample stops (is frozen) at the first check where its best residual is ≤ tol, or its residual is non-finite or
  exceeds ``explode`` times its first measured absolute residual (the "protective break" of Bai et al., "Deep
  Equilibrium Models", NeurIPS 2019). Its returned point then never changes. Every sample still goes through ``fn``
  (shapes never change); what it computes is ignored.
* optionally (``stagnation=(window, factor)``, off by default) a sample also stops, as *stalled*, at a check where its
  best residual has improved by less than ``factor`` over the last ``window`` iterations (best residual then < factor ×
  best residual now): a budget is not burned on a sample that cannot converge (e.g. a residual floor set by bf16
  arithmetic). The published rule of TorchDEQ's Broyden solver (Geng and Kolter, "TorchDEQ: A Library for Deep
  Equilibrium Models", arXiv:2310.18605) is of this kind: after 30 steps, residuals within a factor 1.3 of each other.
* the host reads a device value only at checks (``active.any()``), i.e. once per ``check_every`` iterations.
* with ``Loop(execution="compiled" | "graph")`` the loop never reads the host: it runs the whole budget (``max_iter``
  steps, ``max_iter + 1`` f-evaluations), stopped samples frozen on the device as above, so the same per-sample
  result comes back and the loop can be traced by ``torch.compile`` or captured in a CUDA graph
  (:func:`compiled_iterate`, :mod:`implicit.cuda_graph`). Solvers whose iteration is this loop are ``capturable``.
"""

from __future__ import annotations

import dataclasses
import math
from collections import deque
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple, TypeVar

import torch
from torch import Tensor

from ..lowrank import LowRankInverse
from ..registry import Configurable, check_choice
from ..result import SolverResult
from ..types import FlatMap

STOP_MODES = ("abs", "rel")
#: How a solve runs: ``"eager"`` (adaptive stopping, one host read per check), ``"compiled"`` (a fixed budget under
#: ``torch.compile``) or ``"graph"`` (a fixed budget captured in a CUDA graph per input shape,
#: :mod:`implicit.cuda_graph`).
EXECUTIONS = ("eager", "compiled", "graph")

#: What a solver may be able to do, by the name of its class attribute, and how error messages describe it.
CAPABILITIES = {
    "differentiable_steps": "steps that autograd can differentiate",
    "records_trajectory": "a record of its best iterates at chosen steps",
    "provides_inverse_jacobian": "a low-rank inverse-Jacobian estimate of the solution",
    "capturable": "a loop without host reads (torch.compile, CUDA graphs)",
}

SolverT = TypeVar("SolverT", bound="Solver")


class Solver(Configurable):
    """Base class of the fixed-point solvers.

    Subclasses declare their options as keyword-only ``__init__`` arguments with defaults (values checked there), and
    implement :meth:`start` and :meth:`step` (the shared loop :func:`iterate` does the rest), or override :meth:`run`
    when their iteration does not fit a one-evaluation step (GMRES, ODE integration). They declare what they can do
    with the class attributes below; option validation, the hypothesis strategies and the generic tests read them.

    A solver instance is a configuration, built once per options object; :meth:`run` works on a private copy
    (:meth:`fresh`) that holds the buffers of one solve, so concurrent and nested solves never share state.
    """

    kind: ClassVar[str] = "solver"
    #: solves affine maps ``z ↦ b + z A`` only (the backward system); it takes ``state={"offset": b}``.
    linear_only: ClassVar[bool] = False
    #: differentiates the map it solves (needs its autograd graph), so it cannot solve the backward system.
    forward_only: ClassVar[bool] = False
    #: autograd can differentiate its steps: usable with ``backward="unrolled"``.
    differentiable_steps: ClassVar[bool] = True
    #: honours ``Loop.record_at`` (the best iterate at chosen steps): usable with ``correction=``.
    records_trajectory: ClassVar[bool] = True
    #: exports ``result.inverse_jacobian``: usable with ``backward="shine"``.
    provides_inverse_jacobian: ClassVar[bool] = False
    #: its iteration is the shared loop (:func:`iterate`) of one f-evaluation per step with no host reads of its own:
    #: usable with ``execution="compiled"`` and ``"graph"``.
    capturable: ClassVar[bool] = True

    differentiable: bool = False
    #: set by the loop before :meth:`start`: the steps are traced by ``torch.compile`` (``execution="compiled"``), so
    #: ``differentiable`` is set too; a solver may then keep its history in separate tensors rather than buffers
    #: (which the compiler copies whole at every write).
    traced: bool = False

    @classmethod
    def general(cls) -> bool:
        """Usable in every role: forward and backward solves, unrolled gradients and correction."""
        return not cls.linear_only and not cls.forward_only and cls.differentiable_steps and cls.records_trajectory

    def fresh(self: SolverT) -> SolverT:
        """A copy of this configuration that a solve may fill with its buffers."""
        clone = object.__new__(type(self))
        clone.__dict__.update(self.__dict__)
        return clone

    def start(self, z0: Tensor, differentiable: bool, state: dict[str, Any] | None = None) -> None:
        """Allocate per-solve state for ``z0`` of shape ``(B, N)``. With ``differentiable`` the steps must be
        differentiable by autograd (no in-place writes into tensors autograd saved) and traceable by ``torch.compile``
        (no ``out=`` writes into views). ``state`` warm-starts solver
        internals (e.g. Broyden's inverse-Jacobian estimate); solvers without such internals reject it."""
        self.differentiable = differentiable
        if state:
            raise ValueError(f"solver {self.name!r} takes no warm-start state, got {sorted(state)}")

    def step(self, z: Tensor, fz: Tensor) -> Tensor:
        """Given the current point ``z`` and ``fz = fn(z)`` (both ``(B, N)``), return the next point."""
        raise NotImplementedError

    def inverse_jacobian(self) -> LowRankInverse | None:
        """The solve's estimate of ``(J − I)⁻¹`` at its last point, for solvers that keep one (else ``None``)."""
        return None

    def run(self, fn: FlatMap, z0: Tensor, loop: Loop) -> SolverResult:
        """Solve ``z = fn(z)`` from ``z0`` (``(B, N)``) as ``loop`` says (``execution="compiled"``: the loop under
        ``torch.compile``)."""
        if loop.execution == "compiled":
            return compiled_iterate(self.fresh(), fn, z0, loop)
        return iterate(self.fresh(), fn, z0, loop)

    @classmethod
    def check_loop(cls, loop: Loop) -> None:
        """Reject loop features this solver does not support (``ValueError`` naming the option that needs them)."""
        if loop.differentiable and not cls.differentiable_steps:
            raise ValueError(f"solver {cls.name!r} is not differentiable: use a backward mode other than 'unrolled'")
        if loop.record_at and not cls.records_trajectory:
            raise ValueError(
                f"solver {cls.name!r} does not record trajectories (correction needs one of the discrete solvers)"
            )
        if loop.execution != "eager" and not cls.capturable:
            raise ValueError(
                f"solver {cls.name!r} cannot run with execution={loop.execution!r} (its loop reads the host); "
                "use fixed_point, anderson or broyden, or execution='eager'"
            )


def check_stagnation(value: Any) -> tuple[int, float] | None:
    """The ``stagnation`` setting normalised to ``(window, factor)`` (``None``: off); ``ValueError`` naming the problem.

    ``window``: an integer ≥ 1 (iterations, i.e. f-evaluations); ``factor``: a finite number > 1 (a sample whose best
    residual has improved by less than this factor over the window stops as stalled).
    """
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 2:
        raise ValueError(f"option stagnation must be None (off) or a pair (window, factor), got {value!r}")
    window, factor = value
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"option stagnation: the window must be an integer ≥ 1 (iterations), got {window!r}")
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not math.isfinite(factor) or factor <= 1:
        raise ValueError(f"option stagnation: the factor must be a finite number > 1, got {factor!r}")
    return (window, float(factor))


#: A rule of where a solver class may be used: ``None`` when it may, else the reason it may not.
SolverRule = Callable[[type[Solver]], "str | None"]


def forward_rule(cls: type[Solver]) -> str | None:
    """Forward solvers solve nonlinear maps."""
    return "it solves linear systems only; use it as backward_solver" if cls.linear_only else None


def backward_rule(cls: type[Solver]) -> str | None:
    """Backward solvers only evaluate the map ``u ↦ v + u J`` (a vector-Jacobian product, no graph of its own)."""
    if cls.forward_only:
        return "it differentiates the map it solves and cannot solve the backward system u = v + u J"
    return None


def capability_rule(capabilities: Sequence[str], purpose: str) -> SolverRule:
    """A rule admitting solvers that have every one of ``capabilities`` (names of :data:`CAPABILITIES`); its reason
    names the valid solvers through the ``{valid}`` placeholder of :meth:`Registry.lookup`."""

    def rule(cls: type[Solver]) -> str | None:
        missing = [CAPABILITIES[c] for c in capabilities if not getattr(cls, c)]
        if not missing:
            return None
        return f"{purpose} needs {{valid}}, a solver with {' and '.join(missing)}, which {cls.name!r} does not have"

    return rule


def all_rules(*rules: SolverRule) -> SolverRule:
    """The first reason any of ``rules`` gives."""

    def rule(cls: type[Solver]) -> str | None:
        return next((reason for r in rules if (reason := r(cls)) is not None), None)

    return rule


@dataclass(frozen=True)
class Loop:
    """How a solve runs: the settings of :meth:`Solver.run`, :func:`iterate` and :func:`implicit.solve`.

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
        stagnation: ``(window, factor)`` or ``None`` (off): a sample also stops, reported as stalled, at a check where
            its best residual has improved by less than ``factor`` over the last ``window`` iterations (f-evaluations;
            between checks, so at least ``window``). Validated here (:func:`check_stagnation`).
        execution: ``"eager"``, or ``"compiled"`` / ``"graph"``: the whole budget without host reads (see the
            module docstring); :meth:`Solver.run` compiles the loop for ``"compiled"``, a ``"graph"`` loop is
            captured by :mod:`implicit.cuda_graph`.
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
    stagnation: tuple[int, float] | None = None
    execution: str = "eager"

    def __post_init__(self) -> None:
        if self.stagnation is not None:
            object.__setattr__(self, "stagnation", check_stagnation(self.stagnation))
        check_choice("option execution", self.execution, EXECUTIONS)

    def replace(self, **changes: Any) -> Loop:
        """A copy with ``changes`` (``self`` when there are none)."""
        return dataclasses.replace(self, **changes) if changes else self

    def monitor(self, z0: Tensor) -> Monitor:
        """The per-sample bookkeeping of a solve from ``z0`` under this loop's stopping rule."""
        return Monitor(
            z0,
            tol=self.tol,
            stop_mode=self.stop_mode,
            explode=self.explode,
            initial_active=self.initial_active,
            stagnation=self.stagnation,
        )


@dataclass(frozen=True)
class Solve:
    """A configured solver and the loop it runs; :class:`~implicit.ImplicitOptions` builds one for the forward and
    one for the backward solve, once."""

    solver: Solver
    loop: Loop

    def run(self, fn: FlatMap, z0: Tensor, **changes: Any) -> SolverResult:
        """Solve ``z = fn(z)`` from ``z0`` with this loop, ``changes`` applied to it for this solve only."""
        return self.solver.run(fn, z0, self.loop.replace(**changes))


class _Constants(NamedTuple):
    """The numbers of a monitor's arithmetic as 0-dim CPU tensors (never written to): an op with a tensor operand
    dispatches faster than one with a Python number, and a 0-dim CPU tensor combines with tensors on any device
    without a transfer."""

    eps: Tensor  # added to ‖f(z)‖ (the square root of the smallest normal number)
    scale: Tensor  # 1/√N, from ‖f(z) − z‖ to the absolute residual
    tol: Tensor
    explode: Tensor
    tiny: float  # the smallest positive normal number
    max: float  # the largest finite number


_CONSTANTS: dict[tuple[torch.dtype, int, float, float], _Constants] = {}


def _constants(dtype: torch.dtype, n: int, tol: float, explode: float) -> _Constants:
    """The constants of a solve, cached by what they depend on."""
    key = (dtype, n, tol, explode)
    constants = _CONSTANTS.get(key)
    if constants is None:
        if len(_CONSTANTS) > 1024:  # many distinct sizes or tolerances: start over rather than grow
            _CONSTANTS.clear()
        info = torch.finfo(dtype)
        with torch.inference_mode(False):  # normal tensors even when first needed under inference mode
            eps, scale, tol_t, explode_t = (
                torch.scalar_tensor(value, dtype=dtype, device="cpu")
                for value in (info.tiny**0.5, 1.0 / math.sqrt(n), tol, explode)
            )
        constants = _CONSTANTS[key] = _Constants(eps, scale, tol_t, explode_t, tiny=info.tiny, max=info.max)
    return constants


def residual(fz: Tensor, z: Tensor, stop_mode: str) -> Tensor:
    """``(B,)`` residual of the points ``z`` (``(B, N)``) given ``fz = fn(z)``, in ``stop_mode``, as the solves
    measure it: ``"rel"`` ``‖f(z) − z‖ / (‖f(z)‖ + eps)``, ``"abs"`` ``‖f(z) − z‖ / √N``."""
    constants = _constants(z.dtype, max(z.shape[1], 1), 0.0, 1.0)
    gnorm = torch.linalg.vector_norm(fz - z, dim=1)
    if stop_mode == "rel":
        return gnorm / (torch.linalg.vector_norm(fz, dim=1) + constants.eps)
    return gnorm * constants.scale


class Monitor:
    """Per-sample bookkeeping shared by every solver loop: residuals of measured points, the best iterate, stopping
    (converged / diverged / stalled) and the trace. Everything stays on the device; :meth:`any_active` is the only host
    read.

    Args:
        z0: ``(B, N)`` starting point (the best iterate until a measured point beats it).
        tol, stop_mode, explode: the stopping rule (see :func:`iterate`).
        initial_active: ``(B,)`` bool; samples marked False are measured once, then never updated.
        stagnation: ``(window, factor)`` (validated, see :class:`Loop`) or ``None``: stop a sample, as stalled, once
            its best residual has improved by less than ``factor`` over the last ``window`` f-evaluations.
    """

    def __init__(
        self,
        z0: Tensor,
        *,
        tol: float,
        stop_mode: str,
        explode: float = 1e6,
        initial_active: Tensor | None = None,
        stagnation: tuple[int, float] | None = None,
    ) -> None:
        n = z0.shape[1]
        self.tol, self.stop_mode, self.explode = tol, stop_mode, explode
        self.use_rel = stop_mode == "rel"
        self.constants = constants = _constants(z0.dtype, n, tol, explode)
        self.eps, self.scale, self.tol_t = constants.eps, constants.scale, constants.tol
        self.best_z = z0
        self.initial_active = initial_active
        self.trace: list[Tensor] = []
        self.trace_nfe: list[int] = []
        self.stagnation = stagnation
        # (f-evaluation count, best residual) at the observations of the last stagnation window, oldest first.
        self.history: deque[tuple[int, Tensor]] = deque()
        # Set by the first observation, which measures z0: per sample, of the best iterate, ‖f(z) − z‖, ‖f(z)‖ + eps
        # (kept in the abs stopping mode, for the relative residual at the end) and the residual in the stopping
        # mode; the explosion limit; the active mask; the f-evaluations spent while active.
        self.best_g = self.best_f = self.best_r = self.limit = self.active = self.nstep = z0.new_empty(0)
        self.stalled: Tensor | None = None  # (B,) bool, samples stopped by the stagnation rule (with the rule only)

    def _residual(self, gnorm: Tensor, fnorm: Tensor) -> Tensor:
        """The residual in the stopping mode from ``‖f(z) − z‖`` and ``‖f(z)‖ + eps``."""
        return gnorm / fnorm if self.use_rel else gnorm * self.scale

    def observe(self, z: Tensor, fz: Tensor, nfe: int, *, last: bool = False) -> None:
        """Measure the point ``z`` given ``fz = fn(z)``; ``nfe`` is the f-evaluation count so far. The first point
        measured must be ``z0``; ``last`` says no iteration follows (stopping at tol need not be decided)."""
        gnorm = torch.linalg.vector_norm(fz - z, dim=1)
        fnorm = torch.linalg.vector_norm(fz, dim=1) + self.eps
        r = self._residual(gnorm, fnorm)
        if not self.trace:
            keep = self._first(gnorm, fnorm, r, nfe)
        else:
            active = self.active
            better = (r < self.best_r) & active  # False for NaN
            self.best_g = torch.where(better, gnorm, self.best_g)
            if self.use_rel:
                self.best_r = torch.where(better, r, self.best_r)
            else:  # ‖f(z)‖ is kept for the relative residual at the end
                self.best_f = torch.where(better, fnorm, self.best_f)
                self.best_r = self.best_g * self.scale  # the same arithmetic as r: bitwise r where better
            self.best_z = torch.where(better[:, None], z, self.best_z)
            # A sample goes on while its residual is finite and below the explosion limit (False for NaN/Inf) and
            # its best residual is above tol. Whether it stopped by converging or diverging is read off at the end.
            keep = (gnorm <= self.limit) & active
            if self.tol > 0 and not last:
                keep = keep & (self.best_r > self.tol_t)
            if self.stagnation is not None and not last:
                keep = self._stop_stalled(keep, nfe, *self.stagnation)
            self.nstep.add_(active, alpha=nfe - self.trace_nfe[-1])
        self.active = keep
        self.trace.append(r.detach() if r.requires_grad else r)
        self.trace_nfe.append(nfe)

    def _stop_stalled(self, keep: Tensor, nfe: int, window: int, factor: float) -> Tensor:
        """``keep`` less the samples whose best residual improved by less than ``factor`` over the last ``window``
        f-evaluations (``nfe`` so far); records this observation's best residuals. Device arithmetic only: the
        observation a window ago is found from host counts."""
        history, start = self.history, nfe - window
        while len(history) > 1 and history[1][0] <= start:  # keep the latest observation at least a window ago
            history.popleft()
        best = self.best_r.detach()
        if history and history[0][0] <= start:
            stalled = keep & (history[0][1] < best * factor)  # improved by less than the factor (False for a 0 best)
            self.stalled = stalled if self.stalled is None else self.stalled | stalled
            keep = keep & ~stalled
        history.append((nfe, best))
        return keep

    def _first(self, gnorm: Tensor, fnorm: Tensor, r: Tensor, nfe: int) -> Tensor:
        """The first measurement (of z0, every sample active): it is the best so far, sets the explosion limit
        (``explode`` × the first residual; only 0 is allowed after an exact 0) and returns the samples going on. A
        non-finite first residual stops the sample (as diverged, with that residual reported)."""
        self.best_g, self.best_f, self.best_r = gnorm, fnorm, r
        constants = self.constants
        # finite: an infinite or NaN residual is never below it
        self.limit = (gnorm.detach() * constants.explode).clamp_(constants.tiny, constants.max)
        keep = gnorm <= self.limit
        if self.tol > 0:
            keep = keep & (r > self.tol_t)
        if self.initial_active is not None:
            keep = keep & self.initial_active
        self.nstep = torch.full_like(gnorm, nfe, dtype=torch.long)
        if self.stagnation is not None:
            self.history.append((nfe, r.detach()))
        return keep

    def any_active(self) -> bool:
        """Whether a sample still iterates (one host read)."""
        return bool(self.active.any())

    def result(self, nfe: int, inverse_jacobian: LowRankInverse | None = None) -> SolverResult:
        if not self.trace:
            raise RuntimeError("Monitor.result needs at least one observation (of z0)")
        converged = self.best_r <= self.tol_t if self.tol > 0 else self.best_r == 0
        stalled = torch.zeros_like(converged) if self.stalled is None else self.stalled
        # Stopped, not converged, not stalled and not frozen from the start: a non-finite or exploding residual
        # stopped it.
        diverged = ~(self.active | converged | stalled)
        if self.initial_active is not None:
            diverged = diverged & self.initial_active
        if self.use_rel:
            r_abs, r_rel = self.best_g * self.scale, self.best_r
        else:
            r_abs, r_rel = self.best_r, self.best_g / self.best_f
        return SolverResult(
            z=self.best_z,
            abs=r_abs,
            rel=r_rel,
            nstep=self.nstep,
            nfe=nfe,
            converged=converged,
            diverged=diverged,
            stalled=stalled,
            trace=torch.stack(self.trace),
            trace_nfe=self.trace_nfe,
            stop_mode=self.stop_mode,
            tol=self.tol,
            inverse_jacobian=inverse_jacobian,
        )


def iterate(solver: Solver, fn: FlatMap, z0: Tensor, loop: Loop | None = None, **settings: Any) -> SolverResult:
    """Run ``solver``'s steps on ``z = fn(z)`` from ``z0`` (``(B, N)``) and return the per-sample best iterates.

    ``loop`` holds the settings; keyword ``settings`` build one (``iterate(solver, fn, z0, tol=1e-6, max_iter=50)``)
    or replace fields of ``loop``. ``solver`` is used as it is (not copied): it holds this solve's buffers.
    """
    loop = Loop(**settings) if loop is None else loop.replace(**settings)
    max_iter, check_every, differentiable = loop.max_iter, loop.check_every, loop.differentiable
    fixed_budget = loop.execution != "eager"  # no host reads: the whole budget, stopped samples frozen on the device
    if z0.dim() != 2:
        raise ValueError(f"iterate expects a flat (B, N) state, got shape {tuple(z0.shape)}")
    record_steps = sorted(set(loop.record_at)) if loop.record_at else []
    if record_steps and not 0 <= record_steps[0] <= record_steps[-1] <= max_iter:
        raise ValueError(f"record_at steps must lie in [0, max_iter={max_iter}], got {list(loop.record_at)}")
    record_set = set(record_steps)
    monitor = loop.monitor(z0)
    recorded: dict[int, Tensor] = {}
    grad = differentiable and torch.is_grad_enabled()  # graph-free unless differentiable

    with nullcontext() if grad == torch.is_grad_enabled() else torch.set_grad_enabled(grad):
        # Out-of-place steps under autograd and torch.compile (which cannot trace ``out=`` writes into views).
        solver.traced = loop.execution == "compiled"
        solver.start(z0, differentiable or solver.traced, loop.state)
        z = z0
        nfe = 0
        for k in range(max_iter + 1):
            fz = fn(z)
            nfe += 1
            last = k == max_iter
            if last or k % check_every == 0 or k in record_set:
                monitor.observe(z, fz, nfe, last=last)
                if k in record_set:
                    recorded[k] = monitor.best_z
                if last or (not fixed_budget and not monitor.any_active()):
                    break
            z = solver.step(z, fz)

    result = monitor.result(nfe, solver.inverse_jacobian())
    result.trajectory = [recorded.get(t, monitor.best_z) for t in record_steps]
    return result


#: The ``torch.compile`` arguments of :func:`compiled_iterate` (e.g. ``COMPILE_OPTIONS["mode"] = "max-autotune"``, or
#: another ``backend``); read at each call, a change compiles anew.
COMPILE_OPTIONS: dict[str, Any] = {"fullgraph": True, "dynamic": False}
_compiled_loop: tuple[dict[str, Any], Callable[..., SolverResult]] | None = None


def compiled_iterate(solver: Solver, fn: FlatMap, z0: Tensor, loop: Loop) -> SolverResult:
    """:func:`iterate` under ``torch.compile`` with :data:`COMPILE_OPTIONS` (by default ``fullgraph``: a block that
    dynamo cannot trace raises instead of silently running eagerly; static shapes: a new shape, dtype or loop setting
    compiles anew). Inside a caller's ``torch.compile`` the loop is traced as part of the caller's graph instead.
    ``loop`` must not be eager: the loop then has no host reads and runs the whole budget."""
    global _compiled_loop
    if torch.compiler.is_compiling():
        return iterate(solver, fn, z0, loop)
    if _compiled_loop is None or _compiled_loop[0] != COMPILE_OPTIONS:  # built on first use: importing torch's
        options = dict(COMPILE_OPTIONS)  # compiler stack costs seconds
        _compiled_loop = (options, torch.compile(iterate, **options))
    return _compiled_loop[1](solver, fn, z0, loop)
