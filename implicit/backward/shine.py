"""SHINE: the forward quasi-Newton estimate of the inverse Jacobian reused in the backward pass (Ramzi et al.,
"SHINE: SHaring the INverse Estimate from the forward pass for bi-level optimization and implicit models",
ICLR 2022)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ..registry import check_choice
from ..solvers import Broyden, Solve
from .base import BackwardMode, Tracked
from .implicit import solve_adjoint

FALLBACKS = ("jfb", "exact", "none")
ESTIMATES = ("transpose", "forward", "identity")


class Shine(BackwardMode):
    """``u_SHINE = −v H`` with ``H ≈ (J − I)⁻¹`` the forward solver's low-rank estimate (no VJP, O(rN)).

    Needs a forward solver that provides an inverse-Jacobian estimate (``solver="broyden"`` or ``"adjoint_broyden"``).
    With good Broyden the estimate is accurate only along the directions the solve explored; adjoint Broyden with OPA
    updates along ``∂ℓ/∂z`` makes it accurate where the backward needs it. SHINE's published remedies are also offered:

    Args:
        fallback: per sample, when ``‖u‖ > fallback_ratio ‖v‖`` (a bound that an f with Lipschitz constant L below
            ``1 − 1/ratio`` can never exceed) or u is not finite: ``"jfb"`` replaces u by v (one-step, the
            reference rule), ``"exact"`` solves the implicit system for those samples only (warm-started at v),
            ``"none"`` keeps u.
        fallback_ratio: the ratio above (1.8 in the reference code).
        refine: backward Broyden steps on ``u = v + u J`` started from the SHINE estimate (0: none). Each costs one
            VJP; the solve stops early at ``backward_tol``.
        refine_estimate: initial inverse estimate of the refinement: ``"transpose"`` (``Hᵀ``, the inverse Jacobian of
            the backward system — the default and fastest), ``"forward"`` (``H`` as in the reference code) or
            ``"identity"`` (``−I``).
    """

    name = "shine"
    requires = ("provides_inverse_jacobian",)
    approximates = "SHINE replaces (I − J)⁻¹ by the forward quasi-Newton estimate −H"

    def __init__(
        self,
        *,
        fallback: str = "jfb",
        fallback_ratio: float = 1.8,
        refine: int = 0,
        refine_estimate: str = "transpose",
    ) -> None:
        check_choice("shine: fallback", fallback, FALLBACKS)
        if not (isinstance(fallback_ratio, (int, float)) and math.isfinite(fallback_ratio) and fallback_ratio > 1):
            raise ValueError(f"shine: fallback_ratio must be a finite number > 1, got {fallback_ratio!r}")
        if not (isinstance(refine, int) and not isinstance(refine, bool) and refine >= 0):
            raise ValueError(f"shine: refine must be an integer ≥ 0, got {refine!r}")
        check_choice("shine: refine_estimate", refine_estimate, ESTIMATES)
        self.fallback, self.ratio = fallback, float(fallback_ratio)
        self.refine, self.refine_estimate = refine, refine_estimate
        self.needs_vjp = refine > 0 or fallback == "exact"
        self.uses_backward_solver = fallback == "exact"

    @property
    def approximation(self) -> str | None:
        if self.refine or self.fallback == "exact":
            return "SHINE's refinement or exact fallback is exact only where it converged"
        return self.approximates

    def adjoint(self, v: Tensor, tracked: Tracked) -> Tensor:
        estimate = tracked.result.inverse_jacobian
        if estimate is None:
            raise RuntimeError(
                "backward='shine' needs the forward solver's inverse-Jacobian estimate: use solver='broyden' or "
                "'adjoint_broyden'"
            )
        u = estimate.rmatvec(v, negate=True)  # −v H
        info = tracked.info
        if self.fallback != "none":
            v_norm = torch.linalg.vector_norm(v, dim=1)
            flagged = ~(torch.linalg.vector_norm(u, dim=1) <= self.ratio * v_norm)  # True for NaN/Inf
            info.extras["shine_fallback"] = flagged
            u = torch.where(flagged[:, None], v, u)
            if self.fallback == "exact":
                u = solve_adjoint(tracked, v, u, initial_active=flagged)
        if self.refine:
            initial = {"transpose": estimate.transpose(), "forward": estimate, "identity": None}[self.refine_estimate]
            backward = tracked.problem.options.backward_solve
            refinement = Solve(Broyden(memory=estimate.rank + self.refine + 1), backward.loop)
            state = None if initial is None else {"inverse_jacobian": initial}
            u = solve_adjoint(tracked, v, u, solve=refinement, max_iter=self.refine, state=state)
        return u

    @classmethod
    def option_strategies(cls, st: Any) -> dict[str, Any]:
        return {
            "fallback": st.sampled_from(FALLBACKS),
            "fallback_ratio": st.floats(1.2, 4.0),
            "refine": st.integers(0, 4),
            "refine_estimate": st.sampled_from(ESTIMATES),
        }
