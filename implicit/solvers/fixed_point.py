"""Damped fixed-point iteration ``z ← (1 − τ) z + τ f(z)``."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .base import Solver


class FixedPoint(Solver):
    """Damped fixed-point (Picard / Krasnosel'skii–Mann) iteration.

    Args:
        tau: damping τ > 0. τ = 1 is plain iteration ``z ← f(z)`` (bitwise); τ < 1 converges for every Jacobian
            eigenvalue λ with ``τ < 2(1 − Re λ)/|1 − λ|²``, so damping rescues some non-contractive blocks.

    Cost per step: one f-evaluation, no extra memory beyond the iterate.
    """

    name = "fixed_point"

    def __init__(self, *, tau: float = 1.0) -> None:
        if not (isinstance(tau, (int, float)) and math.isfinite(tau) and tau > 0):
            raise ValueError(f"fixed_point: tau must be a finite number > 0, got {tau!r}")
        self.tau = float(tau)

    @classmethod
    def option_strategies(cls, st: Any) -> dict[str, Any]:
        return {"tau": st.floats(0.6, 1.0)}

    def step(self, z: Tensor, fz: Tensor) -> Tensor:
        if self.tau == 1.0:
            return fz
        # lerp evaluates (1 − τ) z + τ f(z) from the nearer end, exact at both ends.
        return torch.lerp(z, fz, self.tau)
