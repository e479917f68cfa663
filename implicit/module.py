"""``make_implicit``: a weight-tied block ``f(z, x) -> z`` becomes an equilibrium layer ``x -> z*``."""

from __future__ import annotations

import random
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar, overload

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.utils import _pytree as pytree

from .backward import Phantom, Problem, Unrolled, get_backward_class
from .correction import correction_positions
from .dropout import implicit_call
from .options import ImplicitOptions, resolve_options
from .pytree import State, StateLayout, all_finite, tree_tensors
from .regularization import jacobian_frobenius
from .result import ImplicitInfo

Block = Callable[[State, Any], State]
ModuleT = TypeVar("ModuleT", bound=nn.Module)


def equilibrium(
    f: Block,
    x: Any,
    z0: State,
    options: ImplicitOptions | None = None,
    *,
    solver_state: dict[str, Any] | None = None,
    **overrides: Any,
) -> tuple[State, ImplicitInfo]:
    """Solve ``z* = f(z*, x)`` from ``z0`` and return ``(z*, info)`` with gradients per ``options.backward``.

    The functional core of every implicit layer. ``z0`` fixes the state structure: a tensor or a nested
    tuple/list/dict of tensors with a shared leading batch dimension; ``f`` must return the same structure, shapes
    and dtypes. ``x`` is passed to ``f`` untouched (any object; its tensors are checked for non-finite values).
    With ``correction`` set, the first element is a list of states (earliest first, the last is z*).
    ``solver_state`` is handed to the forward solver (e.g. ``{"opa_direction": d}`` for adjoint Broyden's OPA
    updates, ``d`` flat ``(B, N)``).
    """
    options = resolve_options(options, overrides)
    with implicit_call():  # one variational-dropout mask for the whole call
        return _equilibrium(f, x, z0, options, solver_state)


def _equilibrium(
    f: Block, x: Any, z0: State, options: ImplicitOptions, solver_state: dict[str, Any] | None
) -> tuple[Any, ImplicitInfo]:
    if options.nonfinite_input != "ignore" and not all_finite(tree_tensors(x) + tree_tensors(z0)):
        message = "non-finite values (NaN or Inf) in the injection x or the initial state z0"
        if options.nonfinite_input == "raise":
            raise ValueError(message + " (set nonfinite_input='warn' or 'ignore' to allow them)")
        warnings.warn(message, RuntimeWarning, stacklevel=4)
    layout = StateLayout(z0)

    def fn(z: Tensor) -> Tensor:
        return layout.flatten(f(layout.unflatten(z), x), what="the block's output")

    problem = Problem(fn=fn, z0=layout.flatten(z0), options=options, layout=layout, solver_state=solver_state)
    mode = get_backward_class(options.backward)(**options.backward_options)
    if options.correction is None:
        z_flat, info = mode.run(problem)
        states = None
    else:
        steps = correction_positions(options.correction, options.max_iter)
        result = mode.solve_forward(problem, record_at=steps)
        info = ImplicitInfo(forward=result, backward_mode=mode.name)
        # Intermediate states: each its own phantom gradient (the unrolled mode keeps its own graph).
        sampler = (
            mode
            if isinstance(mode, Unrolled)
            else Phantom(steps=options.correction_steps, tau=options.correction_tau, variant="unrolled")
        )
        states = [sampler.attach(problem, result, info, z=state) for state in result.trajectory[:-1]]
        z_flat = mode.attach(problem, result, info)
    if options.jac_loss_probes and _draw(options.jac_loss_prob):
        info.jac_loss = jacobian_frobenius(
            fn, info.forward.z, probes=options.jac_loss_probes, probe=options.jac_loss_probe
        )
    z = layout.unflatten(z_flat)
    return ([*(layout.unflatten(s) for s in states), z] if states is not None else z), info


def _draw(probability: float) -> bool:
    """A Bernoulli draw on the host (no device synchronisation)."""
    return probability >= 1 or (probability > 0 and random.random() < probability)


@contextmanager
def parametrizations_cached(module: nn.Module) -> Iterator[None]:
    """Evaluate every parametrised tensor of ``module`` (``torch.nn.utils.parametrizations`` weight norm, spectral
    norm, orthogonal, ...) once, in the caller's grad mode, and reuse it for every f-evaluation inside the block.

    One evaluation per layer call: the solve, the tracked call and the backward all see the same weights, spectral
    norm's power iteration advances once per call, and gradients reach the original parameters.
    """
    parametrized = [
        (owner, name)
        for owner in module.modules()
        if parametrize.is_parametrized(owner)
        for name in owner.parametrizations
    ]
    if not parametrized:
        yield
        return
    with parametrize.cached():
        for owner, name in parametrized:
            getattr(owner, name)
        yield


class ImplicitMixin:
    """Forward of an implicit layer; combined with an ``nn.Module`` that provides :meth:`block_forward`."""

    implicit_options: ImplicitOptions
    last_info: ImplicitInfo | None = None

    def block_forward(self, z: State, x: Any) -> State:
        """One application of the weight-tied block ``f(z, x)``."""
        raise NotImplementedError

    def initial_state(self, x: Any) -> State:
        """The solve's default starting point: zeros shaped like the injection ``x``. Override (on the block or the
        decorated class) when the state differs in shape from the injection."""
        return pytree.tree_map(lambda t: torch.zeros_like(t) if isinstance(t, Tensor) else t, x)

    def configure(self, **options: Any) -> ImplicitMixin:
        """Change this layer's options (validated; per-call overrides stay possible). Returns the layer."""
        self.implicit_options = resolve_options(self.implicit_options, options)
        return self

    def forward(
        self, x: Any, z0: State | None = None, *, solver_state: dict[str, Any] | None = None, **overrides: Any
    ) -> Any:
        """Solve ``z* = f(z*, x)``.

        Args:
            x: the injection, passed to the block as its second argument (tensor or any pytree).
            z0: starting state (default :meth:`initial_state`). If it requires grad it receives a gradient: zero for
                ``backward="implicit"`` (z* does not depend on z0), the unrolled derivative for ``"unrolled"``.
            solver_state: handed to the forward solver (see :func:`equilibrium`).
            **overrides: per-call options, e.g. ``tol=1e-6, max_iter=100``.

        Returns:
            z* with the state's structure, or ``(z*, info)`` with ``return_info=True``. ``self.last_info`` holds the
            info of the latest call; ``info.backward`` is filled when autograd runs this call's backward.
        """
        if z0 is None:
            z0 = self.initial_state(x)
        with parametrizations_cached(self):  # type: ignore[arg-type]
            z, info = equilibrium(
                self.block_forward, x, z0, self.implicit_options, solver_state=solver_state, **overrides
            )
        self.last_info = info
        return (z, info) if (overrides.get("return_info", self.implicit_options.return_info)) else z


class ImplicitModule(ImplicitMixin, nn.Module):
    """An implicit layer around an existing block instance (``make_implicit(block, ...)``).

    The block is held by reference (``self.block``): parameters are shared, not copied. ``state_dict()`` has exactly
    the block's keys and ``load_state_dict`` accepts the block's state dict.
    """

    def __init__(self, block: nn.Module, options: ImplicitOptions | None = None, **kwargs: Any) -> None:
        super().__init__()
        self.block = block
        self.implicit_options = resolve_options(options, kwargs)
        self.register_state_dict_post_hook(_drop_block_prefix)
        self.register_load_state_dict_pre_hook(self._add_block_prefix)
        self.register_load_state_dict_post_hook(self._report_block_keys)
        self._load_prefixes: list[str] = []

    def block_forward(self, z: State, x: Any) -> State:
        return self.block(z, x)

    def initial_state(self, x: Any) -> State:
        init = getattr(self.block, "initial_state", None)
        return init(x) if callable(init) else super().initial_state(x)

    def _add_block_prefix(self, module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        """Load hook: the block's keys (``prefix + "weight"``) go to ``prefix + "block.weight"``."""
        self._load_prefixes.append(prefix)
        for key in [k for k in state_dict if k.startswith(prefix) and not k.startswith(prefix + "block.")]:
            state_dict[prefix + "block." + key[len(prefix) :]] = state_dict.pop(key)

    def _report_block_keys(self, module: nn.Module, incompatible: Any) -> None:
        """Load hook: missing / unexpected keys are reported under the block's own names."""
        prefix = self._load_prefixes.pop() if self._load_prefixes else ""
        inner = prefix + "block."
        for keys in (incompatible.missing_keys, incompatible.unexpected_keys):
            keys[:] = [prefix + k[len(inner) :] if k.startswith(inner) else k for k in keys]

    def extra_repr(self) -> str:
        o = self.implicit_options
        return f"solver={o.solver!r}, backward={o.backward!r}, tol={o.tol:g}, max_iter={o.max_iter}"


def _drop_block_prefix(module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    inner = prefix + "block."
    for key in [k for k in state_dict if k.startswith(inner)]:
        state_dict[prefix + key[len(inner) :]] = state_dict.pop(key)
    metadata = getattr(state_dict, "_metadata", None)
    if metadata is not None:  # per-module version records, keyed by module prefix without the trailing dot
        for key in [k for k in metadata if k == inner[:-1] or k.startswith(inner)]:
            value = metadata.pop(key)
            metadata[(prefix + key[len(inner) :]) if key.startswith(inner) else prefix[:-1]] = value


def _implicit_class(cls: type[ModuleT], options: ImplicitOptions) -> type[ModuleT]:
    """A subclass of ``cls`` whose ``forward(x, z0=None, **overrides)`` solves for the equilibrium of
    ``cls.forward(self, z, x)``. Same parameters and ``state_dict`` keys as ``cls``."""
    namespace = {
        "__module__": cls.__module__,
        "__qualname__": cls.__qualname__,
        "__doc__": cls.__doc__,
        "implicit_options": options,
        "block_forward": cls.forward,
    }
    if "initial_state" in dir(cls):
        namespace["initial_state"] = cls.initial_state
    return type(cls.__name__, (ImplicitMixin, cls), namespace)


@overload
def make_implicit(target: type[ModuleT], /, **options: Any) -> type[ModuleT]: ...
@overload
def make_implicit(target: nn.Module, /, **options: Any) -> ImplicitModule: ...
@overload
def make_implicit(target: None = None, /, **options: Any) -> Callable[[Any], Any]: ...


def make_implicit(target: Any = None, /, **options: Any) -> Any:
    """Turn a weight-tied block ``f(z, x) -> z`` into an equilibrium layer ``x -> z*`` with ``z* = f(z*, x)``.

    Three forms::

        @make_implicit(solver="anderson", tol=1e-4)      # class decorator: Block(...) builds the implicit layer
        class Block(nn.Module):
            def forward(self, z, x): ...

        deq = make_implicit(block, solver="broyden")     # an existing instance, parameters shared
        deq = make_implicit(Block)                       # a class, default options

    Options are listed in :class:`~implicit.options.ImplicitOptions`; unknown names raise ``TypeError``.
    The layer's ``forward(x, z0=None, **overrides)`` returns z* (same structure as the state).
    """
    resolved = resolve_options(None, options)
    if target is None:
        return lambda t: make_implicit(t, **options)
    if isinstance(target, type):
        if not issubclass(target, nn.Module):
            raise TypeError(f"make_implicit decorates nn.Module subclasses, got class {target.__name__}")
        return _implicit_class(target, resolved)
    if isinstance(target, nn.Module):
        return ImplicitModule(target, resolved)
    raise TypeError(f"make_implicit expects an nn.Module instance or subclass, got {type(target).__name__}")
