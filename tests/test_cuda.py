"""CUDA checks (skipped without a GPU): solvers and backward modes on the device, float32 and float64, and the
host-synchronisation budget counted by ``torch.cuda.set_sync_debug_mode``."""

from __future__ import annotations

import warnings

import pytest
import torch
from problems import DISCRETE_SOLVERS, tanh_problem

import implicit

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

SOLVERS = DISCRETE_SOLVERS


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("solver", SOLVERS)
def test_solvers_match_on_cpu_and_cuda(solver, dtype):
    p = tanh_problem(0.9, "sym", 0.1, dtype=dtype).frozen()
    cpu = implicit.solve(p.fn, p.z0(), solver=solver, tol=1e-5, max_iter=200)
    p.block.cuda()
    x = p.x.cuda()
    gpu = implicit.solve(lambda z: p.block(z, x), p.z0().cuda(), solver=solver, tol=1e-5, max_iter=200)
    assert gpu.z.device.type == "cuda" and bool(gpu.converged.all())
    torch.testing.assert_close(gpu.z.cpu(), cpu.z, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"backward_solver": "gmres"},
        {"backward": "phantom"},
        {"backward": "one_step"},
        {"solver": "broyden", "backward": "shine"},
        {"backward": "unrolled"},
        {"correction": 3, "max_iter": 30},
        {"jac_loss_probes": 1},
    ],
)
def test_layer_gradients_on_cuda_match_cpu(options):
    p = tanh_problem(0.9, "gauss", 1.0, batch=4, n=16)
    exact = dict(tol=1e-12, max_iter=300, backward_tol=1e-12, backward_max_iter=300)
    cpu_layer = implicit.make_implicit(p.block, **{**exact, **options})
    gpu_layer = implicit.make_implicit(
        tanh_problem(0.9, "gauss", 1.0, batch=4, n=16).block.cuda(), **{**exact, **options}
    )

    def grads(layer, x):
        x = x.clone().requires_grad_()
        out = layer(x)
        z = out[-1] if isinstance(out, list) else out
        return torch.autograd.grad(z.pow(2).sum(), [x, *layer.parameters()])

    for a, b in zip(grads(cpu_layer, p.x), grads(gpu_layer, p.x.cuda())):
        torch.testing.assert_close(b.cpu(), a, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("solver", SOLVERS[:3])
def test_host_synchronisations_are_bounded_by_the_checks(solver):
    p = tanh_problem(0.9, "sym", 0.1, dtype=torch.float32).frozen()
    p.block.cuda()
    x, z0 = p.x.cuda(), p.z0().cuda()
    max_iter, check_every = 40, 4
    implicit.solve(lambda z: p.block(z, x), z0, solver=solver, tol=0.0, max_iter=2)  # warm-up (allocations, kernels)
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            implicit.solve(
                lambda z: p.block(z, x), z0, solver=solver, tol=0.0, max_iter=max_iter, check_every=check_every
            )
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message).lower()]
    assert len(syncs) <= max_iter // check_every + 1
