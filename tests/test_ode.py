"""The ODE steady-state solver: on contractive blocks it reaches the discrete solvers' z* within ``tol/(1 − L)``; on
a non-contractive block with Re λ < 1 it finds the equilibrium where plain iteration diverges."""

from __future__ import annotations

import pytest
import torch
from problems import gen, lin_problem, tanh_problem

import implicit

ODE = {"solver": "ode", "solver_options": {"rtol": 1e-5, "atol": 1e-8}}


def rot_weight(seed: int = 0) -> torch.Tensor:
    """``Q D Qᵀ`` with 2×2 blocks ``[[a, −b], [b, a]]``: ρ = 1.581 but max Re λ = 0.5."""
    a = torch.linspace(-0.5, 0.5, 8, dtype=torch.float64)
    b = torch.linspace(1.0, 1.5, 8, dtype=torch.float64)
    blocks = [torch.stack([torch.stack([ai, -bi]), torch.stack([bi, ai])]) for ai, bi in zip(a, b)]
    q, _ = torch.linalg.qr(torch.randn(16, 16, generator=gen(seed), dtype=torch.float64))
    return q @ torch.block_diag(*blocks) @ q.T


@pytest.mark.parametrize(
    ("s", "kind", "xs"), [(0.9, "sym", 0.1), (0.9, "sym", 1.0), (0.9, "gauss", 1.0), (0.5, "gauss", 1.0)]
)
def test_ode_reaches_broydens_equilibrium_within_the_contraction_bound(s, kind, xs):
    p = tanh_problem(s, kind, xs).frozen()
    reference = implicit.solve(p.fn, p.z0(), solver="broyden", tol=1e-12, max_iter=300)
    tol = 1e-4
    result = implicit.solve(p.fn, p.z0(), tol=tol, max_iter=3000, **ODE)
    assert bool(result.converged.all()), result.status
    distance = torch.linalg.vector_norm(result.z - reference.z, dim=1) / torch.linalg.vector_norm(reference.z, dim=1)
    assert float(distance.max()) <= tol / (1 - s)
    # The reported residual is that of the returned point (each RHS evaluation measured its own point).
    fz = p.fn(result.z)
    rel = torch.linalg.vector_norm(fz - result.z, dim=1) / torch.linalg.vector_norm(fz, dim=1)
    torch.testing.assert_close(result.rel, rel, rtol=1e-10, atol=0)


def test_ode_converges_where_plain_iteration_diverges():
    p = lin_problem(batch=4, n=16, weight=rot_weight()).frozen()
    z_star = p.block.closed_form(p.x)
    plain = implicit.solve(p.fn, p.z0(), solver="fixed_point", tol=1e-6, max_iter=60, stop_mode="abs")
    assert bool(plain.diverged.all()) and not bool(plain.converged.any())
    result = implicit.solve(
        p.fn,
        p.z0(),
        solver="ode",
        solver_options={"rtol": 1e-6, "atol": 1e-9},
        tol=1e-6,
        max_iter=3000,
        stop_mode="abs",
    )
    assert bool(result.converged.all()), result.status
    error = torch.linalg.vector_norm(result.z - z_star) / torch.linalg.vector_norm(z_star)
    assert float(error) < 5e-6


def test_ode_budget_is_respected_and_reported():
    p = tanh_problem(0.9, "sym", 0.1).frozen()
    result = implicit.solve(p.fn, p.z0(), tol=1e-10, max_iter=30, **ODE)
    assert result.nfe <= 31
    assert not bool(result.converged.any())
    assert "budget" in result.status


def test_ode_layer_gradients_match_the_exact_gradient():
    p = tanh_problem(0.9, "gauss", 1.0, batch=4, n=16)
    exact = implicit.make_implicit(p.block, tol=1e-13, max_iter=300, backward_tol=1e-13, backward_max_iter=300)
    ode = implicit.make_implicit(
        p.block,
        solver="ode",
        solver_options={"rtol": 1e-10, "atol": 1e-12},
        tol=1e-9,
        max_iter=5000,
        backward_tol=1e-13,
        backward_max_iter=300,
    )
    x = p.x.clone().requires_grad_()
    (g_exact,) = torch.autograd.grad(exact(x).pow(2).sum(), x)
    (g_ode,) = torch.autograd.grad(ode(x).pow(2).sum(), x)
    torch.testing.assert_close(g_ode, g_exact, rtol=1e-6, atol=1e-8)


def test_ode_rejects_bad_options():
    with pytest.raises(ValueError, match="method"):
        implicit.make_implicit(torch.nn.Identity(), solver="ode", solver_options={"method": "leapfrog"})
    with pytest.raises(TypeError, match="valid options"):
        implicit.make_implicit(torch.nn.Identity(), solver="ode", solver_options={"tau": 0.5})
