"""The RAFT update operator adapter: parity with torchvision's RAFT, the functional correlation lookup, detached
coordinates, the adapter contract and gradients on a tiny RAFT."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import adapters
import implicit
from implicit.testing import assert_gradients

optical_flow = pytest.importorskip("torchvision.models.optical_flow")
R = pytest.importorskip("torchvision.models.optical_flow.raft")


def _images(height: int, width: int, batch: int = 1, dtype: torch.dtype = torch.float32, seed: int = 0):
    """A textured image and a copy rolled by (3, 5) pixels plus noise, in [−1, 1] as RAFT expects."""
    g = torch.Generator().manual_seed(seed)
    image1 = torch.rand(batch, 3, height, width, generator=g, dtype=dtype) * 2 - 1
    image2 = torch.roll(image1, (3, 5), dims=(2, 3)) + 0.05 * torch.randn(image1.shape, generator=g, dtype=dtype)
    return image1, image2


def _iterate(raft: nn.Module, image1: torch.Tensor, image2: torch.Tensor, updates: int) -> list[torch.Tensor]:
    block = adapters.raft_update_block(raft)
    x = adapters.prepare_injection(raft, image1, image2)
    z, flows = block.initial_state(x), []
    for _ in range(updates):
        z = block(z, x)
        flows.append(adapters.upsample_flow(raft, z))
    return flows


@pytest.mark.parametrize("size", [(128, 160), (192, 128)])
@pytest.mark.parametrize("build", ["raft_small", "raft_large"])
def test_updates_reproduce_raft_in_float32(build, size):
    """N applications of f from RAFT's start are RAFT's N updates (the float32 gap: the state carries the flow, RAFT
    the absolute coordinates; measured ≤ 2.5e-5 over 6 updates)."""
    torch.manual_seed(0)
    raft = getattr(optical_flow, build)().eval()
    image1, image2 = _images(*size)
    with torch.no_grad():
        reference = raft(image1, image2, num_flow_updates=6)
        flows = _iterate(raft, image1, image2, 6)
    for ours, theirs in zip(flows, reference):
        assert float((ours - theirs).abs().max()) <= 1e-4


@pytest.mark.parametrize("build", ["raft_small", "raft_large"])
def test_updates_reproduce_raft_in_float64(build, monkeypatch):
    """In float64 the agreement is round-off. (torchvision's RAFT itself needs a float64 pixel grid to run in float64:
    its ``make_coords_grid`` returns float32; the adapter makes the grid in the features' dtype.)"""
    grid = R.make_coords_grid
    monkeypatch.setattr(R, "make_coords_grid", lambda *args, **kw: grid(*args, **kw).to(torch.get_default_dtype()))
    torch.manual_seed(0)
    raft = getattr(optical_flow, build)().double().eval()
    image1, image2 = _images(128, 160, dtype=torch.float64)
    torch.set_default_dtype(torch.float64)  # torchvision's lookup offsets come from the default dtype
    with torch.no_grad():
        reference = raft(image1, image2, num_flow_updates=4)
        flows = _iterate(raft, image1, image2, 4)
    for ours, theirs in zip(flows, reference):
        assert float((ours - theirs).abs().max()) <= 1e-10


def test_the_injection_is_what_raft_computes_and_the_model_keeps_nothing():
    torch.manual_seed(0)
    raft = optical_flow.raft_small().eval()
    image1, image2 = _images(128, 128)
    marker = raft.corr_block.corr_pyramid
    with torch.no_grad():
        x = adapters.prepare_injection(raft, image1, image2)
        fmap1, fmap2 = torch.chunk(raft.feature_encoder(torch.cat([image1, image2])), 2)
        raft.corr_block.build_pyramid(fmap1, fmap2)
        assert all(torch.equal(a, b) for a, b in zip(x.pyramid, raft.corr_block.corr_pyramid))
        coords = x.coords0 + torch.randn_like(x.coords0)
        assert torch.equal(adapters.raft.lookup(x.pyramid, coords, x.radius), raft.corr_block.index_pyramid(coords))
    raft.corr_block.corr_pyramid = marker
    with torch.no_grad():
        adapters.prepare_injection(raft, image1, image2)
    assert raft.corr_block.corr_pyramid is marker  # the pyramid travels in x, never on the module


def test_two_image_pairs_interleave():
    """The block is re-entrant: alternating the f-calls of two image pairs gives what each gives alone."""
    torch.manual_seed(0)
    raft = optical_flow.raft_small().eval()
    block = adapters.raft_update_block(raft)
    first, second = _images(128, 128, seed=1), _images(128, 128, seed=2)
    with torch.no_grad():
        xa, xb = adapters.prepare_injection(raft, *first), adapters.prepare_injection(raft, *second)
        za, zb = block.initial_state(xa), block.initial_state(xb)
        for _ in range(3):
            za, zb = block(za, xa), block(zb, xb)
        alone = _iterate(raft, *first, 3)[-1]
    assert torch.equal(adapters.upsample_flow(raft, za), alone)


@pytest.mark.parametrize("detach", [True, False])
def test_detached_coordinates_cut_the_flow_path(detach):
    """With ``detach_coords`` (RAFT's convention) the flow enters the update only as a constant: the new flow's
    derivative in the old flow is zero; without it the lookup and motion encoder are differentiated."""
    torch.manual_seed(0)
    raft = optical_flow.raft_small().eval()
    block = adapters.raft_update_block(raft, detach_coords=detach)
    with torch.no_grad():
        x = adapters.prepare_injection(raft, *_images(128, 128))
    hidden, flow = block.initial_state(x)
    flow = (flow + 0.5).requires_grad_()
    _, new_flow = block(adapters.RaftState(hidden, flow), x)
    (grad,) = torch.autograd.grad(new_flow.sum(), flow, allow_unused=True)
    assert (grad is None) == detach


def test_contract_by_reference_state_dict_and_no_buffer_changes():
    torch.manual_seed(0)
    raft = optical_flow.raft_large()  # its context encoder has BatchNorms
    block = adapters.adapt(raft)
    assert block.raft is raft and {id(p) for p in block.parameters()} == {id(p) for p in raft.parameters()}
    assert set(block.state_dict()) == {"raft." + key for key in raft.state_dict()}
    with torch.no_grad():
        x = adapters.prepare_injection(raft.eval(), *_images(128, 128))
    raft.train()
    before = copy.deepcopy(raft.state_dict())
    layer = implicit.make_implicit(block, max_iter=4, on_divergence="ignore")
    z = layer(x)
    (adapters.upsample_flow(raft, z).sum() + z.hidden.sum()).backward()
    after = raft.state_dict()
    assert all(torch.equal(before[key], after[key]) for key in before)
    assert raft.update_block.recurrent_block.convgru1.convz.weight.grad is not None
    assert raft.mask_predictor.conv.weight.grad is not None
    with pytest.raises(ValueError, match="h0='random'"):
        adapters.raft_update_block(raft, h0="random")
    with pytest.raises(ValueError, match="divisible by 8"):
        adapters.prepare_injection(raft, torch.zeros(1, 3, 130, 128), torch.zeros(1, 3, 130, 128))


def tiny_raft(dtype: torch.dtype = torch.float64) -> nn.Module:
    """A torchvision RAFT of the real parts at toy sizes (2 pyramid levels, radius 1, 8 channels): small enough for
    the gradient checker. Its flow head's last convolution is zeroed, so that the flow has an equilibrium (at random
    initialisation RAFT's update drifts) and the hidden state converges."""
    torch.manual_seed(0)
    levels, radius, hidden, context = 2, 1, 8, 8
    motion = R.MotionEncoder(
        in_channels_corr=levels * (2 * radius + 1) ** 2, corr_layers=(8,), flow_layers=(8, 8), out_channels=8
    )
    recurrent = R.RecurrentBlock(input_size=8 + context, hidden_size=hidden, kernel_size=((3, 3),), padding=((1, 1),))
    model = R.RAFT(
        feature_encoder=R.FeatureEncoder(layers=(8, 8, 8, 8, 16), norm_layer=nn.InstanceNorm2d),
        context_encoder=R.FeatureEncoder(layers=(8, 8, 8, 8, hidden + context), norm_layer=nn.BatchNorm2d),
        corr_block=R.CorrBlock(num_levels=levels, radius=radius),
        update_block=R.UpdateBlock(
            motion_encoder=motion, recurrent_block=recurrent, flow_head=R.FlowHead(in_channels=hidden, hidden_size=8)
        ),
        mask_predictor=R.MaskPredictor(in_channels=hidden, hidden_size=8),
    ).to(dtype)
    with torch.no_grad():
        model.update_block.flow_head.conv2.weight.zero_()
        model.update_block.flow_head.conv2.bias.zero_()
    return model.eval()


@pytest.mark.parametrize(
    "mode",
    [{"backward": "implicit", "backward_max_iter": 300}, {"backward": "phantom", "backward_options": {"steps": 30}}],
)
def test_gradients_on_a_tiny_raft(mode):
    """Against autograd through long plain iteration. Finite differences do not apply with detached coordinates: the
    gradient is that of the system with the flow path cut (RAFT's), not of the equilibrium of the full map."""
    raft = tiny_raft()
    with torch.no_grad():
        x = adapters.prepare_injection(raft, *_images(32, 40, batch=2, dtype=torch.float64))
    report = assert_gradients(adapters.raft_update_block(raft), x, references=("unrolled",), **mode)
    assert any(c.status == "pass" and c.metric != "zero (norm)" for c in report.checks)
    used = {c.tensor for c in report.checks if c.metric != "zero (norm)"}
    assert any("update_block.recurrent_block" in name for name in used) and "x.context" in used
