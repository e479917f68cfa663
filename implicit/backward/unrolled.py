"""Reference gradients: plain autograd through the solver iterations (algorithms.md §2.2)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..result import ImplicitInfo, SolverResult
from .base import BackwardMode, Problem


class Unrolled(BackwardMode):
    """Backpropagate through every forward iteration (including Anderson's mixing or Broyden's updates).

    Memory grows linearly with the iterations; meant as a reference for checking the other modes. Gradients reach a
    ``z0`` that requires grad through the iterations (``∏ ∂z_{k+1}/∂z_k``, which vanishes as the solve converges).
    """

    name = "unrolled"

    def __init__(self) -> None:
        pass

    def solve_forward(self, problem: Problem, record_at: Sequence[int] = ()) -> SolverResult:
        return problem.solve_forward(differentiable=torch.is_grad_enabled(), record_at=record_at)

    def attach(self, problem: Problem, result: SolverResult, info: ImplicitInfo, z: Tensor | None = None) -> Tensor:
        return result.z if z is None else z  # the iterations' graph is the gradient
