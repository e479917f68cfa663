"""Fixed-point solvers, looked up by name.

Adding a solver: subclass :class:`~implicit.solvers.base.Solver` (options as keyword-only ``__init__`` arguments,
``start`` and ``step``) and add it to :data:`SOLVERS`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor

from ..configurable import lookup
from ..result import SolverResult
from .adjoint_broyden import AdjointBroyden
from .anderson import Anderson
from .base import STOP_MODES, FlatMap, Solver, iterate
from .broyden import Broyden
from .fixed_point import FixedPoint
from .gmres import GMRES
from .ode import ODE

SOLVERS: dict[str, type[Solver]] = {
    cls.name: cls for cls in (FixedPoint, Anderson, Broyden, AdjointBroyden, ODE, GMRES)
}


def get_solver_class(name: str) -> type[Solver]:
    """The solver class registered under ``name``; ``ValueError`` listing the valid names otherwise."""
    return lookup(SOLVERS, name, "solver")


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
    differentiable: bool = False,
    record_at: Sequence[int] = (),
    initial_active: Tensor | None = None,
    state: dict[str, Any] | None = None,
) -> SolverResult:
    """Solve ``z = fn(z)`` for a flat batched map ``fn: (B, N) -> (B, N)`` from ``z0``; see :func:`iterate` for the
    loop contract and the arguments. ``solver_options`` are the chosen solver's own options."""
    cls = get_solver_class(solver)
    options = dict(solver_options or {})
    cls.check_options(options, context="solver_options")
    return cls(**options).run(
        fn,
        z0,
        tol=tol,
        max_iter=max_iter,
        stop_mode=stop_mode,
        check_every=check_every,
        differentiable=differentiable,
        record_at=record_at,
        initial_active=initial_active,
        state=state,
    )


__all__ = [
    "GMRES",
    "ODE",
    "SOLVERS",
    "STOP_MODES",
    "AdjointBroyden",
    "Anderson",
    "Broyden",
    "FixedPoint",
    "Solver",
    "get_solver_class",
    "iterate",
    "solve",
]
