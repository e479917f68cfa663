"""What a backward mode receives, and the interface every mode implements."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from ..options import ImplicitOptions
from ..pytree import StateLayout
from ..result import ImplicitInfo, SolverResult
from ..solvers import FlatMap, solve


class DivergenceError(RuntimeError):
    """A solve stopped samples on a non-finite or exploding residual and the policy is ``on_divergence="raise"``."""


@dataclass
class Problem:
    """One equilibrium problem in flat form.

    Attributes:
        fn: the flat map ``(B, N) -> (B, N)``, the block applied to the unflattened state with the injection bound.
            Calling it under grad mode records a graph to everything the block uses (parameters, injection, closures).
        z0: ``(B, N)`` initial point (may require grad).
        options: the validated options of this call.
        layout: the state's layout (structure, leaf shapes and dtypes).
    """

    fn: FlatMap
    z0: Tensor
    options: ImplicitOptions
    layout: StateLayout

    def solve_forward(self, *, differentiable: bool = False) -> SolverResult:
        z0 = self.z0 if differentiable else self.z0.detach()
        result = solve(self.fn, z0, differentiable=differentiable, **self.options.solver_kwargs())
        report_divergence(result, "forward", self.options.on_divergence)
        return result


def report_divergence(result: SolverResult, which: str, policy: str) -> None:
    """Apply the ``on_divergence`` policy to a finished solve (one host read)."""
    if policy == "ignore" or not bool(result.diverged.any()):
        return
    message = f"{which} solve: {result.status}; diverged samples keep their last finite best iterate"
    if policy == "raise":
        raise DivergenceError(message)
    warnings.warn(message, RuntimeWarning, stacklevel=4)


class BackwardMode:
    """A way to differentiate through the equilibrium. ``run`` solves the forward problem and returns the flat
    state ``(B, N)`` with this mode's gradient attached (when autograd needs one) and the call's info."""

    name: ClassVar[str] = ""

    def run(self, problem: Problem) -> tuple[Tensor, ImplicitInfo]:
        raise NotImplementedError
