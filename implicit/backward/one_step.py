"""One-step gradient, Jacobian-free backpropagation (Fung et al., "JFB: Jacobian-Free Backpropagation for Implicit
Networks", AAAI 2022; Geng et al., "On Training Implicit Models", NeurIPS 2021)."""

from __future__ import annotations

from torch import Tensor

from .base import BackwardMode, Tracked


class OneStep(BackwardMode):
    """Jacobian-free backprop: ``u = v``, the gradient of one call ``f(z*)`` from the detached solution — the
    implicit gradient with ``(I − J)⁻¹`` replaced by the identity. Cost: one tracked f-evaluation, no VJP beyond it.
    Equal to ``phantom`` with ``steps=1, tau=1`` and to SHINE with no stored Broyden pairs. Approximate: its cosine
    with the exact gradient falls as the contraction weakens (0.49–0.94 on the tanh test problems of
    benchmarks/RESULTS.md).
    """

    name = "one_step"
    approximates = "one-step backprop replaces (I − J)⁻¹ by the identity"
    needs_vjp = False

    def __init__(self) -> None:
        pass

    def adjoint(self, v: Tensor, tracked: Tracked) -> Tensor:
        return v
