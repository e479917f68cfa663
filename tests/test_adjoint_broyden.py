"""Adjoint Broyden and SHINE's accuracy with it (Ramzi et al., "SHINE", ICLR 2022: with OPA updates the estimate is
accurate along the direction the backward needs)."""

from __future__ import annotations

import pytest
import torch
from problems import KINDS, gen, tanh_problem

import implicit


def _exact_adjoint(p, z: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``v (I − J)⁻¹`` per sample with the explicit Jacobian ``diag(1 − f²) W`` of the tanh block."""
    with torch.no_grad():
        fz = p.fn(z)
        eye = torch.eye(p.n, dtype=z.dtype)
        return torch.stack(
            [torch.linalg.solve((eye - torch.diag(1 - fb**2) @ p.block.W).T, vb) for fb, vb in zip(fz, v)]
        )


def _shine_adjoint(p, v: torch.Tensor, solver: str, solver_options: dict, state=None):
    """z*, SHINE's adjoint estimate ``v − (v Uᵀ) V`` from the forward solver's factors, and the call's info."""
    z, info = implicit.equilibrium(
        p.block,
        p.x,
        p.z0(),
        solver=solver,
        solver_options=solver_options,
        solver_state=state,
        tol=1e-10,
        max_iter=300,
        check_every=1,
        backward="shine",
    )
    factors = info.forward.inverse_jacobian
    u = v - torch.bmm(torch.bmm(v[:, None], factors.U.transpose(1, 2)), factors.V)[:, 0]
    return z.detach(), u, info


@pytest.mark.parametrize(("kind", "xs"), [("sym", 0.1), ("gauss", 1.0), ("orth", 0.1)])
def test_shine_from_adjoint_broyden_with_opa_matches_the_exact_adjoint(kind, xs):
    p = tanh_problem(0.9, kind, xs).frozen()
    v = torch.randn(p.batch, p.n, generator=gen(7), dtype=torch.float64)
    z, u, info = _shine_adjoint(p, v, "adjoint_broyden", {"memory": 300, "opa_every": 5}, {"opa_direction": v})
    assert bool(info.forward.converged.all())
    cosine = torch.nn.functional.cosine_similarity(u, _exact_adjoint(p, z, v), dim=1)
    assert float(cosine.min()) >= 0.99


def test_adjoint_broyden_beats_good_broyden_for_shine_on_a_symmetric_problem():
    p = tanh_problem(0.9, "sym", 0.1).frozen()
    v = torch.randn(p.batch, p.n, generator=gen(8), dtype=torch.float64)
    z_good, u_good, _ = _shine_adjoint(p, v, "broyden", {"memory": 300})
    z_adj, u_adj, _ = _shine_adjoint(p, v, "adjoint_broyden", {"memory": 300})
    cos_good = torch.nn.functional.cosine_similarity(u_good, _exact_adjoint(p, z_good, v), dim=1)
    cos_adj = torch.nn.functional.cosine_similarity(u_adj, _exact_adjoint(p, z_adj, v), dim=1)
    assert float(cos_adj.mean()) > float(cos_good.mean())


@pytest.mark.parametrize("kind", KINDS)
def test_adjoint_broyden_reaches_the_equilibrium(kind):
    p = tanh_problem(0.9, kind, 0.1).frozen()
    reference = implicit.solve(p.fn, p.z0(), solver="broyden", tol=1e-12, max_iter=300)
    result = implicit.solve(p.fn, p.z0(), solver="adjoint_broyden", tol=1e-8, max_iter=300, check_every=1)
    assert bool(result.converged.all())
    distance = torch.linalg.vector_norm(result.z - reference.z, dim=1) / torch.linalg.vector_norm(reference.z, dim=1)
    assert float(distance.max()) <= 1e-8 / (1 - 0.9)


def test_adjoint_broyden_argument_checks():
    p = tanh_problem(0.9, "gauss", 1.0).frozen()
    with pytest.raises(ValueError, match="opa_direction"):
        implicit.solve(p.fn, p.z0(), solver="adjoint_broyden", solver_options={"opa_every": 5})
    with pytest.raises(ValueError, match="not differentiable"):
        implicit.solve(p.fn, p.z0(), solver="adjoint_broyden", differentiable=True)
