"""Forward solvers and the shared loop: accuracy within the contraction bound, per-sample stopping, best iterates,
guards, budgets, and Anderson / Broyden against plain iteration."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from problems import SOLVER_NAMES, count_host_reads, diverging_lin_problem, residuals, tanh_problem

import implicit
from implicit.solvers import Broyden, iterate

TAUS = (1.0, 0.5, 0.8)


def solver_options(solver: str, tau: float) -> dict:
    return {"tau": tau} if solver == "fixed_point" else {}


def assert_reported_residuals_match(fn, result) -> None:
    """The reported abs/rel residuals are those of the returned z (to 1e-12 relative)."""
    r_abs, r_rel = residuals(fn, result.z)
    torch.testing.assert_close(result.abs, r_abs, rtol=1e-12, atol=0)
    torch.testing.assert_close(result.rel, r_rel, rtol=1e-12, atol=0)


# ------------------------------------------------------------------------------------------- accuracy
def assert_within_contraction_bound(p, configs: dict, *, tol: float, stop_mode: str, check_every: int) -> None:
    """Every configuration converges with ``‖z − z*‖ ≤ ‖g(z)‖/(1 − L)``, ``‖g(z)‖ ≤ tol·‖f(z)‖`` (rel) or ``tol·√N``
    (abs), and any two agree within the sum of their bounds."""
    z_star = p.reference()
    bounds = {}
    for name, (solver, options) in configs.items():
        result = implicit.solve(
            p.fn,
            p.z0(),
            solver=solver,
            solver_options=options,
            tol=tol,
            max_iter=3000,
            stop_mode=stop_mode,
            check_every=check_every,
        )
        assert result.converged.all(), (name, result)
        assert not result.diverged.any()
        assert (result.residual <= tol).all()
        assert_reported_residuals_match(p.fn, result)
        with torch.no_grad():
            scale = torch.linalg.vector_norm(p.fn(result.z), dim=1) if stop_mode == "rel" else math.sqrt(p.n)
        bound = tol * scale / (1 - p.lipschitz) + 1e-12  # + the reference's own round-off
        dist = torch.linalg.vector_norm(result.z - z_star, dim=1)
        assert (dist <= bound).all(), (name, (dist / bound).max())
        bounds[name] = (result.z, bound)
    for (a, (za, ba)), (b, (zb, bb)) in itertools.combinations(bounds.items(), 2):
        assert (torch.linalg.vector_norm(za - zb, dim=1) <= ba + bb).all(), (a, b)


@pytest.mark.parametrize(("kind", "xs"), [("gauss", 1.0), ("sym", 0.1)])
def test_accuracy_within_the_contraction_bound_at_the_published_settings(kind, xs):
    """Plain, τ = 0.5, Anderson (scaled), Broyden; B=8, N=64, rel tol 1e-6, bound 1e-5."""
    configs = {
        "plain": ("fixed_point", {}),
        "damped": ("fixed_point", {"tau": 0.5}),
        "anderson": ("anderson", {}),
        "broyden": ("broyden", {}),
    }
    p = tanh_problem(0.9, kind, xs, batch=8, n=64, seed=0).frozen()
    assert_within_contraction_bound(p, configs, tol=1e-6, stop_mode="rel", check_every=1)


@settings(max_examples=20)
@given(
    batch=st.integers(1, 6),
    n=st.integers(4, 32),
    kind=st.sampled_from(("gauss", "sym", "orth")),
    s=st.sampled_from((0.5, 0.9)),
    xs=st.sampled_from((0.1, 1.0)),
    tau=st.sampled_from(TAUS),
    check_every=st.sampled_from((1, 2, 4, 7)),
    stop_mode=st.sampled_from(("rel", "abs")),
    seed=st.integers(0, 2**16),
)
def test_every_solver_reaches_the_fixed_point_within_the_contraction_bound(
    batch, n, kind, s, xs, tau, check_every, stop_mode, seed
):
    p = tanh_problem(s, kind, xs, batch=batch, n=n, seed=seed).frozen()
    configs = {solver: (solver, solver_options(solver, tau)) for solver in SOLVER_NAMES}
    assert_within_contraction_bound(p, configs, tol=1e-6, stop_mode=stop_mode, check_every=check_every)


# ------------------------------------------------------------------------------------------- loop contract
@settings(max_examples=20)
@given(
    solver=st.sampled_from(SOLVER_NAMES),
    max_iter=st.integers(1, 30),
    check_every=st.integers(1, 9),
    stop_mode=st.sampled_from(("rel", "abs")),
)
def test_budget_and_checks_follow_the_loop_contract(solver, max_iter, check_every, stop_mode):
    """tol=0: exactly max_iter + 1 f-evals; residual measured at multiples of check_every and at max_iter; the returned
    point is the best measured one."""
    p = tanh_problem(0.9, "sym", 0.1, batch=3, n=12, seed=max_iter).frozen()
    calls = []

    def fn(z):
        calls.append(1)
        return p.fn(z)

    result = implicit.solve(
        fn, p.z0(), solver=solver, tol=0.0, max_iter=max_iter, check_every=check_every, stop_mode=stop_mode
    )
    checks = sorted(set(range(0, max_iter + 1, check_every)) | {max_iter})
    assert result.nfe == len(calls) == max_iter + 1
    assert result.trace_nfe == [k + 1 for k in checks]
    assert result.trace.shape == (len(checks), 3)
    assert (result.nstep == max_iter + 1).all()
    torch.testing.assert_close(result.residual, result.trace.min(dim=0).values, rtol=0, atol=0)
    assert not result.converged.any()
    assert_reported_residuals_match(p.fn, result)


@pytest.mark.parametrize("solver", SOLVER_NAMES)
@pytest.mark.parametrize("max_iter", (1, 2, 3))
def test_every_budget_reduces_the_residual(solver, max_iter):
    """Peers return the initial guess for max_iter ≤ 2; every budget ≥ 1 must improve on z0 (default check_every)."""
    p = tanh_problem(0.9, "sym", 0.1, seed=3).frozen()
    r0_abs, r0_rel = residuals(p.fn, p.z0())
    result = implicit.solve(p.fn, p.z0(), solver=solver, tol=1e-10, max_iter=max_iter)
    assert result.nfe <= max_iter + 1
    assert (result.rel < r0_rel).all()
    assert (result.abs < r0_abs).all()
    assert not torch.equal(result.z, p.z0())


@pytest.mark.parametrize("solver", SOLVER_NAMES)
def test_graph_free_solve_of_a_map_with_trainable_parameters(solver):
    """``solve(..., differentiable=False)`` on a block whose parameters require grad (the normal case for a layer's
    flat map) must neither fail nor return a point that drags a graph of every iteration along."""
    p = tanh_problem(0.9, "gauss", 1.0, batch=4, n=16)
    assert p.block.W.requires_grad
    result = implicit.solve(p.fn, p.z0(), solver=solver, tol=1e-8, max_iter=100)
    assert result.converged.all()
    assert not result.z.requires_grad


# ------------------------------------------------------------------------------------------- acceleration and restarts
def _nfe_per_sample(solver: str, tol: float, max_iter: int = 400, **solver_options) -> torch.Tensor:
    nsteps, converged = [], []
    for seed in range(3):
        p = tanh_problem(0.9, "sym", 0.1, batch=8, n=64, seed=seed).frozen()
        result = implicit.solve(
            p.fn, p.z0(), solver=solver, solver_options=solver_options, tol=tol, max_iter=max_iter, check_every=1
        )
        nsteps.append(result.nstep)
        converged.append(result.converged)
    assert torch.cat(converged).all(), f"{solver}: not every sample converged"
    return torch.cat(nsteps).double()


def test_scaled_anderson_needs_at_most_half_the_plain_nfe():
    """Scaled-λ Anderson needs at most half the NFE of plain iteration where acceleration pays: sym 0.9, xs 0.1,
    tol 1e-4 — measured 16.0 vs 42.4 mean NFE."""
    plain = _nfe_per_sample("fixed_point", 1e-4)
    anderson = _nfe_per_sample("anderson", 1e-4, m=5, beta=1.0)
    assert anderson.mean() <= 0.5 * plain.mean(), (anderson.mean(), plain.mean())


def test_broyden_with_restart_converges_every_sample():
    """Broyden with restart converges: memory 5 (restarts many times), tol 1e-8, all 24 samples within 400 steps
    (measured mean 33.8)."""
    nfe = _nfe_per_sample("broyden", 1e-8, max_iter=400, memory=5)
    assert nfe.max() <= 401
    assert nfe.mean() <= 60


def test_broyden_memory_does_not_grow_with_max_iter():
    p = tanh_problem(0.9, "sym", 0.1, batch=4, n=32).frozen()
    shapes = {}
    for max_iter in (30, 300):
        solver = Broyden(memory=7)
        result = iterate(solver, p.fn, p.z0(), tol=0.0, max_iter=max_iter)
        assert result.nfe == max_iter + 1
        shapes[max_iter] = (solver.U.shape, solver.V.shape)
        assert result.inverse_jacobian.rank <= 7
        assert result.inverse_jacobian.U.shape == result.inverse_jacobian.V.shape
    assert shapes[30] == shapes[300] == ((7, 4, 32), (7, 4, 32))  # slot-major buffers: (memory, B, N)


# ------------------------------------------------------------------------------------------- per-sample stopping
def _batch_with_one_slow_sample(slow: int):
    """Sym 0.9: xs = 1 samples contract at ρ ≈ 0.55, the xs = 0.1 sample at ρ ≈ 0.87."""
    p = tanh_problem(0.9, "sym", 1.0, batch=5, n=32, seed=7).frozen()
    with torch.no_grad():
        p.x[slow] *= 0.1
    return p


@pytest.mark.parametrize("solver", SOLVER_NAMES)
@pytest.mark.parametrize("check_every", (1, 3))
def test_fast_samples_stop_on_their_own(solver, check_every):
    slow = 2
    p = _batch_with_one_slow_sample(slow)
    kwargs = dict(solver=solver, tol=1e-8, max_iter=500, check_every=check_every)
    full = implicit.solve(p.fn, p.z0(), **kwargs)
    assert full.converged.all()
    fast = [i for i in range(p.batch) if i != slow]
    assert (full.nstep[fast] < full.nstep[slow]).all(), full.nstep
    assert full.nfe == int(full.nstep.max())

    x_fast = p.x[fast]
    alone = implicit.solve(lambda z: p.block(z, x_fast), p.z0()[fast], **kwargs)
    assert torch.equal(full.z[fast], alone.z)
    assert torch.equal(full.nstep[fast], alone.nstep)
    assert torch.equal(full.rel[fast], alone.rel)
    assert alone.nfe < full.nfe


# ------------------------------------------------------------------------------------------- guards
def _nan_at_call(fn, call: int, sample: int):
    count = 0

    def wrapped(z):
        nonlocal count
        count += 1
        out = fn(z)
        if count == call:
            out = out.clone()
            out[sample] = math.nan
        return out

    return wrapped


@pytest.mark.parametrize("solver", SOLVER_NAMES)
@pytest.mark.parametrize("check_every", (1, 2, 4))
def test_nan_in_one_sample_leaves_the_others_bitwise_unchanged(solver, check_every):
    bad = 1
    p = tanh_problem(0.9, "gauss", 1.0, batch=4, n=16, seed=11).frozen()
    kwargs = dict(solver=solver, tol=1e-8, max_iter=200, check_every=check_every)
    clean = implicit.solve(p.fn, p.z0(), **kwargs)
    poisoned = implicit.solve(_nan_at_call(p.fn, 4, bad), p.z0(), **kwargs)
    good = [i for i in range(p.batch) if i != bad]
    for name in ("z", "abs", "rel", "nstep", "converged", "diverged"):
        assert torch.equal(getattr(poisoned, name)[good], getattr(clean, name)[good]), name
    assert poisoned.diverged[bad] and not poisoned.converged[bad]
    assert torch.isfinite(poisoned.z[bad]).all()
    assert torch.isfinite(poisoned.abs[bad]) and torch.isfinite(poisoned.rel[bad])
    assert poisoned.nstep[bad] <= 4 + check_every


def test_diverging_plain_iteration_is_reported_diverged_never_converged():
    p = diverging_lin_problem().frozen()
    result = implicit.solve(p.fn, p.z0(), solver="fixed_point", tol=1e-6, max_iter=200, check_every=1)
    assert result.diverged.all()
    assert not result.converged.any()
    assert torch.isfinite(result.z).all()
    assert result.nfe < 201  # stopped by the explosion guard, not the budget
    assert_reported_residuals_match(p.fn, result)


@pytest.mark.parametrize("solver", ("anderson", "broyden"))
def test_non_contractive_linear_map_is_never_falsely_converged(solver):
    """Root finders may legitimately find the unstable fixed point of a linear map; a sample may only be reported
    converged when its returned z is that fixed point, otherwise it is diverged or not converged."""
    p = diverging_lin_problem().frozen()
    result = implicit.solve(p.fn, p.z0(), solver=solver, tol=1e-6, max_iter=200, check_every=1)
    assert torch.isfinite(result.z).all()
    assert_reported_residuals_match(p.fn, result)
    assert not (result.converged & result.diverged).any()
    z_star = p.block.closed_form(p.x)
    conv = result.converged
    assert (residuals(p.fn, result.z)[1][conv] <= 1e-6).all()
    err = torch.linalg.vector_norm(result.z - z_star, dim=1) / torch.linalg.vector_norm(z_star, dim=1)
    assert (err[conv] <= 1e-4).all()


@pytest.mark.parametrize("solver", ["fixed_point", "anderson", "broyden"])
def test_starting_at_an_exact_fixed_point_is_not_divergence(solver):
    """f(z) = (z + c)/2 evaluates exactly at z = c. From there, with tol=0 (run the budget), a solver's round-off may
    move z by an ulp, but a residual of 1e-17 is not an explosion: the guard must not compare it with the first
    residual 0, nor may a sample be reported converged and diverged at once."""
    c = torch.randn(4, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    def fn(z):
        return 0.5 * z + 0.5 * c

    assert torch.equal(fn(c), c)
    result = implicit.solve(fn, c.clone(), solver=solver, tol=0.0, max_iter=20, check_every=1)
    assert torch.equal(result.z, c) and result.converged.all()
    assert not result.diverged.any(), result.status


# ------------------------------------------------------------------------------------------- host synchronisation
@pytest.mark.parametrize("solver", SOLVER_NAMES)
def test_host_reads_only_at_checks(solver, monkeypatch):
    """On CPU, Tensor.__bool__/item/tolist/__float__/__int__ calls are the proxy for host-device synchronisations."""
    p = tanh_problem(0.9, "gauss", 1.0, batch=4, n=16).frozen()
    reads = count_host_reads(monkeypatch)
    z0 = p.z0()
    assert bool(torch.ones(())) and reads == ["__bool__"]  # the counters see host reads
    reads.clear()
    result = implicit.solve(p.fn, z0, solver=solver, tol=0.0, max_iter=40, check_every=4)
    monkeypatch.undo()
    checks = len(set(range(0, 41, 4)) | {40})
    assert result.nfe == 41
    assert len(reads) <= checks, reads


# ------------------------------------------------------------------------------------------- stopping modes
@pytest.mark.parametrize("solver", SOLVER_NAMES)
def test_abs_residual_does_not_depend_on_the_state_size(solver):
    """The same problem tiled 4× along the state has the same RMS residual (TorchDEQ's unnormalised ‖g‖ doubles)."""
    p = tanh_problem(0.9, "gauss", 1.0, batch=4, n=16, seed=5).frozen()

    def tiled(z):
        return torch.cat([p.fn(part) for part in z.chunk(4, dim=1)], dim=1)

    kwargs = dict(solver=solver, tol=1e-7, max_iter=300, stop_mode="abs", check_every=1)
    one = implicit.solve(p.fn, p.z0(), **kwargs)
    four = implicit.solve(tiled, p.z0().repeat(1, 4), **kwargs)
    assert one.converged.all() and four.converged.all()
    assert torch.equal(one.nstep, four.nstep)
    torch.testing.assert_close(four.abs, one.abs, rtol=1e-6, atol=0)
    torch.testing.assert_close(four.z, one.z.repeat(1, 4), rtol=0, atol=1e-12)
