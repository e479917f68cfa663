"""``implicit.testing.strategies``: drawn states, contractive blocks (Lipschitz bound recomputed here, independently),
injections and solver options, their round trip through the engine and the gradient checker on drawn problems."""

from __future__ import annotations

import copy
import math
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as hst
from problems import DISCRETE_SOLVERS, per_sample_jacobian
from torch.nn import functional as F
from torch.utils import _pytree as pytree

import implicit
from implicit.pytree import StateLayout
from implicit.testing import assert_gradients
from implicit.testing import strategies as deq

ALL_SOLVERS = DISCRETE_SOLVERS
SMALL = deq.states(batch=(1, 3), max_size=12)  # small enough for dense Jacobians and the gradient checker


def _flat_map(block, x, z_like):
    """The block as a flat map ``(B, N) -> (B, N)``, written with StateLayout (not the block's own flattening)."""
    layout = StateLayout(z_like)
    return lambda v: layout.flatten(block(layout.unflatten(v), x))


def _conv_matrix(block) -> torch.Tensor:
    """The dense ``N × N`` matrix of the block's convolution, by autograd on a convolution written here."""
    channels, k, n = block.channels, block.kernel_size, block.n
    weight = block.weight.detach().double()

    def conv(v):
        return F.conv1d(v.reshape(1, channels, n // channels), weight, padding=k // 2).reshape(n)

    return torch.autograd.functional.jacobian(conv, torch.zeros(n, dtype=torch.float64))


def _same_structure(a, b) -> None:
    leaves_a, spec_a = pytree.tree_flatten(a)
    leaves_b, spec_b = pytree.tree_flatten(b)
    assert spec_a == spec_b
    for leaf_a, leaf_b in zip(leaves_a, leaves_b, strict=True):
        assert leaf_a.shape == leaf_b.shape and leaf_a.dtype == leaf_b.dtype


# ------------------------------------------------------------------------------------------------- states
@settings(max_examples=30)
@given(deq.states(batch=(2, 3), leaf_dims=(1, 3), max_leaf_size=6, max_leaves=3, dtype=(torch.float32, torch.float64)))
def test_states_share_batch_and_respect_limits(state):
    leaves, _ = pytree.tree_flatten(state)
    layout = StateLayout(state)  # accepts every draw
    assert 2 <= layout.batch <= 3 and 1 <= len(leaves) <= 3
    assert len({leaf.dtype for leaf in leaves}) == 1 and leaves[0].dtype in (torch.float32, torch.float64)
    for leaf in leaves:
        assert leaf.shape[0] == layout.batch and 1 <= leaf.dim() - 1 <= 3 and leaf[0].numel() <= 6
        assert torch.isfinite(leaf).all()


@pytest.mark.parametrize("structure", [*deq.STRUCTURES, "list"])
def test_each_structure_is_drawn_as_named(structure):
    @settings(max_examples=10)
    @given(deq.states(structures=structure, max_size=10))
    def check(state):
        assert StateLayout(state).numel <= 10
        kind = {"tensor": torch.Tensor, "tuple": tuple, "list": list, "dict": dict}
        if structure in kind:
            assert type(state) is kind[structure]
            children = state if structure != "dict" else list(state.values())
            assert structure == "tensor" or all(isinstance(c, torch.Tensor) for c in children)
        else:  # nested: a container inside a container
            children = state.values() if isinstance(state, dict) else state
            assert isinstance(state, (tuple, list, dict))
            assert any(isinstance(c, (tuple, list, dict)) for c in children)

    check()


# ------------------------------------------------------------------------------------------------- Lipschitz bounds
@settings(max_examples=15)
@given(
    deq.contractive_blocks(SMALL, lipschitz=hst.floats(0.3, 0.95), kinds=("tanh", "linear"), injection=deq.INJECTIONS),
    hst.integers(0, 2**16),
)
def test_dense_blocks_measure_below_the_requested_bound(block, seed):
    assert block.lipschitz <= block.bound < block.requested
    norm = float(torch.linalg.matrix_norm(block.weight.detach().double(), 2))
    assert math.isclose(norm, block.lipschitz, rel_tol=1e-12)
    # The Jacobian in z at random points: ‖∂f/∂z‖₂ ≤ ‖W‖₂ (|tanh'| ≤ 1), equal for the linear block.
    g = torch.Generator().manual_seed(seed)
    z = pytree.tree_map(lambda t: torch.randn(t.shape, generator=g, dtype=t.dtype), block.state_like())
    x = pytree.tree_map(lambda t: torch.randn(t.shape, generator=g, dtype=t.dtype), block.injection_like(z))
    jac = per_sample_jacobian(_flat_map(block, x, z), StateLayout(z).flatten(z))
    jac_norms = torch.linalg.matrix_norm(jac, 2)
    assert (jac_norms <= block.lipschitz * (1 + 1e-12)).all()
    if block.kind == "linear":
        torch.testing.assert_close(jac_norms, torch.full_like(jac_norms, norm), rtol=1e-12, atol=0)


@settings(max_examples=15)
@given(
    deq.contractive_blocks(SMALL, lipschitz=hst.floats(0.3, 0.95), kinds="conv", max_channels=4), hst.integers(0, 99)
)
def test_conv_blocks_measure_below_the_requested_bound(block, seed):
    matrix = _conv_matrix(block)
    norm = float(torch.linalg.matrix_norm(matrix, 2))
    assert math.isclose(norm, block.lipschitz, rel_tol=1e-10)
    assert block.lipschitz < block.requested
    # The block applies exactly this matrix: its Jacobian at z is diag(tanh'(·)) A.
    g = torch.Generator().manual_seed(seed)
    z = pytree.tree_map(lambda t: torch.randn(t.shape, generator=g, dtype=t.dtype), block.state_like(2))
    x = pytree.tree_map(lambda t: torch.randn(t.shape, generator=g, dtype=t.dtype), block.injection_like(2))
    flat = StateLayout(z).flatten(z)
    jac = per_sample_jacobian(_flat_map(block, x, z), flat)
    slopes = 1 - _flat_map(block, x, z)(flat) ** 2
    torch.testing.assert_close(jac, slopes[:, :, None] * matrix, rtol=1e-12, atol=1e-14)


def test_conv_norm_above_the_dense_limit_is_an_upper_bound():
    g = torch.Generator().manual_seed(3)
    for channels, k, length in [(1, 3, 40), (2, 5, 30), (3, 1, 7), (4, 3, 50)]:
        weight = torch.randn(channels, channels, k, generator=g, dtype=torch.float64)
        dense = deq.operator_norm(weight, length)
        bound = deq.operator_norm(weight, length, dense_limit=0)
        assert dense <= bound * (1 + 1e-12) and bound <= 1.5 * dense  # tight, not just safe
        # Power iteration on A and its adjoint (conv_transpose) never exceeds either.
        v = torch.randn(1, channels, length, generator=g, dtype=torch.float64)
        for _ in range(200):
            v = F.conv_transpose1d(F.conv1d(v, weight, padding=k // 2), weight, padding=k // 2)
            v = v / torch.linalg.vector_norm(v)
        power = float(torch.linalg.vector_norm(F.conv1d(v, weight, padding=k // 2)))
        assert power <= dense * (1 + 1e-10)
        assert math.isclose(power, dense, rel_tol=2e-2)


def test_blocks_on_a_given_state_never_exceed_the_bound():
    state = {"h": torch.zeros(2, 3, 4), "c": (torch.zeros(2, 5),)}

    @settings(max_examples=20)
    @given(deq.contractive_blocks(state, lipschitz=hst.floats(0.01, 2.0), fraction=(0.5, 0.99), dtype=torch.float32))
    def check(block):
        assert block.n == 17 and block.weight.dtype == torch.float32
        assert block.measure_lipschitz() == block.lipschitz < block.requested
        _same_structure(block.state_like(2), state)

    check()


def test_block_shapes_dtypes_and_copies():
    state = (torch.zeros(3, 2, 2, dtype=torch.float32), [torch.zeros(3, 1, dtype=torch.float32)])
    block = deq.ContractiveBlock(state, kind="conv", channels=5, kernel_size=3, injection="tensor", injection_size=4)
    assert block.injection_like(7).shape == (7, 4) and block.injection_like(state).shape == (3, 4)
    x = torch.randn(3, 4)
    deq_layer = implicit.make_implicit(block, tol=1e-6)
    _same_structure(deq_layer(x), state)  # z0 from block.initial_state(x)
    wide = copy.deepcopy(block).to(torch.float64)
    _same_structure(wide.initial_state(x.double()), pytree.tree_map(lambda t: t.double(), state))
    assert wide.measure_lipschitz() == block.lipschitz  # float32 → float64 is exact
    with pytest.raises(ValueError, match="elements per sample"):
        block(torch.zeros(3, 6), x)
    with pytest.raises(ValueError, match="must divide"):
        deq.ContractiveBlock(state, kind="conv", channels=2)


# ------------------------------------------------------------------------------------------------- the engine
@settings(max_examples=30)
@given(
    deq.problems(deq.states(batch=(1, 4), max_size=40), injection=deq.INJECTIONS, scale=(0.1, 3.0)),
    deq.solver_options(solvers=ALL_SOLVERS),
)
def test_drawn_pytrees_round_trip_through_the_engine(problem, options):
    block, x, z0 = problem
    x = pytree.tree_map(lambda t: t.clone().requires_grad_(), x)
    z, info = implicit.equilibrium(block, x, z0, **options)
    _same_structure(z, z0)
    assert bool(info.forward.converged.all())
    layout = StateLayout(z0)
    flat = layout.flatten(z)
    back = layout.unflatten(flat)
    _same_structure(back, z)
    for a, b in zip(pytree.tree_leaves(back), pytree.tree_leaves(z), strict=True):
        assert torch.equal(a, b)
    # A fixed point: ‖z − z*‖ ≤ ‖f(z) − z‖ / (1 − L), and the residual is at the requested tolerance.
    with torch.no_grad():
        g = layout.flatten(block(z, x)) - flat
    scale = 1.0 if options["stop_mode"] == "abs" else float(torch.linalg.vector_norm(flat + g, dim=1).max().detach())
    size = math.sqrt(layout.numel) if options["stop_mode"] == "abs" else 1.0
    assert float(torch.linalg.vector_norm(g, dim=1).max()) <= 10 * options["tol"] * max(scale, 1e-3) * size
    grads = torch.autograd.grad(flat.sum(), pytree.tree_leaves(x))
    assert all(torch.isfinite(grad).all() for grad in grads)
    assert info.backward is not None and bool(info.backward.converged.all())


class _Still(torch.nn.Module):
    """The block ``f(z, x) = z``: any options make a layer of it."""

    def forward(self, z, x):
        return z


@settings(max_examples=40)
@given(deq.solver_options(solvers=ALL_SOLVERS, backward_modes=deq.BACKWARD_MODES, on_divergence="raise"))
def test_every_drawn_options_dict_is_accepted(options):
    parsed = implicit.ImplicitOptions(**options)
    assert parsed.on_divergence == "raise" and parsed.solver in ALL_SOLVERS
    assert parsed.backward != "shine" or parsed.solver in ("broyden", "adjoint_broyden")
    assert parsed.backward != "unrolled" or parsed.solver != "adjoint_broyden"
    implicit.make_implicit(_Still(), **options)  # the public entry point takes it too


@settings(max_examples=30)
@given(
    deq.problems(deq.states(max_size=30), lipschitz=0.9),
    deq.solver_options(solvers=ALL_SOLVERS, backward_modes=deq.BACKWARD_MODES, on_divergence="raise"),
)
def test_every_drawn_options_dict_converges_on_a_contractive_block(problem, options):
    block, x, z0 = problem
    layer = implicit.make_implicit(block, **options)
    z, info = layer(x, z0=z0, return_info=True)
    assert bool(info.forward.converged.all())
    _same_structure(z, z0)
    params = list(block.parameters())
    grads = torch.autograd.grad(StateLayout(z).flatten(z).square().sum(), params)
    assert all(torch.isfinite(grad).all() for grad in grads)
    if options["backward"] == "implicit":
        assert bool(info.backward.converged.all())


def test_options_strategy_rejects_impossible_choices():
    with pytest.raises(ValueError, match="linear systems only"):
        deq.solver_options(solvers="gmres")
    with pytest.raises(ValueError, match="no valid"):
        deq.solver_options(solvers="anderson", backward_modes="shine")
    with pytest.raises(ValueError, match="unknown solver"):
        deq.solver_options(backward_solvers="newton")
    with pytest.raises(ValueError, match="backward system"):
        deq.solver_options(backward_solvers=("anderson", "adjoint_broyden"))
    with pytest.raises(TypeError, match="unknown option"):
        deq.solver_options(tolerance=1e-3)
    with pytest.raises(ValueError, match="0 < low"):
        deq.contractive_blocks(lipschitz=(0.0, 0.5))


@settings(max_examples=25)
@given(deq.solver_options(solvers=hst.sampled_from(ALL_SOLVERS), backward_modes=hst.just("shine"), tune=False))
def test_options_from_user_strategies(options):
    assert options["solver"] in ("broyden", "adjoint_broyden") and options["solver_options"] == {}
    implicit.ImplicitOptions(**options)


# ------------------------------------------------------------------------------------------------- composability
@settings(max_examples=10)
@given(
    deq.problems(deq.states(batch=hst.integers(1, 2), structures=("dict", "nested"), max_size=20), z0="zeros"),
    hst.floats(0.1, 5.0),  # the user's own strategy
    deq.solver_options(solvers="anderson", tol=1e-10),
)
def test_strategies_compose_with_the_users_own(problem, amplitude, options):
    block, x, z0 = problem
    scaled = pytree.tree_map(lambda t: amplitude * t, x)
    z, info = implicit.equilibrium(block, scaled, z0, **options)
    assert bool(info.forward.converged.all())
    _same_structure(z, z0)
    assert not isinstance(z0, torch.Tensor)


@settings(max_examples=10)
@given(
    deq.states(batch=2, structures="tuple", max_size=10)
    .flatmap(lambda z: hst.tuples(hst.just(z), deq.contractive_blocks(z, kinds="linear")))
    .flatmap(lambda pair: hst.tuples(hst.just(pair), deq.injections(pair[1], batch=hst.integers(1, 3)))),
    deq.injections(deq.states(batch=3, max_size=6), scale=(0.5, 2.0)),
)
def test_flatmap_chains_and_injections(pair_and_x, x_like_state):
    (z, block), x = pair_and_x
    assert block.n == StateLayout(z).numel
    _same_structure(x, block.injection_like(x))
    assert StateLayout(x_like_state).batch == 3
    _, info = implicit.equilibrium(block, x, block.initial_state(x), tol=1e-10, max_iter=500)
    assert bool(info.forward.converged.all())


# ------------------------------------------------------------------------------------------------- the checker
EXACT_OPTIONS = deq.solver_options(backward_modes=("implicit", "unrolled"))


@settings(max_examples=20)
@given(deq.problems(SMALL, lipschitz=0.9, injection=deq.INJECTIONS), EXACT_OPTIONS)
def test_assert_gradients_passes_on_drawn_problems(problem, options):
    block, x, z0 = problem
    before = copy.deepcopy(block.state_dict())
    report = assert_gradients(block, x, z0=z0, references=("unrolled", "finite_differences"), **options)
    assert report.passed and not report.approximate
    assert {check.kind for check in report.checks} >= {"parameter", "input"}
    for name, value in block.state_dict().items():
        assert torch.equal(value, before[name])  # the user's module is untouched


# ------------------------------------------------------------------------------------------------- the module
def test_module_stands_in_for_hypothesis_strategies():
    assert deq.integers is hst.integers and deq.floats is hst.floats
    with pytest.raises(AttributeError):
        deq.no_such_strategy  # noqa: B018
    with pytest.raises(AttributeError):
        deq._private  # noqa: B018

    @settings(max_examples=5)
    @given(deq.states(batch=deq.integers(1, 4)), deq.solver_options())  # the example, verbatim
    def check(z_like, options):
        assert 1 <= StateLayout(z_like).batch <= 4 and implicit.ImplicitOptions(**options)

    check()


def test_blocks_import_without_hypothesis():
    code = (
        "import sys; sys.modules['hypothesis'] = None\n"
        "import torch\n"
        "from implicit.testing import strategies as s\n"
        "block = s.ContractiveBlock(torch.zeros(2, 4), kind='conv', bound=0.5, channels=2)\n"
        "assert block.lipschitz <= 0.5 and s.operator_norm(torch.eye(3)) == 1.0\n"
        "try:\n"
        "    s.states()\n"
        "except ImportError as error:\n"
        "    assert 'pip install hypothesis' in str(error)\n"
        "else:\n"
        "    raise SystemExit('states() without hypothesis should raise ImportError')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
