"""Restarted GMRES (Saad and Schultz, "GMRES: a generalized minimal residual algorithm for solving nonsymmetric
linear systems", SIAM J. Sci. Stat. Comput. 1986) for affine fixed-point maps, batched per sample."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ..krylov import normalize, orthogonalize
from ..result import SolverResult
from ..types import FlatMap
from .base import Loop, Solver


class GMRES(Solver):
    """GMRES(k) on the fixed point ``u = b + u A`` of an affine map ``fn(u) = b + u A`` (rows are samples), i.e. the
    linear system ``u (I − A) = b`` — the backward system ``u = v + u J`` of implicit differentiation.

    Each cycle measures the true residual ``fn(u) − u`` (one evaluation), builds a Krylov basis of ``w ↦ w − w A``
    with classical Gram–Schmidt applied twice, per-sample dot products, and Givens rotations that give every sample's
    residual after each evaluation; ``u`` moves by the minimal-residual combination of the basis. A sample whose
    residual vanishes (happy breakdown) keeps an exact solution. ``max_iter`` bounds the Krylov evaluations; the
    offset ``b = fn(0)`` costs one more evaluation unless given as ``state={"offset": b}``.

    Args:
        restart: Krylov dimension k per cycle.

    Cost per cycle: k + 1 evaluations and O(k² N) for the orthogonalisation; memory (k + 1) N per sample.
    Not differentiable and only for affine maps: use it as ``backward_solver``.
    """

    name = "gmres"
    linear_only = True
    differentiable_steps = False
    records_trajectory = False
    capturable = False

    def __init__(self, *, restart: int = 20) -> None:
        if not (isinstance(restart, int) and restart >= 1):
            raise ValueError(f"gmres: restart must be an integer ≥ 1, got {restart!r}")
        self.restart = restart

    @classmethod
    def option_strategies(cls, st: Any) -> dict[str, Any]:
        return {"restart": st.integers(5, 30)}

    def run(self, fn: FlatMap, z0: Tensor, loop: Loop) -> SolverResult:
        settings = loop
        tol, max_iter, stop_mode = settings.tol, settings.max_iter, settings.stop_mode
        state = dict(settings.state or {})
        offset = state.pop("offset", None)
        if state:
            raise ValueError(f"gmres: warm-start state takes only 'offset', got {sorted(state)}")
        monitor = settings.monitor(z0)
        nfe = 0
        with torch.no_grad():
            if offset is None:
                offset = fn(torch.zeros_like(z0))
                nfe += 1
            u = z0
            krylov = 0
            while True:
                fu = fn(u)
                nfe += 1
                monitor.observe(u, fu, nfe)
                if krylov >= max_iter or not monitor.any_active():
                    break
                steps = min(self.restart, max_iter - krylov)
                if stop_mode == "rel":
                    threshold = tol * torch.linalg.vector_norm(fu, dim=1)
                else:
                    threshold = torch.full_like(fu[:, 0], tol * math.sqrt(fu.shape[1]))
                correction, used = self._cycle(
                    fn, offset, fu - u, steps, threshold, monitor.active, settings.check_every
                )
                nfe += used
                krylov += used
                u = torch.where(monitor.active[:, None], u + correction, u)
        return monitor.result(nfe)

    @staticmethod
    def _cycle(
        fn: FlatMap, offset: Tensor, r: Tensor, steps: int, threshold: Tensor, active: Tensor, check_every: int
    ) -> tuple[Tensor, int]:
        """One GMRES cycle from residual ``r`` (B, N): the correction ``Δu`` minimising ``‖r − Δu (I − A)‖`` over the
        Krylov space of dimension ≤ ``steps``, and the evaluations used."""
        batch, n = r.shape
        basis = r.new_zeros(batch, steps + 1, n)
        basis[:, 0], beta = normalize(r)
        triangle = r.new_zeros(batch, steps, steps)  # R of the rotated Hessenberg matrix
        g = [beta]  # rotated right-hand side β e₁
        cosines: list[Tensor] = []
        sines: list[Tensor] = []
        used = 0
        for j in range(steps):
            q = basis[:, j]
            w = q - (fn(q) - offset)  # w = q (I − A)
            used += 1
            w, h = orthogonalize(w, basis[:, : j + 1])
            basis[:, j + 1], h_next = normalize(w)
            column = list(h.unbind(dim=1))
            for i, (c, s) in enumerate(zip(cosines, sines)):
                column[i], column[i + 1] = c * column[i] + s * column[i + 1], c * column[i + 1] - s * column[i]
            a, b = column[j], h_next
            radius = torch.hypot(a, b)
            safe = radius > 0
            c = torch.where(safe, a / torch.where(safe, radius, 1.0), 1.0)
            s = torch.where(safe, b / torch.where(safe, radius, 1.0), 0.0)
            cosines.append(c)
            sines.append(s)
            column[j] = radius
            triangle[:, : j + 1, j] = torch.stack(column[: j + 1], dim=1)
            g.append(-s * g[j])
            g[j] = c * g[j]
            done = (j + 1) % check_every == 0 and not bool((active & (g[j + 1].abs() > threshold)).any())
            if done:
                break
        m = len(cosines)
        diag = triangle[:, :m, :m].diagonal(dim1=1, dim2=2)
        degenerate = diag == 0  # columns after a happy breakdown: their rhs entries are 0 as well
        system = triangle[:, :m, :m] + torch.diag_embed(degenerate.to(r.dtype))
        rhs = torch.stack(g[:m], dim=1)[:, :, None]
        y = torch.linalg.solve_triangular(system, rhs, upper=True)[:, :, 0]
        return torch.bmm(y[:, None], basis[:, :m])[:, 0], used
