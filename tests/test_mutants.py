"""Tests written against mutants that survived the suite (``python -m benchmarks.mutation``): each pins down one
property that a small semantic change of the engine or of the gradient checker broke without any test failing."""

from __future__ import annotations

import math
import re

import pytest
import torch
from problems import gen, make_weight, map_gradient, tanh_problem
from torch import nn

import implicit
from implicit.backward import BackwardMode, Tracked
from implicit.backward.implicit import solve_adjoint
from implicit.solvers import Broyden, FixedPoint
from implicit.testing import check_gradients

WIDTH = 6


def _x(batch: int = 3) -> torch.Tensor:
    return torch.randn(batch, WIDTH, generator=gen(5))


class Tanh(nn.Module):
    """``tanh(gain · z Wᵀ + x + b)`` with ``‖W‖₂ = 0.5``, float32 (the checker works on a float64 copy)."""

    def __init__(self) -> None:
        super().__init__()
        self.W = nn.Parameter(make_weight(WIDTH, 0.5, "gauss", gen(0), dtype=torch.float32))
        self.b = nn.Parameter(0.1 * torch.randn(WIDTH, generator=gen(1)))
        self.gain = nn.Parameter(torch.tensor(0.8))

    def weight(self) -> torch.Tensor:
        return self.W

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.gain * (z @ self.weight().T) + x + self.b)


# ------------------------------------------------------------------------------------------- Broyden's factors
@pytest.mark.parametrize("memory", [1, 3, 10])
def test_broyden_estimate_satisfies_the_secant_condition_after_every_step(memory):
    """Good Broyden (Broyden 1965) keeps ``H ≈ (J − I)⁻¹``, the inverse Jacobian of ``g(z) = f(z) − z``, as
    ``H = −I + U Vᵀ``; its rank-one update makes the new H map the latest residual change onto the latest step:
    ``H y = s`` with ``s = z_{k+1} − z_k`` (the step taken) and ``y = g_{k+1} − g_k``. That holds after every step,
    including the restart steps (memory full: all pairs dropped, the new one computed against ``H = −I``, where
    ``u ∝ s − H y = s + y``), and the step taken is the quasi-Newton step ``−H g`` with the updated H.

    30 steps: with memory 1 every step restarts, memory 3 and 10 wrap around (10 and 2 times). Measured: secant
    error ≤ 5e-16 relative to ‖s‖, the step within 3e-16 of −H g (relative to ‖s‖). Both are formed from −H g
    directly, so neither error grows between restarts (deriving −H g from the previous step by a recurrence let
    the step drift to 1.5e-9 from −H g).
    """
    p = tanh_problem(0.9, "gauss", 1.0, batch=4, n=24, seed=3).frozen()
    solver = Broyden(memory=memory)
    z = p.z0()
    solver.start(z, False)
    ranks, secant, newton = [], [], []
    with torch.no_grad():
        for _ in range(30):
            fz = p.fn(z)
            g = fz - z
            previous = solver.previous  # (g_k, s_k): the last residual and the step taken from it
            z = solver.step(z, fz)
            H = solver.inverse_jacobian()
            step = solver.previous[1]
            newton.append(float((torch.linalg.vector_norm(H.matvec(g) + step, dim=1) / step.norm(dim=1)).max()))
            if previous is None:  # the first step: plain iteration, no pair yet
                assert H.rank == 0 and torch.equal(step, g)
                continue
            s, y = previous[1], g - previous[0]
            ranks.append(H.rank)
            secant.append(float((torch.linalg.vector_norm(H.matvec(y) - s, dim=1) / s.norm(dim=1)).max()))
    assert ranks == [k % memory + 1 for k in range(29)]  # restarts: back to one pair after `memory` pairs
    assert max(secant) < 1e-13, secant
    assert max(newton) < 1e-13, newton


# ------------------------------------------------------------------------------------------- the checker's options
SEEN: list[float] = []


class RecordingGain(Tanh):
    """Records every value of the scalar ``gain`` it is evaluated with (in the checker's copy too: a module list)."""

    def forward(self, z, x):
        SEEN.append(float(self.gain.detach()))
        return super().forward(z, x)


@pytest.mark.parametrize("fd_eps", [1e-3, 1e-6])
def test_finite_differences_step_by_fd_eps(fd_eps):
    """Exact modes difference with steps h = fd_eps and 2h: a scalar parameter (unit direction ±1) is evaluated at
    exactly p ± h and p ± 2h besides p."""
    SEEN.clear()
    report = check_gradients(RecordingGain(), _x(), references=("finite_differences",), fd_eps=fd_eps)
    assert report.passed, report.table()
    p = float(torch.tensor(0.8).double())  # the float64 copy's value
    offsets = {round((value - p) / fd_eps, 3) for value in SEEN}
    assert offsets == {-2.0, -1.0, 0.0, 1.0, 2.0}


class WrongSign(Tanh):
    """Backward flips the sign of W's gradient."""

    def weight(self) -> torch.Tensor:
        return map_gradient(self.W, torch.neg)


@pytest.mark.parametrize(
    "options",
    [{"backward": "phantom", "backward_options": {"steps": 5, "tau": 0.5}}, {"backward": "one_step"}],
    ids=["phantom", "one_step"],
)
def test_a_reversed_gradient_fails_the_cosine_bound_of_approximate_modes(options):
    """A cosine of −1 is no direction within 60° of the true gradient: the finite-difference check of W fails (the
    unrolled reference runs the block's own flipped backward, so it agrees), every other tensor passes."""
    correct = check_gradients(Tanh(), _x(), references=("finite_differences",), **options)
    assert correct.passed and correct.approximate
    report = check_gradients(WrongSign(), _x(), references=("unrolled", "finite_differences"), **options)
    assert [(c.tensor, c.reference, c.metric) for c in report.failures] == [("block.W", "finite_differences", "cosine")]
    (failure,) = report.failures
    cosine_w = next(c.value for c in correct.checks if c.tensor == "block.W")
    assert failure.value == pytest.approx(-cosine_w, abs=1e-9) and failure.value < -0.5


class BrokenDown(BackwardMode):
    """The exact adjoint ``u = v (I − J)⁻¹``, except NaN in the first sample: a backward solve that broke down."""

    name = "broken_down"
    exact = True
    uses_backward_solver = True

    def __init__(self) -> None:
        pass

    def adjoint(self, v: torch.Tensor, tracked: Tracked) -> torch.Tensor:
        u = solve_adjoint(tracked, v, v)
        return torch.cat([torch.full_like(u[:1], math.nan), u[1:]])


@pytest.fixture
def broken_down():
    implicit.BACKWARD_MODES.register(BrokenDown)
    yield
    del implicit.BACKWARD_MODES["broken_down"]


def test_a_nan_gradient_fails_when_unrolling_is_the_only_reference(broken_down):
    """Against a finite reference (unrolling), a NaN gradient has a NaN relative error, which is no measurement
    within the bound: every tensor fails, the table shows ``nan``."""
    report = check_gradients(Tanh(), _x(), references=("unrolled",), backward="broken_down")
    assert not report.approximate
    assert [c.tensor for c in report.failures] == ["block.W", "block.b", "block.gain", "x"]
    assert all(math.isnan(c.value) and c.metric == "rel. error" for c in report.failures)
    rows = [line for line in report.table().splitlines() if " FAIL " in line]
    assert len(rows) == 4 and all(" nan " in row for row in rows)
    assert check_gradients(Tanh(), _x(), references=("unrolled",)).passed  # the same check, the exact mode


class RolledGradient(Tanh):
    """Backward hands W the gradient of another row (rolled by one): a gradient unrelated in direction to the true
    one, neither reversed nor zero."""

    def weight(self) -> torch.Tensor:
        return map_gradient(self.W, lambda g: g.roll(1, dims=0))


@pytest.mark.parametrize("seed", range(4))
def test_an_unrelated_gradient_fails_the_cosine_over_several_directions(seed):
    """Approximate modes compare the directional derivatives along 8 random directions with their finite differences
    by cosine: a gradient unrelated to the true one stays below 0.5 (measured −0.64 to 0.41 over these seeds). Along a
    single direction the cosine of two numbers is ±1, and this gradient would pass whenever the signs agree."""
    report = check_gradients(RolledGradient(), _x(), references=("finite_differences",), backward="one_step", seed=seed)
    assert [(c.tensor, c.metric) for c in report.failures] == [("block.W", "cosine")]
    assert -1 < report.failures[0].value < 0.5
    # Correct gradients of tensors with several entries: a cosine over several directions, not ±1.
    assert all(0.5 <= c.value < 1 - 1e-6 for c in report.checks if c.tensor in ("block.b", "x"))


class NaNGradient(Tanh):
    """Backward gives W a NaN gradient (the forward is right)."""

    def weight(self) -> torch.Tensor:
        return map_gradient(self.W, lambda g: torch.full_like(g, math.nan))


@pytest.mark.parametrize("backward", ["implicit", "phantom"])
def test_a_nan_gradient_of_the_block_itself_fails(backward):
    """A block whose own backward gives NaN: the unrolled reference is NaN too, which is no pass either (a relative
    error of ∞, or a NaN cosine); finite differences measure the true derivative and fail it."""
    report = check_gradients(NaNGradient(), _x(), references=("unrolled", "finite_differences"), backward=backward)
    assert [(c.tensor, c.reference) for c in report.failures] == [
        ("block.W", "unrolled"),
        ("block.W", "finite_differences"),
    ]
    assert all(not math.isfinite(c.value) for c in report.failures)
    assert all(c.status == "pass" for c in report.checks if c.tensor != "block.W")


# ------------------------------------------------------------------------------------------- solver steps and options
@pytest.mark.parametrize("tau", [0.25, 0.8, 1.0])
def test_damped_iteration_takes_the_damped_step(tau):
    """``fixed_point`` with damping τ (Krasnosel'skii–Mann) steps to ``(1 − τ) z + τ f(z)``; τ = 1 is ``f(z)``
    bitwise."""
    p = tanh_problem(0.9, "gauss", 1.0, batch=3, n=8).frozen()
    solver = FixedPoint(tau=tau)
    z = torch.randn(3, 8, dtype=torch.float64, generator=gen(2))
    solver.start(z, False)
    fz = p.fn(z)
    step = solver.step(z, fz)
    torch.testing.assert_close(step, (1 - tau) * z + tau * fz, rtol=1e-15, atol=1e-15)
    assert tau != 1.0 or torch.equal(step, fz)


@pytest.mark.parametrize(
    ("solver_options", "message"),
    [
        ({"beta": 0.0}, "beta must be in (0, 1]"),
        ({"beta": -0.5}, "beta must be in (0, 1]"),
        ({"beta": 1.0 + 1e-12}, "beta must be in (0, 1]"),
        ({"m": 0}, "m must be an integer ≥ 1"),
    ],
)
def test_anderson_rejects_mixing_and_window_outside_their_ranges(solver_options, message):
    """β = 0 would never move (every step returns the window's mix of the points themselves)."""
    with pytest.raises(ValueError, match=re.escape(message)):
        implicit.ImplicitOptions(solver="anderson", solver_options=solver_options)
    implicit.ImplicitOptions(solver="anderson", solver_options={"beta": 1.0, "m": 1})  # the closed ends are valid
