"""Gaps found in review ("Scale and hardening"): sparse fixed-point correction in eval mode (Bai et al., "Deep
Equilibrium Optical Flow Estimation", CVPR 2022: the supervised states are a training signal), the stagnation stop
rule of the shared loop (TorchDEQ's Broyden solver stops on stagnating residuals; Geng and Kolter, arXiv:2310.18605),
and Jacobian regularisation (Bai, Koltun and Kolter, ICML 2021) through the backward mode's tracked call ``f(z*)``."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from problems import (
    DISCRETE_SOLVERS,
    DTYPE,
    CountingTanh,
    PytreeBlock,
    count_host_reads,
    gen,
    injection,
    merge_state,
    rel_err,
    tanh_problem,
    widths_for,
)
from torch import Tensor, nn

import implicit
from implicit import options as options_module
from implicit.regularization import jacobian_frobenius
from implicit.solvers import SOLVERS, Loop

# =========================================================================================== 1. correction in eval mode


def corrected_layer(structure: str = "tensor", **options):
    """A layer with ``correction=3`` of 36 steps (steps 12, 24, 36: all of them checks with ``check_every=4``)."""
    p = tanh_problem(0.9, "gauss", 1.0, batch=6, n=12, seed=3)
    block = p.block if structure == "tensor" else PytreeBlock(p.block, structure, widths_for(12, 3))
    settings = {"correction": 3, "max_iter": 36, "check_every": 4, "tol": 1e-10, **options}
    return implicit.make_implicit(block, **settings), p


@pytest.mark.parametrize("structure", ["tensor", "tuple", "nested"])
def test_eval_mode_returns_the_last_training_state_alone(structure):
    """Training mode: the list of 3 states; eval mode: one state with the state's structure, bitwise the list's last
    element (same solve: same f-evaluations), no trajectory recorded, and the same gradient w.r.t. x."""
    layer, p = corrected_layer(structure)
    x = p.x.clone().requires_grad_()
    states, train_info = layer.train()(x, return_info=True)
    assert isinstance(states, list) and len(states) == 3 and len(train_info.forward.trajectory) == 3
    z, eval_info = layer.eval()(x, return_info=True)
    assert not isinstance(z, list) and type(z) is type(states[-1])
    assert eval_info.forward.trajectory == []
    assert torch.equal(merge_state(z), merge_state(states[-1]))
    assert eval_info.forward.nfe == train_info.forward.nfe and eval_info.forward.converged.all()
    c = torch.randn(p.batch, 12, dtype=DTYPE, generator=gen(4))
    (eval_grad,) = torch.autograd.grad((c * merge_state(z)).sum(), x)
    (train_grad,) = torch.autograd.grad((c * merge_state(states[-1])).sum(), x)
    assert rel_err(eval_grad, train_grad) < 1e-14 and torch.linalg.vector_norm(eval_grad) > 0


def test_eval_mode_solves_as_a_layer_without_correction():
    """``correction=6`` of 36 steps with ``check_every=4``: training also checks at the supervised steps 6, 18, 30,
    and 5 of 6 samples stop at step 18; eval mode solves exactly as the layer without correction (checks every 4 steps,
    every sample stops at step 20, same z*)."""
    layer, p = corrected_layer(correction=6, tol=1e-10)
    plain = implicit.make_implicit(p.block, max_iter=36, check_every=4, tol=1e-10)
    z, info = layer.eval()(p.x, return_info=True)
    want, want_info = plain(p.x, return_info=True)
    assert torch.equal(z, want) and info.forward.converged.all()
    assert info.forward.trace_nfe == want_info.forward.trace_nfe == [1, 5, 9, 13, 17, 21]
    assert info.forward.nstep.tolist() == [21] * 6
    states, train_info = layer.train()(p.x, return_info=True)
    assert train_info.forward.trace_nfe == [1, 5, 7, 9, 13, 17, 19, 21]
    assert train_info.forward.nstep.tolist() == [19, 19, 19, 19, 21, 19]
    assert torch.equal(states[-1][4], z[4]) and not torch.equal(states[-1][0], z[0])


def test_equilibrium_and_per_call_correction_keep_their_behaviour():
    """The functional form returns the list whatever the block's mode; an eval layer drops a per-call correction
    too, and returns the list again once back in training mode."""
    layer, p = corrected_layer()
    p.block.eval()
    states, info = implicit.equilibrium(p.block, p.x, torch.zeros_like(p.x), correction=3, max_iter=36, tol=1e-10)
    assert isinstance(states, list) and len(states) == 3 and len(info.forward.trajectory) == 3
    layer.eval()
    assert isinstance(layer(p.x, correction=2), Tensor)
    assert torch.equal(layer(p.x, correction=2), states[-1])
    layer.train()
    assert len(layer(p.x, correction=2)) == 2
    # An eval-time budget below the supervised steps is valid: the correction is dropped before the overrides.
    layer.eval()
    _, info = layer(p.x, max_iter=2, tol=0.0, return_info=True)
    assert info.forward.nfe == 3
    with pytest.raises(ValueError, match="correction=3 states needs"):
        layer.train()(p.x, max_iter=2)


def test_eval_calls_validate_the_options_without_correction_once(monkeypatch):
    """``ImplicitOptions.without_correction`` is built (validated) on the first eval call and reused by every later
    one; options without correction are their own."""
    layer, p = corrected_layer()
    calls: list[object] = []
    validate = options_module._validate

    def counted(o: implicit.ImplicitOptions) -> None:
        calls.append(o)
        validate(o)

    monkeypatch.setattr(options_module, "_validate", counted)
    layer.eval()
    for _ in range(4):
        layer(p.x)
    assert len(calls) == 1 and calls[0].correction is None  # type: ignore[attr-defined]
    options = layer.implicit_options
    assert options.without_correction is options.without_correction is calls[0]
    assert options.without_correction == options.replace(correction=None)
    plain = implicit.ImplicitOptions()
    assert plain.without_correction is plain


# =========================================================================================== 2. stagnation rule
def bf16_plateau() -> tuple[Tensor, object]:
    """A tanh layer evaluated in bf16 with a float32 state (B=8, N=256, ‖W‖₂ = 0.9): rounding sets a floor of the
    relative residual at 1e-5–1e-3 per sample, so tol=1e-5 is out of reach for most samples."""
    g = gen(0)
    weight = torch.randn(256, 256, generator=g)
    weight = (0.9 * weight / torch.linalg.matrix_norm(weight, 2)).bfloat16()
    x = torch.randn(8, 256, generator=g).bfloat16()

    def fn(z: Tensor) -> Tensor:
        return torch.tanh(z.bfloat16() @ weight.T + x).float()

    return torch.zeros(8, 256), fn


def run(solver: str, fn, z0: Tensor, **loop):
    return SOLVERS.lookup(solver)().run(fn, z0, Loop(**loop))


@pytest.mark.parametrize("solver", DISCRETE_SOLVERS)
def test_a_residual_floor_stops_early_with_the_rule_and_burns_the_budget_without(solver):
    """Off: every sample above tol runs all 300 steps. ``stagnation=(20, 1.3)``: they stop as stalled within 60
    f-evaluations (measured 49–57) with residuals at the floor (below 2e-3, from 1 at z0; measured 9e-5–1e-3),
    never as converged or diverged; samples that converge do so identically."""
    z0, fn = bf16_plateau()
    loop = {"tol": 1e-5, "max_iter": 300, "stop_mode": "rel", "check_every": 4}
    off = run(solver, fn, z0, **loop)
    on = run(solver, fn, z0, stagnation=(20, 1.3), **loop)
    assert not off.stalled.any() and off.nfe == 301 and (off.nstep[~off.converged] == 301).all()
    assert (~off.converged).sum() >= 7
    assert torch.equal(on.converged, off.converged) and torch.equal(on.z[on.converged], off.z[off.converged])
    assert torch.equal(on.stalled, ~on.converged) and not on.diverged.any()
    assert on.nfe <= 60 and (on.nstep[on.stalled] <= 60).all() and (on.nstep[on.stalled] > 20).all()
    assert (on.rel[on.stalled] > 1e-5).all() and (on.rel[on.stalled] < 2e-3).all()  # stopped at the floor
    assert f"{int(on.stalled.sum())} stalled" in on.status and "budget" not in on.status


@pytest.mark.parametrize("solver", ["fixed_point", "anderson", "adjoint_broyden", "ode"])
@pytest.mark.parametrize(("window", "check_every"), [(10, 4), (8, 4), (5, 1), (1, 1)])
def test_a_map_without_fixed_point_stalls_one_window_in(solver, window, check_every):
    """``f(z) = z + c`` has the residual c everywhere: its best residual never improves. A stepping solver stops every
    sample at the first check at least ``window`` steps in (nstep = that step + 1); the ODE integrator, which measures
    every evaluation, at evaluation ``window + 1``. Off, the budget (or the integration horizon) is spent."""
    c = torch.randn(4, 16, dtype=DTYPE, generator=gen(1))
    loop = {"tol": 1e-10, "max_iter": 100, "stop_mode": "abs", "check_every": check_every}
    on = run(solver, lambda z: z + c, torch.zeros_like(c), stagnation=(window, 1.3), **loop)
    off = run(solver, lambda z: z + c, torch.zeros_like(c), **loop)
    first = window + 1 if solver == "ode" else math.ceil(window / check_every) * check_every + 1
    assert on.stalled.all() and not (on.converged | on.diverged).any()
    assert (on.nstep == first).all(), on.nstep
    assert not off.stalled.any() and not off.converged.any() and off.nfe > on.nfe
    assert torch.allclose(on.abs, torch.linalg.vector_norm(c, dim=1) / 4, rtol=1e-12, atol=0)


def stuck_batch() -> tuple[Tensor, object, Tensor]:
    """Sym 0.9 tanh samples (contracting at ρ ≈ 0.55–0.87) and sample 0 replaced by ``z + c``, which has none."""
    p = tanh_problem(0.9, "sym", 1.0, batch=5, n=32, seed=7).frozen()
    stuck = torch.tensor([True, False, False, False, False])
    c = torch.randn(5, 32, dtype=DTYPE, generator=gen(2))

    def fn(z: Tensor) -> Tensor:
        return torch.where(stuck[:, None], z + c, p.fn(z))

    return p.z0(), fn, stuck


@pytest.mark.parametrize("solver", ["fixed_point", "anderson", "adjoint_broyden"])
def test_one_stalled_sample_does_not_stop_the_others(solver):
    """The stuck sample stops at step 12 (window 10, checks every 4) instead of running 300; the others go on to
    converge with bitwise the iterates, residuals and counts they have without the rule."""
    z0, fn, stuck = stuck_batch()
    loop = {"tol": 1e-10, "max_iter": 300, "stop_mode": "abs", "check_every": 4}
    off = run(solver, fn, z0, **loop)
    on = run(solver, fn, z0, stagnation=(10, 1.3), **loop)
    assert on.stalled.tolist() == stuck.tolist() and on.converged.tolist() == (~stuck).tolist()
    assert int(on.nstep[0]) == 13 and int(off.nstep[0]) == 301 and off.nfe == 301
    others = ~stuck
    for name in ("z", "abs", "rel", "nstep", "converged", "diverged"):
        assert torch.equal(getattr(on, name)[others], getattr(off, name)[others]), name
    assert on.nfe == int(on.nstep[others].max()) > 13  # the batch went on after the stuck sample stopped


@pytest.mark.parametrize(
    ("solver", "tol", "stagnation"),
    [
        *[(s, 1e-10, rule) for s in DISCRETE_SOLVERS for rule in ((4, 2.0), (8, 1.5), (30, 1.3))],
        ("ode", 1e-4, (30, 1.3)),
        ("ode", 1e-8, (1000, 1.3)),
    ],
)
def test_converging_solves_are_bitwise_unchanged_by_the_rule(solver, tol, stagnation):
    """A solve that contracts faster than the rule's factor per window (or converges before a window has passed)
    returns bitwise the same result with the rule as without it."""
    p = tanh_problem(0.9, "gauss", 1.0, batch=8, n=64, seed=1).frozen()
    loop = {"tol": tol, "max_iter": 1000, "stop_mode": "rel", "check_every": 4}
    off = run(solver, p.fn, p.z0(), **loop)
    on = run(solver, p.fn, p.z0(), stagnation=stagnation, **loop)
    assert off.converged.all() and not on.stalled.any()
    for name in ("z", "abs", "rel", "nstep", "converged", "diverged", "trace"):
        assert torch.equal(getattr(on, name), getattr(off, name)), name
    assert on.nfe == off.nfe and on.trace_nfe == off.trace_nfe


def test_the_rule_adds_no_host_reads(monkeypatch):
    """At most one host read per check with the rule on (Tensor.__bool__/item/... calls as the proxy)."""
    p = tanh_problem(0.9, "gauss", 1.0, batch=4, n=16).frozen()
    reads = count_host_reads(monkeypatch)
    z0 = p.z0()
    result = run("anderson", p.fn, z0, tol=0.0, max_iter=60, check_every=4, stagnation=(4, 1.3))
    monkeypatch.undo()
    assert 1 <= len(reads) <= len(result.trace_nfe), reads
    assert result.stalled.all() and result.nfe < 61  # tol 0: the round-off floor stops every sample


class StuckBlock(nn.Module):
    """``tanh(0.5 z + x)`` except sample 0, ``z + x``, which has no fixed point."""

    def forward(self, z: Tensor, x: Tensor) -> Tensor:
        stuck = torch.arange(z.shape[0]) == 0
        return torch.where(stuck[:, None], z + x, torch.tanh(0.5 * z + x))


def test_the_layer_reports_stalled_samples_apart_from_diverged_and_budget():
    layer = implicit.make_implicit(
        StuckBlock(), stagnation=[8, 1.3], tol=1e-10, max_iter=200, stop_mode="abs", on_divergence="raise"
    )
    assert layer.implicit_options.stagnation == (8, 1.3)
    x = injection(4, 8, 1.0, gen(3))
    with torch.no_grad():
        _, info = layer(x, return_info=True)
        _, off = layer(x, return_info=True, stagnation=None)
    assert info.forward.stalled.tolist() == [True, False, False, False] and not info.forward.diverged.any()
    assert info.forward.converged.tolist() == [False, True, True, True] and int(info.forward.nstep[0]) == 9
    assert info.forward.status == "3/4 converged, 1 stalled (the best residual stopped improving: stagnation rule)"
    assert not off.forward.stalled.any() and int(off.forward.nstep[0]) == 201
    assert off.forward.status == "3/4 converged, 1 stopped at the iteration budget"


BAD_STAGNATION = [
    ((0, 1.3), "window must be an integer ≥ 1"),
    ((-3, 1.3), "window must be an integer ≥ 1"),
    ((2.5, 1.3), "window must be an integer ≥ 1"),
    ((True, 1.3), "window must be an integer ≥ 1"),
    ((30, 1.0), "factor must be a finite number > 1"),
    ((30, 0.5), "factor must be a finite number > 1"),
    ((30, float("nan")), "factor must be a finite number > 1"),
    ((30, float("inf")), "factor must be a finite number > 1"),
    ((30, "1.3"), "factor must be a finite number > 1"),
    ((30, True), "factor must be a finite number > 1"),
    ((30,), r"pair \(window, factor\)"),
    ((30, 1.3, 2), r"pair \(window, factor\)"),
    ("30", r"pair \(window, factor\)"),
    (30, r"pair \(window, factor\)"),
]


@pytest.mark.parametrize(("bad", "message"), BAD_STAGNATION, ids=repr)
def test_bad_stagnation_values_raise_value_errors_naming_the_problem(bad, message):
    block = StuckBlock()
    entries = [
        lambda: implicit.ImplicitOptions(stagnation=bad),
        lambda: implicit.make_implicit(block, stagnation=bad),
        lambda: implicit.make_implicit(block)(torch.zeros(2, 3), stagnation=bad),
        lambda: implicit.equilibrium(block, torch.zeros(2, 3), torch.zeros(2, 3), stagnation=bad),
        lambda: Loop(1e-4, 10, stagnation=bad),
    ]
    for entry in entries:
        with pytest.raises(ValueError, match=f"stagnation.*{message}"):
            entry()


def test_stagnation_values_are_normalised():
    options = implicit.ImplicitOptions(stagnation=[30, 2])
    assert options.stagnation == (30, 2.0) and isinstance(options.stagnation[1], float)
    assert options.forward_solve.loop.stagnation == (30, 2.0) and options.backward_solve.loop.stagnation is None
    assert hash(options) == hash(implicit.ImplicitOptions(stagnation=(30, 2.0)))
    assert implicit.ImplicitOptions().stagnation is None


# =========================================================================================== 3. Jacobian regularisation
N = 16

# Modes whose tracked computation is one call f(z*) (from a z* that requires grad, or not: one_step, plain SHINE),
# and the others.
SHARING = {
    "implicit": {},
    "one_step": {"backward": "one_step"},
    "phantom neumann": {"backward": "phantom", "backward_options": {"variant": "neumann", "steps": 3}},
    "shine": {"solver": "broyden", "backward": "shine"},
    "shine refine": {"solver": "broyden", "backward": "shine", "backward_options": {"refine": 2}},
    "shine exact fallback": {"solver": "broyden", "backward": "shine", "backward_options": {"fallback": "exact"}},
}
OWN_CALL = {  # mode options and the mode's own tracked f-evaluations
    "phantom unrolled": ({"backward": "phantom", "backward_options": {"steps": 3}}, 3),
    "unrolled": ({"solver": "fixed_point", "backward": "unrolled"}, 0),
}


def regularised_call(options: dict, seed: int = 5):
    """One regularised call (2 probes) on a counting tanh block; returns ``(z, info, x, block)``."""
    block = CountingTanh(N, s=0.9, kind="gauss", seed=2)
    x = injection(4, N, 1.0, gen(9)).requires_grad_()
    torch.manual_seed(seed)
    settings = {"tol": 1e-10, "max_iter": 100, "jac_loss_probes": 2, **options}
    z, info = implicit.equilibrium(block, x, torch.zeros_like(x), **settings)
    return z, info, x, block


def own_call_path(monkeypatch, options: dict) -> None:
    """The regulariser's own call of f for this configuration's mode (the path before sharing)."""
    mode = implicit.ImplicitOptions(**options).backward_mode
    monkeypatch.setattr(type(mode), "tracks_one_call", property(lambda self: False))


@pytest.mark.parametrize("name", SHARING)
def test_sharing_the_tracked_call_saves_one_f_evaluation(name, monkeypatch):
    """The block is called ``nfe + 1`` times per regularised step (the solve, then one tracked call serving both the
    gradient and the regulariser), ``nfe + 2`` with the regulariser's own call; ``info.tracked_nfe`` says 1 and 2."""
    options = SHARING[name]
    assert implicit.ImplicitOptions(**options).backward_mode.tracks_one_call
    _, info, _, block = regularised_call(options)
    assert info.tracked_nfe == 1 and block.calls == info.forward.nfe + 1
    own_call_path(monkeypatch, options)
    _, before, _, block = regularised_call(options)
    assert before.tracked_nfe == 2 and block.calls == before.forward.nfe + 2
    assert before.forward.nfe == info.forward.nfe


@pytest.mark.parametrize("name", OWN_CALL)
def test_modes_without_a_shareable_call_make_their_own_and_count_it(name):
    options, tracked = OWN_CALL[name]
    assert not implicit.ImplicitOptions(**options).backward_mode.tracks_one_call
    _, info, _, block = regularised_call(options)
    assert info.tracked_nfe == tracked + 1 and block.calls == info.forward.nfe + tracked + 1
    assert info.jac_loss is not None and info.jac_loss.requires_grad


@pytest.mark.parametrize("name", SHARING)
def test_the_shared_estimate_and_its_gradients_are_those_of_the_own_call(name, monkeypatch):
    """Same probes (seeded RNG), float64: the estimate is bitwise that of the regulariser's own call, the gradients of
    ``jac_loss`` w.r.t. (x, W, U, b) agree to 1e-13, and so do those of ``loss + 0.7·jac_loss`` (the mode's gradient
    through the same tracked call is untouched)."""
    options = SHARING[name]
    c = torch.randn(4, N, dtype=DTYPE, generator=gen(8))

    def gradients(z: Tensor, info, x: Tensor, block) -> tuple[list[Tensor], list[Tensor]]:
        inputs = [x, block.W, block.U, block.b]
        of_jac = list(torch.autograd.grad(info.jac_loss, inputs, retain_graph=True))
        total = list(torch.autograd.grad((c * z).sum() + 0.7 * info.jac_loss, inputs))
        return of_jac, total

    z, info, x, block = regularised_call(options)
    shared = gradients(z, info, x, block)
    own_call_path(monkeypatch, options)
    z_own, own, x_own, block_own = regularised_call(options)
    assert torch.equal(z, z_own) and torch.equal(info.jac_loss, own.jac_loss)
    want = gradients(z_own, own, x_own, block_own)
    for got_list, want_list in zip(shared, want):
        for got, expected in zip(got_list, want_list):
            assert torch.linalg.vector_norm(expected) > 0
            assert rel_err(got, expected) < 1e-13


def test_the_shared_estimate_is_the_functional_estimate_at_the_solution():
    """``info.jac_loss`` equals ``jacobian_frobenius`` of the block at z* with the same probes, also with sparse
    fixed-point correction (the final state's tracked call is shared; the intermediate ones are phantom steps)."""
    for options, tracked in (({}, 1), ({"correction": 3, "max_iter": 30}, 3)):
        _, info, x, block = regularised_call(options)
        torch.manual_seed(5)
        want = jacobian_frobenius(functools.partial(block, x=x), info.forward.z, probes=2)
        assert torch.equal(info.jac_loss, want)
        assert info.tracked_nfe == tracked  # the final tracked call (and one phantom step per intermediate state)


def test_the_functional_solve_and_the_options_carry_the_rule():
    """``implicit.solve(..., stagnation=...)`` and ``ImplicitOptions.solver_kwargs()`` pass the rule on."""
    c = torch.randn(3, 8, dtype=DTYPE, generator=gen(3))
    loop = {"tol": 1e-10, "max_iter": 100, "stop_mode": "abs", "check_every": 4}
    result = implicit.solve(lambda z: z + c, torch.zeros_like(c), stagnation=(5, 1.3), **loop)
    assert result.stalled.all() and result.nfe == 9  # the first check at least 5 steps in
    kwargs = implicit.ImplicitOptions(stagnation=(5, 1.3), stop_mode="abs").solver_kwargs()
    assert kwargs["stagnation"] == (5, 1.3)
    assert implicit.solve(lambda z: z + c, torch.zeros_like(c), **{**kwargs, "tol": 1e-10}).stalled.all()
