"""Implicit layers under DistributedDataParallel and FSDP2 (two CPU processes, gloo): gradients equal the
single-process ones."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from implicit import make_implicit


class _Block(nn.Module):
    def __init__(self, width: int = 12) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        weight = torch.randn(width, width, generator=generator, dtype=torch.float64)
        self.weight = nn.Parameter(0.8 * weight / torch.linalg.matrix_norm(weight, 2))
        self.bias = nn.Parameter(0.1 * torch.randn(width, generator=generator, dtype=torch.float64))

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(z @ self.weight.T + x + self.bias)


def _model() -> nn.Module:
    options = {"tol": 1e-12, "max_iter": 100, "backward_tol": 1e-12, "backward_max_iter": 100}
    return make_implicit(_Block(), solver="anderson", **options)


def _data() -> torch.Tensor:
    return torch.randn(8, 12, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def _wrap(model: nn.Module, wrapper: str, world: int) -> nn.Module:
    if wrapper == "ddp":
        return nn.parallel.DistributedDataParallel(model)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    fully_shard(model, mesh=init_device_mesh("cpu", (world,)))
    return model


def _full_grad(p: nn.Parameter) -> torch.Tensor:
    return p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad


def _worker(rank: int, world: int, port: int, wrapper: str, out: str) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = _wrap(_model(), wrapper, world)
        x = _data().chunk(world)[rank]
        # Two calls before one backward, as in a training step with two views of the data.
        loss = model(x).pow(2).sum() + model(0.5 * x).sum()
        loss.backward()
        grads = {name.removeprefix("module."): _full_grad(p) for name, p in model.named_parameters()}
        if rank == 0:
            torch.save(grads, out)
        dist.barrier()
        del model
    finally:
        dist.destroy_process_group()
    # Leave without the interpreter's teardown: gloo's background threads can make it abort (SIGABRT, "terminate
    # called without an active exception") after all work is done, failing the run at random.
    os._exit(0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("wrapper", ["ddp", "fsdp2"])
def test_distributed_gradients_match_single_process(tmp_path, wrapper):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    out = str(tmp_path / "grads.pt")
    mp.start_processes(_worker, args=(2, _free_port(), wrapper, out), nprocs=2, join=True, start_method="spawn")
    ddp_grads = torch.load(out)

    model = _model()
    x = _data()
    # DDP averages gradients over ranks: the mean of the per-rank losses.
    losses = [model(chunk).pow(2).sum() + model(0.5 * chunk).sum() for chunk in x.chunk(2)]
    (sum(losses) / 2).backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(ddp_grads[name], p.grad, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------------------------------- DEQ-Flow under DDP
def _flow_model() -> nn.Module:
    from torchvision.models.optical_flow import raft_small

    from integrations.flow import raft_to_deq_flow

    torch.manual_seed(0)
    return raft_to_deq_flow(raft_small(), max_iter=3, correction=2, tol=0.0).train()


def _flow_pairs() -> tuple[torch.Tensor, torch.Tensor]:
    image1 = torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(2)) * 2 - 1
    return image1, image1.roll(3, dims=-1)


def _flow_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = nn.parallel.DistributedDataParallel(_flow_model())
        image1, image2 = (t.chunk(world)[rank] for t in _flow_pairs())
        sum(flow.abs().mean() for flow in model(image1, image2)).backward()
        if rank == 0:
            torch.save({name.removeprefix("module."): p.grad for name, p in model.named_parameters()}, out)
        dist.barrier()
        del model
    finally:
        dist.destroy_process_group()
    os._exit(0)


def test_deq_flow_under_ddp_matches_single_process(tmp_path):
    """DEQ-Flow's implicit layer sits outside the module tree (its block refers back to the model); DDP still sees
    every parameter and averages the right gradients."""
    pytest.importorskip("torchvision")
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    out = str(tmp_path / "grads.pt")
    mp.start_processes(_flow_worker, args=(2, _free_port(), out), nprocs=2, join=True, start_method="spawn")
    ddp_grads = torch.load(out)

    model = _flow_model()
    pairs = [t.chunk(2) for t in _flow_pairs()]
    losses = [sum(flow.abs().mean() for flow in model(a, b)) for a, b in zip(*pairs)]
    (sum(losses) / 2).backward()
    assert set(ddp_grads) == {name for name, _ in model.named_parameters()}
    for name, p in model.named_parameters():
        torch.testing.assert_close(ddp_grads[name], p.grad, rtol=1e-4, atol=1e-7)
