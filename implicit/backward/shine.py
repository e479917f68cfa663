"""SHINE: the forward Broyden estimate of the inverse Jacobian reused in the backward pass (Ramzi et al., ICLR 2022;
algorithms.md §2.5)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .base import BackwardMode, Tracked
from .implicit import solve_adjoint

FALLBACKS = ("jfb", "exact", "none")
ESTIMATES = ("transpose", "forward", "identity")


def _apply_inverse_estimate(v: Tensor, u_factors: Tensor, v_factors: Tensor) -> Tensor:
    """``−v H`` for ``H = −I + Σ u_i v_iᵀ`` (rows): ``v − (v Uᵀ) V``."""
    if u_factors.shape[1] == 0:
        return v
    return v - torch.bmm(torch.bmm(v[:, None], u_factors.transpose(1, 2)), v_factors)[:, 0]


class Shine(BackwardMode):
    """``u_SHINE = −v H`` with ``H ≈ (J − I)⁻¹`` the forward Broyden solver's low-rank estimate (no VJP, O(rN)).

    Needs ``solver="broyden"`` or ``"adjoint_broyden"`` (whose factors the result carries). With good Broyden the
    estimate is accurate only along the directions the solve explored; adjoint Broyden with OPA updates along
    ``∂ℓ/∂z`` makes it accurate where the backward needs it. SHINE's published remedies are also offered:

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

    def __init__(
        self,
        *,
        fallback: str = "jfb",
        fallback_ratio: float = 1.8,
        refine: int = 0,
        refine_estimate: str = "transpose",
    ) -> None:
        if fallback not in FALLBACKS:
            raise ValueError(f"shine: fallback must be one of {FALLBACKS}, got {fallback!r}")
        if not (isinstance(fallback_ratio, (int, float)) and math.isfinite(fallback_ratio) and fallback_ratio > 1):
            raise ValueError(f"shine: fallback_ratio must be a finite number > 1, got {fallback_ratio!r}")
        if not (isinstance(refine, int) and not isinstance(refine, bool) and refine >= 0):
            raise ValueError(f"shine: refine must be an integer ≥ 0, got {refine!r}")
        if refine_estimate not in ESTIMATES:
            raise ValueError(f"shine: refine_estimate must be one of {ESTIMATES}, got {refine_estimate!r}")
        self.fallback, self.ratio = fallback, float(fallback_ratio)
        self.refine, self.refine_estimate = refine, refine_estimate
        self.needs_vjp = refine > 0 or fallback == "exact"

    def adjoint(self, v: Tensor, tracked: Tracked) -> Tensor:
        state = tracked.result.state
        if "U" not in state:
            raise RuntimeError("backward='shine' needs the forward factors: use solver='broyden' or 'adjoint_broyden'")
        u_factors, v_factors = state["U"], state["V"]
        u = _apply_inverse_estimate(v, u_factors, v_factors)
        info = tracked.info
        if self.fallback != "none":
            v_norm = torch.linalg.vector_norm(v, dim=1)
            flagged = ~(torch.linalg.vector_norm(u, dim=1) <= self.ratio * v_norm)  # True for NaN/Inf
            info.extras["shine_fallback"] = flagged
            if self.fallback == "jfb":
                u = torch.where(flagged[:, None], v, u)
            else:
                u = torch.where(flagged[:, None], v, u)
                u = solve_adjoint(tracked, v, u, initial_active=flagged)
        if self.refine:
            estimate = {
                "transpose": {"U": v_factors, "V": u_factors},
                "forward": {"U": u_factors, "V": v_factors},
                "identity": None,
            }[self.refine_estimate]
            memory = u_factors.shape[1] + self.refine + 1
            u = solve_adjoint(
                tracked,
                v,
                u,
                solver="broyden",
                solver_options={"memory": memory},
                max_iter=self.refine,
                state=estimate,
            )
        return u
