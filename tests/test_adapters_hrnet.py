"""The HRNet stage adapter: BatchNorm conversion, batch independence, injections, what it refuses."""

from __future__ import annotations

import pytest
import torch

import adapters
import implicit

hrnet = pytest.importorskip("timm.models.hrnet")
resnet = pytest.importorskip("timm.models.resnet")

DTYPE = torch.float64
CHANNELS = [4, 8, 16, 32]


def _stage(multi_scale_output: bool = True, seed: int = 0):
    torch.manual_seed(seed)
    module = hrnet.HighResolutionModule(
        4, resnet.BasicBlock, (1, 1, 1, 1), list(CHANNELS), tuple(CHANNELS), "SUM", multi_scale_output
    )
    return hrnet.SequentialList(module).to(DTYPE)


def _inputs(batch: int = 3, seed: int = 1) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [3 * torch.randn(batch, c, 8 // 2**i, 8 // 2**i, dtype=DTYPE, generator=gen) for i, c in enumerate(CHANNELS)]


def test_batchnorms_become_groupnorms_with_their_affine_parameters():
    stage = _stage()
    with torch.no_grad():
        for module in stage.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
    block = adapters.hrnet_stage_block(stage)
    converted = dict(block.stage.named_modules())
    for name, module in stage.named_modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            new = converted[name]
            assert isinstance(new, torch.nn.GroupNorm) and new.weight is not module.weight
            assert torch.equal(new.weight, module.weight) and torch.equal(new.bias, module.bias)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in block.modules())
    assert len(block.output_norms) == 4


def test_train_mode_keeps_samples_independent():
    """GroupNorm normalises each sample alone: in training mode f of a batch is f of each sample (BatchNorm as it is
    couples them: 65 % relative difference measured)."""
    block = adapters.hrnet_stage_block(_stage()).train()
    x = _inputs()
    z = [torch.randn_like(t) for t in x]
    whole = block(z, x)
    for i in range(3):
        alone = block([t[i : i + 1] for t in z], [t[i : i + 1] for t in x])
        for a, b in zip(alone, whole):
            torch.testing.assert_close(a, b[i : i + 1], rtol=1e-12, atol=1e-12)


def test_highest_resolution_injection_adds_x_at_the_first_scale_only():
    block = adapters.hrnet_stage_block(_stage(), injection="highest").eval()
    x, z = _inputs(), [torch.randn(3, c, 8 // 2**i, 8 // 2**i, dtype=DTYPE) for i, c in enumerate(CHANNELS)]
    changed = [x[0], *(t + 1.0 for t in x[1:])]
    assert all(torch.equal(a, b) for a, b in zip(block(z, x), block(z, changed)))
    assert not torch.equal(block(z, x)[0], block(z, [x[0] + 1.0, *x[1:]])[0])


def test_frozen_batchnorm_shares_the_original_and_never_updates_it():
    stage = _stage()
    block = adapters.hrnet_stage_block(stage, norm="batch_eval").train()
    norms = [m for m in stage.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    shared = {id(p) for p in block.parameters()}
    assert all(id(n.weight) in shared for n in norms)
    before = [n.running_mean.clone() for n in norms]
    deq = implicit.make_implicit(block, tol=1e-6, max_iter=60)
    z = deq(_inputs())
    sum(t.sum() for t in z).backward()
    assert all(torch.equal(b, n.running_mean) for b, n in zip(before, norms))
    assert all(int(n.num_batches_tracked) == 0 for n in norms)


def test_what_cannot_be_a_state_is_refused():
    with pytest.raises(ValueError, match="multi_scale_output=False"):
        adapters.hrnet_stage_block(_stage(multi_scale_output=False))
    with pytest.raises(ValueError, match="norm='layer'"):
        adapters.hrnet_stage_block(_stage(), norm="layer")
    with pytest.raises(TypeError, match="holds no timm HighResolutionModule"):
        adapters.hrnet_stage_block(torch.nn.Sequential(torch.nn.Conv2d(4, 4, 1)))
    block = adapters.adapt(_stage()[0])  # a HighResolutionModule directly
    with pytest.raises(ValueError, match="4 branches"):
        block(_inputs()[:3], _inputs()[:3])
