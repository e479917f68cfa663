"""``execution="compiled"`` (the fixed-budget loop under ``torch.compile``) against eager mode, on the CPU: the same
per-sample result and gradients, no graph break inside the solve when a caller compiles a model, and the errors of
what cannot run this way (``"graph"`` is exercised on a GPU in ``test_cuda.py``; here its CPU error).

Every distinct configuration costs a compilation (10–40 s with inductor on a 2-core CPU), so inductor compiles the
solver-equivalence cases; the layer and model cases use the ``aot_eager`` backend (dynamo's tracing and AOTAutograd's
functionalisation without code generation), which exercises everything the engine controls.
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from problems import tanh_problem
from torch import nn

import implicit
from implicit import make_implicit
from implicit.solvers import base

SMALL = {"tol": 1e-6, "max_iter": 10, "check_every": 2}
RESULT_TENSORS = ("z", "abs", "rel", "nstep", "converged", "diverged", "stalled")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture
def aot_eager(monkeypatch):
    monkeypatch.setitem(base.COMPILE_OPTIONS, "backend", "aot_eager")


def _assert_same_result(compiled, eager, max_iter, *, rtol=1e-10, atol=1e-12):
    for name in RESULT_TENSORS:
        torch.testing.assert_close(getattr(compiled, name), getattr(eager, name), rtol=rtol, atol=atol, msg=name)
    assert compiled.nfe == max_iter + 1  # the whole budget, no host read to stop early
    assert eager.nfe <= compiled.nfe
    for a, b in zip(compiled.trajectory, eager.trajectory, strict=True):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


@pytest.mark.parametrize("solver", ["fixed_point", "anderson", "broyden"])
def test_compiled_solve_returns_the_eager_result(solver):
    """Samples stop at tol on the device (frozen): the compiled solve returns eager mode's per-sample best iterates,
    residuals and f-evaluation counts; only the batch's ``nfe`` shows the full budget."""
    p = tanh_problem(0.8, "gauss", 1.0, batch=5, n=12).frozen()
    max_iter = 16 if solver == "fixed_point" else 10
    kwargs = dict(solver=solver, tol=1e-5, max_iter=max_iter, check_every=2, record_at=(3, 8))
    eager = implicit.solve(p.fn, p.z0(), **kwargs)
    compiled = implicit.solve(p.fn, p.z0(), execution="compiled", **kwargs)
    _assert_same_result(compiled, eager, max_iter)
    if solver == "fixed_point":
        assert int(eager.nstep.min()) < int(eager.nstep.max())  # samples did stop at different times
    if solver == "broyden":
        torch.testing.assert_close(compiled.inverse_jacobian.U, eager.inverse_jacobian.U)


@pytest.mark.parametrize(
    "options",
    [
        {"solver": "anderson", "backward": "implicit", "jac_loss_probes": 1, "stagnation": (4, 1.5)},
        {"solver": "broyden", "backward": "shine", "correction": 2},
        {"solver": "fixed_point", "backward": "unrolled"},
        {"solver": "anderson", "backward": "phantom", "backward_options": {"steps": 3}},
        {"solver": "fixed_point", "backward": "one_step"},
    ],
    ids=[
        "anderson-implicit-jac-stagnation",
        "broyden-shine-correction",
        "fixed_point-unrolled",
        "anderson-phantom",
        "fixed_point-one_step",
    ],
)
def test_compiled_layer_gives_eager_values_and_gradients(options, aot_eager):
    """Values, the Jacobian-regulariser estimate and parameter / input gradients equal eager mode's in float64, in
    every kind of backward mode: attached at z* (implicit, SHINE, the correction states' phantom gradients) and
    through the compiled iterations (unrolled)."""
    p = tanh_problem(0.8, "gauss", 1.0, batch=3, n=10)
    results = {}
    for execution in ("eager", "compiled"):
        layer = make_implicit(p.block, execution=execution, **SMALL, **options)
        x = p.x.clone().requires_grad_()
        torch.manual_seed(0)  # the Jacobian regulariser's probes
        out, info = layer(x, return_info=True)
        states = out if isinstance(out, list) else [out]
        loss = sum((s * (k + 1)).sum() for k, s in enumerate(states))
        if info.jac_loss is not None:
            loss = loss + info.jac_loss
        grads = torch.autograd.grad(loss, [x, *p.params])
        results[execution] = (states, info, grads)
    (s_e, info_e, g_e), (s_c, info_c, g_c) = results["eager"], results["compiled"]
    for a, b in zip(s_c, s_e, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    for a, b in zip(g_c, g_e, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)
    assert info_c.forward.nfe == SMALL["max_iter"] + 1
    if info_e.jac_loss is not None:
        torch.testing.assert_close(info_c.jac_loss, info_e.jac_loss)


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(12, 12)
        with torch.no_grad():
            self.lin.weight.mul_(0.5)

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.lin(z) + x)


class _Model(nn.Module):
    def __init__(self, **options) -> None:
        super().__init__()
        self.inp = nn.Linear(6, 12)
        self.deq = make_implicit(_Block(), **options)
        self.head = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.deq(self.inp(x)))


def _break_sites(explanation) -> list[str]:
    return [f"{frame.filename}:{frame.lineno}" for b in explanation.break_reasons for frame in b.user_stack]


def test_torch_compile_of_a_model_has_no_graph_break_inside_the_solve():
    """``torch._dynamo.explain``: with execution="compiled" an inference call is one graph (the policies that read the
    host — the non-finite input check and the divergence report — switched off); in training, graph breaks happen
    only where the gradient is attached after the solve, never inside the solver loop. The eager loop, which reads
    the host to stop, breaks inside it."""
    torch.manual_seed(0)
    quiet = {"nonfinite_input": "ignore", "on_divergence": "ignore", "max_iter": 6}
    x = torch.randn(4, 6)
    model = _Model(execution="compiled", **quiet)
    with torch.no_grad():
        inference = torch._dynamo.explain(model)(x)
    assert inference.graph_break_count == 0 and inference.graph_count == 1, _break_sites(inference)
    training = torch._dynamo.explain(model)(x)
    sites = _break_sites(training)
    assert not [s for s in sites if "/implicit/solvers/" in s], sites
    torch._dynamo.reset()
    with torch.no_grad():
        eager = torch._dynamo.explain(_Model(**quiet))(x)
    assert any("/implicit/solvers/" in s for s in _break_sites(eager))


def test_compiled_layer_inside_a_compiled_model_matches_eager():
    """A caller's ``torch.compile`` traces the layer's fixed-budget loop into its own graph (no nested compilation);
    the compiled model computes what the eager model computes, gradients included."""
    torch.manual_seed(0)
    model = _Model(execution="compiled", max_iter=8, tol=1e-6).double()
    x = torch.randn(4, 6, dtype=torch.float64)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=False)
    out_c = compiled(x)
    out_e = model(x)
    torch.testing.assert_close(out_c, out_e, rtol=1e-10, atol=1e-12)
    g_c = torch.autograd.grad(out_c.sum(), list(model.parameters()))
    g_e = torch.autograd.grad(out_e.sum(), list(model.parameters()))
    for a, b in zip(g_c, g_e, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"execution": "compiled", "solver": "ode"}, "execution='compiled' needs"),
        ({"execution": "graph", "solver": "adjoint_broyden"}, "execution='graph' needs"),
        ({"execution": "graph", "backward": "unrolled"}, "differentiates the iterations"),
        ({"execution": "jit"}, "option execution must be one of 'eager', 'compiled', 'graph'"),
    ],
)
def test_options_that_cannot_run_raise_naming_the_problem(options, message):
    with pytest.raises(ValueError, match=message):
        make_implicit(_Block(), **options)


def test_graph_execution_needs_cuda_and_solve_rejects_it():
    layer = make_implicit(_Block(), execution="graph")
    with pytest.raises(ValueError, match="captures CUDA graphs, but the state is on cpu"):
        layer(torch.randn(2, 12))
    with pytest.raises(ValueError, match="use it through make_implicit or equilibrium"):
        implicit.solve(lambda z: 0.5 * z, torch.ones(2, 3), execution="graph")
    with pytest.raises(ValueError, match="solver 'ode' cannot run with execution='compiled'"):
        implicit.solve(lambda z: 0.5 * z, torch.ones(2, 3), solver="ode", execution="compiled")


def test_a_block_dynamo_cannot_trace_raises_instead_of_running_eagerly(aot_eager):
    """fullgraph compilation: a host read inside the block is an error naming the graph break, not a silent fallback
    to an eager loop."""

    def block(z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if float(z.abs().max()) > 1e9:  # a host read
            return z
        return 0.5 * z + x

    x = torch.randn(2, 4)
    with pytest.raises(Exception, match=r"(?i)graph break|data-dependent|Unsupported"):
        implicit.equilibrium(block, x, torch.zeros_like(x), execution="compiled", max_iter=3)
