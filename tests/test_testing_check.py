"""``implicit.testing.check_gradients``: passes on correct DEQs, and fails — naming the tensor — on broken ones."""

from __future__ import annotations

import pytest
import torch
from problems import BACKWARD_SOLVER_NAMES, SOLVER_NAMES, gen, make_weight, map_gradient
from torch import nn

import implicit
from implicit.testing import assert_gradients, check_gradients
from implicit.testing.check import NO_GRADIENT, NOT_USED

WIDTH = 6


class Tanh(nn.Module):
    """``tanh(z Wᵀ + x + b)`` with ``‖W‖₂ = lipschitz``, in float32 (the checker works on a float64 copy)."""

    def __init__(self, lipschitz: float = 0.8, seed: int = 0) -> None:
        super().__init__()
        self.W = nn.Parameter(make_weight(WIDTH, lipschitz, "gauss", gen(seed), dtype=torch.float32))
        self.b = nn.Parameter(0.1 * torch.randn(WIDTH, generator=gen(seed + 1)))

    def weight(self) -> torch.Tensor:
        return self.W

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(z @ self.weight().T + x + self.b)


class WrongSign(Tanh):
    """Backward flips the sign of W's gradient."""

    def weight(self) -> torch.Tensor:
        return map_gradient(self.W, torch.neg)


class DetachedInjection(Tanh):
    def forward(self, z, x):
        return torch.tanh(z @ self.W.T + x.detach() + self.b)


SHIFT = torch.linspace(-0.2, 0.2, WIDTH, dtype=torch.float64).requires_grad_()


class ClosureBlock(Tanh):
    """Closes over the tensor SHIFT (not a parameter, not the injection)."""

    def forward(self, z, x):
        return torch.tanh(z @ self.W.T + x + self.b + SHIFT)


class ClosureWithoutGradient(Tanh):
    def forward(self, z, x):
        return torch.tanh(z @ self.W.T + x + self.b + map_gradient(SHIFT, torch.zeros_like))


def _x(batch: int = 3) -> torch.Tensor:
    return torch.randn(batch, WIDTH, generator=gen(5))


@pytest.mark.parametrize("backward_solver", BACKWARD_SOLVER_NAMES)
@pytest.mark.parametrize("solver", SOLVER_NAMES)
def test_exact_modes_pass_every_reference(solver, backward_solver):
    report = assert_gradients(Tanh(), _x(), solver=solver, backward_solver=backward_solver)
    assert not report.approximate
    assert all(c.status in ("pass", "skip") for c in report.checks)
    assert {c.tensor for c in report.checks} == {"block.W", "block.b", "x"}
    assert max(c.value for c in report.checks if c.metric == "rel. error") < 1e-9


@pytest.mark.parametrize(
    "options",
    [
        {"backward": "phantom", "backward_options": {"steps": 5, "tau": 0.5}},
        {"backward": "phantom", "backward_options": {"steps": 5, "variant": "neumann"}},
        {"backward": "one_step"},
        {"solver": "broyden", "backward": "shine"},
    ],
    ids=["phantom", "neumann", "one_step", "shine"],
)
def test_approximate_modes_pass_their_cosine_bound_and_say_why(options):
    report = assert_gradients(Tanh(lipschitz=0.5), _x(), **options)
    assert report.approximate and "(I − J)⁻¹ by" in report.reason
    cosines = [c.value for c in report.checks if c.metric == "cosine"]
    assert cosines and min(cosines) >= 0.5
    assert "approximate mode" in report.table()


def test_closed_over_tensors_are_found_and_checked():
    report = assert_gradients(ClosureBlock(), _x())
    closure_checks = [c for c in report.checks if c.kind == "closure"]
    assert closure_checks and all(c.status in ("pass", "skip") for c in closure_checks)
    assert SHIFT.grad is None  # the user's tensor is not given a gradient by the check


def _failing(report, tensor_part: str) -> list:
    assert not report.passed
    return [c for c in report.failures if tensor_part in c.tensor]


def test_missing_gradient_of_a_closed_over_tensor_fails_naming_it():
    report = check_gradients(ClosureWithoutGradient(), _x())
    failures = _failing(report, "closure")
    assert failures and all(c.kind == "closure" for c in report.failures)
    with pytest.raises(AssertionError, match="closure"):
        assert_gradients(ClosureWithoutGradient(), _x())


def test_wrong_sign_for_one_parameter_fails_naming_it():
    report = check_gradients(WrongSign(), _x())
    assert {c.tensor for c in report.failures} == {"block.W"}
    assert {c.reference for c in report.failures} >= {"finite_differences", "gradcheck"}
    with pytest.raises(AssertionError) as raised:
        assert_gradients(WrongSign(), _x())
    assert "block.W" in str(raised.value) and "FAIL" in str(raised.value)


def test_detached_injection_fails_naming_it():
    report = check_gradients(DetachedInjection(), _x())
    assert {c.tensor for c in report.failures} == {"x"}


class HeldAttribute(Tanh):
    """Holds ``shift``, a tensor that requires grad, as a plain attribute (not a parameter); uses it through
    ``.detach()`` (``use=True``) or not at all."""

    def __init__(self, use: bool) -> None:
        super().__init__()
        self.shift = torch.linspace(-0.2, 0.2, WIDTH).requires_grad_()
        self.use = use

    def forward(self, z, x):
        out = z @ self.W.T + x + self.b
        return torch.tanh(out + self.shift.detach() if self.use else out)


def _held_rows(report, name: str) -> list:
    return [c for c in report.checks if c.tensor == name]


def test_a_detached_attribute_that_requires_grad_fails_naming_it():
    report = check_gradients(HeldAttribute(use=True), _x())
    assert [(c.tensor, c.kind, c.reference, c.status, c.worst) for c in report.failures] == [
        ("block.shift", "closure", "finite_differences", "FAIL", NO_GRADIENT)
    ]
    # The derivative of f along a unit direction d of shift is ‖(1 − f²) ⊙ d‖ over the batch: of order one, far
    # above the round-off bound.
    (row,) = report.failures
    assert 0.05 < row.value < 2.0 and row.tolerance < 1e-6
    with pytest.raises(AssertionError, match=r"block\.shift .*requires grad but receives no gradient"):
        assert_gradients(HeldAttribute(use=True), _x())


def test_an_unused_attribute_that_requires_grad_is_listed_as_not_used_and_passes():
    block = HeldAttribute(use=False)
    report = assert_gradients(block, _x())
    (row,) = _held_rows(report, "block.shift")
    assert (row.kind, row.status, row.value, row.worst) == ("closure", "not used", 0.0, NOT_USED)
    assert "not used" in report.table() and len(report.checks) == 10  # 3 tensors × 3 references + this row
    assert block.shift.grad is None


def _function_block(use: bool, shift: torch.Tensor):
    """A function block ``f(z, x) = tanh(z Wᵀ + x [+ shift.detach()])`` closing over ``W`` (no grad) and ``shift``."""
    W = make_weight(WIDTH, 0.8, "gauss", gen(0))

    def f(z, x):
        out = z @ W.T + x
        return torch.tanh(out + shift.detach() if use else out)

    return f


def test_a_detached_closure_cell_of_a_function_block_fails_with_the_exact_change():
    shift = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    f = _function_block(True, shift)
    report = check_gradients(f, _x())
    assert [(c.tensor, c.kind, c.status, c.worst) for c in report.failures] == [
        ("closure shift", "closure", "FAIL", NO_GRADIENT)
    ]
    # A scalar: d = ±1 and the change is ‖∂f/∂shift‖ = ‖1 − f(z*)²‖ at the equilibrium, to the differences' O(h²).
    z = torch.zeros(3, WIDTH, dtype=torch.float64)
    with torch.no_grad():
        for _ in range(300):
            z = f(z, _x().double())
    expected = float(torch.linalg.vector_norm(1 - f(z, _x().double()).detach() ** 2))
    (row,) = report.failures
    assert row.value == pytest.approx(expected, rel=1e-8)
    # The user's tensor, perturbed during the check, is restored and given no gradient.
    assert float(shift.detach()) == 0.3 and shift.grad is None


def test_an_unused_closure_cell_of_a_function_block_is_not_used_and_passes():
    shift = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    report = assert_gradients(_function_block(False, shift), _x())
    (row,) = _held_rows(report, "closure shift")
    assert (row.status, row.value, row.worst) == ("not used", 0.0, NOT_USED)


def test_a_closure_cell_reaching_the_graph_is_checked_under_its_name():
    shift = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    W = make_weight(WIDTH, 0.8, "gauss", gen(0))
    report = assert_gradients(lambda z, x: torch.tanh(z @ W.T + x + shift), _x())
    rows = _held_rows(report, "closure shift")
    assert [c.reference for c in rows] == ["unrolled", "finite_differences", "gradcheck"]
    assert rows[0].value < 1e-9 and rows[1].value < 1e-6 and rows[2].status == "skip"


def test_a_target_that_is_neither_a_module_nor_a_function_is_rejected():
    with pytest.raises(TypeError, match="a function f"):
        check_gradients("Block", _x())


def test_truncated_backward_solve_on_a_slowly_contracting_block_fails():
    block = Tanh(lipschitz=0.99)
    good = check_gradients(block, 0.01 * _x(), backward_max_iter=500)
    assert good.passed, good.table()
    report = check_gradients(block, 0.01 * _x(), backward_solver="fixed_point", backward_max_iter=2)
    assert not report.passed
    assert {c.tensor for c in report.failures} == {"block.W", "block.b", "x"}
    assert "backward solve" in report.table() and "budget" in report.table()


def test_the_users_module_and_inputs_are_not_changed():
    block = Tanh()
    layer = implicit.make_implicit(block, solver="broyden")
    x = _x()
    before = {k: v.clone() for k, v in block.state_dict().items()}
    x_before = x.clone()
    check_gradients(layer, x)
    assert all(torch.equal(before[k], v) for k, v in block.state_dict().items())
    assert block.W.dtype == torch.float32 and block.W.grad is None
    assert torch.equal(x, x_before) and not x.requires_grad
    assert layer.implicit_options.solver == "broyden" and layer.implicit_options.tol == 1e-4


class PytreeBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = Tanh()

    def forward(self, z, x):
        flat = torch.cat([z["a"], z["b"].flatten(1)], dim=1)
        out = self.inner(flat, x)
        return {"a": out[:, :2], "b": out[:, 2:].reshape(-1, 2, 2)}


@pytest.mark.parametrize("train", [True, False])
def test_pytree_states_and_both_modes(train):
    z0 = {"a": torch.zeros(3, 2), "b": torch.zeros(3, 2, 2)}
    report = assert_gradients(PytreeBlock(), _x(), z0=z0, train=train)
    assert ("train" if train else "eval") in report.description


def test_unknown_reference_is_rejected():
    with pytest.raises(ValueError, match="reference"):
        check_gradients(Tanh(), _x(), references=("exact",))
