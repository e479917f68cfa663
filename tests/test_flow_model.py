"""DEQ-Flow from torchvision's RAFT: the converted model's contract (parts by reference, RAFT's state dict), parity
with RAFT's N updates, training and eval outputs, gradients to every part, encoder checkpointing, warm starts, presets
and errors."""

from __future__ import annotations

import copy
import io

import pytest
import torch

optical_flow = pytest.importorskip("torchvision.models.optical_flow")
R = pytest.importorskip("torchvision.models.optical_flow.raft")

from adapters.raft import RaftState  # noqa: E402
from integrations.flow import PRESETS, DEQFlow, raft_to_deq_flow  # noqa: E402

PARTS = ("feature_encoder", "context_encoder", "corr_block", "update_block", "mask_predictor")


def _images(height: int, width: int, batch: int = 1, dtype: torch.dtype = torch.float32, seed: int = 0, shift=(3, 5)):
    """A random image and a copy rolled by ``shift`` pixels plus noise, in [−1, 1] as RAFT expects."""
    g = torch.Generator().manual_seed(seed)
    image1 = torch.rand(batch, 3, height, width, generator=g, dtype=dtype) * 2 - 1
    image2 = torch.roll(image1, shift, dims=(2, 3)) + 0.05 * torch.randn(image1.shape, generator=g, dtype=dtype)
    return image1, image2


def _naive(n: int, **options):
    """N plain iterations, the last one returned (measured only at 0 and N)."""
    return {"solver": "fixed_point", "max_iter": n, "eval_max_iter": n, "tol": 0.0, "check_every": n, **options}


# ------------------------------------------------------------------------------------------- contract
@pytest.mark.parametrize("build", ["raft_small", "raft_large"])
def test_parts_by_reference_and_raft_state_dict_both_ways(build):
    torch.manual_seed(0)
    raft = getattr(optical_flow, build)()
    model = raft_to_deq_flow(raft)
    assert isinstance(model, R.RAFT) and isinstance(model, DEQFlow)
    for part in PARTS:
        assert getattr(model, part) is getattr(raft, part)
    ours, theirs = model.state_dict(), raft.state_dict()
    assert list(ours) == list(theirs)
    assert all(ours[k].data_ptr() == theirs[k].data_ptr() for k in ours)  # no copies
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in raft.parameters())

    other = getattr(optical_flow, build)()
    model.load_state_dict(other.state_dict(), strict=True)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values()))
    back = getattr(optical_flow, build)()
    back.load_state_dict(model.state_dict(), strict=True)


def test_pickle_and_deepcopy_keep_the_layer_on_the_copied_parts():
    model = raft_to_deq_flow(optical_flow.raft_small())
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    for copied in (torch.load(buffer, weights_only=False), copy.deepcopy(model)):
        assert copied.deq.block.raft is copied and copied.update_block is not model.update_block
        assert copied.implicit_options == model.implicit_options


# ------------------------------------------------------------------------------------------- parity with RAFT
@pytest.mark.parametrize("size", [(128, 160), (192, 128)])
@pytest.mark.parametrize("build", ["raft_small", "raft_large"])
def test_naive_iterations_reproduce_raft_in_float32(build, size):
    """From RAFT's start (h0="tanh", zero flow), N plain iterations of the converted model are RAFT's N updates (the
    float32 gap: the state carries the flow, RAFT the absolute coordinates)."""
    torch.manual_seed(0)
    raft = getattr(optical_flow, build)().eval()
    model = raft_to_deq_flow(raft, **_naive(6)).eval()
    image1, image2 = _images(*size)
    with torch.no_grad():
        reference = raft(image1, image2, num_flow_updates=6)[-1]
        flows, info = model(image1, image2, return_info=True)
    assert len(flows) == 1 and info.forward.nfe == 7
    assert float((flows[0] - reference).abs().max()) <= 1e-4
    assert float(reference.abs().max()) > 1.0  # a non-trivial flow


@pytest.mark.parametrize("build", ["raft_small", "raft_large"])
def test_naive_iterations_reproduce_raft_in_float64(build, monkeypatch):
    grid = R.make_coords_grid
    monkeypatch.setattr(R, "make_coords_grid", lambda *args, **kw: grid(*args, **kw).to(torch.get_default_dtype()))
    torch.manual_seed(0)
    raft = getattr(optical_flow, build)().double().eval()
    model = raft_to_deq_flow(raft, **_naive(5)).eval()
    image1, image2 = _images(128, 160, dtype=torch.float64)
    torch.set_default_dtype(torch.float64)  # torchvision's lookup offsets come from the default dtype
    try:
        with torch.no_grad():
            reference = raft(image1, image2, num_flow_updates=5)[-1]
            (flow,) = model(image1, image2)
    finally:
        torch.set_default_dtype(torch.float32)
    assert flow.dtype == torch.float64
    assert float((flow - reference).abs().max()) <= 1e-10


# ------------------------------------------------------------------------------------------- outputs
def test_training_returns_the_supervised_states_and_eval_the_final_flow():
    torch.manual_seed(0)
    model = raft_to_deq_flow(optical_flow.raft_small(), max_iter=8, correction=4, tol=0.0)
    image1, image2 = _images(128, 160, batch=2)
    flows, info = model.train()(image1, image2, return_info=True)
    assert len(flows) == 4 and all(f.shape == (2, 2, 128, 160) for f in flows)
    assert info.forward.nfe == 9 and info.forward.residual.shape == (2,)
    assert isinstance(info.state, RaftState) and info.state.flow.shape == (2, 2, 16, 20)
    assert not info.state.hidden.requires_grad
    # The last supervised flow is the solution's flow.
    full = torch.nn.functional.interpolate(info.state.flow, scale_factor=8, mode="bilinear", align_corners=True) * 8
    assert torch.allclose(flows[-1], full, atol=1e-5)

    with torch.no_grad():
        evaluated, info = model.eval()(image1, image2, return_info=True)
    assert len(evaluated) == 1 and model.eval_max_iter == 12 and info.forward.nfe == 13
    with torch.no_grad():
        _, info = model(image1, image2, return_info=True, max_iter=3)  # per-call options win
    assert info.forward.nfe == 4


def test_presets_and_explicit_options():
    raft = optical_flow.raft_small()
    chairs = raft_to_deq_flow(raft, preset="chairs").implicit_options
    assert (chairs.max_iter, chairs.supervised_steps, chairs.correction_steps) == (36, (6, 12, 18, 24, 30, 36), 1)
    assert chairs.backward == "phantom" and dict(chairs.backward_options) == {"steps": 1, "tau": 1.0}
    things = raft_to_deq_flow(raft, preset="things").implicit_options
    assert (things.max_iter, things.supervised_steps, things.correction_steps) == (40, (20, 40), 3)
    mine = raft_to_deq_flow(raft, preset="things", max_iter=24, solver="broyden", jac_loss_probes=1)
    assert mine.implicit_options.max_iter == 24 and mine.implicit_options.solver == "broyden"
    assert mine.implicit_options.supervised_steps == (12, 24) and mine.eval_max_iter == 36
    assert raft_to_deq_flow(raft, eval_max_iter=5).eval_max_iter == 5
    assert set(PRESETS) == {"chairs", "things"}


def test_bad_arguments_raise_clear_errors():
    raft = optical_flow.raft_small()
    with pytest.raises(ValueError, match="unknown preset 'sintel'"):
        raft_to_deq_flow(raft, preset="sintel")
    with pytest.raises(ValueError, match="h0='ones'"):
        raft_to_deq_flow(raft, h0="ones")
    with pytest.raises(ValueError, match="eval_max_iter"):
        raft_to_deq_flow(raft, eval_max_iter=0)
    with pytest.raises(TypeError, match="unknown option"):
        raft_to_deq_flow(raft, max_iters=3)
    with pytest.raises(TypeError, match="not a torchvision RAFT"):
        raft_to_deq_flow(torch.nn.Linear(2, 2))
    model = raft_to_deq_flow(raft, max_iter=2).eval()
    with torch.no_grad():
        _, info = model(*_images(128, 160), return_info=True)
        with pytest.raises(ValueError, match=r"warm_start\.hidden has shape"):
            model(*_images(128, 160, batch=2), warm_start=info.state)
        with pytest.raises(TypeError, match="warm_start must be a RaftState"):
            model(*_images(128, 160), warm_start=info.state.flow)
        with pytest.raises(ValueError, match="divisible by 8"):
            model(*_images(128, 164))


# ------------------------------------------------------------------------------------------- gradients and memory
@pytest.mark.parametrize("checkpoint_encoders", [False, True])
def test_gradients_reach_both_encoders_the_update_and_the_mask_predictor(checkpoint_encoders):
    torch.manual_seed(0)
    raft = optical_flow.raft_large()
    model = raft_to_deq_flow(raft, max_iter=4, correction=2, checkpoint_encoders=checkpoint_encoders).train()
    flows = model(*_images(128, 128, batch=2))
    sum(f.abs().mean() for f in flows).backward()
    for part in ("feature_encoder", "context_encoder", "update_block", "mask_predictor"):
        grads = [p.grad for p in getattr(model, part).parameters() if p.requires_grad]
        assert all(g is not None for g in grads), part
        assert sum(float(g.abs().sum()) for g in grads) > 0, part


def test_checkpointed_encoders_give_the_same_gradients_and_count_batch_norm_statistics_once():
    torch.manual_seed(0)
    plain = optical_flow.raft_large().train()
    checkpointed = copy.deepcopy(plain)
    image1, image2 = _images(128, 128, batch=2)
    grads, stats = [], []
    for raft, flag in ((plain, False), (checkpointed, True)):
        model = raft_to_deq_flow(raft, max_iter=3, checkpoint_encoders=flag).train()
        model(image1, image2)[-1].abs().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in raft.context_encoder.parameters()]))
        bn = raft.context_encoder.convnormrelu[1]
        stats.append((bn.running_mean.clone(), int(bn.num_batches_tracked)))
    assert torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-7)
    assert torch.equal(stats[0][0], stats[1][0]) and stats[0][1] == stats[1][1] == 1


def test_bf16_autocast_trains_with_a_float32_flow_state():
    torch.manual_seed(0)
    model = raft_to_deq_flow(optical_flow.raft_small(), max_iter=4, correction=2).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        flows, info = model(*_images(128, 160), return_info=True)
        loss = sum(f.float().abs().mean() for f in flows)
    loss.backward()
    assert info.state.flow.dtype == torch.float32 and info.state.hidden.dtype == torch.bfloat16
    assert all(torch.isfinite(f).all() for f in flows)
    assert all(torch.isfinite(p.grad).all() for p in model.update_block.parameters() if p.grad is not None)


# ------------------------------------------------------------------------------------------- warm start
def _steady_raft() -> torch.nn.Module:
    """raft_small whose flow head is zeroed: the flow stays where it starts and the ConvGRU contracts, so solves
    converge to a tolerance (RAFT-derived f has no equilibrium before DEQ training)."""
    torch.manual_seed(0)
    raft = optical_flow.raft_small()
    with torch.no_grad():
        raft.update_block.flow_head.conv2.weight.zero_()
        raft.update_block.flow_head.conv2.bias.zero_()
    return raft.eval()


def test_warm_start_from_the_previous_pair_lowers_the_iterations_to_a_tolerance():
    model = raft_to_deq_flow(_steady_raft(), tol=1e-5, max_iter=60, check_every=1).eval()
    frame = _images(128, 160)[0]
    g = torch.Generator().manual_seed(3)
    video = [frame + 0.02 * k * torch.randn(frame.shape, generator=g) for k in range(3)]  # slowly changing frames
    with torch.no_grad():
        _, first = model(video[0], video[1], return_info=True)
        _, cold = model(video[1], video[2], return_info=True)
        _, warm = model(video[1], video[2], return_info=True, warm_start=first.state)
    assert first.forward.converged.all() and cold.forward.converged.all() and warm.forward.converged.all()
    assert warm.forward.nfe < cold.forward.nfe


# ------------------------------------------------------------------------------------------- CUDA
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
@pytest.mark.parametrize("build", ["raft_small", "raft_large"])
def test_cuda_parity_and_training_step(build):
    """On the GPU: RAFT's N updates (float32), a training step with checkpointed encoders, bf16 autocast."""
    torch.manual_seed(0)
    raft = getattr(optical_flow, build)().cuda().eval()
    model = raft_to_deq_flow(raft, **_naive(6))
    image1, image2 = (t.cuda() for t in _images(128, 160, batch=2))
    with torch.no_grad():
        reference = raft(image1, image2, num_flow_updates=6)[-1]
        (flow,) = model.eval()(image1, image2)
    assert float((flow - reference).abs().max()) <= 1e-3  # cuDNN convolutions differ from the CPU's in rounding

    trained = raft_to_deq_flow(raft, max_iter=8, correction=2, checkpoint_encoders=True).train()
    for autocast in (False, True):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            flows = trained(image1, image2)
            loss = sum(f.float().abs().mean() for f in flows)
        loss.backward()
        assert all(torch.isfinite(f).all() for f in flows)
        assert all(p.grad is not None for p in trained.update_block.parameters())
