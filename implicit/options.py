"""The options of an implicit layer, validated and normalised in one place.

Every public entry point (``make_implicit``, per-call overrides, :func:`implicit.equilibrium`) goes through
:func:`resolve_options`, so an unknown or misspelled name, a bad value, a solver option the chosen solver does not
take or a combination the chosen components cannot run raises before anything runs. Which solver may be combined
with which backward mode or training signal is derived from what the registered classes declare (their capability
attributes), never from lists of names. Validation builds the configured solvers and backward mode once; layer calls
reuse them. The caller's dictionaries are copied, never mutated.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from .backward import BACKWARD_MODES, BackwardMode, Phantom
from .correction import correction_positions
from .registry import Configurable, Registry, Rule, check_choice, did_you_mean
from .regularization import PROBES, JacobianRegularizer
from .solvers import (
    EXECUTIONS,
    SOLVERS,
    STOP_MODES,
    Loop,
    Solve,
    SolverRule,
    all_rules,
    backward_rule,
    capability_rule,
    forward_rule,
)
from .solvers.base import check_stagnation

NONFINITE_POLICIES = ("raise", "warn", "ignore")
DIVERGENCE_POLICIES = ("warn", "raise", "ignore")


class FrozenMapping(Mapping[str, Any]):
    """A read-only copy of a user's options dict (copyable and picklable, unlike ``MappingProxyType``)."""

    def __init__(self, mapping: Mapping[str, Any] | None = None) -> None:
        self._data = dict(mapping or {})

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __repr__(self) -> str:
        return repr(self._data)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Mapping) and dict(self) == dict(other)

    def __hash__(self) -> int:
        return hash(tuple(sorted(self._data.items(), key=lambda item: item[0])))


@dataclass(frozen=True)
class ImplicitOptions:
    """Options of an implicit layer (all keyword-only at the call sites).

    Forward solve:
        solver: ``"fixed_point"``, ``"anderson"``, ``"broyden"``, ``"adjoint_broyden"`` or ``"ode"`` (any forward
            solver registered in :data:`implicit.SOLVERS`).
        solver_options: the solver's own options (fixed_point: ``tau``; anderson: ``m``, ``beta``, ``lam``;
            broyden: ``memory``; adjoint_broyden: ``memory``, ``opa_every``; ode: ``method``, ``rtol``, ``atol``,
            ``t_max``, ``step_size``).
        tol, stop_mode: stop a sample when its residual ≤ tol; ``"rel"``: ‖f(z) − z‖/‖f(z)‖, ``"abs"``:
            ‖f(z) − z‖/√N (root mean square per element, independent of the state size).
        max_iter: solver steps at most (f-evaluations ≤ max_iter + 1).
        check_every: iterations between residual checks (and host reads).
        stagnation: ``None`` (off) or ``(window, factor)``: stop a sample, reported as stalled
            (``info.forward.stalled``, not converged), at a check where its best residual has improved by less than
            ``factor`` (> 1) over the last ``window`` (≥ 1) iterations, so that the budget is not burned on a sample
            that cannot converge (a residual floor, e.g. bf16 arithmetic). Per sample, decided on the device at the
            checks. ``(30, 1.3)`` is TorchDEQ's Broyden rule (the last 30 residuals within 1.3×) on the best
            residual, without its condition r < 3·tol. The forward solve only. The window counts f-evaluations:
            ``solver="ode"`` spends dozens on its first short steps (measured: best residual < 1.3× lower after 30
            evaluations at tol 1e-6, after 60 at 1e-8), so give it a window of ≥ 100 below tol 1e-4.
        execution: how the forward solve runs. ``"eager"`` (default): adaptive stopping, the loop ends when every
            sample has stopped (one host read per check). ``"compiled"``: the whole budget (``max_iter + 1``
            f-evaluations) with no host read, under ``torch.compile`` (``fullgraph``; compiled once per shape, dtype
            and setting; inside a caller's ``torch.compile`` it is traced into the caller's graph without a break).
            ``"graph"``: the same fixed-budget loop captured in a CUDA graph once per input signature and replayed
            (CUDA only; :mod:`implicit.cuda_graph` lists what it captures). Both return the same per-sample
            :class:`~implicit.SolverResult` as eager mode (samples still stop at tol, frozen on the device; only
            ``nfe`` and the trace show the full budget) and work with every backward mode (``"graph"`` not with
            ``"unrolled"``, whose gradient needs the iterations' autograd graph); the backward linear solve stays
            eager. ``backward="shine"`` then reuses the quasi-Newton estimate after the whole budget, not the one at
            an adaptive stop. Use them when the budget is known (inference at a fixed budget, training at the budget
            the model needs); needs a ``capturable`` solver (fixed_point, anderson, broyden).
    Backward:
        backward: ``"implicit"`` (exact implicit-function-theorem gradient), ``"phantom"`` (damped phantom gradient,
            unrolled or Neumann), ``"one_step"`` (Jacobian-free backprop), ``"shine"`` (forward quasi-Newton inverse
            reused; needs a solver that provides one: ``"broyden"``, ``"adjoint_broyden"``) or ``"unrolled"``
            (autograd through the iterations; reference; needs a solver with differentiable steps).
        backward_options: the mode's own options (phantom: ``steps``, ``tau``, ``variant``; shine: ``fallback``,
            ``fallback_ratio``, ``refine``, ``refine_estimate``).
        backward_solver, backward_solver_options, backward_tol, backward_max_iter, backward_stop_mode: the linear
            solve ``u = v + u J`` (``"implicit"``, SHINE's refinement and exact fallback); ``backward_solver`` may
            also be ``"gmres"`` (option ``restart``), not a solver that differentiates its map (adjoint Broyden).
    Training signals:
        correction: sparse fixed-point correction: the number of supervised states, or the solver steps to
            supervise; a layer in training mode then returns a list of states (the last is the returned state with
            the chosen backward mode, the others each carry a ``correction_steps``-step phantom gradient). In
            ``eval()`` mode the layer returns z* alone and records no trajectory (:attr:`without_correction`, as
            DEQ-Flow and TorchDEQ do at inference); :func:`implicit.equilibrium` always returns the list. Needs a
            solver that records its trajectory (not ``"ode"``).
        correction_steps, correction_tau: the phantom gradient of the intermediate states.
        jac_loss_probes: Hutchinson probes of the Jacobian regulariser ``‖∂f/∂z‖_F²/N`` at z* (0: off); the
            estimate is ``info.jac_loss``.
        jac_loss_prob: probability of computing it on a given call.
        jac_loss_probe: ``"gaussian"`` or ``"rademacher"`` probes.
    Policies:
        nonfinite_input: non-finite values in the injection or z0: ``"raise"``, ``"warn"`` or ``"ignore"``.
        on_divergence: a forward or backward solve with diverged samples: ``"warn"``, ``"raise"`` or ``"ignore"``
            (diverged samples are always reported in the info).
        return_info: forward returns ``(z, info)`` instead of ``z``.

    Built once by validation and reused by every call: :attr:`forward_solve`, :attr:`backward_solve` (configured
    solvers with their :class:`~implicit.solvers.Loop`), :attr:`backward_mode`, :attr:`supervised_steps`,
    :attr:`correction_mode` and :attr:`jacobian_regularizer`; :attr:`without_correction` on first use.
    """

    solver: str = "anderson"
    solver_options: Mapping[str, Any] = field(default_factory=dict)
    tol: float = 1e-4
    max_iter: int = 50
    stop_mode: str = "rel"
    check_every: int = 4
    stagnation: tuple[int, float] | None = None
    execution: str = "eager"
    backward: str = "implicit"
    backward_options: Mapping[str, Any] = field(default_factory=dict)
    backward_solver: str = "anderson"
    backward_solver_options: Mapping[str, Any] = field(default_factory=dict)
    backward_tol: float = 1e-6
    backward_max_iter: int = 50
    backward_stop_mode: str = "rel"
    correction: int | tuple[int, ...] | None = None
    correction_steps: int = 1
    correction_tau: float = 1.0
    jac_loss_probes: int = 0
    jac_loss_prob: float = 1.0
    jac_loss_probe: str = "gaussian"
    nonfinite_input: str = "raise"
    on_divergence: str = "warn"
    return_info: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "solver_options", FrozenMapping(self.solver_options))
        object.__setattr__(self, "backward_solver_options", FrozenMapping(self.backward_solver_options))
        object.__setattr__(self, "backward_options", FrozenMapping(self.backward_options))
        correction = self.correction
        if correction is not None and not (isinstance(correction, int) and not isinstance(correction, bool)):
            if not isinstance(correction, Iterable) or isinstance(correction, (str, bytes)):
                raise ValueError(
                    f"option correction must be a number of states or a sequence of solver steps, got {correction!r}"
                )
            object.__setattr__(self, "correction", tuple(correction))
        object.__setattr__(self, "stagnation", check_stagnation(self.stagnation))
        _validate(self)

    # ------------------------------------------------------------------ built once, by validation
    @cached_property
    def backward_mode(self) -> BackwardMode:
        """The configured backward mode."""
        return _build(BACKWARD_MODES, self.backward, self.backward_options, option="backward")

    @cached_property
    def forward_solve(self) -> Solve:
        """The configured forward solver and its loop."""
        mode = self.backward_mode
        rules: list[SolverRule] = [forward_rule, capability_rule(mode.requires, f"backward={self.backward!r}")]
        if self.correction is not None:
            rules.append(capability_rule(("records_trajectory",), "correction"))
        if self.execution != "eager":
            rules.append(capability_rule(("capturable",), f"execution={self.execution!r}"))
        solver = _build(SOLVERS, self.solver, self.solver_options, option="solver", rule=all_rules(*rules))
        loop = Loop(
            self.tol,
            self.max_iter,
            self.stop_mode,
            self.check_every,
            stagnation=self.stagnation,
            execution=self.execution,
        )
        return Solve(solver, loop)

    @cached_property
    def backward_solve(self) -> Solve:
        """The configured solver of the backward system ``u = v + u J`` and its loop."""
        solver = _build(
            SOLVERS, self.backward_solver, self.backward_solver_options, option="backward_solver", rule=backward_rule
        )
        return Solve(solver, Loop(self.backward_tol, self.backward_max_iter, self.backward_stop_mode, self.check_every))

    @cached_property
    def supervised_steps(self) -> tuple[int, ...] | None:
        """The solver steps whose states sparse fixed-point correction supervises (``None`` without correction)."""
        return None if self.correction is None else tuple(correction_positions(self.correction, self.max_iter))

    @cached_property
    def correction_mode(self) -> BackwardMode:
        """The gradient of the intermediate supervised states: a ``correction_steps``-step phantom gradient, or the
        backward mode itself when it differentiates the iterations."""
        if self.backward_mode.differentiates_iterations:
            return self.backward_mode
        return Phantom(steps=self.correction_steps, tau=self.correction_tau, variant="unrolled")

    @cached_property
    def jacobian_regularizer(self) -> JacobianRegularizer | None:
        """The Jacobian regulariser (``jac_loss_probes`` probes of kind ``jac_loss_probe``), ``None`` when off."""
        return JacobianRegularizer(self.jac_loss_probes, self.jac_loss_probe) if self.jac_loss_probes else None

    @cached_property
    def without_correction(self) -> ImplicitOptions:
        """These options with ``correction=None`` (``self`` when it is already off): what a layer in ``eval()`` mode
        solves with. Validated once, on first use, and kept."""
        return self if self.correction is None else dataclasses.replace(self, correction=None)

    # ------------------------------------------------------------------ derived views
    def replace(self, **changes: Any) -> ImplicitOptions:
        """A copy with ``changes`` applied and validated (unknown names raise ``TypeError``)."""
        return resolve_options(self, changes)

    def solver_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of the forward solve for :func:`implicit.solvers.solve`."""
        return _solve_kwargs(self.solver, self.solver_options, self.forward_solve.loop)

    def backward_solver_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of the backward linear solve for :func:`implicit.solvers.solve`."""
        return _solve_kwargs(self.backward_solver, self.backward_solver_options, self.backward_solve.loop)


OPTION_NAMES = tuple(f.name for f in dataclasses.fields(ImplicitOptions))
_LOOP_OPTIONS = ("tol", "max_iter", "stop_mode", "check_every", "stagnation", "execution")


def _solve_kwargs(solver: str, options: Mapping[str, Any], loop: Loop) -> dict[str, Any]:
    return {"solver": solver, "solver_options": dict(options), **{k: getattr(loop, k) for k in _LOOP_OPTIONS}}


def resolve_options(base: ImplicitOptions | None, changes: Mapping[str, Any]) -> ImplicitOptions:
    """``base`` (or the defaults) updated with ``changes``; ``base`` itself when there are none. Raises ``TypeError``
    for unknown names, naming the closest valid one and listing all."""
    if not changes and base is not None:
        return base
    unknown = [name for name in changes if name not in OPTION_NAMES]
    if unknown:
        hints = ", ".join(f"{name!r}{did_you_mean(name, OPTION_NAMES)}" for name in unknown)
        raise TypeError(f"unknown option(s) {hints}; valid options: {', '.join(OPTION_NAMES)}")
    if base is None:
        return ImplicitOptions(**changes)
    return dataclasses.replace(base, **changes)


def _build(
    registry: Registry[Any], name: str, options: Mapping[str, Any], *, option: str, rule: Rule | None = None
) -> Any:
    """The component ``name`` of ``registry``, valid in the place ``rule`` describes, configured with ``options``."""
    role = {"solver": "forward solver", "backward_solver": "backward solver"}.get(option)
    cls: type[Configurable] = registry.lookup(name, option=option, role=role, rule=rule)
    cls.check_options(options, context=f"{option}_options" if option != "backward" else "backward_options")
    return cls(**options)  # value checks live in the component's constructor


def check_number(name: str, value: Any, *, minimum: float, integer: bool = False) -> None:
    """Raise ``ValueError`` unless the option ``name`` is a finite number (an integer with ``integer``) ≥ minimum."""
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or not math.isfinite(value) or value < minimum:
        what = "an integer" if integer else "a finite number"
        raise ValueError(f"option {name} must be {what} ≥ {minimum}, got {value!r}")


def check_flag(name: str, value: Any) -> None:
    """Raise ``ValueError`` unless the option ``name`` is a bool."""
    if not isinstance(value, bool):
        raise ValueError(f"option {name} must be a bool, got {value!r}")


def _validate(o: ImplicitOptions) -> None:
    for prefix in ("", "backward_"):
        check_number(f"{prefix}tol", getattr(o, f"{prefix}tol"), minimum=0.0)
        check_number(f"{prefix}max_iter", getattr(o, f"{prefix}max_iter"), minimum=1, integer=True)
        check_choice(f"option {prefix}stop_mode", getattr(o, f"{prefix}stop_mode"), STOP_MODES)
    check_number("check_every", o.check_every, minimum=1, integer=True)
    check_number("correction_steps", o.correction_steps, minimum=1, integer=True)
    if not (isinstance(o.correction_tau, (int, float)) and 0 < o.correction_tau <= 1):
        raise ValueError(f"option correction_tau must be in (0, 1], got {o.correction_tau!r}")
    check_number("jac_loss_probes", o.jac_loss_probes, minimum=0, integer=True)
    if not (isinstance(o.jac_loss_prob, (int, float)) and 0 <= o.jac_loss_prob <= 1):
        raise ValueError(f"option jac_loss_prob must be in [0, 1], got {o.jac_loss_prob!r}")
    check_choice("option jac_loss_probe", o.jac_loss_probe, PROBES)
    check_choice("option nonfinite_input", o.nonfinite_input, NONFINITE_POLICIES)
    check_choice("option on_divergence", o.on_divergence, DIVERGENCE_POLICIES)
    check_choice("option execution", o.execution, EXECUTIONS)
    check_flag("return_info", o.return_info)
    # Build the components once: lookups, option names and values, and the solver × mode × correction rules.
    for built in (
        "backward_mode",
        "forward_solve",
        "backward_solve",
        "supervised_steps",
        "correction_mode",
        "jacobian_regularizer",
    ):
        getattr(o, built)
    if o.execution == "graph" and o.backward_mode.differentiates_iterations:
        raise ValueError(
            f"execution='graph' replays a captured solve without an autograd graph; backward={o.backward!r} "
            "differentiates the iterations: use execution='compiled' or 'eager'"
        )


__all__ = ["OPTION_NAMES", "FrozenMapping", "ImplicitOptions", "check_flag", "check_number", "resolve_options"]
