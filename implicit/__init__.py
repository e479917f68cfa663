"""torch-implicit: deep equilibrium layers from any weight-tied PyTorch block.

``make_implicit(block_or_class, **options)`` returns an ``nn.Module`` whose forward solves ``z* = f(z*, x)`` for a
block satisfying :class:`Block`; :func:`equilibrium` is the functional form. Solvers live in
:mod:`implicit.solvers` (registry :data:`SOLVERS`), backward modes in :mod:`implicit.backward` (registry
:data:`BACKWARD_MODES`), options in :class:`ImplicitOptions`.
"""

from .backward import BACKWARD_MODES
from .block import Block
from .lowrank import LowRankInverse
from .module import ImplicitMixin, ImplicitModule, equilibrium, make_implicit
from .options import ImplicitOptions
from .problem import DivergenceError
from .result import ImplicitInfo, SolverResult
from .solvers import SOLVERS, solve

__all__ = [
    "BACKWARD_MODES",
    "SOLVERS",
    "Block",
    "DivergenceError",
    "ImplicitInfo",
    "ImplicitMixin",
    "ImplicitModule",
    "ImplicitOptions",
    "LowRankInverse",
    "SolverResult",
    "equilibrium",
    "make_implicit",
    "solve",
]
__version__ = "0.1.0"
