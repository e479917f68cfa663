"""Sparse fixed-point correction: supervised positions, the states and their own phantom gradients, and the weighted
loss (Bai et al., "Deep Equilibrium Optical Flow
Estimation", CVPR 2022)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from problems import (
    DTYPE,
    SOLVER_NAMES,
    PytreeBlock,
    gen,
    grads,
    merge_state,
    rel_err,
    split_state,
    tanh_problem,
    widths_for,
)
from torch import Tensor

import implicit
from implicit.correction import correction_loss, correction_positions


def problem_and_cotangent(batch: int = 8, n: int = 32, seed: int = 1):
    p = tanh_problem(0.9, "gauss", 1.0, batch=batch, n=n, seed=seed)
    return p, torch.randn(batch, n, dtype=DTYPE, generator=gen(seed + 1))


def loss_and_grads(p, state: Tensor, x: Tensor, c: Tensor) -> tuple[Tensor, list[Tensor]]:
    loss = (c * state).sum()
    return loss, list(torch.autograd.grad(loss, [x, *p.params], retain_graph=True))


def corrected(p, **options) -> tuple[list[Tensor], Tensor, implicit.ImplicitInfo]:
    """The states of one corrected solve on the problem's block, and the injection leaf they depend on."""
    x = p.x.clone().requires_grad_()
    states, info = implicit.equilibrium(p.block, x, p.z0(), **options)
    return states, x, info


def plain(p, **options) -> tuple[Tensor, Tensor, implicit.ImplicitInfo]:
    x = p.x.clone().requires_grad_()
    z, info = implicit.equilibrium(p.block, x, p.z0(), **options)
    return z, x, info


def assert_all_equal(got: list[Tensor], want: list[Tensor]) -> None:
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert torch.equal(g, w), (i, rel_err(g, w))


# ------------------------------------------------------------------------------------------- positions
@pytest.mark.parametrize(
    ("spec", "max_iter", "want"),
    [
        (6, 36, [6, 12, 18, 24, 30, 36]),
        (3, 40, [14, 27, 40]),
        (1, 30, [30]),
        (2, 7, [4, 7]),
        (5, 5, [1, 2, 3, 4, 5]),
        ([3, 7], 10, [3, 7, 10]),
        ((7, 3, 3), 10, [3, 7, 10]),
        ([10], 10, [10]),
        ([1, 10], 10, [1, 10]),
    ],
)
def test_correction_positions(spec, max_iter, want):
    """``t_i = T − (n − 1 − i)⌊T/n⌋``; explicit steps are sorted, deduplicated and get T appended."""
    assert correction_positions(spec, max_iter) == want


@pytest.mark.parametrize(("spec", "max_iter"), [(0, 10), (11, 10), (-1, 10), ([0, 5], 10), ([11], 10), ([], 10)])
def test_invalid_correction_positions_raise(spec, max_iter):
    with pytest.raises(ValueError):
        correction_positions(spec, max_iter)
    with pytest.raises(ValueError):
        implicit.ImplicitOptions(correction=spec, max_iter=max_iter)


@pytest.mark.parametrize("spec", [True, 2.5, "3", [2.5]])
def test_correction_option_that_is_not_a_count_or_steps_raises_value_error(spec):
    """A bool, a float, a string or non-integer steps are bad values (ValueError), not a TypeError from tuple()."""
    with pytest.raises(ValueError):
        implicit.ImplicitOptions(correction=spec, max_iter=10)


# ------------------------------------------------------------------------------------------- states
@pytest.mark.parametrize(
    ("solver", "backward"),
    [("anderson", "implicit"), ("anderson", "phantom"), ("broyden", "shine"), ("fixed_point", "unrolled")],
)
def test_one_state_is_the_plain_mode(solver, backward):
    """``correction=1`` returns ``[z*]`` whose loss and gradients are bitwise those of the plain mode."""
    p, c = problem_and_cotangent()
    options = {"solver": solver, "backward": backward, "max_iter": 30}
    states, x1, _ = corrected(p, correction=1, **options)
    assert isinstance(states, list) and len(states) == 1
    z, x2, _ = plain(p, **options)
    loss1, grads1 = loss_and_grads(p, states[0], x1, c)
    loss2, grads2 = loss_and_grads(p, z, x2, c)
    assert torch.equal(loss1, loss2)
    assert_all_equal(grads1, grads2)


def test_exactly_n_states_when_the_solver_stops_early():
    """A solve that stops at step ~7 of 36 still returns 6 states; the state at step t of a sample that stopped at
    or before t is its final state, bitwise."""
    p, _ = problem_and_cotangent()
    states, _, info = corrected(p, solver="fixed_point", tol=1e-3, max_iter=36, check_every=1, correction=6)
    assert len(states) == 6
    assert info.forward.converged.all() and info.forward.nfe < 36
    stopped_at = info.forward.nstep - 1  # the step whose point each sample returns
    final = states[-1]
    for t, state in zip(correction_positions(6, 36), states):
        after = stopped_at <= t
        assert torch.equal(state[after], final[after]), t
        assert not (state[~after] == final[~after]).all(dim=1).any(), t
    assert (stopped_at > 6).any() and (stopped_at <= 6).any()  # the first state mixes both cases


@settings(max_examples=12)
@given(
    max_iter=st.integers(1, 30),
    data=st.data(),
    solver=st.sampled_from(SOLVER_NAMES),
    seed=st.integers(0, 2**16),
)
def test_each_state_is_the_iterate_of_a_solve_stopped_there(max_iter, data, solver, seed):
    """With ``check_every=1`` and tol 0 the state at step t is bitwise the result of a t-step solve."""
    spec = data.draw(
        st.one_of(st.integers(1, max_iter), st.lists(st.integers(1, max_iter), min_size=1, max_size=4)), label="spec"
    )
    p = tanh_problem(0.9, "sym", 1.0, batch=3, n=8, seed=seed)
    common = {"solver": solver, "tol": 0.0, "check_every": 1}
    states, _, _ = corrected(p, max_iter=max_iter, correction=spec, **common)
    positions = correction_positions(spec, max_iter)
    assert len(states) == len(positions)
    for t, state in zip(positions, states):
        z, _, _ = plain(p, max_iter=t, **common)
        assert torch.equal(state, z), t


def phantom_by_hand(p, z: Tensor, x: Tensor, steps: int, tau: float) -> Tensor:
    """k damped steps ``(1 − τ) h + τ f(h)`` from the detached point, written out here."""
    h = z.detach()
    for _ in range(steps):
        h = (1 - tau) * h + tau * p.block(h, x)
    return h


def test_each_state_has_its_own_phantom_gradient():
    """A loss on intermediate state i gets exactly the k-step phantom gradient at that state (bitwise that of a solve
    stopped at t_i with ``backward="phantom"``; 1e-13 from damped steps written out here); the last state gets the
    plain mode's gradient bitwise."""
    p, c = problem_and_cotangent()
    steps, tau = 2, 0.7
    common = {"solver": "anderson", "tol": 0.0, "check_every": 1}
    states, x, info = corrected(p, max_iter=12, correction=3, correction_steps=steps, correction_tau=tau, **common)
    assert info.tracked_nfe == 2 * steps + 1
    for t, state in zip([4, 8], states[:-1]):
        _, got = loss_and_grads(p, state, x, c)
        alone, x_alone, _ = plain(
            p, max_iter=t, backward="phantom", backward_options={"steps": steps, "tau": tau}, **common
        )
        assert torch.equal(state, alone)
        assert_all_equal(got, loss_and_grads(p, alone, x_alone, c)[1])
        by_hand = grads(phantom_by_hand(p, state, x, steps, tau), [x, *p.params], c)
        assert all(rel_err(g, w) < 1e-13 for g, w in zip(got, by_hand))
    final, x_final, _ = plain(p, max_iter=12, **common)
    assert_all_equal(loss_and_grads(p, states[-1], x, c)[1], loss_and_grads(p, final, x_final, c)[1])


def test_weighted_loss_gradient_is_the_weighted_sum_of_the_state_gradients():
    p, c = problem_and_cotangent()
    states, x, _ = corrected(p, solver="anderson", max_iter=20, correction=4)
    per_state = [loss_and_grads(p, s, x, c) for s in states]
    total = correction_loss([loss for loss, _ in per_state], weighting="exp", gamma=0.8)
    got = torch.autograd.grad(total, [x, *p.params])
    for i, g in enumerate(got):
        want = sum(0.8 ** (3 - k) * grads_k[i] for k, (_, grads_k) in enumerate(per_state))
        assert rel_err(g, want) < 1e-12, i


@pytest.mark.parametrize("structure", ["tuple", "nested"])
def test_correction_with_pytree_states(structure):
    """Each state has the state's structure; merged, values and gradients are those of the flat state."""
    p, c = problem_and_cotangent(batch=4, n=12)
    widths = widths_for(12, 3)
    block = PytreeBlock(p.block, structure, widths)
    options = {"solver": "anderson", "max_iter": 20, "correction": 3, "correction_steps": 2}
    x = p.x.clone().requires_grad_()
    tree_states, _ = implicit.equilibrium(block, x, block.initial_state(x), **options)
    flat_states, x_flat, _ = corrected(p, **options)
    assert len(tree_states) == 3
    for tree, flat in zip(tree_states, flat_states):
        assert type(tree) is type(split_state(flat, structure, widths))
        merged = merge_state(tree)
        assert torch.equal(merged, flat)
        got = loss_and_grads(p, merged, x, c)[1]
        want = loss_and_grads(p, flat, x_flat, c)[1]
        assert all(rel_err(g, w) < 1e-14 for g, w in zip(got, want))


def test_correction_with_the_unrolled_mode():
    """With ``backward="unrolled"`` each state keeps the iterations' graph: its gradient is that of an unrolled
    solve stopped at its step; nothing extra is tracked."""
    p, c = problem_and_cotangent()
    common = {"solver": "fixed_point", "tol": 0.0, "check_every": 1, "backward": "unrolled"}
    states, x, info = corrected(p, max_iter=15, correction=[5, 9], **common)
    assert len(states) == 3 and info.tracked_nfe == 0
    for t, state in zip([5, 9, 15], states):
        alone, x_alone, _ = plain(p, max_iter=t, **common)
        assert torch.equal(state, alone)
        assert_all_equal(loss_and_grads(p, state, x, c)[1], loss_and_grads(p, alone, x_alone, c)[1])


def test_correction_under_no_grad_returns_the_states_without_graphs():
    p, _ = problem_and_cotangent()
    with torch.no_grad():
        states, _, info = corrected(p, solver="anderson", max_iter=20, correction=4)
    assert len(states) == 4 and info.tracked_nfe == 0
    assert all(s.grad_fn is None for s in states)
    with_grad, _, _ = corrected(p, solver="anderson", max_iter=20, correction=4)
    assert_all_equal(states, [s.detach() for s in with_grad])


# ------------------------------------------------------------------------------------------- weighted loss
@pytest.mark.parametrize(
    ("weighting", "params", "weights"),
    [
        ("exp", {}, [0.8**3, 0.8**2, 0.8, 1.0]),
        ("exp", {"gamma": 0.5}, [0.125, 0.25, 0.5, 1.0]),
        ("linear", {"gamma": 0.9}, [1 - 3 * 0.9 / 4, 1 - 2 * 0.9 / 4, 1 - 0.9 / 4, 1.0]),
        ("linear", {"gamma": 0.8, "bias": 0.1}, [1.1 - 3 * 0.8 / 4, 1.1 - 2 * 0.8 / 4, 1.1 - 0.8 / 4, 1.1]),
        ("const", {}, [1.0, 1.0, 1.0, 1.0]),
        ("const", {"const": 0.3}, [0.3, 0.3, 0.3, 0.3]),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_correction_loss_weights(weighting, params, weights, dtype):
    """``Σ w_i ℓ_i`` (earliest state first, the last weighted most): value, per-loss weights (as gradients), a scalar
    on the losses' dtype."""
    values = [3.0, -1.0, 0.5, 2.0]
    losses = [torch.tensor(v, dtype=dtype, requires_grad=True) for v in values]
    total = correction_loss(losses, weighting=weighting, **params)
    assert total.dim() == 0 and total.dtype == dtype and total.device == losses[0].device
    want = sum(w * v for w, v in zip(weights, values))
    assert abs(total.item() - want) <= (1e-6 if dtype == torch.float32 else 1e-14) * max(1.0, abs(want))
    got_weights = torch.autograd.grad(total, losses)
    for g, w in zip(got_weights, weights):
        assert abs(g.item() - w) <= (1e-7 if dtype == torch.float32 else 1e-15)


@pytest.mark.parametrize(
    ("losses", "kwargs"),
    [
        ([], {}),
        ([torch.ones(2)], {}),
        ([torch.tensor(1.0)], {"weighting": "quadratic"}),
    ],
)
def test_correction_loss_rejects_bad_input(losses, kwargs):
    with pytest.raises(ValueError):
        correction_loss(losses, **kwargs)
