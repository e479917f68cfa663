"""Limited-memory ("good") Broyden root finding on g(z) = f(z) − z (Broyden, "A class of methods for solving
nonlinear simultaneous equations", Math. Comp. 1965; the forward solver of Bai et al., "Deep Equilibrium Models",
NeurIPS 2019)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..lowrank import LowRankInverse
from .base import Solver


def _inverse_or_zero(denominator: Tensor, differentiable: bool) -> Tensor:
    """``1 / d``, and 0 where d is zero or not finite. Differentiable: the masked entries get zero gradient
    (``nan_to_num`` of an infinite reciprocal would backpropagate 0 · ∞ = NaN)."""
    if not differentiable:
        return torch.nan_to_num(denominator.reciprocal(), nan=0.0, posinf=0.0, neginf=0.0)
    ok = (denominator.abs() > torch.finfo(denominator.dtype).tiny) & torch.isfinite(denominator)
    return torch.where(ok, 1.0 / torch.where(ok, denominator, 1.0), 0.0)


class Broyden(Solver):
    """Good Broyden with a low-rank inverse Jacobian ``H ≈ (J − I)⁻¹ = −I + Σ_i u_i v_iᵀ``.

    Step ``Δ = −H g``; after each step the pair from ``s = z_{k+1} − z_k``, ``y = g_{k+1} − g_k`` is
    ``vᵀ = sᵀH``, ``u = (s − H y) / (vᵀ y)`` (Sherman–Morrison form of Broyden's update). A pair whose denominator is
    zero or non-finite is stored as zeros. At most ``memory`` pairs are kept: when full, all are dropped (restart,
    ``H ← −I``) and the new pair is computed against ``−I`` — memory never grows with ``max_iter``.

    Args:
        memory: stored pairs at most.

    Cost per step: one f-evaluation and four passes over the stored factors; memory ``2 · memory · N`` per sample.
    The estimate is exported as ``result.inverse_jacobian`` (a :class:`~implicit.lowrank.LowRankInverse`), which
    ``backward="shine"`` reuses.
    """

    name = "broyden"
    provides_inverse_jacobian = True

    def __init__(self, *, memory: int = 10) -> None:
        if not (isinstance(memory, int) and memory >= 1):
            raise ValueError(f"broyden: memory must be an integer ≥ 1, got {memory!r}")
        self.memory = memory

    @classmethod
    def option_strategies(cls, st: Any) -> dict[str, Any]:
        return {"memory": st.integers(2, 12)}

    def start(self, z0: Tensor, differentiable: bool, state: dict[str, Any] | None = None) -> None:
        """``state={"inverse_jacobian": H}`` starts from a :class:`~implicit.lowrank.LowRankInverse` ``H`` of rank r
        instead of ``−I`` (e.g. a transposed forward estimate for a backward solve); the memory is raised to hold its
        r pairs plus one."""
        super().start(z0, differentiable)
        batch, n = z0.shape
        state = dict(state or {})
        initial = state.pop("inverse_jacobian", None)
        if state or not (initial is None or isinstance(initial, LowRankInverse)):
            raise ValueError(
                f"broyden: warm-start state takes only 'inverse_jacobian' (a LowRankInverse), got {sorted(state)}"
            )
        count = 0 if initial is None else initial.rank
        self.memory = max(self.memory, count + 1)
        self.count = count
        self.previous: tuple[Tensor, Tensor] | None = None  # the last residual and step
        if self.traced:
            self.like = z0  # the shape of an empty estimate
            # One (B, 1, N) row per stored pair: a store writes one pair without copying the others (torch.compile
            # turns a pair written into a buffer into a copy of the whole buffer).
            self.u_rows: list[Tensor] = [] if initial is None else list(initial.U.split(1, dim=1))
            self.v_rows: list[Tensor] = [] if initial is None else list(initial.V.split(1, dim=1))
            return
        # Only the first `count` rows are ever read: no need to zero-fill (costly for large memory × N).
        self.U = z0.new_empty(batch, self.memory, n)
        self.V = z0.new_empty(batch, self.memory, n)
        if initial is not None and count:
            self.U[:, :count] = initial.U
            self.V[:, :count] = initial.V
        self.estimates: dict[int, LowRankInverse] = {}  # views of the buffers by rank

    def _store(self, r: int, u: Tensor, v: Tensor) -> None:
        """Put the pair ``(u, v)`` (rows ``(B, 1, N)``) in slot r. Computed out of place and copied: an ``out=``
        into the factor buffers, which the same kernels read, takes PyTorch's slow overlapping-memory path."""
        if self.traced:
            del self.u_rows[r:], self.v_rows[r:]
            self.u_rows.append(u)
            self.v_rows.append(v)
        else:
            if self.differentiable:  # autograd saved the old buffers: write into fresh ones
                self.U, self.V = self.U.clone(), self.V.clone()
            self.U[:, r : r + 1] = u
            self.V[:, r : r + 1] = v
        self.count = r + 1

    def _estimate(self, rank: int) -> LowRankInverse:
        """``H`` from the first ``rank`` stored pairs."""
        if self.differentiable:  # the buffers are replaced at every store
            return LowRankInverse(self.U[:, :rank], self.V[:, :rank])
        estimate = self.estimates.get(rank)
        if estimate is None:
            estimate = self.estimates[rank] = LowRankInverse(self.U[:, :rank], self.V[:, :rank])
        return estimate

    def _products(self, rank: int, y: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
        """``H y`` and ``sᵀ H`` (rows ``(B, 1, N)``) with the first ``rank`` stored pairs."""
        if not self.traced:
            estimate = self._estimate(rank)
            return estimate.matvec(y), estimate.rmatvec(s)
        h_y, s_h = -y, -s  # H = −I + Σ u_i v_iᵀ, term by term (fused by torch.compile)
        for u, v in zip(self.u_rows[:rank], self.v_rows[:rank]):
            h_y = h_y + u * torch.linalg.vecdot(v, y)[..., None]
            s_h = s_h + v * torch.linalg.vecdot(u, s)[..., None]
        return h_y, s_h

    def step(self, z: Tensor, fz: Tensor) -> Tensor:
        g = fz - z
        if self.previous is None:  # −H_0 g: plain iteration when H_0 = −I
            if not self.traced:
                step = self._estimate(self.count).matvec(g, negate=True)
            else:
                step = g if self.count == 0 else -self._products(self.count, g[:, None], g[:, None])[0][:, 0]
        else:
            prev_g, prev_step = self.previous
            s = prev_step[:, None]  # rows (B, 1, N)
            y = (g - prev_g)[:, None]
            r = 0 if self.count == self.memory else self.count  # restart: H ← −I, this pair computed against −I
            if r:
                h_y, v = self._products(r, y, s)  # H y and vᵀ = sᵀ H
                minus_h_g = s - h_y  # −H g = −(H g_prev + H y) and H g_prev = −s, the previous step
                direction = minus_h_g
            else:
                v = -s
                minus_h_g = g[:, None]
                direction = s + y
            # u = (s − H y) / (vᵀ y); a zero or non-finite denominator leaves a zero pair (no update)
            inv = _inverse_or_zero(torch.linalg.vecdot(v, y), self.differentiable)
            u = direction * inv[:, :, None]
            self._store(r, u, v)
            # −H_new g = −H g − u (v·g)
            step = torch.addcmul(minus_h_g, u, torch.linalg.vecdot(v, g[:, None])[:, :, None], value=-1)[:, 0]
        self.previous = (g, step)
        return z + step

    def inverse_jacobian(self) -> LowRankInverse:
        if self.traced:
            if not self.u_rows:
                return LowRankInverse.identity(self.like)
            return LowRankInverse(torch.cat(self.u_rows, dim=1), torch.cat(self.v_rows, dim=1))
        return self._estimate(self.count)
