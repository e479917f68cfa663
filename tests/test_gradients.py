"""Gradients: implicit differentiation (Bai, Kolter and Koltun, "Deep Equilibrium Models", NeurIPS 2019) against
gradcheck, long unrolling and the linear closed form, and the autograd behaviour of implicit layers."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from problems import (
    EXACT,
    SOLVER_NAMES,
    STRUCTURES,
    PytreeBlock,
    lin_f,
    lin_problem,
    merge_state,
    rel_err,
    split_state,
    tanh_f,
    tanh_problem,
    widths_for,
)
from torch import Tensor, nn
from torch.utils import _pytree as pytree

import implicit

GRADCHECK = {"eps": 1e-6, "atol": 1e-7, "rtol": 1e-6}
ORACLE1_PROBLEMS = {
    "tanh-gauss-0.9": lambda: (tanh_f, tanh_problem(0.9, "gauss", batch=4, n=16, seed=1)),
    "tanh-sym-0.9": lambda: (tanh_f, tanh_problem(0.9, "sym", batch=4, n=16, seed=2)),
    "tanh-gauss-0.5": lambda: (tanh_f, tanh_problem(0.5, "gauss", batch=4, n=16, seed=3)),
    "lin": lambda: (lin_f, lin_problem(0.9, "gauss", batch=4, n=16, seed=4)),
}


def leaves(*tensors: Tensor) -> list[Tensor]:
    return [t.detach().clone().requires_grad_() for t in tensors]


def layer_grads(layer: nn.Module, x: Tensor, cotangent: Tensor, **overrides) -> list[Tensor]:
    """Gradients of ``Σ c ⊙ z*`` w.r.t. ``x`` and the layer's parameters (in registration order)."""
    x = x.detach().clone().requires_grad_()
    z = layer(x, **overrides)
    return list(torch.autograd.grad((cotangent * merge_state(z)).sum(), [x, *layer.parameters()]))


def assert_grads_close(got: list[Tensor], want: list[Tensor], rel: float) -> None:
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert rel_err(g, w) < rel, (i, rel_err(g, w))


# ------------------------------------------------------------------------------------------- gradcheck
def _solution_map(block_f, z0: Tensor, **options):
    """``(x, W, U, b) -> z*`` with a block that closes over its inputs."""

    def run(x, W, U, b):
        return implicit.equilibrium(lambda z, x_: block_f(z, x_, W, U, b), x, z0, **options)[0]

    return run


@pytest.mark.parametrize("name", ORACLE1_PROBLEMS)
def test_gradcheck(name):
    """Every entry of the Jacobian of z* w.r.t. x, W, U and b (B=4, N=16: 592 inputs, 64 outputs)."""
    block_f, p = ORACLE1_PROBLEMS[name]()
    run = _solution_map(block_f, p.z0(), **EXACT)
    assert torch.autograd.gradcheck(run, leaves(p.x, *p.params), **GRADCHECK)


@pytest.mark.parametrize("backward_solver", SOLVER_NAMES)
def test_gradcheck_of_a_closed_over_tensor(backward_solver):
    """Gradients reach a tensor the block only closes over (neither a parameter nor the injection)."""
    p = tanh_problem(0.9, "sym", batch=4, n=16, seed=6)
    W, U, b = (t.detach() for t in p.params)
    x, z0 = p.x, p.z0()

    def run(shift):
        options = {**EXACT, "backward_solver": backward_solver}
        return implicit.equilibrium(lambda z, x_: tanh_f(z, x_, W, U, b + shift), x, z0, **options)[0]

    shift = torch.zeros(1, 16, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(run, [shift], **GRADCHECK)
    z = run(shift)
    (g,) = torch.autograd.grad(z.sum(), shift)
    assert torch.linalg.vector_norm(g) > 0.1


def test_gradient_under_functional_call():
    """``torch.func.functional_call`` swaps parameters only during the forward; autograd runs later. The backward must
    differentiate the f that was solved, not the module's own (different) parameters."""
    p = tanh_problem(0.9, "gauss", batch=4, n=16, seed=1)
    layer = implicit.make_implicit(p.block, **EXACT)
    W_other = (0.5 * p.block.W.detach()).requires_grad_()
    z = torch.func.functional_call(layer, {"block.W": W_other}, (p.x,))
    (got,) = torch.autograd.grad(z.sum(), W_other)

    reference = copy.deepcopy(p.block)
    with torch.no_grad():
        reference.W.copy_(W_other)
    (want,) = torch.autograd.grad(implicit.make_implicit(reference, **EXACT)(p.x).sum(), reference.W)
    assert rel_err(got, want) < 1e-8


def test_changing_a_parameter_between_forward_and_backward_is_an_error():
    """The backward differentiates the f of the forward; an in-place update in between must not go unnoticed."""
    p = tanh_problem(0.9, "gauss", batch=4, n=16, seed=1)
    z = implicit.make_implicit(p.block, **EXACT)(p.x)
    with torch.no_grad():
        p.block.W.mul_(0.5)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        z.sum().backward()


# ------------------------------------------------------------------------------------------- unrolling
@settings(max_examples=15)
@given(
    batch=st.integers(1, 5),
    n=st.integers(4, 20),
    d=st.integers(2, 12),
    structure=st.sampled_from(STRUCTURES),
    pieces=st.integers(2, 4),
    kind=st.sampled_from(("gauss", "sym")),
    s=st.sampled_from((0.5, 0.9)),
    forward_solver=st.sampled_from(SOLVER_NAMES),
    backward_solver=st.sampled_from(SOLVER_NAMES),
    tau=st.sampled_from((1.0, 0.5, 0.8)),
    seed=st.integers(0, 2**16),
)
def test_implicit_gradient_equals_long_unrolling(
    batch, n, d, structure, pieces, kind, s, forward_solver, backward_solver, tau, seed
):
    """IFT = autograd through 400 plain/damped iterations (L^400 ≪ 1e-10), rel < 1e-8, on pytree states."""
    p = tanh_problem(s, kind, 1.0, batch=batch, n=n, d=d, seed=seed)
    block = PytreeBlock(p.block, structure, widths_for(n, pieces))
    damping = {"tau": tau}
    ift = implicit.make_implicit(
        block,
        solver=forward_solver,
        solver_options=damping if forward_solver == "fixed_point" else {},
        backward_solver=backward_solver,
        backward_solver_options=damping if backward_solver == "fixed_point" else {},
        **EXACT,
    )
    unrolled = implicit.make_implicit(
        block, solver="fixed_point", solver_options=damping, tol=0.0, max_iter=400, backward="unrolled"
    )
    c = torch.randn(batch, n, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    got = layer_grads(ift, p.x, c)
    assert ift.last_info.forward.converged.all() and ift.last_info.backward.converged.all()
    want = layer_grads(unrolled, p.x, c)
    assert unrolled.last_info.forward.nfe == 401
    assert_grads_close(got, want, 1e-8)


# ------------------------------------------------------------------------------------------- closed form
def _linear_closed_form(p, c: Tensor):
    """``u = c (I − W)⁻¹``; ``∂ℓ/∂W = uᵀz*``, ``∂ℓ/∂U = uᵀx``, ``∂ℓ/∂b = Σ_b u_b``, ``∂ℓ/∂x = u U``."""
    W, U = p.block.W.detach(), p.block.U.detach()
    z_star = p.block.closed_form(p.x)
    u = torch.linalg.solve((torch.eye(p.n, dtype=W.dtype) - W).T, c.T).T  # u (I − W) = c
    return z_star, [u @ U, u.T @ z_star, u.T @ p.x, u.sum(0)]


@pytest.mark.parametrize("solver", SOLVER_NAMES)
@pytest.mark.parametrize("backward_solver", SOLVER_NAMES)
def test_linear_gradients_match_the_closed_form(solver, backward_solver):
    """z* and the gradients of Σ c ⊙ z* w.r.t. x, W, U, b on ``lin`` (rel < 1e-12 / 1e-10)."""
    p = lin_problem(0.9, "gauss", batch=4, n=16, d=8, seed=8)
    c = torch.randn(4, 16, dtype=torch.float64)
    z_star, want = _linear_closed_form(p, c)
    layer = implicit.make_implicit(p.block, solver=solver, backward_solver=backward_solver, **EXACT)
    x = p.x.clone().requires_grad_()
    z = layer(x, z0=p.z0())  # the state (16) is wider than the injection (8)
    assert rel_err(z, z_star) < 1e-12
    got = torch.autograd.grad((c * z).sum(), [x, p.block.W, p.block.U, p.block.b])
    assert_grads_close(list(got), want, 1e-10)


def test_output_used_twice_in_one_graph():
    """Both uses' cotangents add up before the adjoint solve: ℓ = Σ c₁ ⊙ z* + Σ c₂ ⊙ z* = Σ (c₁ + c₂) ⊙ z*."""
    p = lin_problem(0.9, "sym", batch=4, n=16, seed=9)
    c1, c2 = torch.randn(2, 4, 16, dtype=torch.float64)
    _, want = _linear_closed_form(p, c1 + c2)
    layer = implicit.make_implicit(p.block, **EXACT)
    x = p.x.clone().requires_grad_()
    z = layer(x)
    got = torch.autograd.grad((c1 * z).sum() + (c2 * z).sum(), [x, *p.params])
    assert_grads_close(list(got), want, 1e-10)

    # A nonlinear second use: ℓ = Σ c₁ ⊙ z + Σ z², i.e. the cotangent c₁ + 2z.
    z = layer(x)
    got = torch.autograd.grad((c1 * z).sum() + (z * z).sum(), [x, *p.params])
    z = layer(x)
    want = torch.autograd.grad(z, [x, *p.params], c1 + 2 * z.detach())
    assert_grads_close(list(got), list(want), 1e-12)


# ------------------------------------------------------------------------------------------- layer autograd behaviour
def _tanh_layer(seed: int = 0, **options):
    p = tanh_problem(0.9, "sym", 1.0, batch=4, n=16, seed=seed)
    return p, implicit.make_implicit(p.block, **{**EXACT, **options})


def test_two_calls_before_one_backward_sum_their_gradients():
    p, layer = _tanh_layer()
    x1 = p.x
    x2 = torch.randn_like(p.x)
    c1, c2 = torch.randn(2, 4, 16, dtype=torch.float64)
    g1 = layer_grads(layer, x1, c1)
    g2 = layer_grads(layer, x2, c2)

    a, b = x1.clone().requires_grad_(), x2.clone().requires_grad_()
    za, zb = layer(a), layer(b)
    params = list(layer.parameters())
    both = torch.autograd.grad((c1 * za).sum() + (c2 * zb).sum(), [a, b, *params])
    torch.testing.assert_close(both[0], g1[0], rtol=1e-12, atol=0)
    torch.testing.assert_close(both[1], g2[0], rtol=1e-12, atol=0)
    for got, one, two in zip(both[2:], g1[1:], g2[1:]):
        torch.testing.assert_close(got, one + two, rtol=1e-12, atol=1e-15)


def test_eval_mode_gives_the_train_mode_gradient():
    p, layer = _tanh_layer()
    c = torch.randn(4, 16, dtype=torch.float64)
    train = layer_grads(layer.train(), p.x, c)
    evaluated = layer_grads(layer.eval(), p.x, c)
    assert not layer.training
    for a, b in zip(train, evaluated):
        assert torch.equal(a, b)
        assert torch.linalg.vector_norm(a) > 0


def test_no_grad_builds_no_graph_and_runs_no_backward():
    p, layer = _tanh_layer()
    x = p.x.clone().requires_grad_()
    with torch.no_grad():
        z = layer(x)
    assert not z.requires_grad and z.grad_fn is None
    info = layer.last_info
    assert info.backward is None and info.tracked_nfe == 0
    assert info.forward.converged.all()


def test_backward_info_is_filled_by_autograd():
    p, layer = _tanh_layer(backward_tol=1e-10)
    z, info = layer(p.x, return_info=True)
    assert info is layer.last_info
    assert info.backward is None and info.backward_vjps == 0
    z.sum().backward()
    assert info.backward is not None
    assert info.backward.converged.all()
    assert info.backward.nfe > 0 and info.backward_vjps == info.backward.nfe
    assert (info.backward.residual <= 1e-10).all()


def test_backward_budget_of_one_is_reported_as_not_converged():
    p = tanh_problem(0.9, "sym", 0.1, batch=8, n=64, seed=0)
    layer = implicit.make_implicit(p.block, tol=1e-8, max_iter=200, backward_tol=1e-10, backward_max_iter=1)
    z, info = layer(p.x, return_info=True)
    assert info.forward.converged.all()
    z.sum().backward()
    assert info.backward.nfe <= 2
    assert not info.backward.converged.any()
    assert not info.backward.diverged.any()
    assert (info.backward.residual > 1e-10).all()


@pytest.mark.parametrize("structure", ("tensor", "nested"))
def test_initial_state_gets_zero_gradient_in_implicit_mode(structure):
    """z* does not depend on z0: every z0 leaf that requires grad gets an exact zero tensor (not None)."""
    p = tanh_problem(0.9, "sym", 1.0, batch=4, n=16)
    widths = widths_for(16, 3)
    layer = implicit.make_implicit(PytreeBlock(p.block, structure, widths), **EXACT)
    start = split_state(torch.randn(4, 16, dtype=torch.float64), structure, widths)
    z0 = pytree.tree_map(lambda t: t.detach().clone().requires_grad_(), start)
    merge_state(layer(p.x, z0=z0)).sum().backward()
    for leaf in pytree.tree_leaves(z0):
        assert leaf.grad is not None
        assert torch.equal(leaf.grad, torch.zeros_like(leaf))
    assert torch.linalg.vector_norm(p.block.W.grad) > 0


def test_initial_state_gets_the_vanishing_unrolled_derivative():
    p, layer = _tanh_layer(backward="unrolled", solver="fixed_point", tol=1e-10, max_iter=300)
    z0 = torch.randn(4, 16, dtype=torch.float64, requires_grad=True)
    c = torch.randn(4, 16, dtype=torch.float64)
    (c * layer(p.x, z0=z0)).sum().backward()
    assert layer.last_info.forward.converged.all()
    g = z0.grad
    assert g is not None and torch.isfinite(g).all()
    # ∂z_K/∂z0 = Π J_k shrinks like the residual: tiny but not zero.
    assert 0 < torch.linalg.vector_norm(g) <= 1e-6 * torch.linalg.vector_norm(c)


def test_float32_gradients_agree_with_float64():
    p, layer64 = _tanh_layer(seed=4)
    c = torch.randn(4, 16, dtype=torch.float64)
    want = layer_grads(layer64, p.x, c)
    layer32 = implicit.make_implicit(
        copy.deepcopy(p.block).float(), tol=1e-6, backward_tol=1e-6, max_iter=100, backward_max_iter=100
    )
    got = layer_grads(layer32, p.x.float(), c.float())
    assert all(g.dtype == torch.float32 for g in got)
    assert_grads_close([g.double() for g in got], want, 1e-4)
