"""Hypothesis strategies for property-based tests of DEQs: state pytrees, contractive blocks, injections, options.

Every function returns a hypothesis ``SearchStrategy``, so the draws combine with a user's own strategies in one
``@given`` (and with ``.map``, ``.filter``, ``.flatmap``, ``st.tuples``)::

    import implicit
    from hypothesis import given, strategies as hst
    from implicit.testing import strategies as deq

    @given(deq.problems(lipschitz=0.8), deq.solver_options(), hst.floats(0.1, 10.0))
    def test_my_solver(problem, options, temperature):
        block, x, z0 = problem
        z, info = implicit.equilibrium(block, x, z0, **options)
        ...

Any other public name is looked up in ``hypothesis.strategies``, so ``from implicit.testing import strategies as st``
can stand in for it: ``st.states(batch=st.integers(1, 4))``.

Conventions:

* A *state* is a tensor or a nested tuple / list / dict of tensors sharing the leading batch dimension B (see
  :class:`implicit.pytree.StateLayout`); N is the number of elements per sample summed over the leaves.
* A :class:`ContractiveBlock` acts on the flat ``(B, N)`` view of a state (leaves concatenated per sample in pytree
  flattening order), applies ``z ↦ σ(A z + U x + b)`` with a linear map A (a dense matrix or a 1-d convolution) and
  ``σ = tanh`` or the identity, and returns the result in the state's structure, shapes and dtypes. Its Lipschitz
  constant in z is at most the operator 2-norm of A, which is *measured* on the actual weights
  (``block.lipschitz``) and never above the requested bound.
* Random values come from ``torch.Generator`` objects seeded by drawn integers: a failing example is reproducible
  and shrinks (towards seed 0, batch 1, one leaf, small shapes).
* Arguments that are "a value or a strategy" also take a sequence (a choice among its items) or, for numeric
  ranges, a ``(low, high)`` tuple (inclusive) where the docstring says so.

hypothesis is a test dependency, not a runtime one: it is imported when a strategy is built, not when this module
is imported, so :class:`ContractiveBlock` and :func:`operator_norm` work without it.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .. import pytree
from ..backward import BACKWARD_MODES as MODE_REGISTRY
from ..backward import BackwardMode
from ..options import ImplicitOptions, resolve_options
from ..pytree import StateLayout
from ..solvers import SOLVERS as SOLVER_REGISTRY
from ..solvers import STOP_MODES, backward_rule, capability_rule, forward_rule

if TYPE_CHECKING:
    from hypothesis.strategies import SearchStrategy

__all__ = [
    "INJECTIONS",
    "KINDS",
    "STRUCTURES",
    "ContractiveBlock",
    "Problem",
    "approximate_backward_modes",
    "compatible",
    "contractive_blocks",
    "default_backward_solvers",
    "default_solvers",
    "exact_backward_modes",
    "injections",
    "operator_norm",
    "problems",
    "solver_options",
    "states",
]

STRUCTURES = ("tensor", "tuple", "dict", "nested")
ALL_STRUCTURES = (*STRUCTURES, "list")
KINDS = ("tanh", "linear", "conv")
INJECTIONS = ("same", "tensor")

_CONTAINERS = ("tuple", "list", "dict")
_MAX_DEPTH = 3
_KEY_ALPHABET = "abchmnxyz_"
_SEEDS = (0, 2**32 - 1)
# Dense measurement of a convolution's operator norm up to this many elements per sample, an FFT bound above.
_DENSE_LIMIT = 1024


# ------------------------------------------------------------------------------------------------- the registries
# The solver and mode lists are read from the registries when used, so registered components are drawn too.
def default_solvers() -> tuple[str, ...]:
    """Forward solvers drawn by default: those usable in every role (:meth:`Solver.general`); specialised ones
    (``"ode"``, ``"adjoint_broyden"``) are drawn when named."""
    return SOLVER_REGISTRY.names(lambda cls: None if cls.general() else "specialised")


def default_backward_solvers() -> tuple[str, ...]:
    """Backward solvers drawn by default: the general solvers and those made for linear systems (``"gmres"``)."""
    return SOLVER_REGISTRY.names(
        lambda cls: None if cls.general() or (cls.linear_only and backward_rule(cls) is None) else "specialised"
    )


def exact_backward_modes() -> tuple[str, ...]:
    """Registered backward modes whose gradient is exact (up to the solves' tolerances)."""
    return MODE_REGISTRY.names(lambda cls: None if cls.exact else "approximate")


def approximate_backward_modes() -> tuple[str, ...]:
    """Registered backward modes that approximate ``(I − J)⁻¹`` by design."""
    return MODE_REGISTRY.names(lambda cls: "exact" if cls.exact else None)


def compatible(solver: str, mode: str) -> bool:
    """Whether the forward solver ``solver`` has every capability the backward mode ``mode`` requires."""
    mode_cls = MODE_REGISTRY[mode]
    return capability_rule(mode_cls.requires, mode)(SOLVER_REGISTRY[solver]) is None


_DERIVED = {
    "SOLVERS": default_solvers,
    "BACKWARD_SOLVERS": default_backward_solvers,
    "EXACT_BACKWARD_MODES": exact_backward_modes,
    "APPROXIMATE_BACKWARD_MODES": approximate_backward_modes,
    "BACKWARD_MODES": lambda: exact_backward_modes() + approximate_backward_modes(),
}


def __getattr__(name: str) -> Any:
    """The registry-derived name lists (``SOLVERS``, ``BACKWARD_SOLVERS``, ``EXACT_BACKWARD_MODES``,
    ``APPROXIMATE_BACKWARD_MODES``, ``BACKWARD_MODES``: tuples of names, read from the registries at each access);
    other public names come from ``hypothesis.strategies`` (``integers``, ``floats``, ...)."""
    if name in _DERIVED:
        return _DERIVED[name]()
    if name.startswith("_"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    hst = _hypothesis()
    try:
        return getattr(hst, name)
    except AttributeError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r} (nor has hypothesis.strategies)") from None


def _hypothesis() -> Any:
    """``hypothesis.strategies``, imported on first use."""
    try:
        import hypothesis.strategies as hst
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(
            "implicit.testing.strategies needs hypothesis: pip install hypothesis (or torch-implicit[testing])"
        ) from error
    return hst


# ------------------------------------------------------------------------------------------------- measurements
def operator_norm(weight: Tensor, length: int | None = None, *, dense_limit: int = _DENSE_LIMIT) -> float:
    """The operator 2-norm (largest singular value) of a linear map, computed in float64.

    Args:
        weight: an ``(N, N)`` matrix, or a ``Conv1d`` kernel ``(C, C, k)`` (odd k) applied with zero padding ``k // 2``
            to signals of ``length`` samples (``N = C · length`` elements).
        length: the signal length of a convolution (ignored for a matrix).
        dense_limit: up to this N, a convolution is measured exactly on its dense ``N × N`` matrix (built by
            convolving the identity basis); above, by the upper bound ``max_ω ‖K̂(ω)‖₂`` of the circular convolution
            of length ``length + k − 1`` that contains it (embed, convolve, crop: both projections have norm 1).
    """
    w = weight.detach().to(torch.float64)
    if w.dim() == 2:
        return float(torch.linalg.matrix_norm(w, 2))
    if w.dim() != 3 or w.shape[0] != w.shape[1] or w.shape[2] % 2 == 0 or length is None:
        raise ValueError(f"operator_norm takes an (N, N) matrix or a (C, C, odd k) kernel and a length, got {w.shape}")
    channels, _, k = w.shape
    n = channels * length
    if n <= dense_limit:
        basis = torch.eye(n, dtype=torch.float64, device=w.device).reshape(n, channels, length)
        columns = F.conv1d(basis, w, padding=k // 2).reshape(n, n)  # row i = A e_i: the transpose of A
        return float(torch.linalg.matrix_norm(columns, 2))
    symbol = torch.fft.fft(w, n=length + k - 1, dim=-1).permute(2, 0, 1)  # (P, C, C)
    return float(torch.linalg.matrix_norm(symbol, 2).max())


def _flat(tree: Any, batch: int, dtype: torch.dtype, what: str) -> Tensor:
    leaves = list(pytree.tree_leaves(tree))
    if not leaves or not all(isinstance(leaf, Tensor) for leaf in leaves):
        raise TypeError(f"{what} must be a tensor or a pytree of tensors")
    return torch.cat([leaf.reshape(batch, -1).to(dtype) for leaf in leaves], dim=1)


def _batch_of(tree: Any) -> int:
    leaves = [leaf for leaf in pytree.tree_leaves(tree) if isinstance(leaf, Tensor)]
    if not leaves or leaves[0].dim() == 0:
        raise ValueError("expected a tensor or a pytree of tensors with a leading batch dimension")
    return leaves[0].shape[0]


# ------------------------------------------------------------------------------------------------- the block
class ContractiveBlock(nn.Module):
    """``f(z, x) = σ(A z + U x + b)`` on a state pytree, with a measured Lipschitz bound in z.

    z is flattened per sample to ``(B, N)`` (leaves in pytree flattening order), mapped, and returned with z's
    structure, shapes and dtypes; the block works for any batch size and follows ``.to(dtype)``.

    Args:
        state_like: an example state (its batch size is remembered as :attr:`batch`, its structure and per-sample
            shapes for :meth:`initial_state`, :meth:`state_like` and :meth:`injection_like`).
        kind: ``"tanh"`` (σ = tanh, A a dense ``N × N`` matrix ``weight``), ``"linear"`` (σ = identity, dense A) or
            ``"conv"`` (σ = tanh, A the ``Conv1d`` kernel ``weight`` of shape ``(channels, channels, kernel_size)``
            on the flat state viewed as ``(B, channels, N / channels)``, zero padding ``kernel_size // 2``).
        bound: the Lipschitz bound to build: ``weight`` is rescaled so that its measured operator norm is ``bound``
            (up to round-off, never above).
        injection: ``"same"`` (x is a pytree shaped like the state, flattened the same way; U is ``N × N``) or
            ``"tensor"`` (x is one ``(B, injection_size)`` tensor).
        injection_size: d for ``injection="tensor"`` (default N).
        channels, kernel_size: the convolution's (``channels`` must divide N; ``kernel_size`` odd).
        seed: seeds the weights: ``weight`` iid Gaussian before rescaling, ``injection_weight`` (U, ``N × d``)
            Gaussian / √d, ``bias`` (b, N) 0.1 · Gaussian.
        dtype: the parameters' dtype (default: the state's working dtype, at least float32).

    Attributes:
        lipschitz: the measured operator 2-norm of A, an upper bound on the Lipschitz constant of ``z ↦ f(z, x)``
            in the 2-norm of the flat state (``|tanh'| ≤ 1``); exact for ``"linear"``.
        bound: the bound it was built for (``lipschitz ≤ bound``); ``requested``: the bound the strategy was asked
            for (set by :func:`contractive_blocks`, else equal to ``bound``).
        n: N, elements per sample; ``batch``: the example state's batch size; ``injection_size``: d.
    """

    def __init__(
        self,
        state_like: Any,
        *,
        kind: str = "tanh",
        bound: float = 0.5,
        injection: str = "same",
        injection_size: int | None = None,
        channels: int = 1,
        kernel_size: int = 3,
        seed: int = 0,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if injection not in INJECTIONS:
            raise ValueError(f"injection must be one of {INJECTIONS}, got {injection!r}")
        if not (isinstance(bound, (int, float)) and math.isfinite(bound) and bound > 0):
            raise ValueError(f"bound must be a finite number > 0, got {bound!r}")
        layout = StateLayout(state_like)
        self.kind, self.injection = kind, injection
        self.n, self.batch = layout.numel, layout.batch
        self._spec = layout.spec
        self._shapes = [shape[1:] for shape in layout.shapes]
        self._dtypes = list(layout.dtypes)
        dtype = dtype or layout.dtype
        self._built_dtype = dtype
        self.injection_size = self.n if injection == "same" else int(injection_size or self.n)
        if self.injection_size < 1:
            raise ValueError(f"injection_size must be ≥ 1, got {injection_size!r}")
        g = torch.Generator().manual_seed(int(seed))
        if kind == "conv":
            if channels < 1 or self.n % channels:
                raise ValueError(f"channels={channels} must divide the state's {self.n} elements per sample")
            if kernel_size < 1 or kernel_size % 2 == 0:
                raise ValueError(f"kernel_size must be odd, got {kernel_size}")
            self.channels, self.kernel_size = channels, kernel_size
            weight = torch.randn(channels, channels, kernel_size, generator=g, dtype=torch.float64)
        else:
            self.channels, self.kernel_size = 0, 0
            weight = torch.randn(self.n, self.n, generator=g, dtype=torch.float64)
        d = self.injection_size
        self.weight = nn.Parameter(weight.to(dtype))
        self.injection_weight = nn.Parameter(
            (torch.randn(self.n, d, generator=g, dtype=torch.float64) / d**0.5).to(dtype)
        )
        self.bias = nn.Parameter((0.1 * torch.randn(self.n, generator=g, dtype=torch.float64)).to(dtype))
        self.bound = float(bound)
        self.requested = float(bound)
        self.lipschitz = self._rescale(self.bound)

    # ------------------------------------------------------------------ Lipschitz bound
    def measure_lipschitz(self) -> float:
        """The operator 2-norm of A measured on the current weights (e.g. after ``.to(dtype)``), in float64."""
        return operator_norm(self.weight, self.n // self.channels if self.kind == "conv" else None)

    def _rescale(self, bound: float) -> float:
        measured = self.measure_lipschitz()
        if measured == 0.0:
            raise ValueError("the drawn weight is zero")
        eps = torch.finfo(self.weight.dtype).eps
        factor = bound / measured
        for _ in range(16):
            with torch.no_grad():
                self.weight.mul_(factor)
            measured = self.measure_lipschitz()
            if measured <= bound:
                return measured
            factor = bound / measured * (1 - 4 * eps)  # round-off took it above: shrink by a few ulps
        raise RuntimeError(f"could not rescale the weight below {bound} (measured {measured})")

    # ------------------------------------------------------------------ shapes
    def _leaf_dtypes(self) -> list[torch.dtype]:
        """The example state's leaf dtypes, or the parameters' dtype once the block was cast."""
        if self.weight.dtype == self._built_dtype:
            return self._dtypes
        return [self.weight.dtype] * len(self._dtypes)

    def state_like(self, batch: int | None = None) -> Any:
        """Zeros in the state's structure and per-sample shapes with ``batch`` samples (default :attr:`batch`)."""
        batch = self.batch if batch is None else batch
        device = self.weight.device
        leaves = [
            torch.zeros(batch, *shape, dtype=dtype, device=device)
            for shape, dtype in zip(self._shapes, self._leaf_dtypes())
        ]
        return pytree.tree_unflatten(leaves, self._spec)

    def injection_like(self, batch_or_state: int | Any = None) -> Any:
        """Zeros shaped like the injection x the block expects, for a batch size or for a state (its batch)."""
        if batch_or_state is None:
            batch = self.batch
        elif isinstance(batch_or_state, int):
            batch = batch_or_state
        else:
            batch = _batch_of(batch_or_state)
        if self.injection == "same":
            return self.state_like(batch)
        return torch.zeros(batch, self.injection_size, dtype=self.weight.dtype, device=self.weight.device)

    def initial_state(self, x: Any) -> Any:
        """Zeros in the state's structure with x's batch size (used by ``make_implicit(block)`` when z0 is None)."""
        return self.state_like(_batch_of(x))

    # ------------------------------------------------------------------ the map
    def linear_map(self, z: Tensor) -> Tensor:
        """``A z`` for a flat ``(B, N)`` state."""
        if self.kind == "conv":
            batch = z.shape[0]
            signal = z.reshape(batch, self.channels, self.n // self.channels)
            return F.conv1d(signal, self.weight, padding=self.kernel_size // 2).reshape(batch, self.n)
        return z @ self.weight.T

    def forward(self, z: Any, x: Any) -> Any:
        leaves, spec = pytree.tree_flatten(z)
        batch = _batch_of(z)
        dtype = self.weight.dtype
        flat = _flat(z, batch, dtype, "the state z")
        if flat.shape[1] != self.n:
            raise ValueError(f"the state has {flat.shape[1]} elements per sample; this block was built for {self.n}")
        injected = _flat(x, batch, dtype, "the injection x")
        if injected.shape[1] != self.injection_size:
            raise ValueError(
                f"the injection has {injected.shape[1]} elements per sample; this block expects {self.injection_size}"
            )
        out = self.linear_map(flat) + injected @ self.injection_weight.T + self.bias
        if self.kind != "linear":
            out = torch.tanh(out)
        parts = out.split([leaf[0].numel() for leaf in leaves], dim=1)
        return pytree.tree_unflatten(
            [part.reshape(leaf.shape).to(leaf.dtype) for part, leaf in zip(parts, leaves)], spec
        )

    def extra_repr(self) -> str:
        extra = f", channels={self.channels}, kernel_size={self.kernel_size}" if self.kind == "conv" else ""
        return (
            f"kind={self.kind!r}, n={self.n}, injection={self.injection!r} (d={self.injection_size}){extra}, "
            f"lipschitz={self.lipschitz:.6g} (requested ≤ {self.requested:g})"
        )


class Problem(NamedTuple):
    """A drawn equilibrium problem: unpacks as ``block, x, z0``."""

    block: ContractiveBlock
    x: Any
    z0: Any

    @property
    def lipschitz(self) -> float:
        return self.block.lipschitz


# ------------------------------------------------------------------------------------------------- argument helpers
def _is_strategy(value: Any) -> bool:
    return isinstance(value, _hypothesis().SearchStrategy)


def _integers(value: Any, what: str, minimum: int) -> SearchStrategy[int]:
    """An int, an inclusive ``(low, high)`` range or a strategy."""
    hst = _hypothesis()
    if _is_strategy(value):
        return value
    if isinstance(value, tuple) and len(value) == 2:
        low, high = value
        if not (isinstance(low, int) and isinstance(high, int) and minimum <= low <= high):
            raise ValueError(f"{what} must be a range (low, high) of integers with {minimum} ≤ low ≤ high, got {value}")
        return hst.integers(low, high)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{what} must be an integer ≥ {minimum}, a (low, high) range or a strategy, got {value!r}")
    return hst.just(value)


def _floats(value: Any, what: str, *, positive: bool = True) -> SearchStrategy[float]:
    """A number, an inclusive ``(low, high)`` range or a strategy."""
    hst = _hypothesis()
    if _is_strategy(value):
        return value
    if isinstance(value, tuple) and len(value) == 2:
        low, high = (float(v) for v in value)
        if not (math.isfinite(low) and math.isfinite(high) and low <= high and (low > 0 or not positive)):
            raise ValueError(f"{what} must be a range (low, high) with 0 < low ≤ high, got {value}")
        return hst.floats(low, high)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{what} must be a number, a (low, high) range or a strategy, got {value!r}")
    if positive and value <= 0:
        raise ValueError(f"{what} must be > 0, got {value!r}")
    return hst.just(float(value))


def _items(value: Any) -> list[Any] | None:
    """The choices of a "one value, a sequence or a strategy" argument; None for a strategy."""
    if _is_strategy(value):
        return None
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _choices(value: Any, what: str, valid: Sequence[Any] | None = None) -> SearchStrategy[Any]:
    """One value, a non-empty sequence of values (sampled) or a strategy."""
    hst = _hypothesis()
    items = _items(value)
    if items is None:
        return value
    if not items:
        raise ValueError(f"{what} must not be empty")
    if valid is not None:
        unknown = [item for item in items if item not in valid]
        if unknown:
            raise ValueError(f"unknown {what} {unknown}; valid: {', '.join(map(str, valid))}")
    return hst.sampled_from(items)


# ------------------------------------------------------------------------------------------------- states
def _draw_shape(draw: Any, dims: SearchStrategy[int], budget: int) -> tuple[int, ...]:
    hst = _hypothesis()
    count = draw(dims)
    shape, size = [], 1
    for i in range(count):
        room = max(1, budget // size)
        # Leading dims up to 4 (so that later dims get room too), the last one takes what the budget leaves.
        shape.append(draw(hst.integers(1, room if i == count - 1 else min(room, 4))))
        size *= shape[-1]
    return tuple(shape)


def _container(draw: Any, kind: str, children: list[Any]) -> Any:
    if kind == "tuple":
        return tuple(children)
    if kind == "list":
        return list(children)
    hst = _hypothesis()
    keys = draw(
        hst.lists(
            hst.text(_KEY_ALPHABET, min_size=1, max_size=4), min_size=len(children), max_size=len(children), unique=True
        )
    )
    return dict(zip(keys, children))


def _nest(draw: Any, leaves: list[Tensor], depth: int, force_nesting: bool) -> Any:
    """A container of ``leaves`` at ``depth``; with ``force_nesting`` its first child is itself a container."""
    hst = _hypothesis()
    kind = draw(hst.sampled_from(_CONTAINERS))
    if depth >= _MAX_DEPTH:
        return _container(draw, kind, leaves)
    count = draw(hst.integers(1, len(leaves)))  # children
    cuts: list[int] = []
    if count > 1:
        positions = hst.integers(1, len(leaves) - 1)
        cuts = sorted(draw(hst.lists(positions, min_size=count - 1, max_size=count - 1, unique=True)))
    bounds = [0, *cuts, len(leaves)]
    children = []
    for i, (start, stop) in enumerate(itertools.pairwise(bounds)):
        group = leaves[start:stop]
        if len(group) > 1 or (force_nesting and i == 0) or draw(hst.booleans()):
            children.append(_nest(draw, group, depth + 1, False))
        else:
            children.append(group[0])
    return _container(draw, kind, children)


def states(
    batch: Any = (1, 4),
    structures: Any = STRUCTURES,
    *,
    leaf_dims: Any = (1, 3),
    max_leaf_size: int = 8,
    max_leaves: int = 4,
    max_size: int | None = None,
    dtype: Any = torch.float64,
    scale: Any = 1.0,
) -> SearchStrategy[Any]:
    """State pytrees of random tensors sharing a batch dimension.

    Args:
        batch: the batch size B: an int, an inclusive ``(low, high)`` range or a strategy.
        structures: which structures to draw among (one name, a sequence or a strategy of names): ``"tensor"`` (one
            ``(B, ...)`` tensor), ``"tuple"``, ``"list"``, ``"dict"`` (flat containers of 1..max_leaves leaves, dict
            keys drawn) and ``"nested"`` (tuples / lists / dicts inside each other, up to depth 3, at least depth 2).
        leaf_dims: trailing (per-sample) dimensions of each leaf: an int, an inclusive range or a strategy; 0 gives
            ``(B,)`` leaves.
        max_leaf_size: elements per sample of one leaf at most (the product of its trailing sizes).
        max_leaves: leaves at most.
        max_size: elements per sample of the whole state at most (N ≤ max_size; None: no limit beyond the leaves').
        dtype: the leaves' floating dtype: one dtype, a sequence (one drawn per state) or a strategy.
        scale: the values are ``scale · N(0, 1)``: a number, an inclusive range or a strategy.

    Returns:
        a strategy of states; ``StateLayout(state)`` accepts every draw.
    """
    hst = _hypothesis()
    batch_st = _integers(batch, "batch", minimum=1)
    structure_st = _choices(structures, "structures", ALL_STRUCTURES)
    dims_st = _integers(leaf_dims, "leaf_dims", minimum=0)
    dtype_st = _choices(dtype, "dtype")
    scale_st = _floats(scale, "scale", positive=False)
    if max_leaf_size < 1 or max_leaves < 1 or (max_size is not None and max_size < 1):
        raise ValueError("max_leaf_size, max_leaves and max_size must be ≥ 1")

    @hst.composite
    def draw_state(draw: Any) -> Any:
        b = draw(batch_st)
        structure = draw(structure_st)
        leaf_dtype = draw(dtype_st)
        if not (isinstance(leaf_dtype, torch.dtype) and leaf_dtype.is_floating_point):
            raise ValueError(f"states: dtype must be a floating torch.dtype, got {leaf_dtype!r}")
        budget = max_size if max_size is not None else max_leaf_size * max_leaves
        count = 1 if structure == "tensor" else draw(hst.integers(1, min(max_leaves, budget)))
        shapes, used = [], 0
        for i in range(count):
            room = min(max_leaf_size, budget - used - (count - i - 1))
            shapes.append(_draw_shape(draw, dims_st, room))
            used += math.prod(shapes[-1])
        amplitude = draw(scale_st)
        g = torch.Generator().manual_seed(draw(hst.integers(*_SEEDS)))
        leaves = [
            (amplitude * torch.randn(b, *shape, generator=g, dtype=torch.float64)).to(leaf_dtype) for shape in shapes
        ]
        if structure == "tensor":
            return leaves[0]
        if structure == "nested":
            return _nest(draw, leaves, 1, force_nesting=True)
        return _container(draw, structure, leaves)

    return draw_state()


# ------------------------------------------------------------------------------------------------- blocks
def contractive_blocks(
    state: Any = None,
    *,
    lipschitz: Any = 0.9,
    kinds: Any = KINDS,
    injection: Any = "same",
    fraction: Any = (0.25, 0.99),
    injection_size: Any = (1, 6),
    max_channels: int = 4,
    kernel_sizes: Any = (1, 3, 5),
    dtype: torch.dtype | None = None,
) -> SearchStrategy[ContractiveBlock]:
    """Random :class:`ContractiveBlock` s whose measured Lipschitz bound in z is below ``lipschitz``.

    Args:
        state: the state the block acts on: an example state (pytree), a strategy of states (e.g. :func:`states`)
            or None (``states()``). Only its structure and per-sample shapes matter; ``block.batch`` remembers its
            batch size (the default of :func:`injections`).
        lipschitz: the requested bound (> 0; the block contracts when it is < 1): a number, an inclusive
            ``(low, high)`` range or a strategy.
        kinds: ``"tanh"``, ``"linear"``, ``"conv"``: one, a sequence or a strategy.
        injection: ``"same"`` (x shaped like the state) or ``"tensor"`` (x a ``(B, d)`` tensor): one, a sequence or
            a strategy.
        fraction: the weight is rescaled to ``fraction · lipschitz`` (a number in (0, 1), an inclusive range or a
            strategy), then measured again: ``block.lipschitz ≤ fraction · lipschitz < lipschitz``.
        injection_size: d for ``injection="tensor"`` (int, inclusive range or strategy).
        max_channels: a convolution's channels are drawn among the divisors of N up to this.
        kernel_sizes: a convolution's odd kernel size (one, a sequence or a strategy).
        dtype: the parameters' dtype (default: the state's working dtype).

    Each drawn block has ``lipschitz`` (measured: ``torch.linalg.matrix_norm(W, 2)``, or the operator norm of the
    convolution on the state's length, see :func:`operator_norm`), ``bound`` (what it was rescaled to) and
    ``requested`` (the ``lipschitz`` argument as drawn). Use :meth:`ContractiveBlock.injection_like` or
    :func:`injections` for x.
    """
    hst = _hypothesis()
    if state is None:
        state = states()
    state_st = state if _is_strategy(state) else hst.just(state)
    lipschitz_st = _floats(lipschitz, "lipschitz")
    kind_st = _choices(kinds, "kinds", KINDS)
    injection_st = _choices(injection, "injection", INJECTIONS)
    fraction_st = _floats(fraction, "fraction")
    size_st = _integers(injection_size, "injection_size", minimum=1)
    kernel_st = _choices(kernel_sizes, "kernel_sizes")

    @hst.composite
    def draw_block(draw: Any) -> ContractiveBlock:
        example = draw(state_st)
        n = StateLayout(example).numel
        requested = draw(lipschitz_st)
        share = draw(fraction_st)
        if not (requested > 0 and 0 < share < 1):
            raise ValueError(f"contractive_blocks: need lipschitz > 0 and 0 < fraction < 1, got {requested}, {share}")
        kind = draw(kind_st)
        mode = draw(injection_st)
        options: dict[str, Any] = {}
        if mode == "tensor":
            options["injection_size"] = draw(size_st)
        if kind == "conv":
            options["channels"] = draw(hst.sampled_from([c for c in range(1, max_channels + 1) if n % c == 0]))
            options["kernel_size"] = draw(kernel_st)
        block = ContractiveBlock(
            example,
            kind=kind,
            bound=share * requested,
            injection=mode,
            seed=draw(hst.integers(*_SEEDS)),
            dtype=dtype,
            **options,
        )
        if not block.lipschitz < requested:  # guaranteed by the rescaling; checked, not assumed
            raise AssertionError(f"drawn block measures {block.lipschitz}, above the requested {requested}")
        block.requested = float(requested)
        return block

    return draw_block()


def injections(target: Any, *, batch: Any = None, scale: Any = 1.0) -> SearchStrategy[Any]:
    """Injections x of ``scale · N(0, 1)`` values.

    Args:
        target: a :class:`ContractiveBlock` (x as :meth:`~ContractiveBlock.injection_like`), a strategy of blocks, a
            state (x shaped like it, the ``"same"`` convention) or a strategy of states.
        batch: the batch size (int, inclusive range or strategy); default the block's :attr:`~ContractiveBlock.batch`
            or the state's.
        scale: a number, an inclusive range or a strategy.
    """
    hst = _hypothesis()
    target_st = target if _is_strategy(target) else hst.just(target)
    batch_st = None if batch is None else _integers(batch, "batch", minimum=1)
    scale_st = _floats(scale, "scale", positive=False)

    @hst.composite
    def draw_injection(draw: Any) -> Any:
        drawn = draw(target_st)
        b = None if batch_st is None else draw(batch_st)
        if callable(getattr(drawn, "injection_like", None)):  # a ContractiveBlock or a block with that method
            like = drawn.injection_like(b)
        else:
            layout = StateLayout(drawn)
            b = layout.batch if b is None else b
            like = pytree.tree_map(lambda t: t.new_zeros(b, *t.shape[1:]), drawn)
        return _random_like(like, draw(scale_st), draw(hst.integers(*_SEEDS)))

    return draw_injection()


def _random_like(tree: Any, scale: float, seed: int) -> Any:
    g = torch.Generator().manual_seed(seed)

    def fill(t: Tensor) -> Tensor:
        values = scale * torch.randn(t.shape, generator=g, dtype=torch.float64)
        return values.to(device=t.device, dtype=t.dtype)

    return pytree.tree_map(fill, tree)


def problems(
    state: Any = None,
    *,
    z0: Any = ("zeros", "random"),
    scale: Any = 1.0,
    **block_options: Any,
) -> SearchStrategy[Problem]:
    """``(block, x, z0)`` triples (:class:`Problem`): a :func:`contractive_blocks` draw on ``state``, an injection
    with the state's batch size and a starting state.

    Args:
        state: as for :func:`contractive_blocks`.
        z0: ``"zeros"`` (``block.initial_state(x)``), ``"random"`` (``scale · N(0, 1)`` values in the state's
            structure): one, a sequence or a strategy.
        scale: the injection's (and a random z0's) scale: a number, an inclusive range or a strategy.
        **block_options: passed to :func:`contractive_blocks` (``lipschitz``, ``kinds``, ``injection``, ...).
    """
    hst = _hypothesis()
    blocks = contractive_blocks(state, **block_options)
    start_st = _choices(z0, "z0", ("zeros", "random"))
    scale_st = _floats(scale, "scale", positive=False)

    @hst.composite
    def draw_problem(draw: Any) -> Problem:
        block = draw(blocks)
        amplitude = draw(scale_st)
        x = _random_like(block.injection_like(), amplitude, draw(hst.integers(*_SEEDS)))
        start = block.initial_state(x)
        if draw(start_st) == "random":
            start = _random_like(start, amplitude, draw(hst.integers(*_SEEDS)))
        return Problem(block, x, start)

    return draw_problem()


# ------------------------------------------------------------------------------------------------- options
def _own_options(component: type[Any], tune: bool) -> SearchStrategy[dict[str, Any]]:
    """Draws of a registered component's own options (the ranges it declares), or its defaults."""
    hst = _hypothesis()
    names = component.option_strategies(hst) if tune else {}
    return hst.fixed_dictionaries({}, optional=names) if names else hst.just({})


def solver_options(
    solvers: Any = None,
    backward_modes: Any = ("implicit",),
    *,
    backward_solvers: Any = None,
    tol: Any = None,
    backward_tol: Any = None,
    max_iter: Any = 1000,
    backward_max_iter: Any = 1000,
    stop_modes: Any = STOP_MODES,
    check_every: Any = (1, 4),
    tune: bool = True,
    dtype: torch.dtype = torch.float64,
    **fixed: Any,
) -> SearchStrategy[dict[str, Any]]:
    """Dicts of options for ``make_implicit`` / :func:`implicit.equilibrium`, each accepted by
    ``ImplicitOptions(**d)``.

    A draw holds ``solver``, ``solver_options`` (the solver's own options, each present or left at its default, in
    the ranges the solver class declares with ``option_strategies``), ``tol``, ``max_iter``, ``stop_mode``,
    ``check_every``, ``backward`` and ``backward_options`` (likewise) and, for modes that solve the backward linear
    system (``"implicit"``; ``"shine"`` with ``fallback="exact"``: the modes' ``uses_backward_solver``),
    ``backward_solver``, ``backward_solver_options``, ``backward_tol``, ``backward_max_iter``,
    ``backward_stop_mode``. Only valid pairs are drawn: a solver with every capability the mode requires
    (``"shine"`` an inverse-Jacobian estimate, ``"unrolled"`` differentiable steps).

    Solvers and modes are read from :data:`implicit.SOLVERS` and :data:`implicit.BACKWARD_MODES`: by default the
    forward solvers usable in every role (fixed_point, anderson, broyden and any general solver registered),
    the backward solvers among those plus the linear ones (gmres), and ``backward="implicit"``. The declared ranges
    converge on every block of Lipschitz constant ≤ 0.9 (e.g. :func:`contractive_blocks`) within the default budgets
    of 1000 iterations. Specialised solvers are drawn when named: the ODE solver costs 5–20× the f-evaluations, so
    give it a larger ``max_iter`` or a looser ``tol``; a solver that differentiates its map (adjoint Broyden) is
    refused as a backward solver.

    Args:
        solvers, backward_modes, backward_solvers, stop_modes: the choices (one, a sequence or a strategy; ``None``:
            the defaults above).
        tol, backward_tol: a number, a sequence of numbers (sampled) or a strategy; default 1e-6, 1e-8 or 1e-10 in
            float64, 1e-4 or 1e-5 in float32, 20 or 100 eps for half-precision states (see ``dtype``).
        max_iter, backward_max_iter, check_every: an int, an inclusive ``(low, high)`` range or a strategy.
        tune: draw the solvers' and modes' own options (False: always their defaults, empty dicts).
        dtype: the states' dtype, for the default tolerances.
        **fixed: options put into every draw as they are (e.g. ``on_divergence="raise"``), replacing drawn ones.
    """
    hst = _hypothesis()
    solvers = default_solvers() if solvers is None else solvers
    backward_solvers = default_backward_solvers() if backward_solvers is None else backward_solvers
    forward_names = _items(solvers)
    mode_names = _items(backward_modes)
    for name in forward_names or ():  # unknown or misplaced names raise here, not in the middle of a test
        SOLVER_REGISTRY.lookup(name, option="solvers", role="forward solver", rule=forward_rule)
    for name in _items(backward_solvers) or ():
        SOLVER_REGISTRY.lookup(name, option="backward_solvers", role="backward solver", rule=backward_rule)
    for name in mode_names or ():
        MODE_REGISTRY.lookup(name, option="backward_modes")
    default_tols = _default_tolerances(dtype)
    tol_st = _tolerances(tol, default_tols, "tol")
    backward_tol_st = _tolerances(backward_tol, default_tols, "backward_tol")
    max_iter_st = _integers(max_iter, "max_iter", minimum=1)
    backward_max_iter_st = _integers(backward_max_iter, "backward_max_iter", minimum=1)
    stop_st = _choices(stop_modes, "stop_modes", STOP_MODES)
    check_st = _integers(check_every, "check_every", minimum=1)
    backward_solver_st = _choices(backward_solvers, "backward_solvers")
    resolve_options(None, fixed)  # misspelled or invalid fixed options raise now, naming the closest valid one

    def valid_pair(pair: tuple[str, str]) -> bool:
        return compatible(*pair)

    if forward_names is not None and mode_names is not None:
        pairs = [(s, m) for m in mode_names for s in forward_names if compatible(s, m)]
        if not pairs:
            raise ValueError(
                f"no valid (solver, backward) pair among {forward_names} × {mode_names}: each mode needs a solver "
                "with the capabilities it requires (backward='shine' an inverse-Jacobian estimate, "
                "backward='unrolled' differentiable steps)"
            )
        pair_st = hst.sampled_from(pairs)
    else:
        pair_st = hst.tuples(_choices(solvers, "solvers"), _choices(backward_modes, "backward_modes")).filter(
            valid_pair
        )

    @hst.composite
    def draw_options(draw: Any) -> dict[str, Any]:
        solver, mode = draw(pair_st)
        mode_cls: type[BackwardMode] = MODE_REGISTRY[mode]
        options: dict[str, Any] = {
            "solver": solver,
            "solver_options": draw(_own_options(SOLVER_REGISTRY[solver], tune)),
            "tol": draw(tol_st),
            "max_iter": draw(max_iter_st),
            "stop_mode": draw(stop_st),
            "check_every": draw(check_st),
            "backward": mode,
            "backward_options": draw(_own_options(mode_cls, tune)),
        }
        if mode_cls(**options["backward_options"]).uses_backward_solver:
            backward_solver = draw(backward_solver_st)
            options.update(
                backward_solver=backward_solver,
                backward_solver_options=draw(_own_options(SOLVER_REGISTRY[backward_solver], tune)),
                backward_tol=draw(backward_tol_st),
                backward_max_iter=draw(backward_max_iter_st),
                backward_stop_mode=draw(stop_st),
            )
        options.update(fixed)
        ImplicitOptions(**options)  # every draw is valid; a failure here is a bug in this strategy
        return options

    return draw_options()


def _default_tolerances(dtype: torch.dtype) -> tuple[float, ...]:
    if dtype == torch.float64:
        return (1e-6, 1e-8, 1e-10)
    if dtype == torch.float32:
        return (1e-4, 1e-5)
    # Half-precision states: the block's output is rounded to the leaf dtype, so the residual stalls near its eps.
    eps = torch.finfo(dtype).eps
    return (20 * eps, 100 * eps)


def _tolerances(value: Any, default: Sequence[float], what: str) -> SearchStrategy[float]:
    hst = _hypothesis()
    if value is None:
        return hst.sampled_from(tuple(default))
    if _is_strategy(value):
        return value
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    if not items or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 for v in items):
        raise ValueError(f"{what} must be a number ≥ 0, a sequence of them or a strategy, got {value!r}")
    return hst.sampled_from([float(v) for v in items])
