"""Reference gradients: plain autograd through the solver iterations (algorithms.md §2.2)."""

from __future__ import annotations

import torch
from torch import Tensor

from ..result import ImplicitInfo
from .base import BackwardMode, Problem


class Unrolled(BackwardMode):
    """Backpropagate through every forward iteration (including Anderson's mixing or Broyden's updates).

    Memory grows linearly with the iterations; meant as a reference for checking the other modes. Gradients reach a
    ``z0`` that requires grad through the iterations (``∏ ∂z_{k+1}/∂z_k``, which vanishes as the solve converges).
    """

    name = "unrolled"

    def run(self, problem: Problem) -> tuple[Tensor, ImplicitInfo]:
        result = problem.solve_forward(differentiable=torch.is_grad_enabled())
        return result.z, ImplicitInfo(forward=result, backward_mode=self.name)
