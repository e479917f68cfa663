"""Low-rank estimates of an inverse Jacobian, shared by the Broyden solvers and SHINE.

Quasi-Newton root finding on ``g(z) = f(z) − z`` keeps ``H ≈ J_g⁻¹ = (J − I)⁻¹`` in the form ``H = −I + Σᵢ uᵢ vᵢᵀ``
(Broyden 1965; the adjoint variant of Schlenkrich, Griewank and Walther, "On the local convergence of adjoint Broyden
methods", 2010). SHINE (Ramzi et al., "SHINE: SHaring the INverse Estimate from the forward pass for bi-level
optimization and implicit models", ICLR 2022) reuses the same H for the backward pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class LowRankInverse:
    """``H = −I + Σᵢ uᵢ vᵢᵀ`` per sample, stored as factors ``U``, ``V`` of shape ``(B, r, N)`` (row i of ``U[b]`` is
    uᵢ of sample b). Vectors are rows: ``x`` of shape ``(B, N)`` or ``(B, k, N)`` (k vectors per sample).

    Each product costs one pass over each factor, O(rN) per vector.
    """

    U: Tensor
    V: Tensor

    def __post_init__(self) -> None:
        if self.U.dim() != 3 or self.U.shape != self.V.shape:
            raise ValueError(
                f"LowRankInverse takes factors U, V of the same shape (B, r, N), got {tuple(self.U.shape)} and "
                f"{tuple(self.V.shape)}"
            )

    @classmethod
    def identity(cls, like: Tensor) -> LowRankInverse:
        """``H = −I`` (rank 0) for flat states shaped like ``like`` ``(B, N)``."""
        empty = like.new_empty(like.shape[0], 0, like.shape[1])
        return cls(empty, empty)

    @property
    def rank(self) -> int:
        """The number of stored pairs r."""
        return self.U.shape[1]

    def matvec(self, x: Tensor, *, negate: bool = False, out: Tensor | None = None) -> Tensor:
        """``H x`` (``−H x`` with ``negate``) for every row x: ``−x + (x Vᵀ) U``; written into ``out`` (shaped like
        ``x``, not overlapping the factors or ``x``) when given."""
        return _product(x, self.V, self.U, negate, out)

    def rmatvec(self, x: Tensor, *, negate: bool = False, out: Tensor | None = None) -> Tensor:
        """``xᵀ H`` (``−xᵀ H`` with ``negate``) as rows: ``−x + (x Uᵀ) V``; ``out`` as in :meth:`matvec`."""
        return _product(x, self.U, self.V, negate, out)

    def transpose(self) -> LowRankInverse:
        """``Hᵀ = −I + Σᵢ vᵢ uᵢᵀ``: the factors swapped (the estimate for the transposed system)."""
        return LowRankInverse(self.V, self.U)


def _product(x: Tensor, first: Tensor, second: Tensor, negate: bool, out: Tensor | None = None) -> Tensor:
    """``∓x ± (x firstᵀ) second`` in one fused kernel; with rank 0 ``x`` itself (``negate``) or ``−x``."""
    if first.shape[1] == 0:
        if out is None:
            return x if negate else -x
        return out.copy_(x) if negate else torch.neg(x, out=out)
    rows = x if x.dim() == 3 else x[:, None]
    target = None if out is None else (out if out.dim() == 3 else out[:, None])
    coefficients = torch.bmm(rows, first.transpose(1, 2))
    # baddbmm: beta · rows + alpha · (coefficients @ second)
    if negate:
        product = torch.baddbmm(rows, coefficients, second, beta=1, alpha=-1, out=target)
    else:
        product = torch.baddbmm(rows, coefficients, second, beta=-1, out=target)
    return product if x.dim() == 3 else product[:, 0]
