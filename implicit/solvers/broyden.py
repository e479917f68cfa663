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


#: Rows of at least this many elements in all (``B·N``) are dotted by ``bmm`` on the CPU (below, ``vecdot``'s two
#: small kernels dispatch faster than a batched matrix product; measured crossover 2¹⁶ with one thread).
BMM_DOT_MIN_ELEMENTS = 1 << 16


def _row_dot(a: Tensor, b: Tensor, traced: bool) -> Tensor:
    """Dot products of rows ``(B, 1, N)``, ``(B, 1)``. ``vecdot`` multiplies into a temporary of the operands' size
    and sums it, which the compiler fuses (traced) and which is cheapest for small CPU rows; otherwise one ``bmm``,
    which reads each operand once and writes nothing of their size."""
    if traced or (a.device.type == "cpu" and a.numel() < BMM_DOT_MIN_ELEMENTS):
        return torch.linalg.vecdot(a, b)
    return torch.bmm(a, b.transpose(1, 2))[:, :, 0]


class Broyden(Solver):
    """Good Broyden with a low-rank inverse Jacobian ``H ≈ (J − I)⁻¹ = −I + Σ_i u_i v_iᵀ``.

    Step ``Δ = −H g``; after each step the pair from ``s = z_{k+1} − z_k``, ``y = g_{k+1} − g_k`` is
    ``vᵀ = sᵀH``, ``u = (s − H y) / (vᵀ y)`` (Sherman–Morrison form of Broyden's update). A pair whose denominator is
    zero or non-finite is stored as zeros. At most ``memory`` pairs are kept: when full, all are dropped (restart,
    ``H ← −I``) and the new pair is computed against ``−I`` — memory never grows with ``max_iter``. Since the previous
    step was ``s = −H g_k``, ``s − H y = −H g_{k+1}`` and ``vᵀy = vᵀg_{k+1} + sᵀs``: a step forms ``−H g`` and
    ``sᵀH`` (two products with the stored pairs) and never ``y`` or ``H y``, and the step taken is ``−H g`` to
    rounding, with no recurrence between steps.

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
        # Slot-major buffers (memory, B, N): each pair is a block of its own, which the kernels computing a new pair
        # write in place (out=) while reading the other blocks. Only the first `count` slots are ever read: no need
        # to zero-fill (costly for large memory × N).
        self.U = z0.new_empty(self.memory, batch, n)
        self.V = z0.new_empty(self.memory, batch, n)
        if initial is not None and count:
            self.U[:count] = initial.U.transpose(0, 1)
            self.V[:count] = initial.V.transpose(0, 1)
        self.estimates: dict[int, LowRankInverse] = {}  # views of the buffers by rank
        self.slots: dict[int, tuple[Tensor, Tensor]] = {}  # rows (B, 1, N) of slot r of U and V

    def _slot(self, r: int) -> tuple[Tensor | None, Tensor | None]:
        """Where the pair stored in slot r is computed: views of the buffers, or ``None`` (out of place) when the
        steps are differentiable or traced."""
        if self.differentiable:
            return None, None
        slot = self.slots.get(r)
        if slot is None:
            slot = self.slots[r] = (self.U[r, :, None], self.V[r, :, None])
        return slot

    def _store(self, r: int, u: Tensor, v: Tensor) -> None:
        """Put the pair ``(u, v)`` (rows ``(B, 1, N)``) in slot r (a no-op for the buffers when they were computed
        there)."""
        if self.traced:
            del self.u_rows[r:], self.v_rows[r:]
            self.u_rows.append(u)
            self.v_rows.append(v)
        elif self.differentiable:  # autograd saved the old buffers: write into fresh ones
            self.U, self.V = self.U.clone(), self.V.clone()
            self.U[r] = u[:, 0]
            self.V[r] = v[:, 0]
        self.count = r + 1

    def _estimate(self, rank: int) -> LowRankInverse:
        """``H`` from the first ``rank`` stored pairs (factors ``(B, rank, N)``, views of the slot-major buffers)."""
        if self.differentiable:  # the buffers are replaced at every store
            return LowRankInverse(self.U[:rank].transpose(0, 1), self.V[:rank].transpose(0, 1))
        estimate = self.estimates.get(rank)
        if estimate is None:
            estimate = LowRankInverse(self.U[:rank].transpose(0, 1), self.V[:rank].transpose(0, 1))
            self.estimates[rank] = estimate
        return estimate

    def _products(self, rank: int, g: Tensor, s: Tensor, v_out: Tensor | None) -> tuple[Tensor, Tensor]:
        """``−H g`` and ``sᵀ H`` (rows ``(B, 1, N)``) with the first ``rank`` stored pairs; ``sᵀ H`` written into
        ``v_out`` when given."""
        if not self.traced:
            estimate = self._estimate(rank)
            return estimate.matvec(g, negate=True), estimate.rmatvec(s, out=v_out)
        minus_h_g, s_h = g, -s  # H = −I + Σ u_i v_iᵀ, term by term (fused by torch.compile)
        for u, v in zip(self.u_rows[:rank], self.v_rows[:rank]):
            minus_h_g = minus_h_g - u * torch.linalg.vecdot(v, g)[..., None]
            s_h = s_h + v * torch.linalg.vecdot(u, s)[..., None]
        return minus_h_g, s_h

    def step(self, z: Tensor, fz: Tensor) -> Tensor:
        g = fz - z
        if self.previous is None:  # −H_0 g: plain iteration when H_0 = −I
            if not self.traced:
                step = self._estimate(self.count).matvec(g, negate=True)
            else:
                step = g if self.count == 0 else self._products(self.count, g[:, None], g[:, None], None)[0][:, 0]
        else:
            prev_g, prev_step = self.previous
            s, g_row = prev_step[:, None], g[:, None]  # rows (B, 1, N)
            r = 0 if self.count == self.memory else self.count  # restart: H ← −I, this pair computed against −I
            u_out, v_out = self._slot(r)
            if r:
                # The previous step was s = −H g_prev, so with y = g − g_prev: s − H y = −H g and
                # vᵀy = sᵀH g − sᵀH g_prev = vᵀg + sᵀs. Neither y nor H y is formed.
                minus_h_g, v = self._products(r, g_row, s, v_out)  # −H g and vᵀ = sᵀ H
                v_g = _row_dot(v, g_row, self.traced)
                v_y = v_g + _row_dot(s, s, self.traced)
                direction = minus_h_g
            else:
                y = g_row - prev_g[:, None]
                v, minus_h_g, direction = torch.neg(s, out=v_out), g_row, s + y
                v_g, v_y = _row_dot(v, g_row, self.traced), _row_dot(v, y, self.traced)
            # u = (s − H y) / (vᵀ y); a zero or non-finite denominator leaves a zero pair (no update)
            u = torch.mul(direction, _inverse_or_zero(v_y, self.differentiable)[:, :, None], out=u_out)
            self._store(r, u, v)
            # −H_new g = −H g − u (vᵀg)
            step = torch.addcmul(minus_h_g, u, v_g[:, :, None], value=-1)[:, 0]
        self.previous = (g, step)
        return z + step

    def inverse_jacobian(self) -> LowRankInverse:
        if self.traced:
            if not self.u_rows:
                return LowRankInverse.identity(self.like)
            return LowRankInverse(torch.cat(self.u_rows, dim=1), torch.cat(self.v_rows, dim=1))
        return self._estimate(self.count)
