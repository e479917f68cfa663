"""Structured states: the flat layout, its checks, and solves on pytree states."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from problems import STRUCTURES, PytreeBlock, merge_state, split_state, tanh_problem, widths_for
from torch.utils import _pytree as pytree

import implicit
from implicit.pytree import StateLayout, working_dtype

FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


# ------------------------------------------------------------------------------------------- drawn pytrees
def _trees(batch: int):
    leaf = st.builds(
        lambda shape, dtype, seed: (torch.randn(batch, *shape, generator=torch.Generator().manual_seed(seed)) * 3).to(
            dtype
        ),
        st.lists(st.integers(1, 4), max_size=2),
        st.sampled_from(FLOAT_DTYPES),
        st.integers(0, 1000),
    )
    keys = st.text("abcxyz_", min_size=1, max_size=4)
    return st.recursive(
        leaf,
        lambda children: st.one_of(
            st.lists(children, min_size=1, max_size=3).map(tuple),
            st.lists(children, min_size=1, max_size=3),
            st.dictionaries(keys, children, min_size=1, max_size=3),
        ),
        max_leaves=6,
    )


@st.composite
def states(draw):
    batch = draw(st.integers(1, 4))
    return draw(_trees(batch))


def _expected_dtype(dtypes) -> torch.dtype:
    return torch.float64 if torch.float64 in dtypes else torch.float32


@settings(max_examples=25)
@given(states())
def test_flatten_unflatten_round_trip(state):
    leaves, spec = pytree.tree_flatten(state)
    layout = StateLayout(state)
    flat = layout.flatten(state)
    assert flat.shape == (leaves[0].shape[0], sum(math.prod(leaf.shape[1:]) for leaf in leaves))
    assert flat.dtype == _expected_dtype([leaf.dtype for leaf in leaves]) == layout.dtype
    back = layout.unflatten(flat)
    back_leaves, back_spec = pytree.tree_flatten(back)
    assert back_spec == spec
    for a, b in zip(back_leaves, leaves, strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b)
    # The flat matrix concatenates the leaves per sample in flattening order.
    assert torch.equal(flat, torch.cat([leaf.reshape(leaf.shape[0], -1).to(flat.dtype) for leaf in leaves], dim=1))


@pytest.mark.parametrize(
    ("dtypes", "expected"),
    [
        ([torch.float32, torch.float64], torch.float64),
        ([torch.bfloat16], torch.float32),
        ([torch.float16, torch.bfloat16], torch.float32),
        ([torch.float32], torch.float32),
        ([torch.bfloat16, torch.float64], torch.float64),
    ],
)
def test_working_dtype(dtypes, expected):
    assert working_dtype(dtypes) == expected
    state = tuple(torch.ones(2, 3, dtype=d) for d in dtypes)
    assert StateLayout(state).flatten(state).dtype == expected


# ------------------------------------------------------------------------------------------- checks
def _state():
    return {"a": torch.zeros(2, 3, dtype=torch.float64), "b": (torch.zeros(2, 4), torch.zeros(2, 2, 2))}


def test_shape_mismatch_names_the_leaf_and_both_shapes():
    layout = StateLayout(_state())
    wrong = _state()
    wrong["b"] = (torch.zeros(2, 5), wrong["b"][1])
    with pytest.raises(ValueError) as err:
        layout.flatten(wrong, what="the block's output")
    message = str(err.value)
    assert "['b'][0]" in message and "(2, 5)" in message and "(2, 4)" in message
    assert "the block's output" in message


def test_dtype_mismatch_names_the_leaf_and_both_dtypes():
    layout = StateLayout(_state())
    wrong = _state()
    wrong["a"] = wrong["a"].float()
    with pytest.raises(ValueError) as err:
        layout.flatten(wrong)
    assert "['a']" in str(err.value) and "float32" in str(err.value) and "float64" in str(err.value)


def test_structure_mismatch_is_a_value_error():
    layout = StateLayout(_state())
    wrong = _state()
    wrong["b"] = list(wrong["b"])
    with pytest.raises(ValueError, match="structure"):
        layout.flatten(wrong)
    single = StateLayout(torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"\(2, 3\)"):
        single.flatten((torch.zeros(2, 3),))
    with pytest.raises(ValueError, match=r"\(2, 4\).*\(2, 3\)"):
        single.flatten(torch.zeros(2, 4))


def test_leaves_must_share_the_batch_dimension():
    with pytest.raises(ValueError, match="batch"):
        StateLayout((torch.zeros(2, 3), torch.zeros(3, 3)))


@pytest.mark.parametrize(
    ("state", "error"),
    [
        ((torch.zeros(2, 3), 3.0), TypeError),
        ({"a": torch.zeros(2, 3), "b": "text"}, TypeError),
        ((torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.long)), TypeError),
        ((torch.zeros(2, 3), torch.zeros(())), ValueError),
        ((), ValueError),
    ],
    ids=("float leaf", "str leaf", "integer tensor", "scalar tensor", "empty"),
)
def test_invalid_states(state, error):
    with pytest.raises(error):
        StateLayout(state)


def test_block_output_mismatch_is_reported_by_equilibrium():
    x = torch.zeros(2, 3, dtype=torch.float64)
    z0 = {"a": torch.zeros(2, 3, dtype=torch.float64), "b": torch.zeros(2, 4, dtype=torch.float64)}

    def f(z, x):
        return {"a": torch.tanh(z["a"] + x), "b": torch.zeros(2, 5, dtype=torch.float64)}

    with pytest.raises(ValueError) as err:
        implicit.equilibrium(f, x, z0)
    assert "['b']" in str(err.value) and "(2, 5)" in str(err.value) and "(2, 4)" in str(err.value)


# ------------------------------------------------------------------------------------------- solves on pytrees
@settings(max_examples=15)
@given(
    structure=st.sampled_from(STRUCTURES),
    pieces=st.integers(2, 5),
    n=st.integers(5, 24),
    solver=st.sampled_from(("fixed_point", "anderson", "broyden")),
)
def test_structured_state_solves_like_the_flat_one(structure, pieces, n, solver):
    p = tanh_problem(0.9, "gauss", 1.0, batch=3, n=n, seed=n)
    widths = widths_for(n, pieces)
    options = {"solver": solver, "tol": 1e-10, "max_iter": 200}
    flat = implicit.make_implicit(p.block, **options)(p.x)
    layer = implicit.make_implicit(PytreeBlock(p.block, structure, widths), **options)
    z = layer(p.x)
    assert pytree.tree_structure(z) == pytree.tree_structure(split_state(flat, structure, widths))
    assert torch.equal(merge_state(z), flat)


def test_injection_may_be_any_pytree():
    x = {"inputs": torch.randn(3, 4, dtype=torch.float64), "scale": 0.5, "name": "ignored"}

    def f(z, x):
        return torch.tanh(x["scale"] * z + x["inputs"])

    z, info = implicit.equilibrium(f, x, torch.zeros(3, 4, dtype=torch.float64), tol=1e-12, max_iter=100)
    assert info.forward.converged.all()
    torch.testing.assert_close(f(z, x), z, rtol=0, atol=1e-11)
