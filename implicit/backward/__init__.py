"""Backward modes, looked up by the ``backward=`` option.

Adding a mode: subclass :class:`~implicit.backward.base.BackwardMode` and add it to :data:`BACKWARD_MODES`.
"""

from __future__ import annotations

from .base import BackwardMode, DivergenceError, Problem
from .implicit import Implicit
from .unrolled import Unrolled

BACKWARD_MODES: dict[str, type[BackwardMode]] = {cls.name: cls for cls in (Implicit, Unrolled)}

__all__ = ["BACKWARD_MODES", "BackwardMode", "DivergenceError", "Implicit", "Problem", "Unrolled"]
