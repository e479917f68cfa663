"""Jacobian regularisation: the Hutchinson estimator of ``‖∂f/∂z‖_F²/N`` against exact Jacobians, and the layer's
``jac_loss`` (Hutchinson's estimator: its error is within 4 standard deviations
``σ_M = √(2/M) ‖J Jᵀ‖_F``)."""

from __future__ import annotations

import math
import random

import pytest
import torch
from problems import DTYPE, gen, per_sample_jacobian, rel_err, tanh_problem
from torch import Tensor

import implicit
from implicit.regularization import jacobian_frobenius

N = 64


def hutchinson_problem(dtype: torch.dtype = DTYPE):
    """tanh gauss 0.9 (B=8, N=64) at its fixed point, with the exact per-sample Jacobians."""
    p = tanh_problem(0.9, "gauss", 1.0, n=N, seed=2, dtype=dtype)
    z = p.reference()
    return p, z, per_sample_jacobian(p.fn, z)


def exact_value(jac: Tensor) -> Tensor:
    """``‖J_b‖_F² / N`` per sample."""
    return jac.pow(2).sum(dim=(1, 2)) / jac.shape[-1]


def gaussian_std(jac: Tensor, probes: int) -> Tensor:
    """Standard deviation of the M-probe Gaussian estimate per sample: ``σ_M = √(2/M)‖JJᵀ‖_F / N``."""
    gram = jac @ jac.transpose(1, 2)
    return math.sqrt(2 / probes) * torch.linalg.matrix_norm(gram) / jac.shape[-1]


def rademacher_std(jac: Tensor) -> Tensor:
    """One Rademacher probe: variance ``2 Σ_{i≠j} (JJᵀ)_ij²`` (before the 1/N scaling)."""
    gram = jac @ jac.transpose(1, 2)
    off_diagonal = gram - torch.diag_embed(gram.diagonal(dim1=1, dim2=2))
    return math.sqrt(2) * torch.linalg.matrix_norm(off_diagonal) / jac.shape[-1]


def sample_map(p, b: int, copies: int = 1):
    """The map of sample ``b`` alone, on ``copies`` identical rows (each row gets its own probes)."""
    x = p.x[b : b + 1].expand(copies, -1)
    return lambda z: p.block(z, x)


def estimates(p, z: Tensor, b: int, count: int, probe: str, seed: int) -> Tensor:
    """``count`` independent one-probe estimates for sample ``b``."""
    g = gen(seed)
    fn = sample_map(p, b)
    with torch.no_grad():
        return torch.stack([jacobian_frobenius(fn, z[b : b + 1], probe=probe, generator=g) for _ in range(count)])


# ------------------------------------------------------------------------------------------- Hutchinson estimate
@pytest.mark.parametrize("probes", [1, 16, 256])
def test_hutchinson_estimate_is_within_four_sigma(probes):
    """``|R_M − ‖J‖_F²/N| ≤ 4σ_M`` per sample (measured ≤ 2.47σ_M)."""
    p, z, jac = hutchinson_problem()
    want, sigma = exact_value(jac), gaussian_std(jac, probes)
    g = gen(100 + probes)
    for b in range(p.batch):
        with torch.no_grad():
            got = jacobian_frobenius(sample_map(p, b), z[b : b + 1], probes=probes, generator=g)
        assert got.dim() == 0 and got.dtype == DTYPE
        assert abs(got - want[b]) <= 4 * sigma[b], (b, float((got - want[b]) / sigma[b]))


def test_mean_of_many_estimates_is_unbiased():
    """400 one-probe estimates per sample (400 identical rows, one call): their mean is within 4σ₁/√400 of the exact
    value (measured 1.68σ₁/√400)."""
    p, z, jac = hutchinson_problem()
    want, sigma = exact_value(jac), gaussian_std(jac, 1)
    count = 400
    for b in range(p.batch):
        rows = z[b : b + 1].expand(count, -1)
        with torch.no_grad():
            mean = jacobian_frobenius(sample_map(p, b, count), rows, generator=gen(b))
        assert abs(mean - want[b]) <= 4 * sigma[b] / math.sqrt(count), b


def test_empirical_spread_matches_the_predicted_standard_deviation():
    """The spread of one-probe estimates is σ₁ for Gaussian probes (measured 0.93–1.03σ₁) and the smaller
    ``√(2 Σ_{i≠j}(JJᵀ)_ij²)/N`` for Rademacher probes; Rademacher never spreads more than Gaussian."""
    p, z, jac = hutchinson_problem()
    for b in (0, 5):
        gaussian = estimates(p, z, b, 400, "gaussian", seed=10 + b)
        rademacher = estimates(p, z, b, 400, "rademacher", seed=20 + b)
        assert 0.8 <= gaussian.std() / gaussian_std(jac, 1)[b] <= 1.25
        assert 0.8 <= rademacher.std() / rademacher_std(jac)[b] <= 1.25
        assert rademacher.var() <= gaussian.var()
        assert abs(rademacher.mean() - exact_value(jac)[b]) <= 4 * rademacher_std(jac)[b] / 20


def test_rademacher_probes_are_exact_for_a_diagonal_jacobian():
    """ε_i² = 1: for a diagonal Jacobian one Rademacher probe gives ``‖J‖_F²`` exactly; a Gaussian probe does not."""
    scale = torch.linspace(-0.9, 0.9, 16, dtype=DTYPE)
    x = torch.randn(4, 16, dtype=DTYPE)
    z = torch.randn(4, 16, dtype=DTYPE)

    def fn(w: Tensor) -> Tensor:
        return torch.tanh(w * scale + x)

    want = (scale * (1 - fn(z) ** 2)).pow(2).mean()
    with torch.no_grad():
        rademacher = jacobian_frobenius(fn, z, probe="rademacher", generator=gen(0))
        gaussian = jacobian_frobenius(fn, z, probe="gaussian", generator=gen(0))
    assert rel_err(rademacher, want) < 1e-14
    assert rel_err(gaussian, want) > 1e-3


def closed_form_estimate(p, z: Tensor, x: Tensor, eps: Tensor) -> Tensor:
    """``Σ_b ‖ε_b J_b‖² / (B N)`` with ``ε J = (ε ⊙ sech²(z Wᵀ + x Uᵀ + b)) W`` for the tanh block, differentiable
    in W, U, b and x (no VJP involved)."""
    slope = 1 - p.block(z, x) ** 2
    return ((eps * slope) @ p.block.W).pow(2).sum() / z.numel()


def test_estimate_and_its_gradient_match_the_closed_form():
    """With the same probe (one Gaussian probe drawn from the same generator state), the estimate and its gradient
    w.r.t. (x, W, U, b) equal those of the written-out formula."""
    p, z, _ = hutchinson_problem()
    x = p.x.clone().requires_grad_()
    got = jacobian_frobenius(lambda w: p.block(w, x), z, generator=gen(5))
    assert got.requires_grad
    eps = torch.randn(p.batch, N, dtype=DTYPE, generator=gen(5))
    want = closed_form_estimate(p, z, x, eps)
    assert rel_err(got, want) < 1e-13
    inputs = [x, *p.params]
    for g, w in zip(torch.autograd.grad(got, inputs), torch.autograd.grad(want, inputs)):
        assert rel_err(g, w) < 1e-12


def test_generator_makes_the_estimate_reproducible():
    p, z, _ = hutchinson_problem()
    with torch.no_grad():
        a, b, c = (jacobian_frobenius(p.fn, z, probes=3, generator=gen(s)) for s in (1, 1, 2))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_unknown_probe_is_rejected():
    p, z, _ = hutchinson_problem()
    with pytest.raises(ValueError, match="rademacher"):
        jacobian_frobenius(p.fn, z, probe="uniform")
    for bad in ({"jac_loss_probe": "uniform"}, {"jac_loss_probes": -1}, {"jac_loss_prob": 1.5}):
        with pytest.raises(ValueError):
            implicit.ImplicitOptions(**bad)


# ------------------------------------------------------------------------------------------- through the layer
def layer_call(p, seed: int = 3, **options):
    """One layer call with the global RNG seeded (the layer's probes come from it); returns ``(z, info, x)``."""
    x = p.x.clone().requires_grad_()
    torch.manual_seed(seed)
    z, info = implicit.equilibrium(p.block, x, p.z0(), tol=1e-10, max_iter=200, **options)
    return z, info, x


@pytest.mark.parametrize("probe", ["gaussian", "rademacher"])
def test_layer_jac_loss_is_the_estimate_at_the_solution(probe):
    """``info.jac_loss`` is ``jacobian_frobenius`` of the block at z* with the configured probes (same RNG state)."""
    p, _, _ = hutchinson_problem()
    z, info, _ = layer_call(p, jac_loss_probes=2, jac_loss_probe=probe)
    torch.manual_seed(3)
    want = jacobian_frobenius(p.fn, info.forward.z, probes=2, probe=probe)
    assert info.jac_loss is not None and info.jac_loss.dim() == 0
    assert torch.equal(info.jac_loss, want)
    assert torch.equal(info.forward.z, z.detach())


def test_layer_without_probes_reports_no_jac_loss():
    p, _, _ = hutchinson_problem()
    _, info, _ = layer_call(p)
    assert info.jac_loss is None
    _, info, _ = layer_call(p, jac_loss_probes=0, jac_loss_prob=1.0)
    assert info.jac_loss is None


def test_layer_jac_loss_is_trained_through():
    """``loss + w · jac_loss`` has gradient ``∇loss + w ∇jac_loss`` w.r.t. x and every parameter; the regulariser's part
    is that of the estimate with the same probes, and nonzero."""
    p, _, _ = hutchinson_problem()
    c = torch.randn(p.batch, N, dtype=DTYPE, generator=gen(8))
    weight = 0.7
    z, info, x = layer_call(p, jac_loss_probes=2)
    inputs = [x, *p.params]
    loss = (c * z).sum()
    plain = torch.autograd.grad(loss, inputs, retain_graph=True)
    regularised = torch.autograd.grad(loss + weight * info.jac_loss, inputs)

    x2 = x.detach().clone().requires_grad_()
    torch.manual_seed(3)
    estimate = jacobian_frobenius(lambda w: p.block(w, x2), info.forward.z, probes=2)
    regulariser = torch.autograd.grad(estimate, [x2, *p.params])
    for got, g_loss, g_reg in zip(regularised, plain, regulariser):
        assert torch.linalg.vector_norm(g_reg) > 0
        assert rel_err(got - g_loss, weight * g_reg) < 1e-9  # the difference regularising makes, to round-off


def test_layer_jac_loss_under_no_grad_is_detached():
    p, _, _ = hutchinson_problem()
    with torch.no_grad():
        _, info, _ = layer_call(p, jac_loss_probes=2)
    assert not info.jac_loss.requires_grad and info.jac_loss.grad_fn is None
    assert torch.isfinite(info.jac_loss)
    _, with_grad, _ = layer_call(p, jac_loss_probes=2)
    assert rel_err(info.jac_loss, with_grad.jac_loss) < 1e-14


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_layer_jac_loss_dtype_and_accuracy(dtype):
    """In float32 and float64 the estimate has the state's dtype and lies within 4σ of the exact batch mean
    ``Σ_b ‖J_b‖_F²/(B N)`` (σ of the mean of B independent 16-probe estimates)."""
    p, _, jac = hutchinson_problem()
    p_dtype = tanh_problem(0.9, "gauss", 1.0, n=N, seed=2, dtype=dtype)
    _, info, _ = layer_call(p_dtype, jac_loss_probes=16)
    assert info.jac_loss.dtype == dtype and torch.isfinite(info.jac_loss)
    want = exact_value(jac).mean()
    sigma = torch.linalg.vector_norm(gaussian_std(jac, 16)) / p.batch
    assert abs(info.jac_loss.double() - want) <= 4 * sigma + (1e-5 * want if dtype == torch.float32 else 0)
    assert info.jac_loss.grad_fn is not None


@pytest.mark.parametrize(("prob", "calls", "low", "high"), [(0.0, 30, 0, 0), (1.0, 30, 30, 30), (0.3, 300, 63, 117)])
def test_layer_jac_loss_is_computed_with_the_given_probability(prob, calls, low, high):
    """p = 0: never, p = 1: always, p = 0.3: a Bernoulli draw per call (300 calls: within 4σ of 90)."""
    p = tanh_problem(0.5, "gauss", 1.0, batch=2, n=4, seed=1)
    random.seed(0)
    computed = 0
    for _ in range(calls):
        _, info = implicit.equilibrium(p.block, p.x, p.z0(), max_iter=2, jac_loss_probes=1, jac_loss_prob=prob)
        computed += info.jac_loss is not None
    assert low <= computed <= high


def test_jacobian_regulariser_of_a_block_with_fused_attention_trains():
    """PyTorch's fused attention kernels have no double backward; the regulariser's own call of f runs with the math
    kernel, so ``jac_loss`` of a transformer layer is differentiable (it raised "derivative for
    aten::_scaled_dot_product_flash_attention_for_cpu_backward is not implemented" before)."""
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True).double()

    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = layer

        def forward(self, z, x):
            return self.layer(z + x)

    deq = implicit.make_implicit(Block(), jac_loss_probes=2, tol=1e-8, max_iter=100)
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    z, info = deq(x, return_info=True)
    (z.sum() + info.jac_loss).backward()
    grads = [p.grad for p in layer.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    # The estimate's own gradient: nonzero, and the same as with the math kernel forced for the whole call.
    layer.zero_grad()
    torch.manual_seed(1)
    _, info = deq(x, return_info=True)
    (jac_only,) = torch.autograd.grad(info.jac_loss, [layer.self_attn.in_proj_weight])
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        torch.manual_seed(1)
        _, info = deq(x, return_info=True)
        (reference,) = torch.autograd.grad(info.jac_loss, [layer.self_attn.in_proj_weight])
    assert torch.linalg.vector_norm(jac_only) > 0
    torch.testing.assert_close(jac_only, reference, rtol=1e-10, atol=1e-12)
