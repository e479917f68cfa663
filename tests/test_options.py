"""Option validation: one place, every entry point, helpful messages."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from problems import SOLVER_NAMES, TanhBlock, tanh_problem

import implicit
from implicit.options import OPTION_NAMES


def _x() -> torch.Tensor:
    return torch.zeros(2, 8, dtype=torch.float64)


def _equilibrium(**options):
    return implicit.equilibrium(lambda z, x: torch.tanh(0.5 * z + x), _x(), _x(), **options)


# Every public way of passing options.
ENTRY_POINTS = {
    "make_implicit(instance)": lambda **o: implicit.make_implicit(TanhBlock(8), **o),
    "make_implicit(class)": lambda **o: implicit.make_implicit(TanhBlock, **o),
    "decorator": lambda **o: implicit.make_implicit(**o)(TanhBlock),
    "configure": lambda **o: implicit.make_implicit(TanhBlock(8)).configure(**o),
    "per-call override": lambda **o: implicit.make_implicit(TanhBlock(8))(_x(), **o),
    "equilibrium": _equilibrium,
    "ImplicitOptions.replace": lambda **o: implicit.ImplicitOptions().replace(**o),
}


def test_the_defaults_are_valid_and_documented():
    options = implicit.ImplicitOptions()
    assert set(OPTION_NAMES) == {f.name for f in dataclasses.fields(options)}
    assert options.solver in implicit.SOLVERS and options.backward in implicit.BACKWARD_MODES
    assert set(SOLVER_NAMES) | {"adjoint_broyden", "ode"} == {
        n for n, c in implicit.SOLVERS.items() if not c.linear_only
    }


@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize(
    ("misspelled", "valid"),
    [
        ("sovler", "solver"),
        ("max_iters", "max_iter"),
        ("solver_option", "solver_options"),
        ("backward_tols", "backward_tol"),
    ],
)
def test_misspelled_option_names_the_valid_one(entry, misspelled, valid):
    with pytest.raises(TypeError) as err:
        ENTRY_POINTS[entry](**{misspelled: 3})
    message = str(err.value)
    assert repr(misspelled) in message
    assert repr(valid) in message  # "did you mean 'solver'?"
    assert all(name in message for name in OPTION_NAMES)  # and the full list


@pytest.mark.parametrize("key", ("solver", "backward_solver"))
def test_unknown_solver_lists_the_valid_solvers(key):
    with pytest.raises(ValueError) as err:
        implicit.make_implicit(TanhBlock(8), **{key: "newton"})
    assert "'newton'" in str(err.value)
    assert all(name in str(err.value) for name in SOLVER_NAMES)
    p = tanh_problem(batch=2, n=8).frozen()
    with pytest.raises(ValueError, match="broyden"):
        implicit.solve(p.fn, p.z0(), solver="newton")


@pytest.mark.parametrize(
    ("solver", "wrong", "valid"),
    [("anderson", "tau", ("m", "beta", "lam")), ("fixed_point", "m", ("tau",)), ("broyden", "beta", ("memory",))],
)
def test_solver_option_for_another_solver_names_the_valid_options(solver, wrong, valid):
    for key in ("solver_options", "backward_solver_options"):
        prefix = key.removesuffix("solver_options")
        with pytest.raises(TypeError) as err:
            implicit.make_implicit(TanhBlock(8), **{f"{prefix}solver": solver, key: {wrong: 1}})
        assert repr(wrong) in str(err.value) and all(name in str(err.value) for name in valid)
    p = tanh_problem(batch=2, n=8).frozen()
    with pytest.raises(TypeError, match=valid[0]):
        implicit.solve(p.fn, p.z0(), solver=solver, solver_options={wrong: 1})


@pytest.mark.parametrize(
    "bad",
    [
        {"tol": -1.0},
        {"tol": float("nan")},
        {"tol": float("inf")},
        {"tol": "1e-4"},
        {"max_iter": 0},
        {"max_iter": 2.5},
        {"max_iter": True},
        {"check_every": 0},
        {"stop_mode": "max"},
        {"backward": "phantom_typo"},
        {"backward_tol": -1e-6},
        {"backward_max_iter": 0},
        {"backward_stop_mode": "max"},
        {"nonfinite_input": "skip"},
        {"on_divergence": "explode"},
        {"return_info": "yes"},
        {"solver": "fixed_point", "solver_options": {"tau": 0.0}},
        {"solver": "fixed_point", "solver_options": {"tau": float("nan")}},
        {"solver": "anderson", "solver_options": {"m": 0}},
        {"solver": "anderson", "solver_options": {"beta": 1.5}},
        {"solver": "anderson", "solver_options": {"lam": 0.0}},
        {"solver": "broyden", "solver_options": {"memory": 0}},
        {"backward_solver": "broyden", "backward_solver_options": {"memory": -1}},
    ],
    ids=repr,
)
def test_bad_values_raise_value_error(bad):
    for entry in ("make_implicit(instance)", "per-call override", "equilibrium"):
        with pytest.raises(ValueError):
            ENTRY_POINTS[entry](**bad)


def test_a_rejected_override_leaves_the_layer_usable():
    layer = implicit.make_implicit(TanhBlock(8), tol=1e-8)
    with pytest.raises(ValueError):
        layer(_x(), tol=-1.0)
    assert layer.implicit_options.tol == 1e-8
    layer(_x())
    assert layer.last_info.forward.converged.all()


def test_options_are_frozen():
    options = implicit.ImplicitOptions(solver="fixed_point", solver_options={"tau": 0.5})
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.tol = 1.0  # type: ignore[misc]
    with pytest.raises(TypeError):
        options.solver_options["tau"] = 1.0  # type: ignore[index]
    assert options.replace(tol=1e-3).tol == 1e-3 and options.tol == 1e-4


@settings(max_examples=25)
@given(
    solver=st.sampled_from(SOLVER_NAMES),
    backward_solver=st.sampled_from(SOLVER_NAMES),
    tol=st.one_of(st.just(0.0), st.floats(1e-14, 1.0)),
    max_iter=st.integers(1, 10_000),
    check_every=st.integers(1, 100),
    stop_mode=st.sampled_from(("abs", "rel")),
    backward=st.sampled_from(("implicit", "unrolled")),
    nonfinite_input=st.sampled_from(("raise", "warn", "ignore")),
    on_divergence=st.sampled_from(("raise", "warn", "ignore")),
    return_info=st.booleans(),
)
def test_valid_options_are_stored_as_given(**options):
    layer = implicit.make_implicit(TanhBlock(8), **options)
    stored = layer.implicit_options
    assert {name: getattr(stored, name) for name in options} == options
    kwargs = stored.solver_kwargs()
    assert kwargs["solver"] == options["solver"] and kwargs["max_iter"] == options["max_iter"]
    assert stored.backward_solver_kwargs()["solver"] == options["backward_solver"]
