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
from hypothesis import HealthCheck, given, settings
from problems import count_host_reads, tanh_problem
from torch import nn
from torch.utils._pytree import tree_leaves, tree_structure, tree_unflatten

import implicit
from implicit import make_implicit
from implicit.solvers import base
from implicit.testing import strategies as st

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
        {"solver": "broyden", "backward": "shine", "correction": 2, "tol": 0.0},  # SHINE: see the graph test
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
        layer = make_implicit(p.block, execution=execution, **{**SMALL, **options})
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


@pytest.mark.parametrize("solver", ["fixed_point", "anderson", "broyden"])
def test_the_fixed_budget_loop_never_reads_the_host(monkeypatch, solver):
    """What a CUDA-graph capture needs of the loop (and what keeps dynamo's graph whole), checked on the CPU: with
    execution="graph" or "compiled" the loop reads no device value — stopping, stagnation, correction records and
    Broyden's restarts included — while the eager loop reads one per check."""
    p = tanh_problem(0.8, "gauss", 1.0, batch=4, n=10).frozen()
    loop = dict(tol=1e-6, max_iter=30, check_every=2, stagnation=(4, 1.5), record_at=(3, 9))
    options = {"memory": 3} if solver == "broyden" else {}
    solver_cls = implicit.SOLVERS.lookup(solver)
    reads = count_host_reads(monkeypatch)
    for execution in ("graph", "eager"):
        reads.clear()
        base.iterate(solver_cls(**options), p.fn, p.z0(), execution=execution, **loop)
        if execution == "graph":
            assert reads == []
        else:
            assert reads
    monkeypatch.undo()


# ------------------------------------------------------------------------------ execution="graph" without a GPU
@pytest.fixture
def stand_in_recorder(monkeypatch):
    """``implicit.cuda_graph`` with the CUDA recorder replaced by one that reruns the captured solve on its static
    buffers and writes the results into the captured result's tensors: what a graph replay does, observably. Counts
    the captures."""
    from implicit import cuda_graph

    captures = []

    def record(run, device):
        result = run()
        captures.append(result)

        def replay():
            fresh = run()
            for name in (*RESULT_TENSORS, "trace"):
                getattr(result, name).copy_(getattr(fresh, name))
            for mine, new in zip(result.trajectory, fresh.trajectory, strict=True):
                mine.copy_(new)
            if result.inverse_jacobian is not None:
                result.inverse_jacobian.U.copy_(fresh.inverse_jacobian.U)
                result.inverse_jacobian.V.copy_(fresh.inverse_jacobian.V)

        return replay, result

    monkeypatch.setattr(cuda_graph, "CAPTURE_DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(cuda_graph, "record", record)
    return captures


@pytest.mark.parametrize("solver", ["fixed_point", "anderson", "broyden"])
def test_graph_replays_read_the_new_inputs_and_hand_out_fresh_results(stand_in_recorder, solver):
    p = tanh_problem(0.8, "gauss", 1.0, batch=4, n=10).frozen()
    options = dict(solver=solver, tol=1e-6, max_iter=20, check_every=2, correction=2)
    graph = make_implicit(p.block, execution="graph", **options)
    eager = make_implicit(p.block, **options)
    outputs = []
    for scale in (1.0, 0.5, 2.0):
        out_g, info_g = graph(p.x * scale, return_info=True)
        out_e, info_e = eager(p.x * scale, return_info=True)
        for a, b in zip(out_g, out_e, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
        assert torch.equal(info_g.forward.nstep, info_e.forward.nstep) and info_g.forward.nfe == 21
        outputs.append((out_g[-1], out_g[-1].clone()))
    assert len(stand_in_recorder) == 1  # one capture, replayed
    assert all(torch.equal(a, b) for a, b in outputs)  # earlier results are not overwritten by later replays


def test_graph_captures_are_keyed_and_bounded(stand_in_recorder):
    from implicit import cuda_graph

    p = tanh_problem(0.8, "gauss", 1.0, batch=8, n=10)
    layer = make_implicit(p.block, execution="graph", max_iter=8)
    with torch.no_grad():
        layer(p.x[:2])
        layer(p.x[:2] + 1)  # same signature: replayed
        assert len(stand_in_recorder) == 1
        for batch in range(3, 8):  # new shapes: captured, the oldest dropped beyond MAX_CAPTURES
            layer(p.x[:batch])
        assert len(stand_in_recorder) == 6 and len(cuda_graph._CAPTURES[layer]) == cuda_graph.MAX_CAPTURES
        p.block.W.mul_(0.9)  # in place (an optimizer step): the same storage, replayed
        torch.testing.assert_close(layer(p.x[:7]), make_implicit(p.block, max_iter=8)(p.x[:7]))
        assert len(stand_in_recorder) == 6
        p.block.W = torch.nn.Parameter(p.block.W.detach() * 0.9)  # a new storage: captured anew
        layer(p.x[:7])
        assert len(stand_in_recorder) == 7
        layer.eval()  # other module modes: captured anew
        layer(p.x[:7])
        assert len(stand_in_recorder) == 8
        layer(p.x[:7], max_iter=9)  # other loop settings: captured anew
        assert len(stand_in_recorder) == 9


@pytest.mark.parametrize("backward", ["implicit", "phantom", "shine"])
def test_graph_execution_gradients_equal_eager(stand_in_recorder, backward):
    """Equal to eager mode's, SHINE's included when eager mode runs the whole budget too (SHINE reuses the solver's
    inverse-Jacobian estimate after its last step, which a fixed budget takes later than an adaptive stop)."""
    p = tanh_problem(0.8, "gauss", 1.0, batch=3, n=10)
    tol = 0.0 if backward == "shine" else 1e-9
    options = dict(tol=tol, max_iter=40, backward=backward, solver="broyden" if backward == "shine" else "anderson")
    grads = []
    for execution in ("graph", "eager"):
        x = p.x.clone().requires_grad_()
        z = make_implicit(p.block, execution=execution, **options)(x)
        grads.append(torch.autograd.grad(z.pow(2).sum(), [x, *p.params]))
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_graph_execution_rejects_parametrised_weights_and_warm_starts(stand_in_recorder):
    p = tanh_problem(0.8, "gauss", 1.0, batch=3, n=10)
    torch.nn.utils.parametrizations.weight_norm(p.block, name="W")
    with pytest.raises(ValueError, match="parametrised weights"):
        make_implicit(p.block, execution="graph")(p.x)
    q = tanh_problem(0.8, "gauss", 1.0, batch=3, n=10)
    with pytest.raises(ValueError, match="warm-start solver_state"):
        make_implicit(q.block, execution="graph", solver="broyden")(
            q.x, solver_state={"inverse_jacobian": implicit.LowRankInverse.identity(q.x)}
        )


# ------------------------------------------------------------------------------------------------ property test
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    problem=st.problems(),
    options=st.solver_options(
        solvers=("fixed_point", "anderson", "broyden"),
        backward_modes=("implicit", "phantom", "one_step", "unrolled"),
        max_iter=(3, 10),
        check_every=(1, 3),
    ),
)
def test_compiled_execution_equals_eager_on_drawn_problems(aot_eager, problem, options):
    """Drawn state pytrees, solvers, their options and backward modes: the compiled fixed-budget solve returns eager
    mode's per-sample state and stopping, and the same gradients."""
    block, x, z0 = problem
    results = []
    for execution in ("eager", "compiled"):
        torch._dynamo.reset()
        leaves = [leaf.clone().requires_grad_() for leaf in tree_leaves(x)]
        x_in = tree_unflatten(leaves, tree_structure(x))
        z, info = implicit.equilibrium(block, x_in, z0, execution=execution, **options)
        loss = sum((leaf * leaf).sum() for leaf in tree_leaves(z))
        grads = torch.autograd.grad(loss, [*leaves, *block.parameters()], allow_unused=True)
        results.append((tree_leaves(z), info.forward, grads))
    (z_e, f_e, g_e), (z_c, f_c, g_c) = results
    for a, b in zip(z_c, z_e, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
    assert torch.equal(f_c.nstep, f_e.nstep) and torch.equal(f_c.converged, f_e.converged)
    for a, b in zip(g_c, g_e, strict=True):
        if a is None or b is None:
            assert a is None and b is None
        else:
            torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9)
