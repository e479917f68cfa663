"""Backward modes (gradient estimators), looked up by the ``backward=`` option; their own options go in
``backward_options``.

Adding a mode: subclass :class:`~implicit.backward.base.BackwardMode` (options as keyword-only ``__init__``
arguments, an ``adjoint`` rule and, if needed, a ``track`` method) and add it to :data:`BACKWARD_MODES`.
"""

from __future__ import annotations

from ..configurable import lookup
from .base import BackwardMode, DivergenceError, Problem, Tracked
from .implicit import Implicit
from .one_step import OneStep
from .phantom import Phantom
from .shine import Shine
from .unrolled import Unrolled

BACKWARD_MODES: dict[str, type[BackwardMode]] = {cls.name: cls for cls in (Implicit, Phantom, OneStep, Shine, Unrolled)}


def get_backward_class(name: str) -> type[BackwardMode]:
    """The backward mode registered under ``name``; ``ValueError`` listing the valid names otherwise."""
    return lookup(BACKWARD_MODES, name, "backward mode")


__all__ = [
    "BACKWARD_MODES",
    "BackwardMode",
    "DivergenceError",
    "Implicit",
    "OneStep",
    "Phantom",
    "Problem",
    "Shine",
    "Tracked",
    "Unrolled",
    "get_backward_class",
]
