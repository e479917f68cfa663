"""``make_implicit``: a weight-tied block ``f(z, x) -> z`` becomes an equilibrium layer ``x -> z*``.

A layer call is short: :meth:`ImplicitMixin.forward` → :func:`solve_equilibrium` (input check, state layout, the
forward solve, the backward mode's gradient attached at the solution) → :meth:`Solver.run` → the shared loop. Options
are validated once, when the layer is made or configured (per-call overrides are validated per call).
"""

from __future__ import annotations

import random
import sys
import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any, TypeVar, cast, overload

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .block import check_block
from .cuda_graph import graph_solve
from .dropout import implicit_call
from .options import ImplicitOptions, check_flag, resolve_options
from .problem import Problem, report_divergence
from .pytree import StateLayout, all_finite, tree_map, tree_tensors
from .result import ImplicitInfo
from .types import State

ModuleT = TypeVar("ModuleT", bound=nn.Module)


def equilibrium(
    f: Callable[[State, Any], State],
    x: Any,
    z0: State,
    options: ImplicitOptions | None = None,
    *,
    solver_state: dict[str, Any] | None = None,
    **overrides: Any,
) -> tuple[State, ImplicitInfo]:
    """Solve ``z* = f(z*, x)`` from ``z0`` and return ``(z*, info)`` with gradients per ``options.backward``.

    The functional form of every implicit layer. ``z0`` fixes the state structure: a tensor or a nested
    tuple/list/dict of tensors with a shared leading batch dimension; ``f`` must return the same structure, shapes
    and dtypes. ``x`` is passed to ``f`` untouched (any object; its tensors are checked for non-finite values).
    With ``correction`` set, the first element is a list of states (earliest first, the last is z*), in training and
    evaluation alike (a layer in ``eval()`` mode drops the correction; this function does as it is told).
    ``solver_state`` is handed to the forward solver (e.g. ``{"opa_direction": d}`` for adjoint Broyden's OPA
    updates, ``d`` flat ``(B, N)``).
    """
    options = resolve_options(options, overrides)
    with implicit_call():  # one variational-dropout mask for the whole call
        return solve_equilibrium(f, x, z0, options, solver_state)


def solve_equilibrium(
    f: Callable[[State, Any], State],
    x: Any,
    z0: State,
    options: ImplicitOptions,
    solver_state: dict[str, Any] | None = None,
) -> tuple[Any, ImplicitInfo]:
    """The core of a layer call, with validated ``options``: solve, then attach the backward mode's gradient."""
    if options.nonfinite_input != "ignore" and not all_finite(tree_tensors(x) + tree_tensors(z0)):
        message = "non-finite values (NaN or Inf) in the injection x or the initial state z0"
        if options.nonfinite_input == "raise":
            raise ValueError(message + " (set nonfinite_input='warn' or 'ignore' to allow them)")
        warnings.warn(message, RuntimeWarning, stacklevel=3)
    layout = StateLayout(z0)

    def fn(z: Tensor) -> Tensor:
        return layout.flatten(f(layout.unflatten(z), x), what="the block's output")

    problem = Problem(fn=fn, z0=layout.flatten(z0), options=options, layout=layout)
    mode, steps = options.backward_mode, options.supervised_steps
    # The call's changes to the configured loop (none in the common case: the loop is used as built).
    differentiable = mode.differentiates_iterations and torch.is_grad_enabled()
    changes: dict[str, Any] = {}
    if differentiable:
        changes["differentiable"] = True
    if steps is not None:
        changes["record_at"] = steps
    if solver_state:
        changes["state"] = solver_state
    start = problem.z0 if differentiable or not problem.z0.requires_grad else problem.z0.detach()
    if options.execution == "graph":
        result = graph_solve(options.forward_solve, f, x, start, layout, changes)
    else:
        result = options.forward_solve.run(fn, start, **changes)
    report_divergence(result, "forward", options.on_divergence)
    info = ImplicitInfo(forward=result, backward_mode=mode.name, layout=layout)
    regularizer = options.jacobian_regularizer
    if regularizer is not None and not _draw(options.jac_loss_prob):
        regularizer = None
    # The mode's tracked call f(z*) serves the regulariser too when it is one from a z* that requires grad.
    if steps is None:
        out: Any = layout.unflatten(mode.attach(problem, result, info, regularizer=regularizer))
    else:  # the supervised intermediate states (each its own gradient), then z*
        states = [options.correction_mode.attach(problem, result, info, z=s) for s in result.trajectory[:-1]]
        final = mode.attach(problem, result, info, regularizer=regularizer)
        out = [layout.unflatten(s) for s in (*states, final)]
    if regularizer is not None and info.jac_loss is None:  # no tracked call to share: one of its own
        info.jac_loss = regularizer(fn, result.z)
        info.tracked_nfe += 1
    return out, info


def _draw(probability: float) -> bool:
    """A Bernoulli draw on the host (no device synchronisation)."""
    return probability >= 1 or (probability > 0 and random.random() < probability)


def parametrizations_cached(module: nn.Module) -> AbstractContextManager[Any]:
    """Evaluate every parametrised tensor of ``module`` (``torch.nn.utils.parametrizations`` weight norm, spectral
    norm, orthogonal, ...) once, in the caller's grad mode, and reuse it for every f-evaluation inside the block.

    One evaluation per layer call: the solve, the tracked call and the backward all see the same weights, spectral
    norm's power iteration advances once per call, and gradients reach the original parameters.
    """
    parametrized: list[tuple[nn.Module, str]] = []
    stack = [module]
    while stack:  # module.modules(), without its generator and name bookkeeping (this runs on every call)
        owner = stack.pop()
        children = owner._modules
        if "parametrizations" in children:  # parametrize.is_parametrized, without a failing __getattr__
            parametrized.extend((owner, name) for name in children["parametrizations"]._modules)  # type: ignore[union-attr]
        stack.extend(child for child in children.values() if child is not None)
    return _ParametrizationCache(parametrized) if parametrized else _NOTHING


_NOTHING = nullcontext()


class _ParametrizationCache:
    """``parametrize.cached()`` with the given parametrised tensors evaluated on entry."""

    def __init__(self, parametrized: list[tuple[nn.Module, str]]) -> None:
        self.parametrized = parametrized
        self.cache = parametrize.cached()

    def __enter__(self) -> None:
        self.cache.__enter__()
        try:
            for owner, name in self.parametrized:
                getattr(owner, name)
        except BaseException:  # a parametrisation raised: leave torch's global cache as found (``with`` won't exit)
            self.cache.__exit__(*sys.exc_info())
            raise

    def __exit__(self, *exc: Any) -> None:
        self.cache.__exit__(*exc)


class ImplicitMixin(nn.Module):
    """Forward of an implicit layer: the base of ``make_implicit``'s classes, which provide :meth:`block_forward`
    (a decorated block class puts it first in the bases, before the block class itself)."""

    implicit_options: ImplicitOptions
    last_info: ImplicitInfo | None = None

    def block_forward(self, z: State, x: Any) -> State:
        """One application of the weight-tied block ``f(z, x)``."""
        raise NotImplementedError

    def initial_state(self, x: Any) -> State:
        """The solve's default starting point: zeros shaped like the injection ``x``. Override (on the block or the
        decorated class) when the state differs in shape from the injection."""
        if isinstance(x, Tensor):
            return torch.zeros_like(x)
        return tree_map(lambda t: torch.zeros_like(t) if isinstance(t, Tensor) else t, x)

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
            z0: starting state (default :meth:`initial_state`). If it requires grad it receives a gradient: zeros in
                every mode but ``"unrolled"`` (z* does not depend on z0; the other modes attach their gradient at
                z*), the unrolled derivative for ``"unrolled"``.
            solver_state: handed to the forward solver (see :func:`equilibrium`).
            **overrides: per-call options, e.g. ``tol=1e-6, max_iter=100``.

        Returns:
            z* with the state's structure, or ``(z*, info)`` with ``return_info=True``. ``self.last_info`` holds the
            info of the latest call; ``info.backward`` is filled when autograd runs this call's backward. With
            ``correction``: in training mode the list of supervised states (earliest first, the last is z*); in
            ``eval()`` mode z* alone, solved without recording the trajectory (as DEQ-Flow and TorchDEQ do).
        """
        options = self.implicit_options
        return_info = overrides.pop("return_info", options.return_info)
        check_flag("return_info", return_info)
        if not self.training:
            # Eval: z* alone, without the correction states, dropped before the overrides (which may lower max_iter
            # below a supervised step).
            options = options.without_correction  # built once per options object
            overrides.pop("correction", None)
        if overrides:
            options = resolve_options(options, overrides)
        if z0 is None:
            z0 = self.initial_state(x)
        with parametrizations_cached(self), implicit_call():
            z, info = solve_equilibrium(self.block_forward, x, z0, options, solver_state)
        self.__dict__["last_info"] = info  # a plain attribute (nn.Module's __setattr__ costs microseconds)
        return (z, info) if return_info else z

    def __reduce_ex__(self, protocol: Any) -> Any:
        """Pickling (``torch.save``, ``copy.deepcopy``). A class made by ``make_implicit(Class)`` is not reachable by
        its name (the module attribute is the original class), so its instances are rebuilt from the original class
        and the options; decorated classes and ``make_implicit(instance)`` pickle as usual."""
        cls = type(self)
        origin = cls.__dict__.get("_implicit_origin")
        if origin is None or _reachable(cls):
            return super().__reduce_ex__(protocol)
        return _new_instance, (origin, cls.__dict__["implicit_options"]), self.__getstate__()


class ImplicitModule(ImplicitMixin):
    """An implicit layer around an existing block instance (``make_implicit(block, ...)``).

    The block is held by reference (``self.block``): parameters are shared, not copied. ``state_dict()`` has exactly
    the block's keys and ``load_state_dict`` accepts the block's state dict.
    """

    def __init__(self, block: nn.Module, options: ImplicitOptions | None = None, **kwargs: Any) -> None:
        check_block(block.forward, type(block).__name__, owner_module=type(block).__module__)
        super().__init__()
        self.block = block
        self.implicit_options = resolve_options(options, kwargs)
        self.register_state_dict_post_hook(_drop_block_prefix)
        self.register_load_state_dict_pre_hook(self._add_block_prefix)
        self.register_load_state_dict_post_hook(self._report_block_keys)
        self._load_prefixes: list[str] = []

    def block_forward(self, z: State, x: Any) -> State:
        return self._block(z, x)

    @property
    def _block(self) -> nn.Module:
        """The block, read from ``_modules`` directly (``self.block`` goes through ``nn.Module.__getattr__``)."""
        return cast(nn.Module, self._modules["block"])

    def initial_state(self, x: Any) -> State:
        init = _initial_state_method(self._block)
        return init(x) if init is not None else super().initial_state(x)

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


def _initial_state_method(block: nn.Module) -> Callable[[Any], State] | None:
    """``block.initial_state`` if the block has one. Looked up on the class first: a failed ``getattr`` on a module
    goes through ``nn.Module.__getattr__`` and an exception, which costs more than the rest of a small layer call."""
    if getattr(type(block), "initial_state", None) is not None or "initial_state" in block.__dict__:
        return cast(Callable[[Any], State], block.initial_state)
    if type(block).__getattr__ is nn.Module.__getattr__:  # finds only parameters, buffers and submodules
        return None
    return getattr(block, "initial_state", None)  # a wrapper forwarding attributes (torch.compile, DDP)


def _drop_block_prefix(module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    inner = prefix + "block."
    for key in [k for k in state_dict if k.startswith(inner)]:
        state_dict[prefix + key[len(inner) :]] = state_dict.pop(key)
    metadata = getattr(state_dict, "_metadata", None)
    if metadata is not None:  # per-module version records, keyed by module prefix without the trailing dot
        for key in [k for k in metadata if k == inner[:-1] or k.startswith(inner)]:
            value = metadata.pop(key)
            metadata[(prefix + key[len(inner) :]) if key.startswith(inner) else prefix[:-1]] = value


# Classes made by make_implicit(Class, **options), per original class: equal options give the same class.
_IMPLICIT_CLASSES: dict[type, list[tuple[ImplicitOptions, type]]] = {}


def _implicit_class(cls: type[ModuleT], options: ImplicitOptions) -> type[ModuleT]:
    """A subclass of ``cls`` whose ``forward(x, z0=None, **overrides)`` solves for the equilibrium of
    ``cls.forward(self, z, x)``. Same parameters and ``state_dict`` keys as ``cls``."""
    made = _IMPLICIT_CLASSES.setdefault(cls, [])
    for known, implicit_cls in made:
        if known == options:
            return implicit_cls
    check_block(cls.forward, cls.__name__, bound=False, owner_module=cls.__module__)
    namespace = {
        "__module__": cls.__module__,
        "__qualname__": cls.__qualname__,
        "__doc__": cls.__doc__,
        "implicit_options": options,
        "block_forward": cls.forward,
        "_implicit_origin": cls,
    }
    if "initial_state" in dir(cls):
        namespace["initial_state"] = getattr(cls, "initial_state")  # noqa: B009 - not every block class has one
    implicit_cls = type(cls.__name__, (ImplicitMixin, cls), namespace)
    made.append((options, implicit_cls))
    return implicit_cls


def _reachable(cls: type) -> bool:
    """Whether pickle finds ``cls`` itself under its module and qualified name."""
    target: Any = sys.modules.get(cls.__module__)
    for part in cls.__qualname__.split("."):
        target = getattr(target, part, None)
    return target is cls


def _new_instance(origin: type[nn.Module], options: ImplicitOptions) -> nn.Module:
    """An empty instance of ``make_implicit(origin, **options)``'s class, for unpickling (the state comes next)."""
    cls = _implicit_class(origin, options)
    return cls.__new__(cls)


@overload
def make_implicit(target: type[ModuleT], /, **options: Any) -> type[ModuleT]: ...
@overload
def make_implicit(target: nn.Module, /, **options: Any) -> ImplicitModule: ...
@overload
def make_implicit(target: None = None, /, **options: Any) -> Callable[[Any], Any]: ...


def make_implicit(target: Any = None, /, **options: Any) -> Any:
    """Turn a weight-tied block ``f(z, x) -> z`` (see :class:`implicit.Block`) into an equilibrium layer ``x -> z*``
    with ``z* = f(z*, x)``.

    Three forms::

        @make_implicit(solver="anderson", tol=1e-4)      # class decorator: Block(...) builds the implicit layer
        class Block(nn.Module):
            def forward(self, z, x): ...

        deq = make_implicit(block, solver="broyden")     # an existing instance, parameters shared
        deq = make_implicit(Block)                       # a class, default options

    Options are listed in :class:`~implicit.options.ImplicitOptions`; unknown names raise ``TypeError``, a block
    whose ``forward`` does not take ``(z, x)`` raises ``TypeError`` naming the expected signature. The layer's
    ``forward(x, z0=None, **overrides)`` returns z* (same structure as the state). Every form pickles
    (``torch.save(model)``) and deep-copies.
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
