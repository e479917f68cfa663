"""The adapter contract, for every adapter: structure, parameters shared by reference, state dicts, gradients (exact
and phantom) on small float64 instances, nothing mutated, and convergence where the recipe says it converges."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import nn

import adapters
import implicit
from implicit.pytree import StateLayout, tree_map
from implicit.testing import assert_gradients

DTYPE = torch.float64


@dataclass
class Case:
    """An adapter applied to a module: ``make()`` returns ``(original, block, x)`` (float64, small)."""

    make: Callable[[int, int], tuple[nn.Module, nn.Module, Any]]  # (width, seed) -> ...
    prefix: str  # where the original's state dict lives in the block's
    converges: bool = True  # at random init, by the recipe (measured)
    width: int = 8  # small instance for the gradient checks
    large: int = 32  # instance for the convergence check
    # State-dict keys of the original that the adapter converts rather than shares (HRNet's BatchNorms).
    converted: Callable[[nn.Module], set[str]] = lambda original: set()


def _tokens(width: int, seed: int, batch: int = 2, length: int = 4) -> torch.Tensor:
    return torch.randn(batch, length, width, dtype=DTYPE, generator=torch.Generator().manual_seed(seed + 100))


def _torch_layer(norm_first: bool, injection: str = "residual", dropout: float = 0.0) -> Case:
    def make(width: int, seed: int):
        torch.manual_seed(seed)
        layer = nn.TransformerEncoderLayer(
            width, 2, 2 * width, dropout=dropout, batch_first=True, norm_first=norm_first, dtype=DTYPE
        )
        return layer, adapters.transformer_block(layer, injection=injection), _tokens(width, seed)

    return Case(make, "layer.", converges=injection == "residual")


def _timm_block() -> Case:
    vision_transformer = pytest.importorskip("timm.models.vision_transformer")

    def make(width: int, seed: int):
        torch.manual_seed(seed)
        layer = vision_transformer.Block(width, 2).to(DTYPE)
        return layer, adapters.adapt(layer), _tokens(width, seed)

    return Case(make, "layer.")


def _hugging_face(kind: str, injection: str = "residual") -> Case:
    transformers = pytest.importorskip("transformers")

    def make(width: int, seed: int):
        torch.manual_seed(seed)
        if kind == "gpt2":
            from transformers.models.gpt2.modeling_gpt2 import GPT2Block

            config = transformers.GPT2Config(n_embd=width, n_head=2, n_layer=1, n_positions=64)
            config._attn_implementation = "sdpa"
            layer = GPT2Block(config, layer_idx=0)
        elif kind == "bert":
            from transformers.models.bert.modeling_bert import BertLayer

            config = transformers.BertConfig(hidden_size=width, num_attention_heads=2, intermediate_size=2 * width)
            config._attn_implementation = "sdpa"
            layer = BertLayer(config)
        else:
            from transformers.models.vit.modeling_vit import ViTLayer

            config = transformers.ViTConfig(hidden_size=width, num_attention_heads=2, intermediate_size=2 * width)
            config._attn_implementation = "sdpa"
            layer = ViTLayer(config)
        layer = layer.to(DTYPE).eval()
        return layer, adapters.adapt(layer, injection=injection), _tokens(width, seed)

    # GPT-2 with the qkv injection: the residual stream carries z alone into the final norm, which is scale invariant,
    # so f is close to the identity along the stream at random init whatever the weights' scale (measured: rel.
    # residual 1e-3 after 300 plain or Anderson steps, d = 8; trained DEQ-Transformers get their contraction from
    # training with Jacobian regularisation). Its gradients are checked on f itself (test_f_is_differentiable).
    return Case(make, "layer.", converges=injection == "residual")


def _conv_block() -> Case:
    def make(width: int, seed: int):
        torch.manual_seed(seed)
        conv1 = nn.Conv2d(width, 5 * width, 3, padding=1, bias=False, dtype=DTYPE)
        conv2 = nn.Conv2d(5 * width, width, 3, padding=1, bias=False, dtype=DTYPE)
        original = nn.ModuleDict({"conv1": conv1, "conv2": conv2})
        x = torch.randn(2, width, 4, 4, dtype=DTYPE, generator=torch.Generator().manual_seed(seed + 100))
        return original, adapters.conv_block(conv1, conv2), x

    return Case(make, "", width=8, large=32)


def _batch_norm_keys(module: nn.Module) -> set[str]:
    return {
        f"{name}.{key}"
        for name, child in module.named_modules()
        if isinstance(child, nn.BatchNorm2d)
        for key in child.state_dict()
    }


def _hrnet(norm: str = "group", injection: str = "all") -> Case:
    hrnet = pytest.importorskip("timm.models.hrnet")
    resnet = pytest.importorskip("timm.models.resnet")

    def make(width: int, seed: int):
        torch.manual_seed(seed)
        channels = [width * 2**i for i in range(4)]  # at width 16: stage 4 of hrnet_w18_small
        blocks = (2, 2, 2, 2) if width >= 16 else (1, 1, 1, 1)  # fewer tensors for the gradient checks
        stage = hrnet.SequentialList(
            hrnet.HighResolutionModule(4, resnet.BasicBlock, blocks, list(channels), tuple(channels), "SUM")
        ).to(DTYPE)
        stage.eval()  # BatchNorm statistics as a trained model has them (the adapter never updates them)
        gen = torch.Generator().manual_seed(seed + 100)
        x = [3 * torch.randn(2, c, 8 // 2**i, 8 // 2**i, dtype=DTYPE, generator=gen) for i, c in enumerate(channels)]
        return stage, adapters.hrnet_stage_block(stage, norm=norm, injection=injection), x

    converted = _batch_norm_keys if norm == "group" else (lambda original: set())
    return Case(make, "stage.", width=4, large=16, converted=converted)


CASES: dict[str, Callable[[], Case]] = {
    "torch post-LN": lambda: _torch_layer(False),
    "torch pre-LN": lambda: _torch_layer(True),
    "torch post-LN qkv": lambda: _torch_layer(False, "qkv"),
    "torch pre-LN qkv": lambda: _torch_layer(True, "qkv"),
    "timm Block": _timm_block,
    "GPT-2": lambda: _hugging_face("gpt2"),
    "GPT-2 qkv": lambda: _hugging_face("gpt2", "qkv"),
    "BERT": lambda: _hugging_face("bert"),
    "ViT": lambda: _hugging_face("vit"),
    "conv block": _conv_block,
    "HRNet stage": _hrnet,
    "HRNet stage, frozen BatchNorm": lambda: _hrnet("batch_eval"),
}


def _snapshot(tree: Any) -> Any:
    return tree_map(lambda t: t.detach().clone() if isinstance(t, torch.Tensor) else t, tree)


def _same(a: Any, b: Any) -> bool:
    la, lb = StateLayout(a), StateLayout(b)
    return la.shapes == lb.shapes and torch.equal(la.flatten(a), lb.flatten(b))


@pytest.mark.parametrize("name", CASES)
def test_structure_parameters_and_state_dict(name):
    case = CASES[name]()
    original, block, x = case.make(case.width, 0)
    assert isinstance(block, implicit.Block)
    converted = case.converted(original)
    block_parameters = {id(p) for p in block.parameters()}
    shared = [p for name, p in original.named_parameters() if name not in converted]
    assert shared and all(id(p) in block_parameters for p in shared)  # the same tensors, not copies
    keys = set(block.state_dict())
    assert {case.prefix + key for key in original.state_dict() if key not in converted} <= keys
    # The original's state dict loads into the block under the prefix (and reaches the original module); converted
    # BatchNorms take their affine parameters, their running statistics have no place.
    state = original.state_dict()
    changed = {case.prefix + key: torch.full_like(value, 0.125) for key, value in state.items()}
    missing, unexpected = block.load_state_dict(changed, strict=False)
    statistics = {case.prefix + key for key in converted if key.rsplit(".", 1)[1].startswith(("running", "num_"))}
    assert set(unexpected) == statistics and set(missing) == keys - set(changed)
    assert all(
        bool((state[key] == 0.125).all()) for key in state if key not in converted and state[key].is_floating_point()
    )
    # f maps a state to a state of the same structure, shape and dtype.
    z0 = block.initial_state(x)
    assert _same(z0, tree_map(torch.zeros_like, z0))
    out = block(z0, x)
    assert StateLayout(out).shapes == StateLayout(z0).shapes and StateLayout(out).dtypes == StateLayout(z0).dtypes


@pytest.mark.parametrize("name", CASES)
def test_a_solve_mutates_nothing(name):
    """No buffer of the module changes during a solve, and neither the user's module nor the inputs are modified."""
    case = CASES[name]()
    original, block, x = case.make(case.width, 1)
    before, x_before = copy.deepcopy(original.state_dict()), _snapshot(x)
    layer = implicit.make_implicit(block, max_iter=10, on_divergence="ignore")
    layer.train()
    z = layer(x)
    StateLayout(z).flatten(z).sum().backward()
    after = original.state_dict()
    assert all(torch.equal(before[key], after[key]) for key in before)
    assert _same(x, x_before)


@pytest.mark.parametrize("name", CASES)
def test_f_is_differentiable(name):
    """gradcheck of one application of the block, in the state and the injection."""
    case = CASES[name]()
    _, block, x = case.make(case.width, 4)
    block.eval()
    layout, injection = StateLayout(block.initial_state(x)), StateLayout(x)
    z = torch.randn(layout.flat_shape, dtype=DTYPE, generator=torch.Generator().manual_seed(5))

    def f(z_flat: torch.Tensor, x_flat: torch.Tensor) -> torch.Tensor:
        return layout.flatten(block(layout.unflatten(z_flat), injection.unflatten(x_flat)))

    flat_x = injection.flatten(x).detach().clone()
    assert torch.autograd.gradcheck(f, (z.requires_grad_(), flat_x.requires_grad_()), fast_mode=True)


@pytest.mark.parametrize(
    "mode", [{"backward": "implicit"}, {"backward": "phantom", "backward_options": {"steps": 30, "tau": 0.7}}]
)
@pytest.mark.parametrize("name", [name for name in CASES if name != "GPT-2 qkv"])  # see _hugging_face
def test_gradients_match_the_references(name, mode):
    case = CASES[name]()
    original, block, x = case.make(case.width, 2)
    if not case.converges:  # not contractive at random init: scale the weights down for the check
        with torch.no_grad():
            for parameter in original.parameters():
                if parameter.dim() > 1:
                    parameter.mul_(0.3)
    block.eval()
    # rtol 1e-5: central differences of a loss summed over many tokens carry ~1e-6 relative error from the solve
    # tolerance alone (1e-13 / step 1e-5 per entry); the unrolled reference agrees far closer.
    # The phantom mode against unrolling only: its cosine with finite differences says less, at 8× their cost.
    references = ("unrolled", "finite_differences") if mode["backward"] == "implicit" else ("unrolled",)
    report = assert_gradients(block, x, references=references, rtol=1e-5, **mode)
    assert report.approximate == (mode["backward"] == "phantom")
    assert any(check.status == "pass" for check in report.checks)


@pytest.mark.parametrize("name", [name for name in CASES if "qkv" not in name])
def test_the_recipe_converges_at_random_init(name):
    """Rel. residual below 1e-4 within 60 f-evaluations in float64, Anderson or plain iteration, from zero."""
    case = CASES[name]()
    _, block, x = case.make(case.large, 3)
    block.eval()
    best = []
    for solver in ("anderson", "fixed_point"):
        deq = implicit.make_implicit(block, solver=solver, tol=1e-4, max_iter=59, check_every=1, on_divergence="ignore")
        with torch.no_grad():
            _, info = deq(x, return_info=True)
        best.append(float(info.forward.rel.max()))
    assert min(best) < 1e-4, best


@pytest.mark.parametrize(
    "module", ["adapters.registry", "adapters.conv", "adapters.transformer", "adapters.hrnet", "adapters.raft"]
)
def test_docstring_examples_run(module):
    """Every public adapter has a short runnable example in its docstring."""
    import doctest
    import importlib

    torch.manual_seed(0)
    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
