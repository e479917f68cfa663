"""The options of an implicit layer, validated and normalised in one place.

Every public entry point (``make_implicit``, per-call overrides, :func:`implicit.equilibrium`) goes through
:func:`resolve_options`, so an unknown or misspelled name, a bad value or a solver option the chosen solver does not
take raises before anything runs. The caller's dictionaries are copied, never mutated.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from .correction import correction_positions
from .regularization import PROBES
from .solvers import STOP_MODES, get_solver_class

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


def _frozen(mapping: Mapping[str, Any] | None) -> Mapping[str, Any]:
    return FrozenMapping(mapping)


@dataclass(frozen=True)
class ImplicitOptions:
    """Options of an implicit layer (all keyword-only at the call sites).

    Forward solve:
        solver: ``"fixed_point"``, ``"anderson"``, ``"broyden"``, ``"adjoint_broyden"`` or ``"ode"``.
        solver_options: the solver's own options (fixed_point: ``tau``; anderson: ``m``, ``beta``, ``lam``;
            broyden: ``memory``; adjoint_broyden: ``memory``, ``opa_every``; ode: ``method``, ``rtol``, ``atol``,
            ``t_max``, ``step_size``).
        tol, stop_mode: stop a sample when its residual ≤ tol; ``"rel"``: ‖f(z) − z‖/‖f(z)‖, ``"abs"``:
            ‖f(z) − z‖/√N (root mean square per element, independent of the state size).
        max_iter: solver steps at most (f-evaluations ≤ max_iter + 1).
        check_every: iterations between residual checks (and host reads).
    Backward:
        backward: ``"implicit"`` (exact implicit-function-theorem gradient), ``"phantom"`` (damped phantom gradient,
            unrolled or Neumann), ``"one_step"`` (Jacobian-free backprop), ``"shine"`` (forward Broyden inverse
            reused; needs ``solver="broyden"`` or ``"adjoint_broyden"``) or ``"unrolled"`` (autograd through the
            iterations; reference).
        backward_options: the mode's own options (phantom: ``steps``, ``tau``, ``variant``; shine: ``fallback``,
            ``fallback_ratio``, ``refine``, ``refine_estimate``).
        backward_solver, backward_solver_options, backward_tol, backward_max_iter, backward_stop_mode: the linear
            solve ``u = v + u J`` (``"implicit"``, SHINE's refinement and exact fallback); ``backward_solver`` may
            also be ``"gmres"`` (option ``restart``).
    Training signals:
        correction: sparse fixed-point correction: the number of supervised states, or the solver steps to
            supervise; the layer then returns a list of states (the last is the returned state with the chosen
            backward mode, the others each carry a ``correction_steps``-step phantom gradient).
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
    """

    solver: str = "anderson"
    solver_options: Mapping[str, Any] = field(default_factory=dict)
    tol: float = 1e-4
    max_iter: int = 50
    stop_mode: str = "rel"
    check_every: int = 4
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
        object.__setattr__(self, "solver_options", _frozen(self.solver_options))
        object.__setattr__(self, "backward_solver_options", _frozen(self.backward_solver_options))
        object.__setattr__(self, "backward_options", _frozen(self.backward_options))
        correction = self.correction
        if correction is not None and not (isinstance(correction, int) and not isinstance(correction, bool)):
            if not isinstance(correction, Iterable) or isinstance(correction, (str, bytes)):
                raise ValueError(
                    f"option correction must be a number of states or a sequence of solver steps, got {correction!r}"
                )
            object.__setattr__(self, "correction", tuple(correction))
        _validate(self)

    def replace(self, **changes: Any) -> ImplicitOptions:
        """A copy with ``changes`` applied and validated (unknown names raise ``TypeError``)."""
        return resolve_options(self, changes)

    def solver_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of the forward solve for :func:`implicit.solvers.solve`."""
        return {
            "solver": self.solver,
            "solver_options": dict(self.solver_options),
            "tol": self.tol,
            "max_iter": self.max_iter,
            "stop_mode": self.stop_mode,
            "check_every": self.check_every,
        }

    def backward_solver_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of the backward linear solve for :func:`implicit.solvers.solve`."""
        return {
            "solver": self.backward_solver,
            "solver_options": dict(self.backward_solver_options),
            "tol": self.backward_tol,
            "max_iter": self.backward_max_iter,
            "stop_mode": self.backward_stop_mode,
            "check_every": self.check_every,
        }


OPTION_NAMES = tuple(f.name for f in dataclasses.fields(ImplicitOptions))


def resolve_options(base: ImplicitOptions | None, changes: Mapping[str, Any]) -> ImplicitOptions:
    """``base`` (or the defaults) updated with ``changes``; raises ``TypeError`` for unknown names, naming the closest
    valid one and listing all."""
    unknown = [name for name in changes if name not in OPTION_NAMES]
    if unknown:
        hints = []
        for name in unknown:
            close = difflib.get_close_matches(name, OPTION_NAMES, n=1)
            hints.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise TypeError(f"unknown option(s) {', '.join(hints)}; valid options: {', '.join(OPTION_NAMES)}")
    if base is None:
        return ImplicitOptions(**changes)
    return dataclasses.replace(base, **changes)


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"option {name}={value!r} is not one of {', '.join(map(repr, choices))}")


def _check_number(name: str, value: Any, *, minimum: float, integer: bool = False) -> None:
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or not math.isfinite(value) or value < minimum:
        what = "an integer" if integer else "a finite number"
        raise ValueError(f"option {name} must be {what} ≥ {minimum}, got {value!r}")


def _validate(o: ImplicitOptions) -> None:
    from .backward import get_backward_class  # late import: backward modes use the options type

    for prefix in ("", "backward_"):
        solver = getattr(o, f"{prefix}solver")
        cls = get_solver_class(solver)
        if cls.linear_only and not prefix:
            raise ValueError(f"solver {solver!r} solves linear systems only; use it as backward_solver")
        if cls.forward_only and prefix:
            raise ValueError(f"solver {solver!r} differentiates f itself and cannot solve the backward system")
        cls.check_options(dict(getattr(o, f"{prefix}solver_options")), context=f"{prefix}solver_options")
        cls(**getattr(o, f"{prefix}solver_options"))  # value checks live in the solver's constructor
        _check_number(f"{prefix}tol", getattr(o, f"{prefix}tol"), minimum=0.0)
        _check_number(f"{prefix}max_iter", getattr(o, f"{prefix}max_iter"), minimum=1, integer=True)
        _check_choice(f"{prefix}stop_mode", getattr(o, f"{prefix}stop_mode"), STOP_MODES)
    _check_number("check_every", o.check_every, minimum=1, integer=True)
    mode = get_backward_class(o.backward)
    mode.check_options(dict(o.backward_options), context="backward_options")
    mode(**o.backward_options)
    if o.backward == "shine" and o.solver not in ("broyden", "adjoint_broyden"):
        raise ValueError(
            f"backward='shine' reuses the forward Broyden factors: needs solver='broyden' or 'adjoint_broyden', "
            f"not {o.solver!r}"
        )
    if o.correction is not None:
        correction_positions(o.correction, o.max_iter)
    _check_number("correction_steps", o.correction_steps, minimum=1, integer=True)
    if not 0 < o.correction_tau <= 1:
        raise ValueError(f"option correction_tau must be in (0, 1], got {o.correction_tau!r}")
    _check_number("jac_loss_probes", o.jac_loss_probes, minimum=0, integer=True)
    if not 0 <= o.jac_loss_prob <= 1:
        raise ValueError(f"option jac_loss_prob must be in [0, 1], got {o.jac_loss_prob!r}")
    _check_choice("jac_loss_probe", o.jac_loss_probe, PROBES)
    _check_choice("nonfinite_input", o.nonfinite_input, NONFINITE_POLICIES)
    _check_choice("on_divergence", o.on_divergence, DIVERGENCE_POLICIES)
    if not isinstance(o.return_info, bool):
        raise ValueError(f"option return_info must be a bool, got {o.return_info!r}")
