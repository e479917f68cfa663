"""One equilibrium problem in flat form, as the backward modes see it, and the divergence policy of finished solves."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Protocol

from torch import Tensor

from .pytree import StateLayout
from .result import SolverResult
from .solvers import Solve
from .types import FlatMap


class DivergenceError(RuntimeError):
    """A solve stopped samples on a non-finite or exploding residual and the policy is ``on_divergence="raise"``."""


class GradientSettings(Protocol):
    """What a backward mode reads from the layer's options (:class:`~implicit.ImplicitOptions` provides it)."""

    @property
    def backward_solve(self) -> Solve:
        """The configured solver and loop of the backward linear system ``u = v + u J``."""
        ...

    @property
    def on_divergence(self) -> str:
        """The policy for diverged samples: ``"warn"``, ``"raise"`` or ``"ignore"``."""
        ...


@dataclass
class Problem:
    """One equilibrium problem in flat form.

    Attributes:
        fn: the flat map ``(B, N) -> (B, N)``, the block applied to the unflattened state with the injection bound.
            Calling it under grad mode records a graph to everything the block uses (parameters, injection, closures).
        z0: ``(B, N)`` initial point (may require grad).
        options: the call's validated options (what the gradient needs of them: :class:`GradientSettings`).
        layout: the state's layout (structure, leaf shapes and dtypes).
    """

    fn: FlatMap
    z0: Tensor
    options: GradientSettings
    layout: StateLayout


def report_divergence(result: SolverResult, which: str, policy: str) -> None:
    """Apply the ``on_divergence`` policy to a finished solve (one host read)."""
    if policy == "ignore" or not bool(result.diverged.any()):
        return
    message = f"{which} solve: {result.status}; diverged samples keep their last finite best iterate"
    if policy == "raise":
        raise DivergenceError(message)
    warnings.warn(message, RuntimeWarning, stacklevel=4)
