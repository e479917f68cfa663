"""Phantom gradients (Geng et al., "On Training Implicit Models", NeurIPS 2021, eqs. 5–7)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ..problem import Problem
from ..registry import check_choice
from ..result import ImplicitInfo, SolverResult
from .base import BackwardMode, Tracked

VARIANTS = ("unrolled", "neumann")


class Phantom(BackwardMode):
    """Phantom gradient with damping τ and k steps, ``B = (1 − τ) I + τ J``.

    * ``variant="unrolled"`` (UPG): autograd through k tracked damped steps ``h(z) = (1 − τ) z + τ f(z)`` from the
      detached z*; cost k tracked f-evaluations (k activations kept).
    * ``variant="neumann"`` (NPG): ``u = τ v Σ_{i<k} Bⁱ`` by k − 1 vector-Jacobian products at z*, then one through
      the tracked call ``f(z*)``.

    At an exact fixed point both give ``u = v (I − Bᵏ)(I − J)⁻¹``: the exact adjoint up to ``v Bᵏ (I − J)⁻¹``,
    which vanishes when damped iteration converges (ρ(B) < 1). ``steps=1, tau=1`` is one-step backprop.

    Args:
        steps: k ≥ 1.
        tau: damping τ ∈ (0, 1].
        variant: ``"unrolled"`` or ``"neumann"``.
    """

    name = "phantom"
    approximates = "phantom gradients replace (I − J)⁻¹ by τ Σ_{i<k} Bⁱ, B = (1 − τ) I + τ J"

    def __init__(self, *, steps: int = 5, tau: float = 0.5, variant: str = "unrolled") -> None:
        if not (isinstance(steps, int) and not isinstance(steps, bool) and steps >= 1):
            raise ValueError(f"phantom: steps must be an integer ≥ 1, got {steps!r}")
        if not (isinstance(tau, (int, float)) and math.isfinite(tau) and 0 < tau <= 1):
            raise ValueError(f"phantom: tau must be in (0, 1], got {tau!r}")
        check_choice("phantom: variant", variant, VARIANTS)
        self.steps, self.tau, self.variant = steps, float(tau), variant
        self.needs_vjp = variant == "neumann"

    @property
    def tracks_one_call(self) -> bool:
        return self.variant == "neumann"  # the default track; the unrolled variant tracks k damped steps

    def track(self, problem: Problem, z_star: Tensor, result: SolverResult, info: ImplicitInfo) -> Tracked:
        if self.variant == "neumann":
            return super().track(problem, z_star, result, info)
        h = z_star
        for _ in range(self.steps):
            h = torch.lerp(h, problem.fn(h), self.tau)  # (1 − τ) h + τ f(h), exact at τ = 1
        info.tracked_nfe += self.steps
        return Tracked(z=z_star, out=h, problem=problem, result=result, info=info)

    def adjoint(self, v: Tensor, tracked: Tracked) -> Tensor:
        if self.variant == "unrolled":
            return v
        term, total = v, v
        for _ in range(self.steps - 1):
            term = torch.lerp(term, tracked.vjp(term), self.tau)  # term ← term B
            total = total + term
        tracked.info.backward_vjps += self.steps - 1
        return self.tau * total

    @classmethod
    def option_strategies(cls, st: Any) -> dict[str, Any]:
        return {"steps": st.integers(1, 10), "tau": st.floats(0.2, 1.0), "variant": st.sampled_from(VARIANTS)}
