"""``make_implicit`` layers: forms, parameter sharing, state dicts, options per call, copies and policies."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from problems import TanhBlock, diverging_lin_problem, injection, tanh_problem
from torch import Tensor, nn

import implicit

OPTIONS = {"solver": "anderson", "tol": 1e-10, "max_iter": 100, "check_every": 1}


class BufferedBlock(TanhBlock):
    """A tanh block with a registered buffer (state dicts carry buffers too)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.register_buffer("gain", torch.full((self.W.shape[0],), 0.9, dtype=self.W.dtype))

    def forward(self, z: Tensor, x: Tensor) -> Tensor:
        return self.gain * super().forward(z, x)


class WideStateBlock(TanhBlock):
    """State width 12 from a 5-wide injection: the default ``zeros_like(x)`` start cannot work."""

    calls = 0

    def __init__(self, seed: int = 0) -> None:
        super().__init__(12, 5, s=0.9, kind="gauss", seed=seed)

    def initial_state(self, x: Tensor) -> Tensor:
        WideStateBlock.calls += 1
        return torch.full((x.shape[0], 12), 0.25, dtype=x.dtype)


def x_for(n: int = 16, batch: int = 4, seed: int = 1) -> Tensor:
    return injection(batch, n, 1.0, torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------- forms
def test_decorator_class_and_instance_forms_solve_identically():
    x = x_for()
    Decorated = implicit.make_implicit(**OPTIONS)(TanhBlock)
    Plain = implicit.make_implicit(TanhBlock)
    decorated = Decorated(16, seed=3)
    configured = Plain(16, seed=3).configure(**OPTIONS)
    wrapped = implicit.make_implicit(TanhBlock(16, seed=3), **OPTIONS)
    assert isinstance(decorated, TanhBlock) and isinstance(decorated, implicit.ImplicitMixin)
    assert isinstance(wrapped, implicit.ImplicitModule)
    assert list(decorated.state_dict()) == list(TanhBlock(16).state_dict())

    z = wrapped(x)
    assert wrapped.last_info.forward.converged.all()
    assert torch.equal(decorated(x), z)
    assert torch.equal(configured(x), z)
    # The block's own forward stays reachable as f.
    z_in = torch.randn(4, 16, dtype=torch.float64)
    assert torch.equal(decorated.block_forward(z_in, x), TanhBlock(16, seed=3)(z_in, x))
    torch.testing.assert_close(decorated.block_forward(z, x), z, rtol=0, atol=1e-9)


def test_make_implicit_rejects_what_is_not_a_module():
    with pytest.raises(TypeError):
        implicit.make_implicit(lambda z, x: z)
    with pytest.raises(TypeError):
        implicit.make_implicit(int)


# ------------------------------------------------------------------------------------------- parameters and state
def test_instance_form_shares_the_blocks_parameters():
    block = BufferedBlock(16, seed=2)
    layer = implicit.make_implicit(block, **OPTIONS)
    assert layer.block is block
    layer_params, block_params = list(layer.parameters()), list(block.parameters())
    assert len(layer_params) == len(block_params) == 3
    assert all(a is b for a, b in zip(layer_params, block_params))
    x = x_for()
    before = layer(x)
    with torch.no_grad():
        block.b.add_(0.5)
    assert not torch.allclose(layer(x), before)


def _perturbed_copy(block: nn.Module) -> nn.Module:
    other = copy.deepcopy(block)
    with torch.no_grad():
        for t in [*other.parameters(), *other.buffers()]:
            t.add_(torch.rand_like(t))
    return other


def _assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_state_dict_keys_and_round_trips():
    block = BufferedBlock(16, seed=2)
    layer = implicit.make_implicit(block, **OPTIONS)
    assert list(layer.state_dict()) == list(block.state_dict()) == ["W", "U", "b", "gain"]

    source = _perturbed_copy(block)
    layer.load_state_dict(source.state_dict())  # block -> implicit layer
    _assert_same_state(block, source)
    target = BufferedBlock(16, seed=5)
    target.load_state_dict(layer.state_dict())  # implicit layer -> block
    _assert_same_state(target, source)
    layer.load_state_dict(layer.state_dict())  # implicit -> implicit
    _assert_same_state(block, source)


def test_nested_state_dict_round_trips():
    """A model holding the implicit layer and one holding the bare block have interchangeable state dicts."""

    def model(block: nn.Module) -> nn.Module:
        torch.manual_seed(0)
        return nn.ModuleDict({"encoder": nn.Linear(16, 16).double(), "deq": block})

    with_layer = model(implicit.make_implicit(BufferedBlock(16, seed=2), **OPTIONS))
    with_block = model(BufferedBlock(16, seed=7))
    assert list(with_layer.state_dict()) == list(with_block.state_dict())
    assert "deq.W" in with_layer.state_dict()

    source = _perturbed_copy(with_block)
    with_layer.load_state_dict(source.state_dict())
    _assert_same_state(with_layer, source)
    fresh = model(BufferedBlock(16, seed=9))
    fresh.load_state_dict(with_layer.state_dict())
    _assert_same_state(fresh, source)
    assert torch.equal(with_layer["deq"].block.W, source["deq"].W)


def _damaged_state_dict() -> dict[str, Tensor]:
    state = TanhBlock(16).state_dict()
    del state["b"]
    state["c"] = torch.zeros(1)
    return state


def test_missing_and_unexpected_keys_are_still_reported():
    layer = implicit.make_implicit(TanhBlock(16), **OPTIONS)
    with pytest.raises(RuntimeError, match="Missing key") as err:
        layer.load_state_dict(_damaged_state_dict())
    assert "Unexpected key" in str(err.value)
    result = layer.load_state_dict(_damaged_state_dict(), strict=False)
    assert len(result.missing_keys) == 1 and len(result.unexpected_keys) == 1


def test_missing_and_unexpected_keys_use_the_layers_key_names():
    """The layer's state dict has the block's keys, so load errors must name those keys, not internal ones."""
    layer = implicit.make_implicit(TanhBlock(16), **OPTIONS)
    result = layer.load_state_dict(_damaged_state_dict(), strict=False)
    assert list(result.missing_keys) == ["b"] and list(result.unexpected_keys) == ["c"]
    with pytest.raises(RuntimeError) as err:
        layer.load_state_dict(_damaged_state_dict())
    assert "block." not in str(err.value)


# ------------------------------------------------------------------------------------------- options per call
def test_per_call_overrides_leave_the_stored_options_alone():
    layer = implicit.make_implicit(TanhBlock(16, s=0.9, kind="sym", seed=1), **OPTIONS)
    stored = layer.implicit_options
    x = 0.1 * x_for()
    _, info = layer(x, max_iter=3, return_info=True)
    assert info.forward.nfe <= 4
    assert not info.forward.converged.all()
    _, info = layer(x, tol=1e-3, return_info=True)
    assert info.forward.tol == 1e-3 and info.forward.converged.all()
    assert (info.forward.residual <= 1e-3).all()
    assert layer.implicit_options is stored and layer.implicit_options.max_iter == 100
    _, info = layer(x, return_info=True)
    assert info.forward.nfe > 4 and info.forward.tol == 1e-10 and info.forward.converged.all()


def test_return_info_option_and_override():
    layer = implicit.make_implicit(TanhBlock(16), **OPTIONS)
    x = x_for()
    z = layer(x)
    assert isinstance(z, Tensor) and isinstance(layer.last_info, implicit.ImplicitInfo)
    z2, info = layer(x, return_info=True)
    assert torch.equal(z, z2) and info is layer.last_info
    assert isinstance(info.forward, implicit.SolverResult) and info.backward_mode == "implicit"
    layer.configure(return_info=True)
    z3, _ = layer(x)
    assert torch.equal(z, z3)
    assert isinstance(layer(x, return_info=False), Tensor)


def test_configure_validates_and_returns_the_layer():
    layer = implicit.make_implicit(TanhBlock(16), **OPTIONS)
    assert layer.configure(solver="broyden", solver_options={"memory": 4}) is layer
    assert layer.implicit_options.solver == "broyden" and dict(layer.implicit_options.solver_options) == {"memory": 4}
    assert layer.implicit_options.tol == OPTIONS["tol"]  # untouched options stay
    layer(x_for())
    assert layer.last_info.forward.inverse_jacobian.rank <= 4
    before = layer.implicit_options
    with pytest.raises(TypeError):
        layer.configure(tolerance=1e-3)
    with pytest.raises(ValueError):
        layer.configure(tol=-1.0)
    assert layer.implicit_options is before


def test_initial_state_of_the_block_is_used():
    x = injection(3, 5, 1.0, torch.Generator().manual_seed(0))
    block = WideStateBlock()
    layer = implicit.make_implicit(block, solver="fixed_point", tol=1e-10, max_iter=200)
    WideStateBlock.calls = 0
    z = layer(x)
    assert z.shape == (3, 12) and WideStateBlock.calls == 1
    assert layer.last_info.forward.converged.all()
    # The solve starts from the block's point: with max_iter=1 it returns one plain step from there.
    _, info = layer(x, max_iter=1, check_every=1, return_info=True)
    start = torch.full((3, 12), 0.25, dtype=torch.float64)
    with torch.no_grad():
        one_step = block(start, x)
    assert torch.equal(info.forward.z, one_step)
    # An explicit z0 bypasses initial_state.
    WideStateBlock.calls = 0
    layer(x, z0=torch.zeros(3, 12, dtype=torch.float64))
    assert WideStateBlock.calls == 0

    Decorated = implicit.make_implicit(solver="fixed_point", tol=1e-10, max_iter=200)(WideStateBlock)
    assert torch.equal(Decorated()(x), z) and WideStateBlock.calls == 1


# ------------------------------------------------------------------------------------------- copies
@pytest.mark.parametrize("form", ("instance", "decorated"))
def test_deepcopy_solves_identically(form):
    if form == "instance":
        layer = implicit.make_implicit(TanhBlock(16, seed=4), **OPTIONS)
    else:
        layer = implicit.make_implicit(**OPTIONS)(TanhBlock)(16, seed=4)
    layer.configure(solver_options={"m": 3}, tol=1e-9)  # instance-level options must be copied too
    clone = copy.deepcopy(layer)
    x = x_for()
    assert torch.equal(clone(x), layer(x))
    assert clone.implicit_options == layer.implicit_options
    assert all(a is not b and torch.equal(a, b) for a, b in zip(clone.parameters(), layer.parameters()))
    with torch.no_grad():
        next(clone.parameters()).mul_(0.5)
    assert not torch.equal(clone(x), layer(x))


def test_options_given_by_the_user_are_not_mutated():
    solver_options = {"m": 3, "beta": 1.0}
    options = {"solver": "anderson", "solver_options": solver_options, "tol": 1e-8, "max_iter": 60}
    snapshot = copy.deepcopy(options)
    layer = implicit.make_implicit(TanhBlock(16), **options)
    overrides = {"solver_options": {"m": 2}, "tol": 1e-6}
    layer(x_for(), **overrides)
    layer.configure(tol=1e-7)
    assert options == snapshot and options["solver_options"] is solver_options
    assert overrides == {"solver_options": {"m": 2}, "tol": 1e-6}
    # The layer holds its own copy: changing the caller's dict later changes nothing.
    solver_options["m"] = 0
    assert layer.implicit_options.solver_options["m"] == 3
    layer(x_for())
    with pytest.raises(TypeError):
        layer.implicit_options.solver_options["m"] = 1  # type: ignore[index]


# ------------------------------------------------------------------------------------------- policies
def _poisoned_injection() -> Tensor:
    x = x_for()
    x[2, 3] = float("nan")
    return x


def test_nonfinite_input_raise():
    layer = implicit.make_implicit(TanhBlock(16), **OPTIONS)
    with pytest.raises(ValueError, match="non-finite"):
        layer(_poisoned_injection())
    with pytest.raises(ValueError, match="non-finite"):
        layer(x_for(), z0=torch.full((4, 16), float("inf"), dtype=torch.float64))


def test_nonfinite_input_warn():
    layer = implicit.make_implicit(TanhBlock(16), nonfinite_input="warn", on_divergence="ignore", **OPTIONS)
    with pytest.warns(RuntimeWarning, match="non-finite"):
        z = layer(_poisoned_injection())
    assert layer.last_info.forward.diverged.tolist() == [False, False, True, False]
    assert torch.isfinite(z).all()


def test_nonfinite_input_ignore_keeps_the_other_samples_exact():
    layer = implicit.make_implicit(TanhBlock(16), nonfinite_input="ignore", on_divergence="ignore", **OPTIONS)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        z = layer(_poisoned_injection())
    info = layer.last_info.forward
    assert info.diverged.tolist() == [False, False, True, False]
    assert info.converged.tolist() == [True, True, False, True]
    clean = layer(x_for())
    good = [0, 1, 3]
    assert torch.equal(z[good], clean[good])


def _diverging_layer(**options):
    p = diverging_lin_problem()
    return p, implicit.make_implicit(p.block, solver="fixed_point", tol=1e-8, max_iter=200, **options)


def test_on_divergence_raise():
    p, layer = _diverging_layer(on_divergence="raise")
    with pytest.raises(implicit.DivergenceError, match="diverged"):
        layer(p.x)
    assert issubclass(implicit.DivergenceError, RuntimeError)


def test_on_divergence_warn_and_ignore():
    p, layer = _diverging_layer()
    with pytest.warns(RuntimeWarning, match="diverged"):
        z, info = layer(p.x, return_info=True)
    assert info.forward.diverged.all() and not info.forward.converged.any()
    assert torch.isfinite(z).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, info = layer(p.x, on_divergence="ignore", return_info=True)
    assert info.forward.diverged.all()


class Midpoint(nn.Module):
    """``f(z, x) = (z + x)/2``: z* = x, and f(x, x) == x exactly in floating point."""

    def forward(self, z: Tensor, x: Tensor) -> Tensor:
        return 0.5 * z + 0.5 * x


def test_warm_start_from_the_equilibrium_with_a_fixed_budget_does_not_raise():
    """Fixed-budget solves (tol=0) warm-started from the equilibrium are a normal training pattern."""
    x = x_for()
    layer = implicit.make_implicit(Midpoint(), solver="anderson", tol=0.0, max_iter=20, on_divergence="raise")
    z, info = layer(x, z0=x.clone(), return_info=True)
    assert not info.forward.diverged.any()
    assert torch.equal(z, x)


def test_a_converging_layer_emits_no_warning():
    p = tanh_problem(0.9, "sym", 0.1, batch=4, n=16)
    layer = implicit.make_implicit(p.block, **OPTIONS)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer(p.x).sum().backward()
    assert layer.last_info.forward.converged.all() and layer.last_info.backward.converged.all()


@pytest.mark.parametrize("structure", ["tensor", "tuple", "dict", "nested"])
def test_info_state_is_the_detached_solution_and_warm_starts_the_next_call(structure):
    """``info.state`` is z* in the state's structure and dtypes, detached; as ``z0`` on a nearby input it saves
    iterations (fixed-point reuse)."""
    from problems import PytreeBlock, merge_state, widths_for

    p = tanh_problem(0.9, "sym", 0.1, batch=4, n=16)
    layer = implicit.make_implicit(PytreeBlock(p.block, structure, widths_for(16, 3)), **{**OPTIONS, "tol": 1e-8})
    z, info = layer(p.x, return_info=True)
    state = info.state
    assert type(state) is type(z) and not merge_state(state).requires_grad
    assert torch.equal(merge_state(state), merge_state(z).detach())
    assert info.state is state  # built once

    nearby = p.x + 1e-3 * torch.randn(p.x.shape, generator=torch.Generator().manual_seed(5), dtype=p.x.dtype)
    _, cold = layer(nearby, return_info=True)
    _, warm = layer(nearby, z0=state, return_info=True)
    assert cold.forward.converged.all() and warm.forward.converged.all()
    assert warm.forward.nfe < cold.forward.nfe
