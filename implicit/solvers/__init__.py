"""Fixed-point solvers, looked up by name in :data:`SOLVERS`.

Adding a solver: one module with a :class:`~implicit.solvers.base.Solver` subclass (options as keyword-only
``__init__`` arguments, ``start`` and ``step``, the capability attributes it differs in) and its registration in
:data:`SOLVERS`; see CONTRIBUTING.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor

from ..registry import Registry
from ..result import SolverResult
from ..types import FlatMap
from .adjoint_broyden import AdjointBroyden
from .anderson import Anderson
from .base import (
    CAPABILITIES,
    EXECUTIONS,
    STOP_MODES,
    Loop,
    Solve,
    Solver,
    SolverRule,
    all_rules,
    backward_rule,
    capability_rule,
    compiled_iterate,
    forward_rule,
    iterate,
)
from .broyden import Broyden
from .fixed_point import FixedPoint
from .gmres import GMRES
from .ode import ODE

SOLVERS: Registry[Solver] = Registry("solver", (FixedPoint, Anderson, Broyden, AdjointBroyden, ODE, GMRES))


def get_solver_class(name: str) -> type[Solver]:
    """The solver class registered under ``name``; ``ValueError`` naming the closest valid name otherwise."""
    return SOLVERS.lookup(name)


def solve(
    fn: FlatMap,
    z0: Tensor,
    *,
    solver: str = "anderson",
    solver_options: dict[str, Any] | None = None,
    tol: float = 1e-4,
    max_iter: int = 50,
    stop_mode: str = "rel",
    check_every: int = 4,
    stagnation: tuple[int, float] | None = None,
    execution: str = "eager",
    differentiable: bool = False,
    record_at: Sequence[int] = (),
    initial_active: Tensor | None = None,
    state: dict[str, Any] | None = None,
) -> SolverResult:
    """Solve ``z = fn(z)`` for a flat batched map ``fn: (B, N) -> (B, N)`` from ``z0``; the keyword arguments after
    ``solver_options`` (the chosen solver's own options) are the :class:`Loop` settings. ``execution`` is
    ``"eager"`` or ``"compiled"``; ``"graph"`` needs the map's inputs to capture and is an option of the layers
    (:class:`~implicit.ImplicitOptions`)."""
    if execution == "graph":
        raise ValueError(
            "execution='graph' captures the layer's inputs in static buffers: use it through make_implicit or "
            "equilibrium (solve takes 'eager' or 'compiled')"
        )
    cls = SOLVERS.lookup(solver, option="solver")
    options = dict(solver_options or {})
    cls.check_options(options, context="solver_options")
    loop = Loop(
        tol=tol,
        max_iter=max_iter,
        stop_mode=stop_mode,
        check_every=check_every,
        stagnation=stagnation,
        execution=execution,
        differentiable=differentiable,
        record_at=record_at,
        initial_active=initial_active,
        state=state,
    )
    cls.check_loop(loop)
    return cls(**options).run(fn, z0, loop)


__all__ = [
    "CAPABILITIES",
    "EXECUTIONS",
    "GMRES",
    "ODE",
    "SOLVERS",
    "STOP_MODES",
    "AdjointBroyden",
    "Anderson",
    "Broyden",
    "FixedPoint",
    "Loop",
    "Solve",
    "Solver",
    "SolverRule",
    "all_rules",
    "backward_rule",
    "capability_rule",
    "compiled_iterate",
    "forward_rule",
    "get_solver_class",
    "iterate",
    "solve",
]
