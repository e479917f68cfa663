"""The generic suite: every registered solver and backward mode, driven by what their classes declare.

Parametrisations are read from ``implicit.SOLVERS`` and ``implicit.BACKWARD_MODES`` at collection, so a newly
registered component is exercised here without editing a list (its own oracle goes in its own test file). Also: the
option validation derived from the declared capabilities, and a solver and a mode registered at run time being
validated, drawn by the hypothesis strategies and checked by the gradient checker like the built-in ones.
"""

from __future__ import annotations

import math
import re
from typing import Any

import pytest
import torch
from hypothesis import find
from problems import TanhBlock, per_sample_jacobian, rel_err, residuals, row_times, solution_grads, tanh_problem
from problems import exact_adjoint as dense_adjoint

import implicit
from implicit.backward import BackwardMode, Tracked
from implicit.solvers import Solver, backward_rule, forward_rule
from implicit.testing import check_gradients
from implicit.testing import strategies as deq

FORWARD_SOLVERS = implicit.SOLVERS.names(forward_rule)
BACKWARD_SOLVERS = implicit.SOLVERS.names(backward_rule)
MODES = tuple(implicit.BACKWARD_MODES)
PAIRS = [(solver, mode) for mode in MODES for solver in FORWARD_SOLVERS if deq.compatible(solver, mode)]
BUDGET = 4000  # f-evaluations: the ODE integrator needs many more than the discrete solvers


def _problem():
    return tanh_problem(0.9, "gauss", 1.0, batch=4, n=12, seed=21)


def _exact_gradients(p, z, c) -> list[torch.Tensor]:
    u = dense_adjoint(per_sample_jacobian(p.fn, z), c)
    x = p.x.detach().clone().requires_grad_()
    return list(torch.autograd.grad(p.block(z, x), [x, *p.params], u))


def _cotangent(p) -> torch.Tensor:
    return torch.randn(p.batch, p.n, dtype=p.x.dtype, generator=torch.Generator().manual_seed(3))


# ------------------------------------------------------------------------------------------- every solver
@pytest.mark.parametrize("solver", FORWARD_SOLVERS)
def test_every_forward_solver_reaches_the_equilibrium(solver):
    """Stopped at rel. tol t, ``‖z − z*‖ ≤ t ‖f(z)‖ / (1 − L)`` (contraction L = 0.9), with the reported residuals
    those of the returned point."""
    p = _problem().frozen()
    tol = 1e-8
    result = implicit.solve(p.fn, p.z0(), solver=solver, tol=tol, max_iter=BUDGET, check_every=1)
    assert result.converged.all() and not result.diverged.any(), result
    r_abs, r_rel = residuals(p.fn, result.z)
    torch.testing.assert_close(result.rel, r_rel, rtol=1e-12, atol=0)
    torch.testing.assert_close(result.abs, r_abs, rtol=1e-12, atol=0)
    bound = tol * torch.linalg.vector_norm(p.fn(result.z), dim=1) / (1 - p.lipschitz)
    assert (torch.linalg.vector_norm(result.z - p.reference(), dim=1) <= bound + 1e-13).all()


@pytest.mark.parametrize("solver", BACKWARD_SOLVERS)
def test_every_backward_solver_gives_the_exact_gradient(solver):
    p = _problem()
    c = _cotangent(p)
    got, z, info = solution_grads(
        p, c, tol=1e-12, max_iter=500, backward_solver=solver, backward_tol=1e-10, backward_max_iter=BUDGET
    )
    assert info.backward.converged.all()
    for g, want in zip(got, _exact_gradients(p, z, c)):
        assert rel_err(g, want) < 1e-7


@pytest.mark.parametrize("solver", FORWARD_SOLVERS)
def test_declared_capabilities_hold_and_decide_the_valid_options(solver):
    """What a solver class declares is what it does, and what option validation allows."""
    cls = implicit.SOLVERS[solver]
    p = _problem()
    fn = p.fn

    if cls.records_trajectory:
        result = implicit.solve(fn, p.z0(), solver=solver, tol=0.0, max_iter=4, record_at=(1, 3))
        assert [t.shape for t in result.trajectory] == [(p.batch, p.n)] * 2
        implicit.ImplicitOptions(solver=solver, correction=2)
    else:
        with pytest.raises(ValueError, match="trajector"):
            implicit.solve(fn, p.z0(), solver=solver, max_iter=4, record_at=(1,))
        with pytest.raises(ValueError, match=f"correction needs .*{solver!r} does not have"):
            implicit.ImplicitOptions(solver=solver, correction=2)

    with torch.no_grad():
        result = implicit.solve(fn, p.z0(), solver=solver, tol=1e-10, max_iter=BUDGET)
    if cls.provides_inverse_jacobian:
        estimate = result.inverse_jacobian
        assert isinstance(estimate, implicit.LowRankInverse) and estimate.rank > 0
        assert estimate.U.shape[0] == p.batch and estimate.U.shape[2] == p.n
        implicit.ImplicitOptions(solver=solver, backward="shine")
    else:
        assert result.inverse_jacobian is None
        with pytest.raises(ValueError, match="backward='shine' needs solver='broyden' or 'adjoint_broyden'"):
            implicit.ImplicitOptions(solver=solver, backward="shine")

    if cls.differentiable_steps:
        c = _cotangent(p)
        got, z, _ = solution_grads(p, c, solver=solver, tol=1e-12, max_iter=BUDGET, backward="unrolled")
        # Through an adaptive integrator the derivative carries the integrator's own error (measured 8e-5).
        bound = 1e-6 if cls.general() else 1e-3
        assert rel_err(got[0], _exact_gradients(p, z, c)[0]) < bound
    else:
        with pytest.raises(ValueError, match="not differentiable"):
            implicit.solve(fn, p.z0(), solver=solver, differentiable=True)
        with pytest.raises(ValueError, match=r"backward='unrolled' needs .*steps that autograd can differentiate"):
            implicit.ImplicitOptions(solver=solver, backward="unrolled")


# ------------------------------------------------------------------------------------------- every mode
def _check(solver: str, mode: str, **overrides: Any):
    """The gradient checker on a small contractive block; specialised solvers (the ODE integrator) at a tolerance
    their cost allows."""
    block = TanhBlock(6, s=0.6, kind="gauss", seed=5)
    x = torch.randn(2, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    settings: dict[str, Any] = {"references": ("unrolled", "finite_differences"), "solver": solver, "backward": mode}
    if not implicit.SOLVERS[solver].general():
        settings.update(check_tol=1e-7, rtol=1e-4)
    return check_gradients(block, x, **{**settings, **overrides})


@pytest.mark.parametrize(("solver", "mode"), PAIRS)
def test_every_mode_with_every_compatible_solver_passes_the_gradient_checker(solver, mode):
    report = _check(solver, mode)
    assert report.passed, report.table()
    assert report.approximate == (not implicit.BACKWARD_MODES[mode].exact)
    assert {c.tensor for c in report.checks} == {"block.W", "block.U", "block.b", "x"}


@pytest.mark.parametrize("mode", MODES)
def test_every_mode_returns_the_solvers_value_and_the_same_gradient_in_eval_mode(mode):
    """The backward mode changes the gradient, never the value (bitwise the solver's z*); ``eval()`` changes nothing;
    under ``no_grad`` nothing is tracked."""
    solver = next(s for s in deq.default_solvers() if deq.compatible(s, mode))
    p = _problem()
    c = _cotangent(p)
    options = {"solver": solver, "tol": 1e-10, "max_iter": 300, "backward": mode}
    with torch.no_grad():
        reference = implicit.solve(p.fn, p.z0(), solver=solver, tol=1e-10, max_iter=300).z
        z, info = implicit.equilibrium(p.block, p.x, p.z0(), **options)
    assert torch.equal(z, reference) and not z.requires_grad and info.tracked_nfe == 0
    layer = implicit.make_implicit(p.block, **options)
    z_train = layer(p.x)
    train = torch.autograd.grad((c * z_train).sum(), list(p.params))
    z_eval = layer.eval()(p.x)
    evaluated = torch.autograd.grad((c * z_eval).sum(), list(p.params))
    assert torch.equal(z_train, reference) and torch.equal(z_eval, reference)
    assert all(torch.equal(a, b) for a, b in zip(train, evaluated))


# ------------------------------------------------------------------------------------------- validation messages
@pytest.mark.parametrize(
    ("options", "reason", "valid"),
    [
        ({"solver": "adjoint_broyden", "backward": "unrolled"}, "steps that autograd can differentiate", "'ode'"),
        ({"solver": "ode", "correction": 2}, "record of its best iterates", "'adjoint_broyden'"),
        ({"solver": "anderson", "backward": "shine"}, "inverse-Jacobian estimate", "'broyden' or 'adjoint_broyden'"),
        ({"solver": "gmres"}, "solves linear systems only", "adjoint_broyden, ode"),
        ({"backward_solver": "adjoint_broyden"}, "cannot solve the backward system", "ode, gmres"),
    ],
)
def test_combinations_a_component_cannot_run_raise_at_construction_with_the_reason(options, reason, valid):
    with pytest.raises(ValueError, match=re.escape(reason)) as err:
        implicit.ImplicitOptions(**options)
    assert valid in str(err.value)
    with pytest.raises(ValueError, match=re.escape(reason)):
        implicit.make_implicit(TanhBlock(4), **options)


@pytest.mark.parametrize(
    ("option", "value", "valid", "invalid"),
    [
        ("solver", "newton", implicit.SOLVERS.names(forward_rule), "gmres"),
        ("backward_solver", "newton", implicit.SOLVERS.names(backward_rule), "adjoint_broyden"),
    ],
)
def test_an_unknown_solver_lists_only_the_solvers_valid_in_that_place(option, value, valid, invalid):
    with pytest.raises(ValueError) as err:
        implicit.ImplicitOptions(**{option: value})
    listed = str(err.value).split("solvers: ", 1)[1]
    assert [name.strip() for name in listed.split(",")] == list(valid)
    assert invalid not in listed


@pytest.mark.parametrize(
    ("options", "suggestion"),
    [
        ({"solver": "andersen"}, "'anderson'"),
        ({"backward_solver": "gmers"}, "'gmres'"),
        ({"backward": "phantm"}, "'phantom'"),
        ({"stop_mode": "ab"}, "'abs'"),
        ({"on_divergence": "warm"}, "'warn'"),
        ({"nonfinite_input": "rase"}, "'raise'"),
        ({"jac_loss_probe": "gauss"}, "'gaussian'"),
        ({"backward": "phantom", "backward_options": {"variant": "neuman"}}, "'neumann'"),
        ({"solver": "broyden", "backward": "shine", "backward_options": {"fallback": "exactly"}}, "'exact'"),
    ],
)
def test_a_misspelled_value_names_the_closest_valid_one(options, suggestion):
    with pytest.raises(ValueError, match=re.escape(f"did you mean {suggestion}?")):
        implicit.ImplicitOptions(**options)


# ------------------------------------------------------------------------------------------- registered at run time
class HalfStep(Solver):
    """Damped iteration under a new name: a general solver (every capability by default)."""

    name = "half_step"

    def __init__(self, *, tau: float = 0.5) -> None:
        if not 0 < tau <= 1:
            raise ValueError(f"half_step: tau must be in (0, 1], got {tau!r}")
        self.tau = tau

    def step(self, z: torch.Tensor, fz: torch.Tensor) -> torch.Tensor:
        return torch.lerp(z, fz, self.tau)

    @classmethod
    def option_strategies(cls, st: Any) -> dict[str, Any]:
        return {"tau": st.floats(0.5, 1.0)}


class TwoTerms(BackwardMode):
    """``u = v + v J``: the first two terms of the Neumann series of ``v (I − J)⁻¹`` (an approximate mode)."""

    name = "two_terms"
    approximates = "two terms of the Neumann series replace (I − J)⁻¹"

    def __init__(self) -> None:
        pass

    def adjoint(self, v: torch.Tensor, tracked: Tracked) -> torch.Tensor:
        tracked.info.backward_vjps += 1
        return v + tracked.vjp(v)


@pytest.fixture
def registered():
    implicit.SOLVERS.register(HalfStep)
    implicit.BACKWARD_MODES.register(TwoTerms)
    yield
    del implicit.SOLVERS["half_step"]
    del implicit.BACKWARD_MODES["two_terms"]


def test_a_registered_solver_is_validated_drawn_and_checked(registered):
    with pytest.raises(ValueError, match=re.escape("did you mean 'half_step'?")):
        implicit.ImplicitOptions(solver="half_stepp")
    with pytest.raises(TypeError, match=re.escape("'tua' (did you mean 'tau'?)")):
        implicit.ImplicitOptions(solver="half_step", solver_options={"tua": 0.5})
    with pytest.raises(ValueError, match="half_step: tau"):
        implicit.ImplicitOptions(solver="half_step", solver_options={"tau": 2.0})
    assert "half_step" in deq.default_solvers() and "half_step" in deq.SOLVERS
    drawn = find(deq.solver_options(), lambda options: options["solver"] == "half_step")
    implicit.ImplicitOptions(**drawn)
    implicit.ImplicitOptions(solver="half_step", backward="unrolled", correction=2)  # general: every role
    report = _check("half_step", "implicit")
    assert report.passed and not report.approximate, report.table()
    p = _problem().frozen()
    result = implicit.solve(p.fn, p.z0(), solver="half_step", tol=1e-10, max_iter=BUDGET)
    assert result.converged.all()


def test_a_registered_backward_mode_is_validated_drawn_and_checked(registered):
    assert "two_terms" in deq.approximate_backward_modes() and "two_terms" not in deq.exact_backward_modes()
    with pytest.raises(TypeError, match="valid options: \\(none\\)"):
        implicit.ImplicitOptions(backward="two_terms", backward_options={"steps": 2})
    drawn = find(deq.solver_options(backward_modes=deq.BACKWARD_MODES), lambda o: o["backward"] == "two_terms")
    assert "backward_solver" not in drawn  # the mode does not declare that it uses one
    report = _check("anderson", "two_terms")
    assert report.approximate and "two terms of the Neumann series" in report.table()
    assert report.passed, report.table()
    # The adjoint is the declared rule: u = v + vJ at z*.
    p = _problem()
    c = _cotangent(p)
    got, z, info = solution_grads(p, c, tol=1e-12, max_iter=500, backward="two_terms")
    jac = per_sample_jacobian(p.fn, z)
    u = c + row_times(c, jac)
    x = p.x.detach().clone().requires_grad_()
    want = torch.autograd.grad(p.block(z, x), [x, *p.params], u)
    assert all(rel_err(g, w) < 1e-12 for g, w in zip(got, want)) and info.backward_vjps == 1
    assert math.isclose(float(torch.linalg.vector_norm(got[0])), float(torch.linalg.vector_norm(want[0])))
