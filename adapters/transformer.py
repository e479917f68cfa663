"""Transformer layers as DEQ blocks (Bai, Kolter and Koltun, "Deep Equilibrium Models", NeurIPS 2019): PyTorch's
``nn.TransformerEncoderLayer``, timm's ViT ``Block`` and Hugging Face's GPT-2, BERT and ViT layers.

The state is the token sequence ``z`` of shape ``(B, T, D)`` (batch first, whatever the layer's own convention);
the injection ``x`` is the input embedding of the same shape, or a :class:`TransformerInput` that also carries the
attention masks. Two injections:

* ``"residual"`` (default): ``f(z, x) = layer(z + x)``;
* ``"qkv"`` (DEQ-Transformer): the embedding is added to the attention's query / key / value projections, through the
  layer's own projection weights (``qkv(h) + x W``, as ``qkv(h + x)`` less a second bias), while the residual stream
  carries z alone. For ``nn.TransformerEncoderLayer`` and GPT-2.

A pre-LN layer keeps ``z + x`` unnormalised in its residual stream, so each call adds about x: the iterates drift
linearly and the relative residual falls like 1/k without converging. Such layers get a final ``LayerNorm`` by
default (``final_norm``), which bounds the map; post-LN layers converge as they are. Dropout anywhere in the layer
(including attention-probability dropout and drop-path) draws one set of masks per DEQ call: the layer runs under
:func:`implicit.dropout.fixed_randomness` in training mode.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from implicit.dropout import fixed_randomness

from .registry import by_class, class_path, register_adapter

INJECTIONS = ("residual", "qkv")

TORCH_LAYER = "torch.nn.modules.transformer.TransformerEncoderLayer"
TIMM_BLOCK = "timm.models.vision_transformer.Block"
GPT2_BLOCK = "transformers.models.gpt2.modeling_gpt2.GPT2Block"
BERT_LAYER = "transformers.models.bert.modeling_bert.BertLayer"
VIT_LAYER = "transformers.models.vit.modeling_vit.ViTLayer"


class TransformerInput(NamedTuple):
    """The injection of a transformer block: token embeddings ``(B, T, D)`` and what the layer's attention takes.

    Attributes:
        tokens: the input embedding, added to the state (``"residual"``) or to the query/key/value projections.
        attn_mask: the layer's attention mask, in the layer's own convention (``nn.TransformerEncoderLayer``: (T, T)
            or (B·heads, T, T), boolean True = masked or additive; timm: additive or boolean; Hugging Face: its
            layer-level (B, 1, T, T) additive mask).
        key_padding_mask: ``(B, T)`` (``nn.TransformerEncoderLayer`` only).
        is_causal: the causal hint of ``nn.TransformerEncoderLayer``.
    """

    tokens: Tensor
    attn_mask: Tensor | None = None
    key_padding_mask: Tensor | None = None
    is_causal: bool = False


def transformer_input(
    tokens: Tensor, attn_mask: Tensor | None = None, key_padding_mask: Tensor | None = None, is_causal: bool = False
) -> TransformerInput:
    """A :class:`TransformerInput`, with float masks made only of 0 and −inf (PyTorch's
    ``generate_square_subsequent_mask``) turned into the equivalent boolean masks (True = masked), whose entries
    pass the layer's non-finite-input check."""
    return TransformerInput(tokens, _boolean(attn_mask), _boolean(key_padding_mask), is_causal)


def _boolean(mask: Tensor | None) -> Tensor | None:
    if mask is None or not mask.is_floating_point():
        return mask
    blocked = mask == float("-inf")
    if bool(((mask == 0) | blocked).all()):
        return blocked
    return mask


def _as_input(x: Any) -> TransformerInput:
    if isinstance(x, TransformerInput):
        return x
    if isinstance(x, Tensor):
        return TransformerInput(x)
    raise TypeError(f"a transformer block's injection is a (B, T, D) tensor or a TransformerInput, got {type(x)}")


class TransformerBlock(nn.Module):
    """A transformer layer as ``f(z, x)``: the layer (held by reference, state dict under ``layer.``), the injection
    and an optional final norm (its own parameters under ``final_norm.``, or a module you passed, by reference)."""

    def __init__(self, layer: nn.Module, width: int, *, injection: str, final_norm: nn.Module | None) -> None:
        super().__init__()
        self.layer = layer
        self.width = width
        self.injection = injection
        self.final_norm = final_norm

    def forward(self, z: Tensor, x: Any) -> Tensor:
        inputs = _as_input(x)
        if inputs.tokens.shape != z.shape or z.shape[-1] != self.width:
            raise ValueError(
                f"{type(self).__name__}: tokens of shape (B, T, {self.width}) expected, the state has "
                f"{tuple(z.shape)} and the injection {tuple(inputs.tokens.shape)}"
            )
        with fixed_randomness(z.device) if self.training else contextlib.nullcontext():
            out = self.step(z, inputs)
        return out if self.final_norm is None else self.final_norm(out)

    def step(self, z: Tensor, inputs: TransformerInput) -> Tensor:
        """One application of the layer with the injection (before the final norm)."""
        raise NotImplementedError

    def initial_state(self, x: Any) -> Tensor:
        """Zeros shaped like the tokens ``(B, T, D)``."""
        return torch.zeros_like(_as_input(x).tokens)

    def extra_repr(self) -> str:
        return f"injection={self.injection!r}"


class EncoderLayerBlock(TransformerBlock):
    """``nn.TransformerEncoderLayer`` (post-LN or ``norm_first``), ``"residual"`` or ``"qkv"`` injection."""

    layer: nn.TransformerEncoderLayer

    def step(self, z: Tensor, inputs: TransformerInput) -> Tensor:
        layer = self.layer
        masks = {"attn_mask": inputs.attn_mask, "key_padding_mask": inputs.key_padding_mask}
        flip = not layer.self_attn.batch_first  # the state is batch first; the layer may not be
        if self.injection == "residual":
            h = z + inputs.tokens
            h = h.transpose(0, 1) if flip else h
            out = layer(
                h,
                src_mask=masks["attn_mask"],
                src_key_padding_mask=masks["key_padding_mask"],
                is_causal=inputs.is_causal,
            )
            return out.transpose(0, 1) if flip else out
        z_, u = (z.transpose(0, 1), inputs.tokens.transpose(0, 1)) if flip else (z, inputs.tokens)

        def attend(h: Tensor) -> Tensor:  # the layer's attention on h, its projections shifted by u W
            q = h + u
            out = layer.self_attn(q, q, q, need_weights=False, is_causal=inputs.is_causal, **masks)[0]
            return layer.dropout1(out)

        def feed_forward(h: Tensor) -> Tensor:
            return layer.dropout2(layer.linear2(layer.dropout(layer.activation(layer.linear1(h)))))

        if layer.norm_first:
            h = z_ + attend(layer.norm1(z_))
            out = h + feed_forward(layer.norm2(h))
        else:
            h = layer.norm1(z_ + attend(z_))
            out = layer.norm2(h + feed_forward(h))
        return out.transpose(0, 1) if flip else out


class TimmBlock(TransformerBlock):
    """timm's ViT ``Block`` (pre-LN), ``"residual"`` injection."""

    def step(self, z: Tensor, inputs: TransformerInput) -> Tensor:
        if inputs.key_padding_mask is not None or inputs.is_causal:
            raise ValueError("timm's Block takes attn_mask only (no key_padding_mask, no is_causal hint)")
        return self.layer(z + inputs.tokens, attn_mask=inputs.attn_mask)


class HuggingFaceBlock(TransformerBlock):
    """Hugging Face GPT-2 (``"residual"`` or ``"qkv"``), BERT and ViT layers; ``attn_mask`` is the layer-level mask."""

    def step(self, z: Tensor, inputs: TransformerInput) -> Tensor:
        if inputs.key_padding_mask is not None or inputs.is_causal:
            raise ValueError("Hugging Face layers take their own attention_mask (as attn_mask) only")
        layer: Any = self.layer  # a third-party module
        if self.injection == "qkv":  # GPT-2: the attention reads ln_1(z) + x, the residual stream carries z
            attended = layer.attn(layer.ln_1(z) + inputs.tokens, attention_mask=inputs.attn_mask)[0]
            h = z + attended
            return h + layer.mlp(layer.ln_2(h))
        out = layer(z + inputs.tokens, attention_mask=inputs.attn_mask)
        return out[0] if isinstance(out, tuple) else out


class _Family(NamedTuple):
    """How to read a layer family (its modules are third-party, hence ``Any``)."""

    block: type[TransformerBlock]
    width: Callable[[Any], int]
    pre_ln: Callable[[Any], bool]
    eps: Callable[[Any], float]
    injections: tuple[str, ...]


def _normalized(norm: Any) -> int:
    return int(norm.normalized_shape[0])


_FAMILIES: dict[str, _Family] = {
    TORCH_LAYER: _Family(
        EncoderLayerBlock, lambda m: m.linear1.in_features, lambda m: m.norm_first, lambda m: m.norm1.eps, INJECTIONS
    ),
    TIMM_BLOCK: _Family(TimmBlock, lambda m: _normalized(m.norm1), lambda m: True, lambda m: 1e-6, ("residual",)),
    GPT2_BLOCK: _Family(
        HuggingFaceBlock, lambda m: _normalized(m.ln_1), lambda m: True, lambda m: m.ln_1.eps, INJECTIONS
    ),
    BERT_LAYER: _Family(
        HuggingFaceBlock,
        lambda m: _normalized(m.output.LayerNorm),
        lambda m: False,
        lambda m: m.output.LayerNorm.eps,
        ("residual",),
    ),
    VIT_LAYER: _Family(
        HuggingFaceBlock,
        lambda m: _normalized(m.layernorm_before),
        lambda m: True,
        lambda m: m.layernorm_before.eps,
        ("residual",),
    ),
}


def _family(layer: nn.Module) -> _Family:
    family = by_class(_FAMILIES, layer)
    if family is not None:
        return family
    raise TypeError(
        f"transformer_block: unsupported layer {class_path(type(layer))}; supported: {', '.join(sorted(_FAMILIES))}"
    )


@register_adapter(*_FAMILIES)
def transformer_block(
    layer: nn.Module, *, injection: str = "residual", final_norm: bool | nn.Module | None = None
) -> TransformerBlock:
    """A transformer layer as a DEQ block ``f(z, x)`` over token states ``(B, T, D)``.

    Args:
        layer: an ``nn.TransformerEncoderLayer``, a timm ``vision_transformer.Block`` or a Hugging Face
            ``GPT2Block``, ``BertLayer`` or ``ViTLayer`` (held by reference; its state dict loads under ``layer.``).
        injection: ``"residual"`` (``layer(z + x)``) or ``"qkv"`` (the embedding added to the attention's
            projections through the layer's own weights; ``nn.TransformerEncoderLayer`` and GPT-2).
        final_norm: ``None`` (default): a final ``LayerNorm`` for pre-LN layers (``norm_first``, timm, GPT-2, ViT),
            none for post-LN ones (post-LN plus a final LN is post-LN again); ``True`` / ``False``: always / never;
            or a norm module of your own (held by reference). Without it a pre-LN layer drifts: each call adds about
            x to the residual stream, ‖z‖ grows linearly and the relative residual falls like 1/k without converging.

    Pre-LN and post-LN layers with this recipe converge from zero at random initialisation (post-LN
    ``nn.TransformerEncoderLayer``, d_model 64: rel. residual 1e-10–3e-8 after 60 plain iterations). The injection
    ``x`` is a ``(B, T, D)`` tensor or a :class:`TransformerInput` with masks (:func:`transformer_input`).

    Example::

        >>> import torch
        >>> from torch import nn
        >>> import adapters, implicit
        >>> layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.1, batch_first=True, norm_first=True)
        >>> deq = implicit.make_implicit(adapters.transformer_block(layer), solver="anderson", tol=1e-5)
        >>> deq(torch.randn(2, 5, 16)).shape
        torch.Size([2, 5, 16])
    """
    family = _family(layer)
    if injection not in family.injections:
        raise ValueError(
            f"transformer_block: injection={injection!r} is not available for {type(layer).__name__}; "
            f"valid: {', '.join(map(repr, family.injections))}"
        )
    width = family.width(layer)
    norm: nn.Module | None
    if isinstance(final_norm, nn.Module):
        norm = final_norm
    elif final_norm is True or (final_norm is None and family.pre_ln(layer)):
        weight = next(layer.parameters())
        norm = nn.LayerNorm(width, eps=family.eps(layer), device=weight.device, dtype=weight.dtype)
    elif final_norm is None or final_norm is False:
        norm = None
    else:
        raise TypeError(f"transformer_block: final_norm must be None, True, False or a module, got {final_norm!r}")
    return family.block(layer, width, injection=injection, final_norm=norm)
