"""Spectral radius of the block's Jacobian: power iteration and Arnoldi against known spectra."""

from __future__ import annotations

import math

import pytest
import torch
from problems import gen, tanh_problem

import implicit
from implicit.diagnostics import spectral_radius

N = 32


def similar_to(diagonal: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """``S D S⁻¹`` with a well-conditioned random S: a non-normal matrix with the spectrum of ``D``."""
    s = torch.randn(N, N, generator=gen(seed), dtype=torch.float64) + 3 * torch.eye(N, dtype=torch.float64)
    return s @ diagonal @ torch.linalg.inv(s)


def linear_block(jacobian: torch.Tensor):
    return lambda z, x: z @ jacobian.T + x


def real_dominant() -> torch.Tensor:
    others = torch.rand(N - 1, generator=gen(1), dtype=torch.float64) * 1.2 - 0.6
    return similar_to(torch.diag(torch.cat([torch.tensor([0.9], dtype=torch.float64), others])))


def complex_dominant(angle: float = 0.7) -> torch.Tensor:
    c, s = 0.9 * math.cos(angle), 0.9 * math.sin(angle)
    rotation = torch.tensor([[c, -s], [s, c]], dtype=torch.float64)
    others = torch.rand(N - 2, generator=gen(2), dtype=torch.float64) * 1.2 - 0.6
    return similar_to(torch.block_diag(rotation, torch.diag(others)))


def _state():
    x = torch.randn(3, N, generator=gen(3), dtype=torch.float64)
    return x, torch.zeros_like(x)


@pytest.mark.parametrize(("iters", "bound"), [(20, 2e-3), (40, 1e-6), (60, 1e-9)])
def test_power_iteration_finds_a_real_dominant_eigenvalue(iters, bound):
    x, z = _state()
    estimate = spectral_radius(linear_block(real_dominant()), x, z, iters=iters, method="power", generator=gen(4))
    assert float((estimate - 0.9).abs().max()) < bound


@pytest.mark.parametrize("jacobian", [real_dominant, complex_dominant])
def test_arnoldi_is_exact_for_real_and_complex_dominant_eigenvalues(jacobian):
    x, z = _state()
    estimate = spectral_radius(linear_block(jacobian()), x, z, iters=20, generator=gen(5))
    assert float((estimate - 0.9).abs().max()) < 1e-6


def test_power_iteration_oscillates_on_a_complex_pair_where_arnoldi_does_not():
    x, z = _state()
    power = spectral_radius(linear_block(complex_dominant()), x, z, iters=60, method="power", generator=gen(6))
    assert float((power - 0.9).abs().max()) > 1e-3  # the Rayleigh quotient of a rotating iterate is not |λ|


def test_spectral_radius_of_a_tanh_layer_at_its_equilibrium_is_below_the_lipschitz_bound():
    p = tanh_problem(0.9, "sym", 0.1, batch=4, n=16)
    deq = implicit.make_implicit(p.block, tol=1e-10, max_iter=200)
    with torch.no_grad():
        z = deq(p.x)
        rho = spectral_radius(deq.block_forward, p.x, z, iters=16)
    # Exact: eigenvalues of diag(1 − z²) W per sample.
    exact = torch.stack([torch.linalg.eigvals(torch.diag(1 - zb**2) @ p.block.W.detach()).abs().max() for zb in z])
    torch.testing.assert_close(rho, exact, rtol=1e-8, atol=1e-10)
    assert float(rho.max()) < 0.9
    assert not rho.requires_grad


def test_spectral_radius_rejects_bad_arguments():
    x, z = _state()
    with pytest.raises(ValueError, match="method"):
        spectral_radius(linear_block(real_dominant()), x, z, method="lanczos")
    with pytest.raises(ValueError, match="iters"):
        spectral_radius(linear_block(real_dominant()), x, z, iters=0)


@pytest.mark.parametrize(
    "jacobian",
    [
        0.99 * torch.eye(N, dtype=torch.float64),  # every start spans an invariant space of dimension one
        torch.block_diag(0.7 * torch.eye(N - 2, dtype=torch.float64), torch.tensor([[0.0, 0.9], [-0.9, 0.0]])),
    ],
    ids=["scaled-identity", "two-invariant-blocks"],
)
def test_arnoldi_stops_cleanly_on_an_invariant_krylov_space(jacobian):
    """The Krylov space of cI is one-dimensional (of the second map, at most three): the steps after it are round-off,
    which must not be normalised into the basis (that gave ρ ≈ 3 for 0.99 I)."""
    x, z = _state()
    estimate = spectral_radius(linear_block(jacobian), x, z, iters=20, generator=gen(7))
    expected = float(torch.linalg.eigvals(jacobian).abs().max())
    torch.testing.assert_close(estimate, torch.full_like(estimate, expected), rtol=1e-10, atol=0)
