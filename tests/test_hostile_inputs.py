"""Hostile inputs: empty and single-sample batches, non-contiguous and channels-last tensors, integer dtypes,
inference mode, a ``z0`` that requires grad in every backward mode, parameters that turn NaN, and blocks that raise
mid-solve or mid-backward. Each case asserts a clear error naming the problem or the correct numbers."""

from __future__ import annotations

import warnings

import pytest
import torch
from problems import TanhBlock, gen, injection, tanh_problem
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import weight_norm

import implicit
from implicit.dropout import VariationalDropout

DTYPE = torch.float64
TIGHT = {"tol": 1e-13, "max_iter": 300, "check_every": 1, "backward_tol": 1e-13, "backward_max_iter": 300}
GRADIENT_MODES = [  # (backward, extra options): every mode, each with a solver that has what it needs
    ("implicit", {}),
    ("phantom", {}),
    ("one_step", {}),
    ("shine", {"solver": "broyden"}),
    ("unrolled", {}),
]


def layer_for(block: nn.Module, **options) -> implicit.ImplicitModule:
    return implicit.make_implicit(block, **{**TIGHT, **options})


# ---------------------------------------------------------------------------------------------------- batch sizes
@pytest.mark.parametrize(
    ("backward", "options"),
    [m for m in GRADIENT_MODES if m[0] != "unrolled"] + [("implicit", {"solver": "fixed_point"})],
)
def test_empty_batch_gives_an_empty_result_and_empty_gradients(backward, options):
    """Chosen behaviour: B = 0 is not an error; z* is (0, N), info's masks are (0,), x's gradient is (0, d) and the
    parameters' gradients are zeros of their own shapes (the loss does not depend on them)."""
    block = TanhBlock(8, 5, seed=1)
    layer = layer_for(block, backward=backward, **options)
    x = torch.zeros(0, 5, dtype=DTYPE, requires_grad=True)
    z0 = torch.zeros(0, 8, dtype=DTYPE)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no divergence or other warning for an empty batch
        z, info = layer(x, z0, return_info=True)
    assert z.shape == (0, 8) and z.dtype == DTYPE
    assert info.forward.converged.shape == (0,) and info.forward.diverged.shape == (0,)
    assert info.state.shape == (0, 8)
    gx, *gp = torch.autograd.grad(z.square().sum(), [x, *block.parameters()])
    assert gx.shape == (0, 5)
    for g, param in zip(gp, block.parameters()):
        assert g.shape == param.shape and torch.equal(g, torch.zeros_like(param))


@pytest.mark.parametrize("solver", ["anderson", "broyden", "fixed_point"])
def test_batch_of_one_equals_the_same_sample_inside_a_batch(solver):
    p = tanh_problem(batch=6, n=12, seed=2)
    layer = layer_for(p.block, solver=solver)
    x = p.x.clone().requires_grad_()
    z_all = layer(x)
    (gx_all,) = torch.autograd.grad(z_all.square().sum(), x)
    for i in (0, 3, 5):
        xi = p.x[i : i + 1].clone().requires_grad_()
        zi = layer(xi)
        assert zi.shape == (1, 12)
        torch.testing.assert_close(zi, z_all[i : i + 1].detach(), rtol=0, atol=1e-11)
        (gxi,) = torch.autograd.grad(zi.square().sum(), xi)
        torch.testing.assert_close(gxi, gx_all[i : i + 1], rtol=0, atol=1e-10)


# ---------------------------------------------------------------------------------------------------- memory layouts
def test_non_contiguous_x_and_z0_solve_like_contiguous_ones_and_are_not_mutated():
    n, batch = 10, 5
    block = TanhBlock(n, seed=3)
    layer = layer_for(block)
    g = gen(4)
    x_t = torch.randn(n, batch, generator=g, dtype=DTYPE).t()  # (B, n), transposed storage
    z_big = torch.randn(batch, 2 * n, generator=g, dtype=DTYPE)
    z0_s = z_big[:, ::2]  # (B, n), strided slice
    assert not x_t.is_contiguous() and not z0_s.is_contiguous()
    x_before, z_big_before = x_t.clone(), z_big.clone()

    x_nc = x_t.requires_grad_()
    z_nc = layer(x_nc, z0_s)
    (g_nc,) = torch.autograd.grad(z_nc.sum(), x_nc)
    x_c = x_before.contiguous().requires_grad_()
    z_c = layer(x_c, z0_s.contiguous())
    (g_c,) = torch.autograd.grad(z_c.sum(), x_c)

    torch.testing.assert_close(z_nc, z_c, rtol=0, atol=1e-12)
    torch.testing.assert_close(g_nc, g_c, rtol=0, atol=1e-12)
    assert torch.equal(x_t.detach(), x_before) and torch.equal(z_big, z_big_before)  # caller's storage untouched


class ConvBlock(nn.Module):
    """``f(z, x) = tanh(0.5 · conv(z)/‖conv‖ + x)`` on ``(B, C, H, W)`` states (contractive: the kernel's 1-norm
    bounds the convolution's Lipschitz constant)."""

    def __init__(self, channels: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, dtype=DTYPE)
        with torch.no_grad():
            self.conv.weight.mul_(0.5 / self.conv.weight.abs().sum())

    def forward(self, z: Tensor, x: Tensor) -> Tensor:
        return torch.tanh(self.conv(z) + x)


def test_channels_last_inputs_solve_like_contiguous_ones():
    torch.manual_seed(5)
    layer = layer_for(ConvBlock())
    g = gen(6)
    x = torch.randn(2, 3, 5, 4, generator=g, dtype=DTYPE)
    z0 = 0.1 * torch.randn(2, 3, 5, 4, generator=g, dtype=DTYPE)
    x_cl, z0_cl = x.to(memory_format=torch.channels_last), z0.to(memory_format=torch.channels_last)
    assert not x_cl.is_contiguous() and x_cl.is_contiguous(memory_format=torch.channels_last)
    x_cl_before, z0_cl_before = x_cl.clone(), z0_cl.clone()

    xa, xb = x.clone().requires_grad_(), x_cl.clone().requires_grad_()
    za, zb = layer(xa, z0), layer(xb, z0_cl)
    assert zb.shape == (2, 3, 5, 4)
    torch.testing.assert_close(zb, za, rtol=0, atol=1e-12)
    ga, gb = (
        torch.autograd.grad((z * torch.arange(z.numel(), dtype=DTYPE).view_as(z)).sum(), xi)[0]
        for z, xi in ((za, xa), (zb, xb))
    )
    torch.testing.assert_close(gb, ga, rtol=0, atol=1e-12)
    assert torch.equal(x_cl, x_cl_before) and torch.equal(z0_cl, z0_cl_before)


# ---------------------------------------------------------------------------------------------------- dtypes
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool])
def test_integer_or_bool_z0_is_rejected_naming_the_leaf(dtype):
    p = tanh_problem(batch=3, n=6)
    layer = layer_for(p.block)
    with pytest.raises(TypeError, match=rf"state leaf <state> has dtype {dtype}; states must be floating point"):
        layer(p.x, torch.zeros(3, 6, dtype=dtype))
    with pytest.raises(TypeError, match=rf"state leaf \['count'\] has dtype {dtype}"):
        implicit.equilibrium(
            lambda z, x: z, p.x, {"h": torch.zeros(3, 6, dtype=DTYPE), "count": torch.zeros(3, 1, dtype=dtype)}
        )


def test_integer_x_with_the_default_z0_is_rejected_as_an_integer_state():
    """The default z0 is ``zeros_like(x)``: an integer x without ``z0=`` gives an integer state, rejected by name."""
    layer = layer_for(TanhBlock(4, seed=0))
    with pytest.raises(TypeError, match="states must be floating point"):
        layer(torch.ones(2, 4, dtype=torch.int64))


class MaskedBlock(TanhBlock):
    """Reads a pytree injection ``{"x": float, "mask": integer/bool}``; records the objects it was given."""

    seen: list

    def forward(self, z: Tensor, x: dict) -> Tensor:
        self.seen.append(x["mask"])
        return torch.tanh(self.pre_activation(z, x["x"]) * x["mask"].to(z.dtype))


@pytest.mark.parametrize("mask_dtype", [torch.int64, torch.bool])
def test_integer_mask_in_a_pytree_x_passes_through_untouched(mask_dtype):
    """Documented: x is passed to the block untouched (the same objects, dtypes kept); only z0 must be floating."""
    block = MaskedBlock(6, seed=7)
    block.seen = []
    layer = layer_for(block)
    xf = injection(4, 6, 1.0, gen(8)).requires_grad_()
    mask = torch.tensor([[1], [0], [1], [1]], dtype=mask_dtype)
    mask_before = mask.clone()
    z = layer({"x": xf, "mask": mask}, torch.zeros(4, 6, dtype=DTYPE))
    assert block.seen and all(m is mask for m in block.seen)
    assert torch.equal(mask, mask_before) and mask.dtype == mask_dtype
    assert torch.equal(z[1], torch.zeros(6, dtype=DTYPE))  # masked sample: f ≡ 0, its fixed point is 0
    reference = layer_for(TanhBlock(6, seed=7))(xf.detach()[[0, 2, 3]], torch.zeros(3, 6, dtype=DTYPE))
    torch.testing.assert_close(z[[0, 2, 3]].detach(), reference, rtol=0, atol=1e-12)
    (gx,) = torch.autograd.grad(z.sum(), xf)
    assert torch.equal(gx[1], torch.zeros(6, dtype=DTYPE)) and bool(gx[[0, 2, 3]].abs().sum() > 0)


# ---------------------------------------------------------------------------------------------------- grad modes
@pytest.mark.parametrize("backward", ["implicit", "unrolled"])
def test_inference_mode_call_returns_a_plain_tensor_and_training_continues(backward):
    p = tanh_problem(batch=4, n=8, seed=9)
    layer = layer_for(p.block, backward=backward)
    x = p.x.clone().requires_grad_()
    z_ref = layer(x)
    g_ref = torch.autograd.grad(z_ref.square().sum(), [x, *p.block.parameters()])
    with torch.inference_mode():
        z_inf, info = layer(x, return_info=True)
    assert not z_inf.requires_grad and z_inf.is_inference() and bool(info.forward.converged.all())
    torch.testing.assert_close(z_inf, z_ref.detach(), rtol=0, atol=1e-12)
    z = layer(x)  # a normal call after it still trains, with the same gradients
    assert z.requires_grad and not z.is_inference()
    g = torch.autograd.grad(z.square().sum(), [x, *p.block.parameters()])
    for a, b in zip(g, g_ref):
        assert torch.equal(a, b)


@pytest.mark.parametrize(("backward", "options"), [m for m in GRADIENT_MODES if m[0] != "unrolled"])
def test_z0_gets_an_exactly_zero_gradient_in_the_equilibrium_modes(backward, options):
    """Implicit, phantom, one-step and SHINE differentiate at z*, which does not depend on z0: z0's gradient is a
    tensor of exact zeros (not None), while x still gets its gradient."""
    p = tanh_problem(batch=4, n=8, seed=10)
    layer = layer_for(p.block, backward=backward, **options)
    x = p.x.clone().requires_grad_()
    z0 = (0.3 * torch.randn(4, 8, generator=gen(11), dtype=DTYPE)).requires_grad_()
    z0_before = z0.detach().clone()
    z = layer(x, z0)
    gz0, gx = torch.autograd.grad(z.square().sum(), [z0, x])
    assert gz0 is not None and torch.equal(gz0, torch.zeros_like(z0))
    assert bool(gx.abs().sum() > 0)
    assert torch.equal(z0.detach(), z0_before)


def test_unrolled_z0_gradient_is_the_derivative_through_the_iterations():
    """fixed_point, tol=0, 3 steps, abs residuals (monotone for a 0.9-contraction): z = f(f(f(z0))) exactly, so z0's
    gradient equals the one through a manual unroll, and agrees with central finite differences."""
    p = tanh_problem(batch=3, n=6, seed=12)
    layer = implicit.make_implicit(
        p.block, solver="fixed_point", backward="unrolled", tol=0.0, max_iter=3, check_every=1, stop_mode="abs"
    )
    z0 = (0.5 * torch.randn(3, 6, generator=gen(13), dtype=DTYPE)).requires_grad_()
    c = torch.randn(3, 6, generator=gen(14), dtype=DTYPE)
    z = layer(p.x, z0)
    (g,) = torch.autograd.grad((c * z).sum(), z0)
    manual = z0
    for _ in range(3):
        manual = p.block(manual, p.x)
    torch.testing.assert_close(z, manual, rtol=0, atol=1e-15)
    (g_manual,) = torch.autograd.grad((c * manual).sum(), z0)
    torch.testing.assert_close(g, g_manual, rtol=0, atol=1e-14)
    assert float(g.abs().max()) > 1e-3  # not the zero of the equilibrium modes
    direction, h = torch.randn(3, 6, generator=gen(15), dtype=DTYPE), 1e-6
    with torch.no_grad():
        fd = ((c * layer(p.x, z0 + h * direction)).sum() - (c * layer(p.x, z0 - h * direction)).sum()) / (2 * h)
    assert abs(float(fd) - float((g * direction).sum())) < 1e-8


def test_unrolled_anderson_z0_gradient_matches_finite_differences():
    p = tanh_problem(batch=2, n=6, seed=16)
    layer = implicit.make_implicit(
        p.block, solver="anderson", backward="unrolled", tol=0.0, max_iter=4, check_every=1, stop_mode="abs"
    )
    z0 = (0.5 * torch.randn(2, 6, generator=gen(17), dtype=DTYPE)).requires_grad_()
    c = torch.randn(2, 6, generator=gen(18), dtype=DTYPE)
    (g,) = torch.autograd.grad((c * layer(p.x, z0)).sum(), z0)
    assert float(g.abs().max()) > 1e-4
    for seed in (19, 20):
        direction, h = torch.randn(2, 6, generator=gen(seed), dtype=DTYPE), 1e-6
        with torch.no_grad():
            plus, minus = (c * layer(p.x, z0 + h * direction)).sum(), (c * layer(p.x, z0 - h * direction)).sum()
        assert abs(float((plus - minus) / (2 * h)) - float((g * direction).sum())) < 1e-7


# ---------------------------------------------------------------------------------------------------- NaN mid-training
def nan_after_one_step() -> tuple[implicit.ImplicitModule, Tensor]:
    p = tanh_problem(batch=4, n=8, seed=21)
    layer = layer_for(p.block, tol=1e-10)
    opt = torch.optim.SGD(p.block.parameters(), lr=1e-2)
    layer(p.x).square().sum().backward()
    opt.step()
    with torch.no_grad():
        p.block.W[2, 3] = float("nan")  # a parameter turns NaN
    return layer, p.x


def test_nan_parameters_warn_by_default_and_are_never_reported_converged():
    layer, x = nan_after_one_step()
    with pytest.warns(RuntimeWarning, match=r"forward solve: 0/4 converged, 4 diverged"):
        z, info = layer(x, return_info=True)
    assert not bool(info.forward.converged.any()) and bool(info.forward.diverged.all())
    assert bool(torch.isfinite(z).all())  # the last finite best iterate (here z0 = 0), not a NaN
    assert layer.last_info is info


def test_nan_parameters_raise_divergence_error_when_asked():
    layer, x = nan_after_one_step()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "ignore": no warning, and still not reported converged
        _, info = layer(x, on_divergence="ignore", return_info=True)
    assert not bool(info.forward.converged.any()) and bool(info.forward.diverged.all())
    with pytest.raises(implicit.DivergenceError, match=r"forward solve: 0/4 converged, 4 diverged"):
        layer(x, on_divergence="raise")
    assert layer.last_info is info  # the raising call left the previous call's info in place


def test_nan_in_one_injection_sample_raises_or_is_isolated():
    p = tanh_problem(batch=4, n=8, seed=22)
    layer = layer_for(p.block)
    x = p.x.clone()
    x[1, 0] = float("nan")
    with pytest.raises(ValueError, match=r"non-finite values \(NaN or Inf\) in the injection x or the initial state"):
        layer(x)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        z, info = layer(x, nonfinite_input="warn", return_info=True)
    messages = [str(w.message) for w in caught]
    assert any("non-finite values" in m for m in messages) and any("1 diverged" in m for m in messages)
    assert info.forward.converged.tolist() == [True, False, True, True]
    clean = layer(p.x[[0, 2, 3]])
    torch.testing.assert_close(z[[0, 2, 3]], clean, rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------------------------------- raising blocks
class FlakyBlock(TanhBlock):
    """A 0.5-contraction with variational dropout on the injection that raises on its ``fail_call``-th call or in
    its ``fail_vjp``-th backward (counted from when they are set)."""

    def __init__(self, seed: int) -> None:
        super().__init__(8, s=0.5, seed=seed)
        self.drop = VariationalDropout(0.25)
        self.calls = self.vjps = 0
        self.fail_call: int | None = None
        self.fail_vjp: int | None = None

    def _vjp(self, grad: Tensor) -> None:
        self.vjps += 1
        if self.vjps == self.fail_vjp:
            raise RuntimeError(f"block backward failed on VJP {self.vjps}")

    def forward(self, z: Tensor, x: Tensor) -> Tensor:
        self.calls += 1
        if self.calls == self.fail_call:
            raise RuntimeError(f"block failed on call {self.calls}")
        pre = self.pre_activation(z, self.drop(x))
        if pre.requires_grad and self.fail_vjp is not None:
            pre.register_hook(self._vjp)
        return torch.tanh(pre)


def flaky_layer(seed: int = 23) -> implicit.ImplicitModule:
    block = FlakyBlock(seed)
    weight_norm(block, "W")  # a parametrisation: cached per call by the engine
    return layer_for(block, tol=1e-12)


def run_step(layer: implicit.ImplicitModule, x: Tensor) -> tuple[Tensor, list[Tensor]]:
    torch.manual_seed(1234)  # the dropout mask's draw
    xr = x.clone().requires_grad_()
    z = layer(xr)
    grads = torch.autograd.grad(z.square().sum(), [xr, *layer.parameters()])
    return z.detach(), list(grads)


def assert_bitwise_like_fresh(layer: implicit.ImplicitModule, x: Tensor) -> None:
    z, grads = run_step(layer, x)
    z_fresh, grads_fresh = run_step(flaky_layer(), x)
    assert torch.equal(z, z_fresh)
    assert len(grads) == len(grads_fresh) and all(torch.equal(a, b) for a, b in zip(grads, grads_fresh))
    assert torch.equal(layer.last_info.forward.z, z_fresh.view_as(layer.last_info.forward.z))


@pytest.mark.parametrize("k", [1, 4])
def test_block_raising_inside_the_solve_leaves_no_half_updated_state(k):
    x = injection(4, 8, 1.0, gen(24))
    layer = flaky_layer()
    layer.train()
    layer(x)  # a previous successful call
    info_before = layer.last_info
    block = layer.block
    block.calls, block.fail_call = 0, k
    torch.manual_seed(1234)
    with pytest.raises(RuntimeError, match=f"block failed on call {k}"):
        layer(x.clone().requires_grad_())
    assert layer.last_info is info_before  # not replaced by a half-finished call
    assert parametrize._cache_enabled == 0  # the parametrisation cache was closed
    block.fail_call = None
    assert_bitwise_like_fresh(layer, x)


def test_block_raising_inside_the_backward_leaves_no_half_updated_state():
    x = injection(4, 8, 1.0, gen(25))
    layer = flaky_layer()
    block = layer.block
    block.vjps, block.fail_vjp = 0, 3  # inside the adjoint solve (the first VJP is the warm start's)
    torch.manual_seed(1234)
    xr = x.clone().requires_grad_()
    z, info = layer(xr, return_info=True)
    with pytest.raises(RuntimeError, match="block backward failed on VJP 3"):
        z.square().sum().backward()
    assert info.backward is None  # no half-filled backward report
    assert parametrize._cache_enabled == 0
    block.fail_vjp = None
    layer.zero_grad(set_to_none=True)
    assert_bitwise_like_fresh(layer, x)


def test_parametrization_raising_on_entry_restores_torchs_cache():
    """A parametrisation that raises when the layer evaluates it on entry must not leave PyTorch's global
    parametrisation cache switched on (it would serve stale weights to every parametrised module afterwards), even
    while the exception, and with it the call's frames, is kept alive."""

    class Failing(nn.Module):
        fail = False

        def forward(self, w: Tensor) -> Tensor:
            if self.fail:
                raise RuntimeError("parametrization failed")
            return w

    block = TanhBlock(6, seed=26)
    failing = Failing()
    parametrize.register_parametrization(block, "W", failing)
    layer = layer_for(block)
    x = injection(2, 6, 1.0, gen(27))
    z_ok = layer(x)
    failing.fail = True
    with pytest.raises(RuntimeError, match="parametrization failed") as excinfo:
        layer(x)
    assert excinfo.value is not None and parametrize._cache_enabled == 0
    failing.fail = False
    assert torch.equal(layer(x), z_ok)


# ------------------------------------------------------------------------------------------- found by the stress run
def test_unrolled_output_stays_connected_when_no_step_reaches_it():
    """Every sample diverging at its first evaluation, or a warm start already within tolerance: the returned point
    is z0 itself. The output still requires grad (backward runs): NaN gradients for the diverged case (as the other
    modes give), exact zeros for the converged start (the derivative of a solve that took no step)."""
    block = TanhBlock(6, seed=0)
    with torch.no_grad():
        block.b[0] = float("nan")
    layer = implicit.make_implicit(block, solver="fixed_point", backward="unrolled", on_divergence="ignore")
    x = torch.randn(2, 6, dtype=torch.float64, requires_grad=True)
    z, info = layer(x, return_info=True)
    assert info.forward.diverged.all() and z.requires_grad and torch.isfinite(z).all()
    z.sum().backward()
    assert torch.isnan(block.W.grad).any()

    healthy = implicit.make_implicit(TanhBlock(6, seed=1), solver="anderson", backward="unrolled", tol=1e-8)
    _, first = healthy(x.detach(), return_info=True)
    x2 = x.detach().clone().requires_grad_()
    z, info = healthy(x2, z0=first.state, return_info=True)
    assert info.forward.nfe == 1 and z.requires_grad
    assert torch.equal(z.detach(), first.state)
    z.sum().backward()
    assert torch.equal(x2.grad, torch.zeros_like(x2))


def test_ode_reports_a_nan_map_as_diverged_whatever_check_every():
    """A non-finite f(z) used to reach torchdiffeq's step-size control and abort with "underflow in dt"."""
    for check_every in (1, 2, 4):
        result = implicit.solve(
            lambda z: torch.tanh(0.5 * z + float("nan")),
            torch.zeros(2, 4, dtype=torch.float64),
            solver="ode",
            check_every=check_every,
            max_iter=300,
        )
        assert result.diverged.all() and not result.converged.any()
