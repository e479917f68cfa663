"""Weight / spectral normalisation helpers and variational dropout inside implicit layers."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from torch import nn

import implicit
from implicit.dropout import VariationalDropout, fixed_randomness
from implicit.norms import SpectralBound, spectral_norm, weight_norm

WIDTH = 12


class Block(nn.Module):
    def __init__(self, norm=None, dropout: float = 0.0, scale: float = 3.0) -> None:
        super().__init__()
        self.linear = nn.Linear(WIDTH, WIDTH, dtype=torch.float64)
        with torch.no_grad():
            self.linear.weight.mul_(scale)
        if norm is not None:
            norm(self.linear)
        self.drop = VariationalDropout(dropout)

    def forward(self, z, x):
        return torch.tanh(self.linear(self.drop(z)) + x)


def _x(batch: int = 4) -> torch.Tensor:
    return torch.randn(batch, WIDTH, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


@pytest.mark.parametrize("bound", [0.5, 0.9])
def test_spectral_bound_caps_sigma_without_forcing_it(bound):
    large = Block(lambda m: spectral_norm(m, bound=bound), scale=3.0)
    sigma = float(torch.linalg.matrix_norm(large.linear.weight.detach(), 2))
    assert abs(sigma - bound) < 1e-3 * bound
    small = Block(lambda m: spectral_norm(m, bound=bound), scale=0.01)
    original = small.linear.parametrizations.weight.original
    torch.testing.assert_close(small.linear.weight, original)  # below the cap: untouched


def test_spectral_bound_buffers_follow_the_weight_device_and_dtype():
    block = Block(lambda m: spectral_norm(m, bound=0.9))
    parametrization = block.linear.parametrizations.weight[0]
    assert isinstance(parametrization, SpectralBound)
    assert parametrization._u.dtype == torch.float64 and parametrization._v.dtype == torch.float64
    block.float()
    assert parametrization._u.dtype == torch.float32


@pytest.mark.parametrize(
    ("norm", "scale"),
    [
        (lambda m: spectral_norm(m, bound=0.9), 3.0),
        (lambda m: spectral_norm(m), 3.0),
        (lambda m: weight_norm(m), 0.2),  # weight norm keeps the scale: start contractive
    ],
    ids=["spectral_bound", "spectral_norm", "weight_norm"],
)
def test_normalised_blocks_train_for_two_steps_without_a_reset_and_match_unrolled_gradients(norm, scale):
    block = Block(norm, scale=scale)
    block.eval()  # freeze the power iteration so that both layers see the same weight
    deq = implicit.make_implicit(block, tol=1e-12, max_iter=300, backward_tol=1e-12, backward_max_iter=300)
    reference = implicit.make_implicit(block, solver="fixed_point", backward="unrolled", tol=0.0, max_iter=300)
    params = list(block.parameters())
    g_deq = torch.autograd.grad(deq(_x()).pow(2).sum(), params)
    g_ref = torch.autograd.grad(reference(_x()).pow(2).sum(), params)
    for a, b in zip(g_deq, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)
    block.train()
    optimizer = torch.optim.SGD(block.parameters(), lr=1e-2)
    for _ in range(2):
        optimizer.zero_grad()
        deq(_x()).pow(2).sum().backward()
        optimizer.step()
    copy.deepcopy(deq)(_x())


def test_power_iteration_advances_once_per_layer_call():
    block = Block(lambda m: spectral_norm(m, bound=0.9))
    deq = implicit.make_implicit(block, tol=1e-10, max_iter=100)
    parametrization = block.linear.parametrizations.weight[0]
    calls = []
    original = parametrization._power_iteration
    parametrization._power_iteration = lambda *a: (calls.append(1), original(*a))
    deq(_x())
    assert len(calls) == 1
    assert deq.last_info.forward.nfe > 1


def test_variational_dropout_mask_is_fixed_within_a_call_and_redrawn_between_calls():
    block = Block(dropout=0.3, scale=0.5)
    deq = implicit.make_implicit(block, tol=1e-12, max_iter=200)
    z1, info = deq(_x(), return_info=True)
    # With one mask per call the block has a fixed point, and the solver finds it.
    assert bool(info.forward.converged.all())
    mask1 = block.drop._mask.clone()
    zero_fraction = float((mask1 == 0).double().mean())
    assert 0.1 < zero_fraction < 0.5
    z2 = deq(_x())
    assert not torch.equal(block.drop._mask, mask1)
    assert not torch.allclose(z1, z2)
    # Outside an implicit layer, a new mask each forward.
    drop = VariationalDropout(0.5)
    x = torch.ones(64, 8)
    assert not torch.equal(drop(x), drop(x))


def test_variational_dropout_gradient_uses_the_calls_mask():
    torch.manual_seed(0)
    block = Block(dropout=0.3, scale=0.5)
    deq = implicit.make_implicit(block, tol=1e-13, max_iter=300, backward_tol=1e-13, backward_max_iter=300)
    x = _x().requires_grad_()
    z = deq(x)
    (g,) = torch.autograd.grad(z.sum(), x)
    mask = block.drop._mask
    # Reference: the same block with that mask frozen in, differentiated by long unrolling.
    frozen = lambda zz, xx: torch.tanh(block.linear(zz * mask) + xx)  # noqa: E731
    zz = torch.zeros_like(x)
    for _ in range(300):
        zz = frozen(zz, x)
    (g_ref,) = torch.autograd.grad(zz.sum(), x)
    torch.testing.assert_close(g, g_ref, rtol=1e-8, atol=1e-10)


def test_variational_dropout_shapes_devices_and_eval():
    drop = VariationalDropout(0.5, shared_dims=(2, 3))
    out = drop(torch.ones(2, 4, 5, 5, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16
    per_channel = out[:, :, 0, 0]
    assert torch.equal(out, per_channel[:, :, None, None].expand_as(out))
    assert drop(torch.ones(2, 3, device="meta")).device.type == "meta"
    drop.eval()
    x = torch.randn(3, 3)
    assert torch.equal(drop(x), x)
    with pytest.raises(ValueError, match="probability"):
        VariationalDropout(1.0)


class OrdinaryDropoutBlock(nn.Module):
    """A block built from modules with ordinary ``nn.Dropout``, made variational by replaying the random stream."""

    def __init__(self, replay: bool) -> None:
        super().__init__()
        self.linear = nn.Linear(WIDTH, WIDTH, dtype=torch.float64)
        with torch.no_grad():
            self.linear.weight.mul_(0.5)
        self.drop = nn.Dropout(0.3)
        self.replay = replay

    def forward(self, z, x):
        with fixed_randomness(z.device) if self.replay else contextlib.nullcontext():
            return torch.tanh(self.linear(self.drop(z)) + x)


def test_fixed_randomness_makes_ordinary_dropout_variational():
    """With the stream replayed every f-evaluation of a call draws the same masks, so the solve converges to the
    fixed point of the masked map; without it the residual stalls at the masks' noise."""
    x = torch.randn(4, WIDTH, dtype=torch.float64)
    torch.manual_seed(0)
    replayed = implicit.make_implicit(OrdinaryDropoutBlock(replay=True), solver="fixed_point", tol=1e-10, max_iter=300)
    fresh = implicit.make_implicit(OrdinaryDropoutBlock(replay=False), solver="fixed_point", tol=1e-10, max_iter=300)
    fresh.load_state_dict(replayed.state_dict())
    _, info = replayed(x, return_info=True)
    assert info.forward.converged.all()
    _, info = fresh(x, on_divergence="ignore", return_info=True)
    assert (info.forward.rel > 1e-3).all()


def test_fixed_randomness_replays_within_a_call_and_redraws_between_calls():
    block = OrdinaryDropoutBlock(replay=True)
    z, x = torch.randn(3, WIDTH, dtype=torch.float64), torch.zeros(3, WIDTH, dtype=torch.float64)
    calls: list[list[torch.Tensor]] = []

    def f(z_, x_):
        first, second = block(z_, x_), block(z_, x_)
        assert torch.equal(first, second)  # the same masks at every evaluation of one call
        calls[-1].append(first)
        return 0.5 * first

    def call(max_iter: int = 1) -> torch.Tensor:
        """The block's output at z in a new implicit call (its first f-evaluation is at z0 = z)."""
        calls.append([])
        with torch.no_grad():
            implicit.equilibrium(f, x, z, max_iter=max_iter, tol=0.0)
        return calls[-1][0]

    torch.manual_seed(7)
    first_call = call()
    assert not torch.equal(call(), first_call)  # a new call, new masks
    torch.manual_seed(7)
    assert torch.equal(call(), first_call)  # reproducible from the global seed
    # The global generator advances by one draw per call, whatever the number of f-evaluations.
    torch.manual_seed(7)
    call(max_iter=5)
    after_five = torch.rand(1)
    torch.manual_seed(7)
    call(max_iter=1)
    assert torch.equal(torch.rand(1), after_five)
    # Outside an implicit call nothing is replayed.
    assert not torch.equal(block(z, x), block(z, x))
