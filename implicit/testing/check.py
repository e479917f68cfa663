"""Check the gradients of a user's DEQ against references: long unrolling, finite differences, gradcheck.

The check runs on a copy of the layer cast to float64 (the user's module is untouched) with the forward and backward
tolerances tightened to ``check_tol`` and the forward budget raised, so that what remains is the implementation's
error — except the backward *budget*, which is kept: a backward solve that cannot converge in the configured budget
shows up as a gradient error, as it would in training.
"""

from __future__ import annotations

import copy
import inspect
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .. import pytree
from ..dropout import implicit_call
from ..graph import graph_leaves
from ..module import ImplicitMixin, make_implicit
from ..options import ImplicitOptions
from ..pytree import StateLayout
from ..solvers import solve

REFERENCES = ("unrolled", "finite_differences", "gradcheck")
# A gradient counts as zero when its norm is below this many machine epsilons (or solve tolerances, when larger) of
# the largest gradient checked.
_ROUNDOFF = 1e3
# What a tensor that requires grad but receives none is told, by whether the block's output changes with it.
NO_GRADIENT = "requires grad but receives no gradient; the block's output changes with it"
NOT_USED = "requires grad, receives no gradient, and the block's output does not change with it"


@dataclass
class Check:
    """One comparison: the gradient of one tensor against one reference."""

    tensor: str
    kind: str  # "parameter", "input" or "closure"
    reference: str
    metric: str
    value: float
    tolerance: float
    status: str  # "pass", "FAIL", "skip" or "not used"
    worst: str = ""

    @property
    def failed(self) -> bool:
        return self.status == "FAIL"


@dataclass
class GradientReport:
    """Everything :func:`check_gradients` measured; ``passed`` is False when any check failed."""

    description: str
    approximate: bool
    reason: str
    checks: list[Check] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return not any(check.failed for check in self.checks)

    @property
    def failures(self) -> list[Check]:
        return [check for check in self.checks if check.failed]

    def table(self) -> str:
        """The report as a fixed-width table (what :func:`assert_gradients` raises with)."""
        verdict = "passed" if self.passed else f"FAILED ({len(self.failures)} of {len(self.checks)} checks)"
        lines = [f"DEQ gradient check: {self.description} — {verdict} in {self.seconds:.1f} s"]
        if self.approximate:
            lines.append(f"approximate mode: {self.reason}")
        header = ("tensor", "kind", "reference", "metric", "value", "tolerance", "status", "worst entry")
        rows = [header] + [
            (c.tensor, c.kind, c.reference, c.metric, _fmt(c.value, c.failed), _fmt(c.tolerance), c.status, c.worst)
            for c in self.checks
        ]
        widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
        for row in rows:
            lines.append(("  ".join(cell.ljust(w) for cell, w in zip(row[:-1], widths)) + "  " + row[-1]).rstrip())
        lines.extend(self.notes)
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _fmt(value: float, failed: bool = False) -> str:
    """A number for the table: ``-`` for the NaN of a skipped check, ``nan`` for a measured NaN (a failure)."""
    if math.isnan(value):
        return "nan" if failed else "-"
    return f"{value:.2e}"


# ------------------------------------------------------------------------------------------------------ preparation
def _is_approximate(options: ImplicitOptions) -> tuple[bool, str]:
    """Whether the configured backward mode is approximate by design, and why (what the mode declares)."""
    reason = options.backward_mode.approximation
    return (False, "") if reason is None else (True, reason + "; compared by cosine")


class FunctionBlock(nn.Module):
    """A plain function ``f(z, x) -> z`` as a block (what :func:`check_gradients` wraps a function target in). The
    function is held, not copied: the tensors it closes over are the caller's."""

    def __init__(self, fn: Callable[[Any, Any], Any]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, z: Any, x: Any) -> Any:
        return self.fn(z, x)


def _prepare_layer(target: Any, dtype: torch.dtype | None, options: dict[str, Any]) -> ImplicitMixin:
    if isinstance(target, ImplicitMixin):
        layer = copy.deepcopy(target)
        if options:
            layer.configure(**options)
    elif isinstance(target, nn.Module):
        layer = make_implicit(copy.deepcopy(target), **options)
    elif inspect.isfunction(target):
        layer = make_implicit(FunctionBlock(target), **options)
    else:
        raise TypeError(
            "check_gradients takes an implicit layer, a block nn.Module or a function f(z, x), got "
            f"{type(target).__name__}"
        )
    if dtype is not None:
        layer.to(dtype)
    return layer


def _cast(tree: Any, dtype: torch.dtype | None, requires_grad: bool) -> Any:
    def cast(t: Any) -> Any:
        if not isinstance(t, Tensor) or not t.is_floating_point():
            return t
        t = t.detach().to(dtype) if dtype is not None else t.detach().clone()
        return t.requires_grad_(requires_grad)

    return pytree.tree_map(cast, tree)


def _leaves(tree: Any, prefix: str) -> list[tuple[str, Tensor]]:
    paths, _ = pytree.tree_flatten_with_path(tree)
    return [(prefix + pytree.keystr(path), leaf) for path, leaf in paths if isinstance(leaf, Tensor)]


# The attributes every nn.Module has (parameter, buffer, submodule and hook tables): not the user's tensors.
_MODULE_INTERNALS = frozenset(vars(nn.Module()))


def _functions(module: nn.Module) -> Iterator[Callable[..., Any]]:
    """The Python functions a module runs that can hold tensors: its ``forward`` (for the globals it names) and the
    functions held as its attributes (e.g. a :class:`FunctionBlock`'s)."""
    forward = vars(module).get("forward", getattr(type(module), "forward", None))
    if inspect.isfunction(forward) and forward is not nn.Module.forward:
        yield forward
    for value in vars(module).values():
        if inspect.isfunction(value) and value is not forward:
            yield value


def _function_tensors(fn: Callable[..., Any]) -> Iterator[tuple[str, Any]]:
    """``(name, value)`` of what a function holds: its closure cells, argument defaults and the globals it names."""
    code = fn.__code__
    for name, cell in zip(code.co_freevars, fn.__closure__ or ()):
        try:
            yield name, cell.cell_contents
        except ValueError:  # an empty cell (a variable not assigned yet)
            continue
    defaults = fn.__defaults__ or ()
    positional = code.co_varnames[: code.co_argcount]
    yield from zip(positional[len(positional) - len(defaults) :], defaults)
    yield from (fn.__kwdefaults__ or {}).items()
    for name in code.co_names:
        if name in fn.__globals__:
            yield name, fn.__globals__[name]


def held_tensors(layer: nn.Module) -> dict[int, tuple[str, Tensor]]:
    """The tensors a block holds besides its parameters, by ``id``: ``(name, tensor)``.

    Found: plain module attributes and buffers (named by their path in the layer, e.g. ``block.scale``, with the
    index of a tensor inside a list / tuple / dict attribute), and the closure cells, argument defaults and named
    globals of the functions the block runs — its modules' ``forward`` and functions held as attributes, such as a
    function block (named ``closure NAME``). Tensors reached only through other calls are not found here; those
    that reach the autograd graph are still checked, as ``closure (shape) #i``.
    """
    held: dict[int, tuple[str, Tensor]] = {}

    def add(name: str, value: Any) -> None:
        if not isinstance(value, (Tensor, list, tuple, dict)):
            return
        for path, leaf in _leaves(value, name):
            held.setdefault(id(leaf), (path, leaf))

    for prefix, module in layer.named_modules():
        dot = prefix + "." if prefix else ""
        for name, value in vars(module).items():
            if name not in _MODULE_INTERNALS:
                add(dot + name, value)
        for name, buffer in module.named_buffers(recurse=False):
            add(dot + name, buffer)
        for fn in _functions(module):
            for name, value in _function_tensors(fn):
                add(f"closure {name}", value)
    return held


# ------------------------------------------------------------------------------------------------------ the check
def check_gradients(
    target: nn.Module | Callable[[Any, Any], Any],
    x: Any,
    *,
    z0: Any = None,
    references: Sequence[str] = REFERENCES,
    rtol: float = 1e-6,
    min_cosine: float = 0.5,
    fd_eps: float = 1e-5,
    fd_directions: int | None = None,
    check_tol: float | None = None,
    check_max_iter: int = 2000,
    dtype: torch.dtype | None = torch.float64,
    train: bool | None = None,
    seed: int = 0,
    **options: Any,
) -> GradientReport:
    """Compare the gradients of an implicit layer (or of ``make_implicit(block, **options)``) with references.

    Checked: every parameter that requires grad, every floating-point leaf of the injection ``x`` and every other
    leaf tensor requiring grad that the block reaches (closed-over tensors), for the loss ``ℓ = Σ c ⊙ z*`` with a
    random cotangent c. A leaf tensor requiring grad that the block holds (a module attribute, a closure cell of a
    function block; see :func:`held_tensors`) but that never reaches the autograd graph — the block detaches it or
    does not use it — is listed too, whatever the references: status ``FAIL`` (:data:`NO_GRADIENT`) when central
    differences of the block's output at z* along random directions change with it, ``not used`` when they do not.

    Args:
        target: an implicit layer (``make_implicit`` result or decorated class instance), a plain block module or a
            function ``f(z, x)``; ``options`` configure the copy (e.g. ``backward="phantom"``).
        x, z0: the injection and (optional) initial state of the example.
        references: any of ``"unrolled"`` (autograd through plain iteration run until its residual is at round-off;
            skipped when plain iteration does not converge), ``"finite_differences"`` (central differences of ℓ
            along random directions) and ``"gradcheck"`` (``torch.autograd.gradcheck`` in fast mode on z*; not for
            closed-over tensors).
        rtol: relative error allowed for exact modes (``"implicit"``, ``"unrolled"``).
        min_cosine: cosine with the reference required of approximate modes (phantom, one-step, SHINE), whose
            gradient differs from the exact one by design.
        fd_eps, fd_directions: finite-difference step and number of random directions per tensor (default 1 for
            exact modes, 8 for approximate ones, whose projected gradients are compared by cosine).
        check_tol, check_max_iter: forward/backward tolerance (default 1e-13 in float64, 1e-5 otherwise) and forward
            budget of the checked copy.
        dtype: the copy's dtype (``None`` keeps the module's own; closed-over tensors are never cast).
        train: check in train (True) or eval (False) mode; default: the layer's current mode.
        seed: seeds the cotangent and the directions.
    """
    started = time.perf_counter()
    unknown = [r for r in references if r not in REFERENCES]
    if unknown:
        raise ValueError(f"unknown reference(s) {unknown}; valid: {', '.join(REFERENCES)}")
    layer = _prepare_layer(target, dtype, options)
    if train is not None:
        layer.train(train)
    user = layer.implicit_options
    approximate, reason = _is_approximate(user)
    if check_tol is None:
        check_dtype = dtype or next((p.dtype for p in layer.parameters()), torch.get_default_dtype())
        check_tol = 1e-13 if check_dtype == torch.float64 else 1e-5
    layer.implicit_options = user.replace(
        tol=check_tol,
        max_iter=max(user.max_iter, check_max_iter),
        backward_tol=min(user.backward_tol, check_tol),
        correction=None,
        jac_loss_probes=0,
        return_info=False,
        nonfinite_input="ignore",
        on_divergence="ignore",
    )
    generator = torch.Generator().manual_seed(seed)
    x = _cast(x, dtype, requires_grad=True)
    z_start = layer.initial_state(x) if z0 is None else z0
    z_start = _cast(z_start, dtype, requires_grad=False)
    layout = StateLayout(z_start)
    cotangent = torch.randn(layout.flat_shape, generator=generator, dtype=layout.dtype).to(layout.device)

    def loss(z: Any) -> Tensor:
        return (layout.flatten(z) * cotangent).sum()

    held = held_tensors(layer)
    targets = _targets(layer, x, z_start, held)
    z, info = layer(x, z0=z_start, return_info=True)
    raw = torch.autograd.grad(loss(z), [t for _, _, t in targets], allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for (_, _, t), g in zip(targets, raw)]

    description = (
        f"backward={user.backward!r} ({'approximate' if approximate else 'exact'}), solver={user.solver!r}, "
        f"{layout.dtype}, {'train' if layer.training else 'eval'} mode"
    )
    report = GradientReport(description=description, approximate=approximate, reason=reason)
    report.notes.append(f"forward solve: {info.forward.status}, {info.forward.nfe} f-evaluations")
    if info.backward is not None:
        report.notes.append(f"backward solve: {info.backward.status}, {info.backward_vjps} VJPs")

    def forward_loss() -> Tensor:
        with torch.no_grad():
            return loss(layer(x, z0=z_start))

    for reference in references:
        if reference == "unrolled":
            report.checks += _against_unrolled(layer, x, z_start, loss, targets, grads, approximate, rtol, min_cosine)
        elif reference == "finite_differences":
            directions = fd_directions or (8 if approximate else 1)
            report.checks += _against_differences(
                forward_loss, targets, grads, approximate, rtol, min_cosine, fd_eps, directions, generator
            )
        else:
            report.checks += _against_gradcheck(layer, x, z_start, layout, targets, approximate, rtol)
    known = {id(t) for _, _, t in targets}
    unreached = [
        (name, t)
        for key, (name, t) in held.items()
        if key not in known and t.requires_grad and t.is_leaf and t.is_floating_point()
    ]
    if unreached:
        z_star = pytree.tree_map(lambda t: t.detach() if isinstance(t, Tensor) else t, z)
        report.checks += _without_gradient(layer, x, z_star, unreached, fd_eps, fd_directions or 2, generator, seed)
    report.seconds = time.perf_counter() - started
    return report


def assert_gradients(target: nn.Module | Callable[[Any, Any], Any], x: Any, **kwargs: Any) -> GradientReport:
    """:func:`check_gradients`, raising ``AssertionError`` with the report's table when a check fails."""
    report = check_gradients(target, x, **kwargs)
    if not report.passed:
        raise AssertionError("\n" + report.table())
    return report


def _targets(
    layer: ImplicitMixin, x: Any, z_start: Any, held: dict[int, tuple[str, Tensor]]
) -> list[tuple[str, str, Tensor]]:
    """``(name, kind, tensor)`` for parameters, injection leaves and closed-over leaves (named as ``held`` names them,
    else ``closure (shape) #i``)."""
    params = [(name, "parameter", p) for name, p in layer.named_parameters() if p.requires_grad]
    inputs = [(name, "input", t) for name, t in _leaves(x, "x") if t.requires_grad]
    known = {id(t) for _, _, t in params + inputs}
    with torch.enable_grad():
        probe = StateLayout(z_start).flatten(layer.block_forward(z_start, x))
    named: list[tuple[str, str, Tensor]] = []
    for t in graph_leaves(probe):
        if id(t) in known:
            continue
        name = held[id(t)][0] if id(t) in held else f"closure {tuple(t.shape)} #{len(named)}"
        named.append((name, "closure", t))
    return params + inputs + named


def _compare(
    got: Tensor, expected: Tensor, approximate: bool, rtol: float, min_cosine: float, zero: float = 0.0
) -> tuple[str, float, float, bool]:
    """(metric, value, tolerance, passed) of ``got`` against ``expected``. Both at most ``zero`` in norm: a gradient
    that is zero up to round-off on both sides (e.g. an attention key bias, which softmax ignores), where a relative
    error or a cosine would compare noise with noise."""
    got, expected = got.detach().flatten().double(), expected.detach().flatten().double()
    largest = max(float(torch.linalg.vector_norm(got)), float(torch.linalg.vector_norm(expected)))
    if largest <= zero:
        return "zero (norm)", largest, zero, True
    if approximate:
        denom = torch.linalg.vector_norm(got) * torch.linalg.vector_norm(expected)
        if float(denom) == 0.0:
            same = float(torch.linalg.vector_norm(got - expected)) == 0.0
            return "cosine", 1.0 if same else 0.0, min_cosine, same
        cosine = float(torch.dot(got, expected) / denom)
        return "cosine", cosine, min_cosine, cosine >= min_cosine
    scale = float(torch.linalg.vector_norm(expected))
    error = float(torch.linalg.vector_norm(got - expected))
    value = error / scale if scale > 0 else (0.0 if error == 0 else math.inf)
    return "rel. error", value, rtol, value <= rtol


def _worst(got: Tensor, expected: Tensor) -> str:
    difference = (got.detach() - expected.detach()).abs()
    if difference.numel() == 0:
        return ""
    index = tuple(int(i) for i in torch.unravel_index(difference.argmax(), difference.shape))
    return f"{list(index)}: {float(got[index]):.6g} vs {float(expected[index]):.6g}"


def _against_unrolled(
    layer: ImplicitMixin,
    x: Any,
    z_start: Any,
    loss: Callable[[Any], Tensor],
    targets: list[tuple[str, str, Tensor]],
    grads: list[Tensor],
    approximate: bool,
    rtol: float,
    min_cosine: float,
) -> list[Check]:
    options = layer.implicit_options
    layout = StateLayout(z_start)
    with torch.no_grad():
        fn = lambda z: layout.flatten(layer.block_forward(layout.unflatten(z), x))  # noqa: E731
        probe = solve(fn, layout.flatten(z_start), solver="fixed_point", tol=options.tol, max_iter=options.max_iter)
    if not bool(probe.converged.all()):
        return [
            Check(name, kind, "unrolled", "-", math.nan, math.nan, "skip", "plain iteration does not converge")
            for name, kind, _ in targets
        ]
    steps = 2 * probe.nfe + 10
    reference = copy.copy(layer)  # shares parameters with the checked copy
    reference.implicit_options = options.replace(
        backward="unrolled", backward_options={}, solver="fixed_point", solver_options={}, tol=0.0, max_iter=steps
    )
    raw = torch.autograd.grad(loss(reference(x, z0=z_start)), [t for _, _, t in targets], allow_unused=True)
    expected = [torch.zeros_like(t) if e is None else e for (_, _, t), e in zip(targets, raw)]
    largest = max((float(torch.linalg.vector_norm(e.double())) for e in expected), default=0.0)
    checks = []
    for (name, kind, t), got, exp in zip(targets, grads, expected):
        # A tensor below float64 (a float32 closure in a float64 check) carries its own rounding: 1e-4 at least.
        bound = rtol if t.dtype == torch.float64 else max(rtol, 1e-4)
        # Zero up to what the check can resolve: round-off, or the solves' tolerance (amplified by the conditioning).
        zero = _ROUNDOFF * max(float(torch.finfo(t.dtype).eps), options.tol) * largest
        metric, value, tolerance, passed = _compare(got, exp, approximate, bound, min_cosine, zero)
        status = "pass" if passed else "FAIL"
        checks.append(
            Check(name, kind, "unrolled", metric, value, tolerance, status, "" if passed else _worst(got, exp))
        )
    return checks


def _against_differences(
    forward_loss: Callable[[], Tensor],
    targets: list[tuple[str, str, Tensor]],
    grads: list[Tensor],
    approximate: bool,
    rtol: float,
    min_cosine: float,
    eps: float,
    directions: int,
    generator: torch.Generator,
) -> list[Check]:
    measured = []
    for (_, _, t), got in zip(targets, grads):
        original = t.detach().clone()
        # A tensor below float64 (e.g. a float32 closure in a float64 check) gets a larger step and a looser bound.
        step = float(torch.finfo(t.dtype).eps) ** (1 / 3) if t.dtype != torch.float64 else eps
        analytic, numeric, spread = [], [], []
        # Exact modes also difference with twice the step: |D(h) − D(2h)| estimates the differences' own error
        # (truncation, and the solves' tolerance divided by the step), which the comparison then allows.
        steps = (step,) if approximate else (step, 2 * step)
        try:
            for _ in range(directions):
                d = torch.randn(t.shape, generator=generator, dtype=torch.float64).to(t.device, t.dtype)
                d = d / torch.linalg.vector_norm(d)
                differences = []
                for h in steps:
                    values = []
                    for sign in (1.0, -1.0):
                        with torch.no_grad():
                            t.copy_(original + sign * h * d)
                        values.append(float(forward_loss()))
                    differences.append((values[0] - values[1]) / (2 * h))
                numeric.append(differences[0])
                spread.append(abs(differences[0] - differences[-1]))
                analytic.append(float((got * d).sum()))
        finally:
            with torch.no_grad():
                t.copy_(original)  # nothing the user passed in stays modified
        measured.append(
            (
                torch.tensor(analytic, dtype=torch.float64),
                torch.tensor(numeric, dtype=torch.float64),
                max(spread, default=0.0),
            )
        )
    # A directional derivative that is zero on both sides is compared with the differences' own noise: a millionth
    # of the largest finite difference measured.
    largest = max((float(n.abs().max()) for _, n, _ in measured if n.numel()), default=0.0)
    checks = []
    for (name, kind, t), got, (a, n, estimate) in zip(targets, grads, measured):
        low_precision = t.dtype != torch.float64
        bound = 1e-2 if low_precision else max(rtol, 1e-7)
        zero = 1e-6 * largest
        if max(float(a.abs().max()), float(n.abs().max())) <= zero:
            metric, value, tolerance, passed = "zero (max)", max(float(a.abs().max()), float(n.abs().max())), zero, True
        elif approximate:
            metric, value, tolerance, passed = _compare(a, n, True, rtol, min_cosine)
        else:
            # Relative to the directional derivative (at least 1 % of the gradient's norm), within rtol plus twice
            # the differences' estimated error — never more than 1e-2, which no wrong gradient meets.
            scale = max(float(n.abs().max()), float(torch.linalg.vector_norm(got)) * 1e-2, 1e-300)
            value = float((a - n).abs().max()) / scale
            tolerance = min(bound + 2 * estimate / scale, 1e-2)
            metric, passed = "dir. rel. error", value <= tolerance
        worst = "" if passed else f"directional derivative {float(a[0]):.6g} vs finite difference {float(n[0]):.6g}"
        checks.append(
            Check(name, kind, "finite_differences", metric, value, tolerance, "pass" if passed else "FAIL", worst)
        )
    return checks


def _against_gradcheck(
    layer: ImplicitMixin,
    x: Any,
    z_start: Any,
    layout: StateLayout,
    targets: list[tuple[str, str, Tensor]],
    approximate: bool,
    rtol: float,
) -> list[Check]:
    checks = []
    params = dict(layer.named_parameters())
    for name, kind, t in targets:
        if approximate or kind == "closure":
            why = "approximate mode" if approximate else "closed-over tensors cannot be passed as inputs"
            checks.append(Check(name, kind, "gradcheck", "-", math.nan, math.nan, "skip", why))
            continue

        def output(value: Tensor, name: str = name, kind: str = kind, original: Tensor = t) -> Tensor:
            if kind == "parameter":
                z = torch.func.functional_call(layer, {**params, name: value}, (x,), {"z0": z_start})
            else:
                z = layer(pytree.tree_map(lambda leaf: value if leaf is original else leaf, x), z0=z_start)
            return layout.flatten(z)

        ok = torch.autograd.gradcheck(
            output,
            (t.detach().clone().requires_grad_(),),
            eps=1e-6,
            atol=1e-8,
            rtol=max(rtol, 1e-5),
            fast_mode=True,
            raise_exception=False,
        )
        checks.append(Check(name, kind, "gradcheck", "fast mode", math.nan, max(rtol, 1e-5), "pass" if ok else "FAIL"))
    return checks


def _without_gradient(
    layer: ImplicitMixin,
    x: Any,
    z_star: Any,
    tensors: list[tuple[str, Tensor]],
    eps: float,
    directions: int,
    generator: torch.Generator,
    seed: int,
) -> list[Check]:
    """Rows for leaf tensors that require grad and are held by the block but are not in its autograd graph: central
    differences of the block's output ``f(z*, x)`` along ``directions`` random unit directions of each tensor. An
    output that changes by more than round-off (relative to ``‖f(z*, x)‖``, over the step) fails with
    :data:`NO_GRADIENT`; one that does not is ``not used``. Every evaluation replays the same random stream, so
    dropout in the block does not count as a change."""
    layout = StateLayout(z_star)
    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []

    def output() -> Tensor:
        with torch.no_grad(), torch.random.fork_rng(devices=cuda), implicit_call():
            torch.manual_seed(seed)
            return layout.flatten(layer.block_forward(z_star, x))

    base = output()
    noise = _ROUNDOFF * float(torch.finfo(base.dtype).eps) * float(torch.linalg.vector_norm(base.double()))
    checks = []
    for name, t in tensors:
        original = t.detach().clone()
        step = float(torch.finfo(t.dtype).eps) ** (1 / 3) if t.dtype != torch.float64 else eps
        change = 0.0
        try:
            for _ in range(directions):
                d = torch.randn(t.shape, generator=generator, dtype=torch.float64).to(t.device, t.dtype)
                d = d / torch.linalg.vector_norm(d)
                values = []
                for sign in (1.0, -1.0):
                    with torch.no_grad():
                        t.copy_(original + sign * step * d)
                    values.append(output().double())
                difference = float(torch.linalg.vector_norm(values[0] - values[1])) / (2 * step)
                change = difference if math.isnan(difference) else max(change, difference)
        finally:
            with torch.no_grad():
                t.copy_(original)  # nothing the user passed in stays modified
        tolerance = noise / step
        changes = not change <= tolerance  # NaN: changes
        checks.append(
            Check(
                name,
                "closure",
                "finite_differences",
                "output change",
                change,
                tolerance,
                "FAIL" if changes else "not used",
                NO_GRADIENT if changes else NOT_USED,
            )
        )
    return checks
