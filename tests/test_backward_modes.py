"""Backward modes: phantom gradients, one-step, SHINE and implicit differentiation with every backward solver (GMRES
included) against their closed forms and the exact gradient (phantom gradients: Geng et al.,
"On Training Implicit Models", NeurIPS 2021; SHINE: Ramzi et al., ICLR 2022)."""

from __future__ import annotations

import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from problems import (
    BACKWARD_SOLVER_NAMES,
    DTYPE,
    EXACT,
    SOLVER_NAMES,
    STRUCTURES,
    CountingTanh,
    Problem,
    PytreeBlock,
    cosine,
    exact_adjoint,
    gen,
    grads,
    grads_from_adjoint,
    lin_problem,
    merge_state,
    per_sample_jacobian,
    phantom_adjoint,
    read_adjoint,
    rel_err,
    row_times,
    shine_adjoint,
    solution_grads,
    tanh_f,
    tanh_problem,
    widths_for,
)
from torch import Tensor

import implicit
from implicit.backward import Phantom, Shine, Tracked
from implicit.backward import Problem as FlatProblem
from implicit.options import ImplicitOptions
from implicit.pytree import StateLayout
from implicit.result import ImplicitInfo

BACKWARD_SOLVERS = BACKWARD_SOLVER_NAMES
# Broyden forward (SHINE reuses its factors), solved to round-off; memory large enough never to restart.
FORWARD = {**EXACT, "solver": "broyden", "solver_options": {"memory": 100}}
# Options of every mode, as passed to the layer; exact modes solve the backward system to round-off.
EXACT_MODES = {
    **{
        f"implicit-{solver}": {
            "backward": "implicit",
            "backward_solver": solver,
            "backward_solver_options": {"restart": 10} if solver == "gmres" else {},
        }
        for solver in BACKWARD_SOLVERS
    },
    "shine-refine": {"backward": "shine", "backward_options": {"refine": 200}},
    "shine-exact-fallback-refine": {"backward": "shine", "backward_options": {"fallback": "exact", "refine": 200}},
}
APPROXIMATE_MODES = {
    "one_step": {"backward": "one_step"},
    "phantom-unrolled": {"backward": "phantom", "backward_options": {"steps": 5, "tau": 0.5}},
    "phantom-neumann": {"backward": "phantom", "backward_options": {"steps": 5, "tau": 0.5, "variant": "neumann"}},
    "shine-jfb": {"backward": "shine"},
    "shine-none": {"backward": "shine", "backward_options": {"fallback": "none"}},
}
GRADIENT_MODES = {**EXACT_MODES, **APPROXIMATE_MODES}
ALL_MODES = {**GRADIENT_MODES, "unrolled": {"backward": "unrolled"}}
GRADCHECK = {"eps": 1e-6, "atol": 1e-7, "rtol": 1e-6}


def cotangent(p: Problem, seed: int = 1) -> Tensor:
    return torch.randn(p.batch, p.n, dtype=p.x.dtype, generator=gen(seed))


def assert_all_close(got: list[Tensor], want: list[Tensor], rel: float) -> None:
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert rel_err(g, w) <= rel, (i, rel_err(g, w))


def assert_all_equal(got: list[Tensor], want: list[Tensor]) -> None:
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert torch.equal(g, w), (i, rel_err(g, w))


def exact_grads(p: Problem, z: Tensor, c: Tensor) -> list[Tensor]:
    """The implicit-differentiation gradient of ``Σ c ⊙ z*`` w.r.t. (x, W, U, b) from a dense adjoint solve."""
    return grads_from_adjoint(p, z, exact_adjoint(per_sample_jacobian(p.fn, z), c))


def shine_fallback_mask(c: Tensor, estimate: implicit.LowRankInverse, ratio: float = 1.8) -> Tensor:
    """The reference fallback rule: flag the samples with ``‖u_SHINE‖ > ratio ‖v‖``."""
    norm = torch.linalg.vector_norm
    return norm(shine_adjoint(c, estimate), dim=1) > ratio * norm(c, dim=1)


# ------------------------------------------------------------------------------------------- phantom gradients
def test_one_step_is_phantom_with_one_undamped_step():
    """One-step ≡ phantom(k=1, τ=1) — gradients w.r.t. x and every parameter bitwise equal."""
    p = tanh_problem(0.9, "sym", 1.0, seed=2)
    c = cotangent(p)
    one_step, z1, _ = solution_grads(p, c, **EXACT, backward="one_step")
    phantom, z2, info = solution_grads(
        p, c, **EXACT, backward="phantom", backward_options={"steps": 1, "tau": 1.0, "variant": "unrolled"}
    )
    assert torch.equal(z1, z2)
    assert info.tracked_nfe == 1
    assert_all_equal(phantom, one_step)
    assert all(torch.linalg.vector_norm(g) > 0 for g in one_step)


@pytest.mark.parametrize(("steps", "tau"), [(5, 0.5), (10, 0.8), (3, 1.0)])
def test_unrolled_and_neumann_phantom_agree_at_an_exact_fixed_point(steps, tau):
    """At z* solved to 1e-14, UPG = NPG = ``u*(I − Bᵏ)`` (rel ≤ 1e-12)."""
    p = tanh_problem(0.9, "sym", 0.3, seed=3)
    c = cotangent(p)
    phantom = {"steps": steps, "tau": tau}
    upg, z, info = solution_grads(p, c, **EXACT, backward="phantom", backward_options=phantom)
    assert (info.forward.residual <= 1e-14).all()
    npg, _, _ = solution_grads(p, c, **EXACT, backward="phantom", backward_options={**phantom, "variant": "neumann"})
    assert_all_close(upg, npg, 1e-12)
    closed_form = phantom_adjoint(per_sample_jacobian(p.fn, z), c, steps, tau)
    assert_all_close(npg, grads_from_adjoint(p, z, closed_form), 1e-12)


def phantom_grads_at(p: Problem, z: Tensor, c: Tensor, **phantom) -> list[Tensor]:
    """Gradients w.r.t. (W, U, b) of ``Σ c ⊙ z`` with a phantom mode attached at an arbitrary point ``z`` (the low-level
    :meth:`BackwardMode.attach`; the phantom gradient uses only the point, not the solve that produced it)."""
    z0 = p.z0()
    problem = FlatProblem(fn=p.fn, z0=z0, options=ImplicitOptions(), layout=StateLayout(z0))
    result = implicit.solve(p.fn, z0, max_iter=1)
    state = Phantom(**phantom).attach(problem, result, ImplicitInfo(forward=result, backward_mode="phantom"), z=z)
    assert torch.equal(state, z)  # the value is the given point whatever the gradient
    return grads(state, list(p.params), c)


@pytest.mark.parametrize(("steps", "tau"), [(5, 0.5), (10, 0.8), (3, 1.0)])
def test_unrolled_and_neumann_phantom_differ_off_the_fixed_point(steps, tau):
    """Conversely: at z* + 1e-3 noise UPG ≠ NPG (measured 1.7e-3–2.5e-3 apart), while NPG still obeys its
    closed form ``τ v Σ_{i<k} Bⁱ`` with B taken at the perturbed point."""
    p = tanh_problem(0.9, "sym", 0.3, seed=3)
    c = cotangent(p)
    z = p.reference() + 1e-3 * torch.randn(p.batch, p.n, dtype=DTYPE, generator=gen(7))
    upg = phantom_grads_at(p, z, c, steps=steps, tau=tau, variant="unrolled")
    npg = phantom_grads_at(p, z, c, steps=steps, tau=tau, variant="neumann")
    assert min(rel_err(a, b) for a, b in zip(upg, npg)) > 1e-4
    closed_form = phantom_adjoint(per_sample_jacobian(p.fn, z), c, steps, tau)
    assert_all_close(npg, grads_from_adjoint(p, z, closed_form)[1:], 1e-12)


@pytest.mark.parametrize("variant", ["neumann", "unrolled"])
@pytest.mark.parametrize(("steps", "tau"), [(1, 1.0), (5, 0.5), (12, 0.7)])
def test_phantom_on_the_linear_block_matches_the_closed_form(variant, steps, tau):
    """On ``lin``, ``u = v (I − Bᵏ)(I − W)⁻¹`` with ``B = (1 − τ) I + τ W`` (matrix powers, not the Neumann
    sum), and ``∂ℓ/∂x = u U``, ``∂ℓ/∂W = uᵀz*``, ``∂ℓ/∂U = uᵀx``, ``∂ℓ/∂b = Σ_b u_b`` (rel < 1e-12)."""
    p = lin_problem(0.9, "gauss", batch=4, n=16, d=8, seed=8)
    c = cotangent(p)
    got, z, _ = solution_grads(
        p, c, **EXACT, backward="phantom", backward_options={"steps": steps, "tau": tau, "variant": variant}
    )
    W, U = p.block.W.detach(), p.block.U.detach()
    eye = torch.eye(p.n, dtype=DTYPE)
    damped = (1 - tau) * eye + tau * W
    u = torch.linalg.solve(eye - W, c, left=False) @ (eye - torch.linalg.matrix_power(damped, steps))
    assert_all_close(got, [u @ U, u.T @ z, u.T @ p.x, u.sum(0)], 1e-12)


# ------------------------------------------------------------------------------------------- GMRES
@pytest.mark.parametrize(("kind", "xs"), [("sym", 0.1), ("gauss", 1.0), ("orth", 0.1)])
def test_gmres_residual_after_k_vjps_is_at_most_the_fixed_point_residual(kind, xs):
    """The first GMRES cycle from u0 = 0 has, after k VJPs, ``‖v − u(I − J)‖ ≤ ‖vJᵏ‖ + 1e-13‖v‖``, the
    residual of the fixed-point iterate ``v Σ_{i<k} Jⁱ`` (k ≤ 30, explicit per-sample J at z*)."""
    p = tanh_problem(0.9, kind, xs, seed=3).frozen()
    jac = per_sample_jacobian(p.fn, p.reference())
    v = cotangent(p, seed=5)
    calls = 0

    def affine(u: Tensor) -> Tensor:
        nonlocal calls
        calls += 1
        return v + row_times(u, jac)

    norm = torch.linalg.vector_norm
    power = v
    for k in range(1, 31):
        power = row_times(power, jac)  # v Jᵏ
        calls = 0
        result = implicit.solve(
            affine, torch.zeros_like(v), solver="gmres", solver_options={"restart": k}, tol=0.0, max_iter=k,
            stop_mode="abs", state={"offset": v},
        )  # fmt: skip
        assert calls == k + 2  # k Krylov VJPs + the residuals of u0 and of the result
        gmres = norm(affine(result.z) - result.z, dim=1)
        assert (gmres <= norm(power, dim=1) + 1e-13 * norm(v, dim=1)).all(), (k, gmres, norm(power, dim=1))


def test_gmres_keeps_the_exact_solution_at_a_happy_breakdown():
    """Diagonal J with one-hot rows of v (and one zero row, β = 0): the Krylov space is exhausted after one VJP
    (``h_{j+1} = 0`` exactly); GMRES must return the exact ``u = v (I − J)⁻¹`` with no NaN, even at tol = 0."""
    diagonal = torch.linspace(-0.9, 0.9, 6, dtype=DTYPE)
    v = torch.zeros(4, 6, dtype=DTYPE)
    v[0, 1], v[1, 4], v[2, 5] = 1.0, -2.0, 3.0  # row 3 stays zero

    def affine(u: Tensor) -> Tensor:
        return v + u * diagonal

    result = implicit.solve(
        affine, torch.zeros_like(v), solver="gmres", solver_options={"restart": 5}, tol=0.0, max_iter=5,
        state={"offset": v},
    )  # fmt: skip
    assert not result.diverged.any()
    torch.testing.assert_close(result.z, v / (1 - diagonal), rtol=1e-15, atol=0)


def test_gmres_backward_passes_gradcheck():
    """IFT with GMRES(4) (restarted several times) as the backward solver: every entry of dz*/d(x, W, U, b)."""
    p = tanh_problem(0.9, "gauss", batch=2, n=6, seed=4)
    W, U, b = (t.detach() for t in p.params)
    options = {**EXACT, "backward_solver": "gmres", "backward_solver_options": {"restart": 4}}

    def solution(x, W, U, b):
        return implicit.equilibrium(lambda z, x_: tanh_f(z, x_, W, U, b), x, p.z0(), **options)[0]

    inputs = [t.clone().requires_grad_() for t in (p.x, W, U, b)]
    assert torch.autograd.gradcheck(solution, inputs, **GRADCHECK)


def test_gmres_handles_cotangent_rows_that_are_zero():
    """A one-hot cotangent (as gradcheck feeds): the zero rows have β = 0 and must give u = 0, not NaN; the nonzero
    row gets the exact adjoint."""
    p = tanh_problem(0.9, "sym", 0.1, seed=5)
    c = torch.zeros(p.batch, p.n, dtype=DTYPE)
    c[2, 7] = 1.0
    u, z, info = read_adjoint(p, c, **EXACT, backward_solver="gmres", backward_solver_options={"restart": 10})
    assert torch.isfinite(u).all()
    assert torch.equal(u[torch.arange(p.batch) != 2], torch.zeros(p.batch - 1, p.n, dtype=DTYPE))
    assert info.backward.converged.all()
    assert rel_err(u[2], exact_adjoint(per_sample_jacobian(p.fn, z), c)[2]) < 1e-10


# ------------------------------------------------------------------------------------------- SHINE
def test_shine_without_stored_pairs_returns_the_cotangent_bitwise():
    """The rule itself: with empty factors (H = −I) the adjoint is v, bitwise."""
    p = tanh_problem(0.9, "gauss", batch=4, n=16)
    empty = torch.zeros(4, 0, 16, dtype=DTYPE)
    result = implicit.solve(p.fn, p.z0(), max_iter=1)
    result.inverse_jacobian = implicit.LowRankInverse(empty, empty)
    info = ImplicitInfo(forward=result, backward_mode="shine")
    tracked = Tracked(z=result.z, out=p.fn(result.z), problem=None, result=result, info=info)
    v = cotangent(p)
    for fallback in ("jfb", "none"):
        assert torch.equal(Shine(fallback=fallback).adjoint(v, tracked), v)


@pytest.mark.parametrize("how", ["budget of one step", "start at the fixed point"])
def test_shine_with_no_stored_pairs_is_one_step(how):
    """Through the layer: a Broyden forward that stores no pair (one step, or z0 already converged) gives
    SHINE's adjoint = v and gradients bitwise equal to one-step's."""
    p = tanh_problem(0.9, "sym", 1.0, seed=6)
    c = cotangent(p)
    options = {"solver": "broyden", "max_iter": 1} if how == "budget of one step" else {"solver": "broyden"}
    z0 = p.reference() if how == "start at the fixed point" else None
    u, _, info = read_adjoint(p, c, z0=z0, backward="shine", **options)
    assert info.forward.inverse_jacobian.rank == 0
    assert torch.equal(u, c)
    if z0 is None:
        shine, _, _ = solution_grads(p, c, backward="shine", **options)
        one_step, _, _ = solution_grads(p, c, backward="one_step", **options)
        assert_all_equal(shine, one_step)


@pytest.mark.parametrize(("kind", "xs"), [("sym", 0.1), ("gauss", 1.0), ("orth", 0.1)])
def test_good_broyden_shine_is_a_descent_direction(kind, xs):
    """Good-Broyden SHINE (no fallback) is ``v − (vUᵀ)V`` from the forward factors and, though inaccurate (cosine
    with the exact adjoint, minimum over samples: 0.14 sym, 0.96 gauss, 0.88 orth), positively correlated with the
    exact adjoint for every sample."""
    p = tanh_problem(0.9, kind, xs, seed=0)
    c = cotangent(p)
    forward = {"solver": "broyden", "solver_options": {"memory": 300}, "tol": 1e-10, "max_iter": 300}
    u, z, info = read_adjoint(p, c, **forward, backward="shine", backward_options={"fallback": "none"})
    assert info.forward.converged.all()
    assert rel_err(u, shine_adjoint(c, info.forward.inverse_jacobian)) < 1e-13
    similarity = cosine(u, exact_adjoint(per_sample_jacobian(p.fn, z), c))
    assert (similarity > 0).all() and (similarity < 1 - 1e-6).any(), similarity


SHINE_FLAGGING = {"solver": "broyden", "solver_options": {"memory": 300}, "tol": 1e-10, "max_iter": 300}


def flagged_shine_problem() -> tuple[Problem, Tensor]:
    """sym 0.9, xs 0.1: good Broyden's estimate exceeds 1.8‖v‖ for 3 of 8 samples."""
    p = tanh_problem(0.9, "sym", 0.1, seed=0)
    return p, cotangent(p)


@pytest.mark.parametrize("ratio", [None, 1.3])
def test_shine_jfb_fallback_replaces_exactly_the_samples_beyond_the_ratio(ratio):
    p, c = flagged_shine_problem()
    shine = {} if ratio is None else {"fallback_ratio": ratio}
    u, _, info = read_adjoint(p, c, **SHINE_FLAGGING, backward="shine", backward_options=shine)
    u_shine = shine_adjoint(c, info.forward.inverse_jacobian)
    mask = shine_fallback_mask(c, info.forward.inverse_jacobian, 1.8 if ratio is None else ratio)
    assert mask.any() and not mask.all(), mask
    assert torch.equal(info.extras["shine_fallback"], mask)
    assert torch.equal(u[mask], c[mask])
    assert rel_err(u[~mask], u_shine[~mask]) < 1e-13
    kept, _, _ = read_adjoint(p, c, **SHINE_FLAGGING, backward="shine", backward_options={**shine, "fallback": "none"})
    assert rel_err(kept, u_shine) < 1e-13  # "none" keeps the flagged estimates too


def test_shine_exact_fallback_solves_the_flagged_samples_only():
    """``fallback="exact"``: flagged samples get the implicit adjoint (to the backward tol), the others keep
    ``u_SHINE`` bitwise (the same as with ``"jfb"``)."""
    p, c = flagged_shine_problem()
    backward = {"backward": "shine", "backward_tol": 1e-12, "backward_max_iter": 300}
    exact, z, info = read_adjoint(p, c, **SHINE_FLAGGING, **backward, backward_options={"fallback": "exact"})
    jfb, _, _ = read_adjoint(p, c, **SHINE_FLAGGING, **backward)
    mask = info.extras["shine_fallback"]
    assert torch.equal(mask, shine_fallback_mask(c, info.forward.inverse_jacobian))
    assert mask.any() and not mask.all()
    assert torch.equal(exact[~mask], jfb[~mask])
    u_star = exact_adjoint(per_sample_jacobian(p.fn, z), c)
    for b in mask.nonzero()[:, 0].tolist():
        assert rel_err(exact[b], u_star[b]) < 1e-9, b
    assert info.backward is not None and info.backward_vjps == info.backward.nfe


@pytest.mark.parametrize(("kind", "xs"), [("sym", 0.1), ("gauss", 1.0), ("orth", 0.1)])
def test_refining_from_the_transposed_estimate_needs_fewer_vjps(kind, xs):
    """Broyden refinement of SHINE to rel tol 1e-10 (forward Broyden to 1e-10, memory never restarting)
    needs fewer VJPs per sample from ``Hᵀ`` than from ``−I`` (measured 25.3/31.1 sym, 15.3/17.9 gauss, 13.4/76.5 orth)
    and, on the non-normal orth problem, than from the forward ``H`` (13.4 vs 99.9)."""
    p = tanh_problem(0.9, kind, xs, seed=0)
    c = cotangent(p)
    vjps = {}
    for estimate in ("transpose", "forward", "identity"):
        shine = {"fallback": "none", "refine": 300, "refine_estimate": estimate}
        u, z, info = read_adjoint(
            p, c, **SHINE_FLAGGING, check_every=1, backward="shine", backward_options=shine, backward_tol=1e-10
        )
        assert info.forward.converged.all()
        assert info.backward_vjps == info.backward.nfe
        vjps[estimate] = info.backward.nstep.double().mean().item()
        if estimate != "forward":  # from H the refinement may stall on orth (measured: 2 of 8 samples)
            assert info.backward.converged.all()
            assert rel_err(u, exact_adjoint(per_sample_jacobian(p.fn, z), c)) < 1e-8
    assert vjps["transpose"] < vjps["identity"], vjps
    if kind == "orth":
        assert vjps["transpose"] < vjps["forward"], vjps
        assert vjps["transpose"] < 0.5 * vjps["identity"], vjps


# ------------------------------------------------------------------------------------------- every mode
def mode_problem() -> tuple[Problem, Tensor]:
    p = tanh_problem(0.9, "sym", 0.1, n=32, seed=9)
    return p, cotangent(p)


@pytest.mark.parametrize("mode", EXACT_MODES)
def test_exact_modes_match_the_exact_gradient(mode):
    p, c = mode_problem()
    got, z, info = solution_grads(p, c, **FORWARD, **EXACT_MODES[mode])
    assert info.forward.converged.all() and info.backward.converged.all()
    assert_all_close(got, exact_grads(p, z, c), 1e-8)


@pytest.mark.parametrize("mode", APPROXIMATE_MODES)
def test_approximate_modes_follow_their_closed_form(mode):
    """Each approximate adjoint is its documented closed form at z*, a valid direction (cosine with the exact
    adjoint in [−1, 1], not NaN) and not exact on this problem."""
    p, c = mode_problem()
    options = APPROXIMATE_MODES[mode]
    u, z, info = read_adjoint(p, c, **FORWARD, **options)
    jac = per_sample_jacobian(p.fn, z)
    similarity = cosine(u, exact_adjoint(jac, c))
    assert ((similarity >= -1) & (similarity <= 1)).all() and (similarity < 1 - 1e-6).any(), similarity
    assert rel_err(u, documented_adjoint(options, jac, c, info.forward.inverse_jacobian)) < 1e-12


def documented_adjoint(options: dict, jac: Tensor, c: Tensor, estimate: implicit.LowRankInverse) -> Tensor:
    """The adjoint an approximate mode documents: one-step ``v``; phantom ``τ v Σ_{i<k} Bⁱ``; SHINE ``v − (vUᵀ)V``
    with the 1.8 fallback to v."""
    backward, mode = options["backward"], options.get("backward_options", {})
    if backward == "one_step":
        return c
    if backward == "phantom":
        return phantom_adjoint(jac, c, mode.get("steps", 5), mode.get("tau", 0.5))
    assert backward == "shine" and mode.get("fallback", "jfb") in ("jfb", "none")
    u = shine_adjoint(c, estimate)
    if mode.get("fallback", "jfb") == "jfb":
        u = torch.where(shine_fallback_mask(c, estimate)[:, None], c, u)
    return u


@pytest.mark.parametrize("mode", GRADIENT_MODES)
def test_initial_state_gets_a_zero_gradient(mode):
    p, c = mode_problem()
    z0 = torch.randn(p.batch, p.n, dtype=DTYPE, requires_grad=True)
    z, _ = implicit.equilibrium(p.block, p.x, z0, **FORWARD, **GRADIENT_MODES[mode])
    g = torch.autograd.grad((c * z).sum(), [z0, p.block.W])
    assert torch.equal(g[0], torch.zeros_like(z0))
    assert torch.linalg.vector_norm(g[1]) > 0


def test_every_mode_returns_the_same_value_and_no_grad_builds_no_graph():
    """The value is the solver's z* bitwise in every mode, with and without grad; under no_grad nothing is tracked."""
    p, _ = mode_problem()
    values = []
    for options in ALL_MODES.values():
        with torch.no_grad():
            z, info = implicit.equilibrium(p.block, p.x, p.z0(), **FORWARD, **options)
        assert z.grad_fn is None and not z.requires_grad
        assert info.tracked_nfe == 0 and info.backward is None and info.backward_vjps == 0
        z_grad, _ = implicit.equilibrium(p.block, p.x, p.z0(), **FORWARD, **options)
        assert z_grad.requires_grad
        values += [z, z_grad]
    assert all(torch.equal(v, values[0]) for v in values)


@pytest.mark.parametrize("mode", ALL_MODES)
def test_eval_mode_gives_the_train_mode_gradient(mode):
    p, c = mode_problem()
    layer = implicit.make_implicit(p.block, **FORWARD, **ALL_MODES[mode])
    train = grads(layer(p.x), list(p.params), c)
    evaluated = grads(layer.eval()(p.x), list(p.params), c)
    assert not p.block.training
    assert_all_equal(evaluated, train)


def expected_costs(options: dict) -> tuple[int | None, int | None]:
    """Documented ``(tracked_nfe, backward_vjps)``; None where the count is the backward solve's own nfe."""
    backward, mode = options["backward"], options.get("backward_options", {})
    if backward == "phantom" and mode.get("variant", "unrolled") == "unrolled":
        return mode.get("steps", 5), 0
    if backward == "phantom":
        return 1, mode.get("steps", 5) - 1
    if backward == "unrolled":
        return 0, 0
    if backward == "implicit" or mode.get("refine") or mode.get("fallback") == "exact":
        return 1, None
    return 1, 0


@pytest.mark.parametrize("mode", ALL_MODES)
def test_tracked_evaluations_and_backward_vjps_are_accounted(mode):
    """``tracked_nfe`` and ``backward_vjps`` per mode (one-step 1/0, unrolled phantom k/0, Neumann phantom 1/k−1,
    solves: their nfe, summed over SHINE's fallback and refinement solves), checked against the block's actual calls
    and the gradients that flowed through it."""
    p, c = mode_problem()
    block = CountingTanh(p.n, s=0.9, kind="sym", seed=9)
    block.load_state_dict(p.block.state_dict())
    options = ALL_MODES[mode]
    z, info = implicit.equilibrium(block, p.x, p.z0(), **FORWARD, **options)
    tracked, vjps = expected_costs(options)
    assert info.tracked_nfe == tracked
    assert block.calls == info.forward.nfe + tracked
    assert info.backward_vjps == 0 and block.vjps == 0
    (c * z).sum().backward()
    if vjps is None:
        solves = 2 if mode == "shine-exact-fallback-refine" else 1  # the exact fallback, then the refinement
        assert info.backward is not None and info.backward.nfe > 0
        assert (info.backward_vjps > info.backward.nfe) if solves == 2 else (info.backward_vjps == info.backward.nfe)
    else:
        assert info.backward_vjps == vjps
    if mode != "unrolled":  # every tracked evaluation is backpropagated once, plus the adjoint rule's VJPs
        assert block.vjps == info.tracked_nfe + info.backward_vjps


@pytest.mark.parametrize("solver", SOLVER_NAMES)
def test_unrolled_mode_differentiates_every_forward_solver(solver):
    """``"unrolled"`` backpropagates through the solver's own steps; converged to 1e-12 that approaches the implicit
    gradient (measured 5e-11 plain, 2e-8 Broyden, 9e-11 Anderson)."""
    p, c = mode_problem()
    got, z, info = solution_grads(p, c, solver=solver, tol=1e-12, max_iter=400, backward="unrolled")
    assert info.forward.converged.all()
    assert_all_close(got, exact_grads(p, z, c), 1e-6)


# ------------------------------------------------------------------------------------------- option validation
def test_shine_needs_the_broyden_forward_solver():
    p, _ = mode_problem()
    with pytest.raises(ValueError, match="broyden"):
        implicit.make_implicit(p.block, backward="shine", solver="anderson")
    with pytest.raises(ValueError, match="broyden"):
        implicit.equilibrium(p.block, p.x, p.z0(), backward="shine", solver="fixed_point")


@pytest.mark.parametrize(
    ("backward", "wrong", "valid"),
    [
        ("phantom", "step", "steps, tau, variant"),
        ("shine", "ratio", "fallback, fallback_ratio, refine, refine_estimate"),
        ("one_step", "steps", "(none)"),
        ("implicit", "tol", "(none)"),
        ("unrolled", "steps", "(none)"),
    ],
)
def test_unknown_backward_option_names_the_valid_ones(backward, wrong, valid):
    extra = {"solver": "broyden"} if backward == "shine" else {}
    with pytest.raises(TypeError, match=re.escape(f"valid options: {valid}")):
        implicit.ImplicitOptions(backward=backward, backward_options={wrong: 1}, **extra)


@pytest.mark.parametrize(
    "bad",
    [
        {"backward": "phantom", "backward_options": {"steps": 0}},
        {"backward": "phantom", "backward_options": {"steps": 2.0}},
        {"backward": "phantom", "backward_options": {"steps": True}},
        {"backward": "phantom", "backward_options": {"tau": 0.0}},
        {"backward": "phantom", "backward_options": {"tau": 1.5}},
        {"backward": "phantom", "backward_options": {"tau": float("nan")}},
        {"backward": "phantom", "backward_options": {"variant": "neuman"}},
        {"backward": "shine", "solver": "broyden", "backward_options": {"fallback": "exactly"}},
        {"backward": "shine", "solver": "broyden", "backward_options": {"fallback_ratio": 1.0}},
        {"backward": "shine", "solver": "broyden", "backward_options": {"fallback_ratio": float("inf")}},
        {"backward": "shine", "solver": "broyden", "backward_options": {"refine": -1}},
        {"backward": "shine", "solver": "broyden", "backward_options": {"refine": True}},
        {"backward": "shine", "solver": "broyden", "backward_options": {"refine_estimate": "H"}},
        {"backward_solver": "gmres", "backward_solver_options": {"restart": 0}},
        {"solver": "gmres"},  # linear systems only
        {"backward": "phantom_gradient"},
    ],
)
def test_bad_backward_option_values_raise_value_error(bad):
    with pytest.raises(ValueError):
        implicit.ImplicitOptions(**bad)


def test_gmres_options_are_checked_by_name():
    with pytest.raises(TypeError, match="valid options: restart"):
        implicit.ImplicitOptions(backward_solver="gmres", backward_solver_options={"memory": 5})


# ------------------------------------------------------------------------------------------- property
@settings(max_examples=12)
@given(
    mode=st.sampled_from(sorted(GRADIENT_MODES)),
    steps=st.integers(1, 12),
    tau=st.sampled_from((0.5, 0.7, 1.0)),
    structure=st.sampled_from(STRUCTURES),
    batch=st.integers(1, 4),
    n=st.integers(4, 16),
    kind=st.sampled_from(("gauss", "sym")),
    seed=st.integers(0, 2**16),
)
def test_gradient_of_every_mode_on_pytree_states(mode, steps, tau, structure, batch, n, kind, seed):
    """Exact modes give the gradient w.r.t. x of 400 unrolled plain iterations (rel ≤ 1e-8); approximate modes give
    the one their closed form predicts (rel ≤ 1e-10), for any state structure and batch."""
    options = dict(GRADIENT_MODES[mode])
    if options["backward"] == "phantom":
        options["backward_options"] = {**options["backward_options"], "steps": steps, "tau": tau}
    p = tanh_problem(0.9, kind, 1.0, batch=batch, n=n, d=3, seed=seed)
    widths = widths_for(n, 3)
    block = PytreeBlock(p.block, structure, widths)
    c = torch.randn(batch, n, dtype=DTYPE, generator=gen(seed + 1))

    def grad_x(**layer_options) -> tuple[Tensor, Tensor, ImplicitInfo]:
        x = p.x.clone().requires_grad_()
        z, info = implicit.equilibrium(block, x, block.initial_state(x), **layer_options)
        (g,) = torch.autograd.grad(merge_state(z), x, c)
        return g, merge_state(z).detach(), info

    got, z, info = grad_x(**FORWARD, **options)
    if mode in EXACT_MODES:
        want, _, _ = grad_x(solver="fixed_point", tol=0.0, max_iter=400, backward="unrolled")
        assert rel_err(got, want) <= 1e-8
    else:
        u = documented_adjoint(options, per_sample_jacobian(p.fn, z), c, info.forward.inverse_jacobian)
        assert rel_err(got, grads_from_adjoint(p, z, u)[0]) <= 1e-10


@pytest.mark.parametrize("tol", [1e-6, 1e-10, 1e-13])
def test_unrolled_broyden_gradient_stays_finite_at_round_off(tol):
    """A Broyden pair whose denominator vanishes is dropped; unrolled, its masked reciprocal must not
    backpropagate 0 · ∞ = NaN (regression: found by the strategies' drawn problems)."""
    x = torch.tensor([[1.5410], [-0.2934]], dtype=torch.float64, requires_grad=True)

    def f(z, x):
        return torch.tanh(0.45 * z + x)

    z, _ = implicit.equilibrium(
        f, x, torch.zeros(2, 4, dtype=torch.float64), solver="broyden", backward="unrolled", tol=tol, max_iter=100
    )
    (grad,) = torch.autograd.grad(z.sum(), x)
    slope = 1 - z.detach()[:, :1] ** 2  # scalar equilibrium z = tanh(0.45 z + x): dz/dx = s / (1 − 0.45 s)
    torch.testing.assert_close(grad, 4 * slope / (1 - 0.45 * slope), rtol=max(1e-8, 100 * tol), atol=0)
