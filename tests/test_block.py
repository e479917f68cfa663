"""The block contract ``implicit.Block``: ``forward(z, x) -> z``, optional ``initial_state(x)``; ``make_implicit``
checks the signature once and names the expected one when it does not fit."""

from __future__ import annotations

import pytest
import torch
from problems import TanhBlock
from torch import nn

import implicit


class Keyword(nn.Module):
    """Extra keyword-only arguments with defaults are fine."""

    def forward(self, z, x, *, scale: float = 0.5):
        return scale * z + x


class Variadic(nn.Module):
    def forward(self, *args):
        z, x = args
        return 0.5 * z + x


class OneArgument(nn.Module):
    def forward(self, x):
        return x


class ThreeArguments(nn.Module):
    def forward(self, z, x, y):
        return z


class NoForward(nn.Module):
    pass


def test_blocks_satisfy_the_runtime_checkable_protocol():
    assert isinstance(TanhBlock(4), implicit.Block)
    assert isinstance(Keyword(), implicit.Block)
    assert not isinstance(lambda z, x: z, implicit.Block)


@pytest.mark.parametrize("block", [Keyword(), Variadic()])
def test_a_block_taking_z_and_x_is_accepted(block):
    layer = implicit.make_implicit(block, solver="fixed_point", tol=1e-10, max_iter=100)
    x = torch.ones(2, 3)
    torch.testing.assert_close(layer(x), 2 * x, rtol=0, atol=1e-8)  # z* = x / (1 − 0.5)


@pytest.mark.parametrize(
    ("block", "named"),
    [
        (OneArgument(), "OneArgument.forward(x)"),
        (ThreeArguments(), "ThreeArguments.forward(z, x, y)"),
        (nn.Linear(3, 3), "Linear.forward(input: torch.Tensor) -> torch.Tensor"),
    ],
)
def test_a_forward_not_taking_z_and_x_is_refused_naming_the_signature(block, named):
    for make in (lambda: implicit.make_implicit(block), lambda: implicit.make_implicit(type(block))):
        with pytest.raises(TypeError) as err:
            make()
        message = str(err.value)
        assert named in message and "forward(z, x) -> z" in message and "implicit.Block" in message


def test_a_module_without_forward_is_refused():
    with pytest.raises(TypeError, match="NoForward defines no forward"):
        implicit.make_implicit(NoForward())
    with pytest.raises(TypeError, match="NoForward defines no forward"):
        implicit.make_implicit(solver="anderson")(NoForward)


def test_initial_state_of_the_protocol_is_used_by_every_form():
    class Wide(nn.Module):
        def forward(self, z, x):
            return 0.5 * z + x.sum(dim=1, keepdim=True)

        def initial_state(self, x):
            return torch.zeros(x.shape[0], 1, dtype=x.dtype)

    x = torch.ones(2, 3)
    want = torch.full((2, 1), 6.0)
    for layer in (implicit.make_implicit(Wide(), tol=1e-10), implicit.make_implicit(Wide, tol=1e-10)()):
        torch.testing.assert_close(layer(x), want, rtol=0, atol=1e-7)


def test_a_library_layer_with_an_optional_second_argument_points_to_the_adapters():
    """``nn.TransformerEncoderLayer.forward(src, src_mask=None, ...)``: wrapped as it is, x would become the mask."""
    layer = nn.TransformerEncoderLayer(8, 2, 16, batch_first=True)
    with pytest.raises(TypeError) as err:
        implicit.make_implicit(layer)
    message = str(err.value)
    assert "TransformerEncoderLayer is a layer of torch.nn" in message and "'src_mask'" in message
    assert "adapters.adapt" in message
    # A library layer whose two arguments are both required is a valid f(z, x), e.g. a bilinear map.
    bilinear = implicit.make_implicit(nn.Bilinear(3, 3, 3).double(), solver="fixed_point", tol=1e-10, max_iter=500)
    with torch.no_grad():
        bilinear.block.weight.mul_(0.1)
    z = bilinear(torch.full((2, 3), 0.1, dtype=torch.float64))
    assert bilinear.last_info.forward.converged.all() and z.shape == (2, 3)
