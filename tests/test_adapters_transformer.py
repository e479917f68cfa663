"""Transformer adapters: what f computes for each injection, masks, batch conventions, dropout, final norms, the
Jacobian regulariser, and ``adapters.adapt``'s dispatch."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import adapters
import implicit

DTYPE = torch.float64


def _layer(norm_first: bool = False, dropout: float = 0.0, batch_first: bool = True, seed: int = 0):
    torch.manual_seed(seed)
    return nn.TransformerEncoderLayer(
        16, 2, 32, dropout=dropout, batch_first=batch_first, norm_first=norm_first, dtype=DTYPE
    ).eval()


def _tokens(batch: int = 3, length: int = 5, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, length, 16, dtype=DTYPE, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("norm_first", [False, True])
def test_residual_injection_is_the_layer_on_z_plus_x(norm_first):
    layer = _layer(norm_first)
    block = adapters.transformer_block(layer, final_norm=False)
    z, x = _tokens(seed=2), _tokens(seed=3)
    assert torch.equal(block(z, x), layer(z + x))


@pytest.mark.parametrize("norm_first", [False, True])
def test_qkv_injection_shifts_the_attention_input_only(norm_first):
    """With x = 0 both injections are the layer itself; with x ≠ 0 the attention reads (LN(z) or z) + x while the
    residual stream carries z."""
    layer = _layer(norm_first)
    block = adapters.transformer_block(layer, injection="qkv", final_norm=False)
    z, x = _tokens(seed=2), _tokens(seed=3)
    torch.testing.assert_close(block(z, torch.zeros_like(x)), layer(z), rtol=1e-12, atol=1e-12)
    seen = []
    handle = layer.self_attn.register_forward_hook(lambda module, args, kwargs_out: seen.append(args[0]))
    try:
        out = block(z, x)
    finally:
        handle.remove()
    attention_input = layer.norm1(z) if norm_first else z
    torch.testing.assert_close(seen[0], attention_input + x, rtol=0, atol=0)
    # the residual stream: post-LN norm1(z + attention(...)), not norm1(z + x + ...)
    assert not torch.allclose(out, layer(z + x))


def test_sequence_first_layers_take_batch_first_states():
    """The state is (B, T, D) whatever the layer's convention; a sequence-first layer gives the same f."""
    first = _layer(batch_first=True)
    second = _layer(batch_first=False)
    second.load_state_dict(first.state_dict())
    z, x = _tokens(seed=2), _tokens(seed=3)
    for injection in ("residual", "qkv"):
        a = adapters.transformer_block(first, injection=injection)(z, x)
        b = adapters.transformer_block(second, injection=injection)(z, x)
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_masks_pass_through_the_injection():
    """A key-padding mask hides the last tokens: the other tokens' equilibrium does not depend on them. A float
    causal mask of −inf (PyTorch's own) is accepted through transformer_input."""
    layer = _layer()
    deq = implicit.make_implicit(adapters.adapt(layer), solver="anderson", tol=1e-10, max_iter=200)
    x = _tokens(batch=2, length=6, seed=4)
    padding = torch.zeros(2, 6, dtype=torch.bool)
    padding[:, 4:] = True
    other = x.clone()
    other[:, 4:] = torch.randn(2, 2, 16, dtype=DTYPE)
    with torch.no_grad():
        a = deq(adapters.transformer_input(x, key_padding_mask=padding))
        b = deq(adapters.transformer_input(other, key_padding_mask=padding))
    torch.testing.assert_close(a[:, :4], b[:, :4], rtol=1e-8, atol=1e-8)
    causal = nn.Transformer.generate_square_subsequent_mask(6, dtype=DTYPE)
    inputs = adapters.transformer_input(x, attn_mask=causal, is_causal=True)
    assert inputs.attn_mask is not None and inputs.attn_mask.dtype == torch.bool
    with torch.no_grad():
        z = deq(inputs)
        changed = deq(adapters.transformer_input(torch.cat([x[:, :3], other[:, 3:]], 1), attn_mask=causal))
    torch.testing.assert_close(z[:, :3], changed[:, :3], rtol=1e-8, atol=1e-8)  # token t sees tokens ≤ t only
    with pytest.raises(ValueError, match="non-finite"):
        deq(adapters.TransformerInput(x, attn_mask=causal))  # the raw −inf mask, not through transformer_input


def test_dropout_draws_one_set_of_masks_per_call():
    """Train mode with dropout 0.1 everywhere (including attention probabilities): the solve converges, as with
    fixed masks, and consecutive calls draw new masks."""
    layer = _layer(dropout=0.1).train()
    deq = implicit.make_implicit(adapters.adapt(layer), solver="anderson", tol=1e-9, max_iter=200)
    x = _tokens()
    with torch.no_grad():
        first, info = deq(x, return_info=True)
        assert info.forward.converged.all()
        second = deq(x)
    assert not torch.allclose(first, second)
    evaluation = deq.eval()
    with torch.no_grad():
        assert torch.equal(evaluation(x), evaluation(x))


def test_jacobian_regularisation_of_an_adapted_layer():
    layer = _layer().train()
    deq = implicit.make_implicit(adapters.adapt(layer), jac_loss_probes=1, tol=1e-6, max_iter=100)
    z, info = deq(_tokens(), return_info=True)
    (z.square().mean() + info.jac_loss).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in layer.parameters())


def test_final_norm_defaults_and_choices():
    post, pre = _layer(norm_first=False), _layer(norm_first=True)
    assert adapters.transformer_block(post).final_norm is None
    assert isinstance(adapters.transformer_block(pre).final_norm, nn.LayerNorm)
    assert isinstance(adapters.transformer_block(post, final_norm=True).final_norm, nn.LayerNorm)
    assert adapters.transformer_block(pre, final_norm=False).final_norm is None
    mine = nn.LayerNorm(16, dtype=DTYPE)
    block = adapters.transformer_block(pre, final_norm=mine)
    assert block.final_norm is mine and block.final_norm.weight is mine.weight
    with pytest.raises(TypeError, match="final_norm"):
        adapters.transformer_block(pre, final_norm="layer")


def test_pre_ln_without_a_final_norm_drifts():
    """The reason for the default: without the final norm each call adds about x to the residual stream; ‖z‖ grows
    linearly while the relative residual falls like 1/k (measured: exactly 1/k, ‖z‖ × 10 from call 10 to 100)."""
    block = adapters.transformer_block(_layer(norm_first=True), final_norm=False)
    x = _tokens()
    deq = implicit.make_implicit(block, solver="fixed_point", tol=0.0, check_every=1, on_divergence="ignore")
    with torch.no_grad():
        _, short = deq(x, max_iter=10, return_info=True)
        _, long = deq(x, max_iter=100, return_info=True)
    assert (long.forward.abs > 0.5 * short.forward.abs).all()  # the absolute residual does not fall
    assert (long.forward.rel < 0.2 * short.forward.rel).all()  # while the relative one does, like 1/k
    converged = implicit.make_implicit(adapters.transformer_block(block.layer), solver="fixed_point", tol=1e-8)
    with torch.no_grad():
        _, info = converged(x, max_iter=100, return_info=True)
    assert info.forward.converged.all()


def test_adapt_dispatches_on_the_type_and_names_the_supported_ones():
    class MyLayer(nn.TransformerEncoderLayer):
        pass

    torch.manual_seed(0)
    sub = MyLayer(16, 2, 32, batch_first=True, dtype=DTYPE)
    assert isinstance(adapters.adapt(sub), adapters.TransformerBlock)
    with pytest.raises(TypeError) as err:
        adapters.adapt(nn.Linear(3, 3))
    message = str(err.value)
    assert "torch.nn.modules.linear.Linear" in message and "TransformerEncoderLayer" in message
    vision_transformer = pytest.importorskip("timm.models.vision_transformer")
    with pytest.raises(ValueError, match="injection='qkv' is not available for Block"):
        adapters.adapt(vision_transformer.Block(16, 2), injection="qkv")
