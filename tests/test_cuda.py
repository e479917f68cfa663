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


# ------------------------------------------------------------------------------ execution="graph" and "compiled"
GRAPH_SOLVERS = ("fixed_point", "anderson", "broyden")


def _cuda_problem(dtype, batch=4, seed=0):
    p = tanh_problem(0.8, "gauss", 1.0, batch=batch, n=16, seed=seed, dtype=dtype)
    p.block.cuda()
    return p, p.x.cuda()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("solver", GRAPH_SOLVERS)
def test_graph_execution_replays_the_eager_result(solver, dtype):
    """Captured once, replayed with new inputs: each replay returns what eager mode returns for those inputs (same
    per-sample iterates, residuals, stopping), the batch's nfe being the whole budget."""
    p, x = _cuda_problem(dtype)
    options = dict(solver=solver, tol=1e-5, max_iter=20, check_every=2)
    graph = implicit.make_implicit(p.block, execution="graph", **options)
    eager = implicit.make_implicit(p.block, **options)
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)
    with torch.no_grad():
        for scale in (1.0, 0.5, 2.0):
            zg, ig = graph(x * scale, return_info=True)
            ze, ie = eager(x * scale, return_info=True)
            torch.testing.assert_close(zg, ze, **tol)
            assert ig.forward.nfe == 21
            assert torch.equal(ig.forward.converged, ie.forward.converged)
            if dtype == torch.float64:
                assert torch.equal(ig.forward.nstep, ie.forward.nstep)


def test_graph_execution_recaptures_on_new_shapes_and_keeps_few():
    from implicit import cuda_graph

    p, x = _cuda_problem(torch.float32, batch=8)
    layer = implicit.make_implicit(p.block, execution="graph", max_iter=10)
    with torch.no_grad():
        for batch in range(1, 8):
            z = layer(x[:batch])
            torch.testing.assert_close(z, implicit.make_implicit(p.block, max_iter=10)(x[:batch]), rtol=1e-4, atol=1e-5)
    assert len(cuda_graph._CAPTURES[layer]) == cuda_graph.MAX_CAPTURES


def test_graph_execution_memory_stays_flat_and_sees_in_place_parameter_updates():
    p, x = _cuda_problem(torch.float32)
    layer = implicit.make_implicit(p.block, execution="graph", max_iter=15)
    with torch.no_grad():
        layer(x)
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        for _ in range(30):
            layer(x)
        torch.cuda.synchronize()
        assert torch.cuda.memory_allocated() == before
        p.block.W.mul_(0.5)  # what an optimizer step does: in place
        torch.testing.assert_close(layer(x), implicit.make_implicit(p.block, max_iter=15)(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"backward": "phantom"},
        {"backward": "one_step"},
        {"solver": "broyden", "backward": "shine"},
        {"correction": 3},
        {"jac_loss_probes": 1},
    ],
)
@pytest.mark.parametrize("execution", ["graph", "compiled"])
def test_graph_and_compiled_gradients_match_eager(options, execution):
    p, x = _cuda_problem(torch.float64)
    # SHINE reuses the estimate after the solver's last step: compare against an eager run of the whole budget too.
    tol = 0.0 if options.get("backward") == "shine" else 1e-10
    settings = dict(tol=tol, max_iter=60, backward_tol=1e-10, backward_max_iter=100, **options)

    def grads(layer):
        xr = x.clone().requires_grad_()
        torch.manual_seed(0)
        out, info = layer(xr, return_info=True)
        states = out if isinstance(out, list) else [out]
        loss = sum(s.pow(2).sum() for s in states) + (info.jac_loss if info.jac_loss is not None else 0)
        return torch.autograd.grad(loss, [xr, *layer.parameters()])

    ours = grads(implicit.make_implicit(p.block, execution=execution, **settings))
    reference = grads(implicit.make_implicit(p.block, **settings))
    for a, b in zip(ours, reference):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9)


def test_graph_execution_rejects_parametrised_weights():
    p, x = _cuda_problem(torch.float32)
    torch.nn.utils.parametrizations.weight_norm(p.block, name="W")
    layer = implicit.make_implicit(p.block, execution="graph")
    with pytest.raises(ValueError, match="parametrised weights"):
        layer(x)
