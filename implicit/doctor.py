"""The DEQ-readiness doctor: is a block ``f(z, x)`` a well-posed map with a reachable equilibrium?

``diagnose(block, x)`` runs, on a sample input:

* the function checks — f is deterministic within one DEQ call (dropout with one mask per call is fine, fresh
  masks per evaluation are not), does not couple the samples of a batch (BatchNorm in training mode does), leaves
  the module's buffers alone during solves (running statistics) and its arguments unmodified (lists overwritten in
  place), and returns the state's structure;
* per-example residual curves of plain iteration, Anderson and Broyden over a budget of f-evaluations: absolute
  residual ``a_k = ‖f(z_k) − z_k‖``, state norm ``n_k = ‖f(z_k)‖``, relative residual ``r_k = a_k / n_k``, and the
  absolute residual of every leaf of a structured state;
* the spectral radius of ∂f/∂z at the best point found (Arnoldi).

The verdict is ``"ready"`` (a solver reaches the tolerance for every example without drifting), ``"slow"``
(bounded, but not there within the budget), ``"diverges"`` (non-finite values, explosion, or *linear drift*: the step
``f(z) − z`` neither shrinks nor turns, so ‖z‖ grows linearly and the relative residual falls like 1/k — a small
relative residual alone is never evidence of convergence) or ``"not_a_function"`` (a function check failed). A
contraction slower than about 0.995 per evaluation cannot be told from drift within 60 evaluations: raise the budget.
``python -m implicit.doctor module:factory`` prints the report and exits 0 only for a ready block.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from .diagnostics import spectral_radius
from .dropout import implicit_call
from .factory import UsageError, add_factory_argument, fail, load_factory, make_example, takes_seed
from .module import ImplicitMixin
from .pytree import StateLayout, tree_map
from .solvers import SOLVERS, solve
from .types import State

VERDICTS = ("ready", "slow", "diverges", "not_a_function")
DEFAULT_SOLVERS = ("fixed_point", "anderson", "broyden")
PROG = "python -m implicit.doctor"
# Linear drift over the second half of the budget: the step ‖f(z) − z‖ at its end is still above this fraction of
# the one at its middle (not shrinking) ...
_STALLED = 0.8
# ... and the iterates' displacement is above this fraction of the path they walked (the steps point one way; at
# round-off the steps are noise and the displacement is a small part of the path) or ‖z‖ grows by more than this
# factor over the second half
_ALIGNED = 0.5
_GROWTH = 1.1
# ... and the relative residual is above this many units of round-off of the state's dtype (at an equilibrium the
# steps are round-off that need not shrink)
_ROUNDOFF = 64
# ‖z‖ growing this many times over the budget, or residuals this many times the first: an explosion
_EXPLOSION = 1e3


def _same_within(dtype: torch.dtype) -> float:
    """Two evaluations of f that should agree (the same point, or an example alone vs in its batch) may differ by
    this much (relative): the square root of the precision, which leaves room for kernels that differ by batch size
    (TF32, split reductions) and none for a fresh dropout mask or batch statistics (differences of order one)."""
    return torch.finfo(dtype).eps ** 0.5


@dataclass
class Check:
    """One function check."""

    name: str
    passed: bool | None  # None: not run (e.g. batch independence with a batch of one)
    detail: str


@dataclass
class Curves:
    """Per-evaluation residuals of one solver, ``(K, B)`` tensors (K evaluations, B examples), float64."""

    solver: str
    abs: Tensor
    norm: Tensor
    leaves: dict[str, Tensor] = field(default_factory=dict)
    displacement: Tensor | None = None  # (B,) ‖z_K − z_{K/2}‖: how far the iterates moved over the second half
    best: Any = None  # the state at the best evaluated point (per example), for the spectral radius
    eps: float = torch.finfo(torch.float64).eps  # the precision of the state's dtype

    @property
    def rel(self) -> Tensor:
        return self.abs / self.norm.clamp_min(torch.finfo(torch.float64).tiny)

    def calls_to(self, tol: float) -> Tensor:
        """``(B,)`` evaluations until the relative residual is ≤ tol (``inf`` where never)."""
        hit = self.rel <= tol
        first = torch.argmax(hit.to(torch.int64), dim=0).to(torch.float64) + 1
        return torch.where(hit.any(dim=0), first, math.inf)

    def growth(self) -> Tensor:
        """``(B,)`` state norm at the last evaluation over the norm at the middle of the budget."""
        k = self.norm.shape[0]
        return self.norm[-1] / self.norm[k // 2].clamp_min(torch.finfo(torch.float64).tiny)

    def slope(self) -> Tensor:
        """``(B,)`` least-squares slope of log r_k against log k over the second half of the budget (−1: drift-like
        1/k decay; steeper and curving down: convergence)."""
        k = self.rel.shape[0]
        steps = torch.arange(1, k + 1, dtype=torch.float64)[k // 2 :].log()
        r = self.rel[k // 2 :].clamp_min(1e-300).log()
        steps = steps - steps.mean()
        return (steps[:, None] * (r - r.mean(dim=0))).sum(dim=0) / steps.square().sum().clamp_min(1e-300)

    def stalled(self) -> Tensor:
        """``(B,)`` absolute residual at the last evaluation over the one at the middle of the budget."""
        k = self.abs.shape[0]
        return self.abs[-1] / self.abs[k // 2].clamp_min(torch.finfo(torch.float64).tiny)

    def alignment(self) -> Tensor:
        """``(B,)`` displacement of the iterates over the second half of the budget over the path they walked
        (the sum of the steps ``‖f(z_k) − z_k‖``): about 1 when every step points the same way."""
        if self.displacement is None:
            return torch.zeros(self.abs.shape[1], dtype=torch.float64)
        k = self.abs.shape[0]
        path = self.abs[k // 2 : k - 1].sum(dim=0)
        return self.displacement / path.clamp_min(torch.finfo(torch.float64).tiny)

    def drifting(self) -> Tensor:
        """``(B,)`` True where the iterates walk off: the step ``f(z) − z`` does not shrink and either keeps its
        direction or ‖z‖ keeps growing, so the relative residual falls like 1/k with no equilibrium near (however
        small it gets when ‖z‖ starts large)."""
        moving = self.rel[-1] > _ROUNDOFF * self.eps
        walking_off = (self.alignment() > _ALIGNED) | (self.growth() > _GROWTH)
        return moving & (self.stalled() > _STALLED) & walking_off

    def status(self, tol: float) -> str:
        """``"converges"``, ``"slow"``, ``"drift"``, ``"explodes"`` or ``"non-finite"`` (over all examples)."""
        if not (torch.isfinite(self.abs).all() and torch.isfinite(self.norm).all()):
            return "non-finite"
        if bool((self.norm[-1] > _EXPLOSION * self.norm[0].clamp_min(1e-300)).any()):
            return "explodes"
        if bool((self.abs[-1] > _EXPLOSION * self.abs[0].clamp_min(1e-300)).any()):
            return "explodes"
        if bool(self.drifting().any()):
            return "drift"
        return "converges" if bool(torch.isfinite(self.calls_to(tol)).all()) else "slow"


@dataclass
class DoctorReport:
    """What :func:`diagnose` found; ``verdict`` is one of :data:`VERDICTS`, ``reasons`` says why."""

    verdict: str
    reasons: list[str]
    checks: list[Check]
    curves: dict[str, Curves]
    spectral_radius: Tensor | None
    tol: float
    budget: int

    @property
    def ready(self) -> bool:
        return self.verdict == "ready"

    def table(self) -> str:
        """The report as text: the verdict and why, the function checks, the solvers' curves, the spectral radius."""
        lines = [f"DEQ readiness: {self.verdict}"] + [f"  - {reason}" for reason in self.reasons]
        lines.append("")
        lines += _columns(
            ("check", "result", "detail"),
            [(c.name, {True: "pass", False: "FAIL", None: "skip"}[c.passed], c.detail) for c in self.checks],
        )
        if self.curves:
            lines.append("")
            header = (
                "solver",
                "status",
                f"calls to rel. {self.tol:g}",
                "best rel. residual (worst example)",
                "last abs. residual (worst example)",
                "‖z‖ last/middle",
                "log-log slope of r",
            )
            rows = []
            for name, c in self.curves.items():
                calls = c.calls_to(self.tol)
                status = c.status(self.tol)
                if status in ("converges", "slow"):
                    reached = f"{int(calls.max())}" if bool(torch.isfinite(calls).all()) else "not all examples"
                else:
                    reached = "-"
                rows.append(
                    (
                        name,
                        status,
                        reached,
                        f"{float(c.rel.min(dim=0).values.max()):.2e}",
                        f"{float(c.abs[-1].max()):.2e}",
                        f"{float(c.growth().max()):.3f}",
                        f"{float(c.slope().mean()):.2f}" if status != "converges" else "-",
                    )
                )
            lines += _columns(header, rows)
            best = min(self.curves.values(), key=lambda c: float(c.rel[-1].max()))
            if len(best.leaves) > 1:
                lines.append("")
                lines.append(f"per leaf ({best.solver}, last evaluation):")
                lines += _columns(
                    ("leaf", "worst abs. residual"),
                    [(name, f"{float(a[-1].max()):.2e}") for name, a in best.leaves.items()],
                )
        if self.spectral_radius is not None:
            rho = self.spectral_radius
            lines.append("")
            rho_mean, rho_max = float(rho.mean()), float(rho.max())
            lines.append(f"spectral radius of ∂f/∂z at the best point: mean {rho_mean:.3f}, max {rho_max:.3f}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

    def plot(self, path: str) -> None:
        """Write the curves (relative and absolute residual, ‖z‖, per evaluation; every example a thin line, the
        median a thick one) to an image file (needs matplotlib: ``pip install torch-implicit[plot]``)."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError as error:  # pragma: no cover - depends on the environment
            raise ImportError("plotting needs matplotlib: pip install matplotlib (or torch-implicit[plot])") from error
        figure, axes = plt.subplots(1, 3, figsize=(15, 4.2), squeeze=False)
        for (title, key), axis in zip(
            (("relative residual r_k", "rel"), ("absolute residual a_k", "abs"), ("state norm ‖f(z_k)‖", "norm")),
            axes[0],
        ):
            for index, curves in enumerate(self.curves.values()):
                raw = getattr(curves, key)
                values = torch.where(raw > 0, raw, math.nan)  # exact zeros have no place on a log axis
                steps = range(1, values.shape[0] + 1)
                color = f"C{index}"
                axis.plot(steps, values.numpy(), color=color, alpha=0.25, linewidth=0.7)
                axis.plot(steps, values.nanmedian(dim=1).values.numpy(), color=color, label=curves.solver)
            axis.set_yscale("log")
            axis.set_xlabel("f-evaluations")
            axis.set_title(title)
        axes[0][0].axhline(self.tol, color="k", linestyle=":", linewidth=0.8)
        axes[0][0].legend()
        figure.suptitle(f"DEQ readiness: {self.verdict}")
        figure.tight_layout()
        figure.savefig(path, dpi=110)
        plt.close(figure)


def _columns(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(str(row[i])) for row in (header, *rows)) for i in range(len(header))]
    return ["  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip() for row in (header, *rows)]


# ------------------------------------------------------------------------------------------------------ checks
def _clone(tree: Any) -> Any:
    return tree_map(lambda t: t.detach().clone() if isinstance(t, Tensor) else t, tree)


def _identical(a: Any, b: Any) -> bool:
    """The same containers holding equal tensors (``a`` snapshotted before, ``b`` after a call)."""
    if isinstance(a, Tensor):
        return isinstance(b, Tensor) and a.shape == b.shape and bool(torch.equal(a, b))
    if isinstance(a, (list, tuple)):
        return isinstance(b, type(a)) and len(a) == len(b) and all(_identical(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_identical(a[k], b[k]) for k in a)
    return True


def _difference(a: Tensor, b: Tensor) -> float:
    """Relative difference of two evaluations (non-finite values count as equal where both have them)."""
    same = (a == b) | (a.isnan() & b.isnan())
    scale = float(torch.linalg.vector_norm(torch.where(b.isfinite(), b, 0.0))) or 1.0
    return float(torch.linalg.vector_norm(torch.where(same, 0.0, a - b))) / scale


def _function_checks(f: Callable[[State, Any], State], x: Any, layout: StateLayout) -> list[Check]:
    """The checks that need a few evaluations of f, all inside one DEQ call (one set of dropout masks)."""
    with implicit_call():
        return _checks_in_one_call(f, x, layout)


def _checks_in_one_call(f: Callable[[State, Any], State], x: Any, layout: StateLayout) -> list[Check]:
    checks: list[Check] = []
    same = _same_within(layout.dtype)
    generator = torch.Generator().manual_seed(0)
    flat = torch.randn(layout.flat_shape, generator=generator, dtype=torch.float64).to(layout.device, layout.dtype)
    z = layout.unflatten(flat)
    try:
        first = layout.flatten(f(z, x), what="the block's output")
        second = layout.flatten(f(z, x), what="the block's output")
    except ValueError as error:
        return [Check("output structure", False, str(error))]
    checks.append(Check("output structure", True, f"{len(layout.shapes)} leaf/leaves {layout.shapes}"))
    difference = _difference(first, second)
    checks.append(
        Check(
            "deterministic in a DEQ call",
            difference <= same,
            f"two evaluations at the same point differ by {difference:.1e} (relative)"
            + ("" if difference <= same else ": fresh random draws per evaluation (dropout without fixed masks?)"),
        )
    )
    batch = layout.batch
    if batch < 2:
        checks.append(Check("samples independent", None, "a batch of one: not checked"))
    elif difference > same:
        checks.append(Check("samples independent", None, "not checked: f is not deterministic"))
    else:
        # keep one example, redraw the others: its output must not move
        worst = 0.0
        rows = torch.arange(batch, device=layout.device)[:, None]
        for index in (0, batch - 1):
            others = torch.randn(layout.flat_shape, generator=generator, dtype=torch.float64)
            mixed = torch.where(rows == index, flat, others.to(layout.device, layout.dtype))
            moved = layout.flatten(f(layout.unflatten(mixed), x), what="the block's output")
            worst = max(worst, _difference(moved[index], first[index]))
        checks.append(
            Check(
                "samples independent",
                worst <= same,
                f"an example's output moves by {worst:.1e} (relative) when the other examples change"
                + ("" if worst <= same else ": f couples the samples (BatchNorm in training mode?)"),
            )
        )
    before_x, before_z = _clone(x), _clone(z)
    f(z, x)
    untouched = _identical(before_x, x) and _identical(before_z, z)
    checks.append(
        Check(
            "arguments unchanged",
            untouched,
            "f leaves z and x as they were" if untouched else "f modified its arguments in place",
        )
    )
    return checks


# ------------------------------------------------------------------------------------------------------ curves
def _curves(fn: Callable[[Tensor], Tensor], z0: Tensor, layout: StateLayout, solver: str, budget: int) -> Curves:
    absolute: list[Tensor] = []
    norms: list[Tensor] = []
    leaves: dict[str, list[Tensor]] = {name: [] for name in layout.names}
    best = [math.inf] * layout.batch
    best_z = z0.clone()
    visited: dict[str, Tensor] = {}  # the points evaluated at the middle of the budget and last

    def recording(z: Tensor) -> Tensor:
        visited["middle" if len(absolute) == budget // 2 else "last"] = z.detach().clone()
        fz = fn(z)
        g = (fz - z).double()
        a, n = torch.linalg.vector_norm(g, dim=1), torch.linalg.vector_norm(fz.double(), dim=1)
        absolute.append(a)
        norms.append(n)
        for name, part in zip(layout.names, g.split(layout.sizes, dim=1)):
            leaves[name].append(torch.linalg.vector_norm(part, dim=1))
        r = (a / n.clamp_min(torch.finfo(torch.float64).tiny)).tolist()
        for b, value in enumerate(r):
            if value < best[b]:  # NaN never beats
                best[b] = value
                best_z[b] = z[b]
        return fz

    solve(recording, z0, solver=solver, tol=0.0, max_iter=budget - 1, check_every=budget)
    if len(absolute) != budget:
        raise RuntimeError(f"diagnose: {solver} evaluated f {len(absolute)} times for a budget of {budget}")
    displacement = torch.linalg.vector_norm((visited["last"] - visited["middle"]).double(), dim=1)
    stack = torch.stack
    return Curves(
        solver,
        stack(absolute).cpu(),
        stack(norms).cpu(),
        {name: stack(values).cpu() for name, values in leaves.items()},
        displacement.cpu(),
        best_z,
        torch.finfo(layout.dtype).eps,
    )


def _verdict(checks: list[Check], curves: dict[str, Curves], tol: float) -> tuple[str, list[str]]:
    failed = [c for c in checks if c.passed is False]
    reasons = [f"{c.name}: {c.detail}" for c in failed]
    statuses = {name: c.status(tol) for name, c in curves.items()}
    ready = [name for name, status in statuses.items() if status == "converges"]
    for name, c in curves.items():
        status = statuses[name]
        if status == "converges":
            reasons.append(f"{name} reaches rel. {tol:g} for every example within {int(c.calls_to(tol).max())} calls")
        elif status == "drift":
            reasons.append(
                f"{name}: the step ‖f(z) − z‖ does not shrink ({float(c.stalled().max()):.2f}× its value at the "
                f"middle of the budget) while ‖z‖ grows ×{float(c.growth().max()):.2f} over the second half "
                f"(displacement {float(c.alignment().max()):.2f}× the path walked) and the relative residual falls "
                f"with log-log slope {float(c.slope().mean()):.2f}: linear drift, not convergence"
            )
        elif status == "explodes":
            reasons.append(f"{name}: ‖z‖ or the residual grows more than {_EXPLOSION:g}× over the budget")
        elif status == "non-finite":
            reasons.append(f"{name}: non-finite values")
        else:
            reasons.append(
                f"{name}: bounded, but the worst example's best rel. residual in {c.rel.shape[0]} calls is "
                f"{float(c.rel.min(dim=0).values.max()):.1e} (tolerance {tol:g})"
            )
    if failed:
        return "not_a_function", reasons
    if ready:
        return "ready", reasons
    if any(status in ("drift", "explodes", "non-finite") for status in statuses.values()):
        return "diverges", reasons
    return "slow", reasons


def diagnose(
    block: nn.Module,
    x: Any,
    z0: State | None = None,
    *,
    solvers: Sequence[str] = DEFAULT_SOLVERS,
    budget: int = 60,
    tol: float = 1e-4,
    train: bool = True,
) -> DoctorReport:
    """Diagnose the block ``f(z, x)`` (or an implicit layer's block) on the sample ``x``.

    Args:
        block: an ``nn.Module`` with ``forward(z, x)`` (see :class:`implicit.Block`) or an implicit layer.
        x: a sample injection, with a batch of at least two examples for the independence check.
        z0: the start (default: the block's ``initial_state(x)``, else zeros shaped like x).
        solvers: the forward solvers whose curves are recorded.
        budget: f-evaluations per solver.
        tol: the relative residual a ready block reaches for every example within the budget.
        train: run f in training mode (as training does; dropout and BatchNorm behave as they will there); the
            module's mode is restored afterwards.

    Returns:
        A :class:`DoctorReport` (``.verdict``, ``.reasons``, ``.table()``, ``.plot(path)``).
    """
    if budget < 4:
        raise ValueError(f"diagnose: budget must be at least 4 f-evaluations, got {budget}")
    for name in solvers:
        SOLVERS.lookup(name, option="solvers")
    if isinstance(block, ImplicitMixin):
        f: Callable[[State, Any], State] = block.block_forward
        initial = block.initial_state
    else:
        f = block
        init = getattr(block, "initial_state", None)
        initial = init if callable(init) else partial(tree_map, torch.zeros_like)
    x = _clone(x)  # f may modify its arguments (a check reports it); the caller's tensors stay as they were
    start = initial(x) if z0 is None else z0
    layout = StateLayout(start)
    mode = block.training
    block.train(train)
    buffers = {name: b.detach().clone() for name, b in block.named_buffers()}
    try:
        with torch.no_grad():
            checks = _function_checks(f, x, layout)
            curves: dict[str, Curves] = {}
            if checks[0].passed:

                def fn(z: Tensor) -> Tensor:
                    return layout.flatten(f(layout.unflatten(z), x), what="the block's output")

                for name in solvers:
                    with implicit_call():  # one DEQ call per solve: one set of dropout masks
                        curves[name] = _curves(fn, layout.flatten(start), layout, name, budget)
        changed = [name for name, b in block.named_buffers() if name in buffers and not torch.equal(buffers[name], b)]
        checks.append(
            Check(
                "buffers unchanged",
                not changed,
                "no buffer changed during the solves"
                if not changed
                else f"changed during the solves: {', '.join(changed[:4])}{' …' if len(changed) > 4 else ''} "
                "(running statistics of a norm inside f?)",
            )
        )
        verdict, reasons = _verdict(checks, curves, tol)
        rho = None
        if curves and verdict != "not_a_function":
            best = min(curves.values(), key=lambda c: float(c.rel.min(dim=0).values.max()))
            if torch.isfinite(best.best).all():
                with implicit_call():
                    rho = spectral_radius(f, x, layout.unflatten(best.best), iters=20).double().cpu()
    finally:
        block.train(mode)
        with torch.no_grad():  # what the checks changed (the report says so), as it was
            for name, b in block.named_buffers():
                if name in buffers:
                    b.copy_(buffers[name])
    return DoctorReport(verdict, reasons, checks, curves, rho, tol, budget)


# ------------------------------------------------------------------------------------------------------ command line
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Is a block f(z, x) ready to be a DEQ? Runs the function checks, records the residual curves "
        "of each solver and names the verdict. Exit status 0: ready; 1: slow, diverges or not a function; 2: usage "
        "error.",
    )
    add_factory_argument(parser, "(block, x) or (block, x, z0)")
    parser.add_argument("--budget", type=int, default=60, help="f-evaluations per solver (60)")
    parser.add_argument("--tol", type=float, default=1e-4, help="relative residual a ready block reaches (1e-4)")
    parser.add_argument("--solvers", default=",".join(DEFAULT_SOLVERS), help="comma-separated forward solvers")
    parser.add_argument("--eval", action="store_true", help="run f in evaluation mode (default: training mode)")
    parser.add_argument("--plot", metavar="PATH", help="write the residual and ‖z‖ curves to an image (matplotlib)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1; 0 keeps torch's)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.threads:
            torch.set_num_threads(args.threads)
        factory = load_factory(args.factory)
        block, x, z0 = make_example(factory, 0, takes_seed(factory), args.factory)
        solvers = [s.strip() for s in args.solvers.split(",") if s.strip()]
        try:
            report = diagnose(block, x, z0, solvers=solvers, budget=args.budget, tol=args.tol, train=not args.eval)
        except (ValueError, TypeError) as error:
            fail(str(error))
    except UsageError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    print(report.table())
    if args.plot:
        report.plot(args.plot)
        print(f"\nwrote {args.plot}")
    return 0 if report.ready else 1


if __name__ == "__main__":
    sys.exit(main())
