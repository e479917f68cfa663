"""torch-implicit: deep equilibrium layers from any weight-tied PyTorch block.

``make_implicit(block_or_class, **options)`` returns an ``nn.Module`` whose forward solves ``z* = f(z*, x)``;
:func:`equilibrium` is the functional form. Solvers live in :mod:`implicit.solvers`, backward modes in
:mod:`implicit.backward`, options in :class:`ImplicitOptions`.
"""

from .backward import BACKWARD_MODES, DivergenceError
from .module import ImplicitMixin, ImplicitModule, equilibrium, make_implicit
from .options import ImplicitOptions
from .result import ImplicitInfo, SolverResult
from .solvers import SOLVERS, solve

__all__ = [
    "BACKWARD_MODES",
    "SOLVERS",
    "DivergenceError",
    "ImplicitInfo",
    "ImplicitMixin",
    "ImplicitModule",
    "ImplicitOptions",
    "SolverResult",
    "equilibrium",
    "make_implicit",
    "solve",
]
__version__ = "0.1.0"
