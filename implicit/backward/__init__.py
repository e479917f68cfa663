"""Backward modes (gradient estimators), looked up by the ``backward=`` option in :data:`BACKWARD_MODES`; their own
options go in ``backward_options``.

Adding a mode: one module with a :class:`~implicit.backward.base.BackwardMode` subclass (options as keyword-only
``__init__`` arguments, an ``adjoint`` rule, if needed a ``track`` method, and the attributes that say what it is)
and its registration in :data:`BACKWARD_MODES`; see CONTRIBUTING.md.
"""

from __future__ import annotations

from ..problem import DivergenceError, Problem
from ..registry import Registry
from .base import AttachGradient, BackwardMode, Tracked
from .implicit import Implicit
from .one_step import OneStep
from .phantom import Phantom
from .shine import Shine
from .unrolled import Unrolled

BACKWARD_MODES: Registry[BackwardMode] = Registry("backward mode", (Implicit, Phantom, OneStep, Shine, Unrolled))


def get_backward_class(name: str) -> type[BackwardMode]:
    """The backward mode registered under ``name``; ``ValueError`` naming the closest valid name otherwise."""
    return BACKWARD_MODES.lookup(name)


__all__ = [
    "BACKWARD_MODES",
    "AttachGradient",
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
