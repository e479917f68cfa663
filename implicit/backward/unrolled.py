"""Reference gradients: plain autograd through the solver iterations (backpropagation through the unrolled solve)."""

from __future__ import annotations

import torch
from torch import Tensor

from ..problem import Problem
from ..regularization import JacobianRegularizer
from ..result import ImplicitInfo, SolverResult
from .base import BackwardMode


class Unrolled(BackwardMode):
    """Backpropagate through every forward iteration (including Anderson's mixing or Broyden's updates).

    Memory grows linearly with the iterations; meant as a reference for checking the other modes. Gradients reach a
    ``z0`` that requires grad through the iterations (``∏ ∂z_{k+1}/∂z_k``, which vanishes as the solve converges).
    Needs a solver whose steps autograd can differentiate.
    """

    name = "unrolled"
    exact = True
    requires = ("differentiable_steps",)
    differentiates_iterations = True

    def __init__(self) -> None:
        pass

    @property
    def tracks_one_call(self) -> bool:
        return False  # no tracked computation: the iterations' graph is the gradient

    def attach(
        self,
        problem: Problem,
        result: SolverResult,
        info: ImplicitInfo,
        z: Tensor | None = None,
        *,
        regularizer: JacobianRegularizer | None = None,
    ) -> Tensor:
        state = result.z if z is None else z  # the iterations' graph is the gradient; no tracked call to share
        if state.requires_grad or not torch.is_grad_enabled():
            return state
        # No step led to the returned point (a start already within tolerance, every sample diverged at its first
        # evaluation, an empty batch): its derivative is z0's, zero for x and the parameters. Keep the output
        # connected to them so that backward runs: a call f(z) that contributes to the gradient only, with weight 0
        # (NaN where f is not finite, as in the other modes).
        out = problem.fn(state)
        info.tracked_nfe += 1
        return torch.where(torch.zeros((), dtype=torch.bool, device=state.device), out, state)
