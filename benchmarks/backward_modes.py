"""Backward modes: cost and gradient quality of every backward mode against the exact implicit gradient.

Usage::

    python -m benchmarks.backward_modes [--quick] [--repeats 7] [--only tanh,conv] [--write]

For each problem and each backward configuration (exact implicit differentiation with every backward solver and two
tolerances, phantom gradients, one-step, SHINE from good and adjoint Broyden, SHINE with OPA, SHINE refinement from
three initial estimates) one table row gives

* the cost: forward f-evaluations and VJPs (adjoint Broyden spends one VJP per step), f-evaluations recorded by
  autograd in the forward pass (``info.tracked_nfe``), backward VJPs (``info.backward_vjps``: beyond the one
  backpropagation through the tracked computation that every mode does), bytes autograd keeps for the backward, and
  the median wall time of the forward (grad mode) and of the backward (``torch.autograd.grad`` of the loss w.r.t. the
  parameters) over interleaved rounds, one thread;
* the quality: per-sample cosine (min / mean) and relative error of the adjoint ``u ≈ v (I − J)⁻¹`` and the relative
  error of the parameter gradient, against a float64 GMRES solve of ``u (I − J) = v`` to rel. 1e-12 at the very
  point the mode's forward returned (so the forward tolerance does not enter the comparison).

Problems: tanh layers ``f(z, x) = tanh(z Wᵀ + x Uᵀ + b)`` with ‖W‖₂ = 0.9 (``sym 0.9, xs 0.1``, ``gauss 0.9, xs 1``,
``orth 0.9, xs 0.1``; B=8, N=64, float64, forward good Broyden memory 30 to rel. 1e-10) and the MDEQ-style conv
residual block of ``benchmarks/solver_overhead.py`` (32×16×16, B=8, float32, forward Broyden memory 30 to rel. 1e-4;
backward tol 1e-6 only, 1e-10 is below float32 round-off). Loss ``½‖z* − y‖²`` with a random target y, so ``v = z* −
y``. For the tanh layers the per-sample adjoint is read exactly from the gradient of the pre-activation injection ``xe
= x Uᵀ + b`` (``∂ℓ/∂xe = u ⊙ (1 − f²)``); for the conv block the per-sample quality is that of ``∂ℓ/∂x`` (``x`` enters
inside a GroupNorm, so ``∂ℓ/∂x_b = u_b ∂f/∂x_b``, linear in the sample's adjoint).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime as _dt
import gc
import math
import os
import platform
import shlex
import sys
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import implicit

from .solver_overhead import (
    Timing,
    count_vjps,
    cpu_name,
    fmt,
    gc_paused,
    make_tol_problem,
    ratio,
    replace_block,
    source_state,
    table,
)

RESULTS_PATH = Path(__file__).with_name("RESULTS.md")
SECTION_TITLE = "## Backward modes and training features (CPU)"
BEGIN_MARK = "<!-- BEGIN GENERATED (python -m benchmarks.backward_modes --write) -->"
END_MARK = "<!-- END GENERATED (benchmarks.backward_modes) -->"

TANH_PROBLEMS = ("tanh-sym-0.9-0.1", "tanh-gauss-0.9-1", "tanh-orth-0.9-0.1")
REFERENCE_TOL = 1e-12
OPA_PRESOLVE_TOL = 1e-3  # the OPA direction ∂ℓ/∂z* comes from a cheap first solve to this rel. tolerance


# --------------------------------------------------------------------------------------------------- helpers
class _Saved:
    """What the pack hook stores: a detached alias (no grad_fn, so no reference cycle through a saved output)."""

    __slots__ = ("__weakref__", "nbytes", "ptr", "tensor")

    def __init__(self, t: Tensor) -> None:
        self.tensor = t.detach()
        storage = t.untyped_storage()
        self.ptr, self.nbytes = storage.data_ptr(), storage.nbytes()


class SavedTensors:
    """Records the tensors autograd saves for backward while active (``saved_tensors_hooks``); :meth:`alive_mb`
    gives the distinct storages still held by a graph afterwards, parameters excluded — the activation memory the
    backward needs (a transient graph, e.g. adjoint Broyden's per-step one, is not counted once freed)."""

    def __init__(self) -> None:
        self.refs: list[weakref.ref[_Saved]] = []

    def _pack(self, t: Tensor) -> _Saved:
        saved = _Saved(t)
        self.refs.append(weakref.ref(saved))
        return saved

    @contextlib.contextmanager
    def recording(self) -> Iterator[SavedTensors]:
        with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda saved: saved.tensor):
            yield self

    def alive_mb(self, exclude: list[Tensor]) -> float:
        skip = {p.untyped_storage().data_ptr() for p in exclude}
        storages: dict[int, int] = {}
        for ref in self.refs:
            saved = ref()
            if saved is not None and saved.ptr not in skip:
                storages[saved.ptr] = saved.nbytes
        return sum(storages.values()) / 2**20


def cosines(a: Tensor, b: Tensor) -> Tensor:
    """Per-row cosine of ``(B, N)`` tensors."""
    norm = torch.linalg.vector_norm
    return (a * b).sum(1) / (norm(a, dim=1) * norm(b, dim=1))


def rel_error(a: Tensor | list[Tensor], b: Tensor | list[Tensor]) -> float:
    if isinstance(a, list):
        a = torch.cat([t.detach().double().reshape(-1) for t in a])
        b = torch.cat([t.detach().double().reshape(-1) for t in b])
    return (torch.linalg.vector_norm(a.double() - b.double()) / torch.linalg.vector_norm(b.double())).item()


def environment_lines(prog: str, argv: list[str], extra: str) -> list[str]:
    return [
        f"- date (UTC): {_dt.datetime.now(_dt.timezone.utc).strftime('%Y-%m-%d %H:%M')}",
        f"- CPU: {cpu_name()}, {os.cpu_count()} logical cores; torch threads: {torch.get_num_threads()}",
        f"- torch {torch.__version__}, Python {platform.python_version()}; torch-implicit {implicit.__version__}, "
        f"{source_state()}",
        f"- command: `{shlex.join(['python', '-m', prog, *argv])}`",
        f"- {extra}",
    ]


def write_section(text: str, begin: str, end: str, path: Path = RESULTS_PATH) -> None:
    """Replace this section's generated block in ``path`` (appended under :data:`SECTION_TITLE` when missing)."""
    replace_block(text, begin, end, path, heading=SECTION_TITLE)


def load_note() -> str:
    return f"load average (1 min) {os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else ""


# --------------------------------------------------------------------------------------------------- problems
@dataclass
class Case:
    """One benchmark problem: a block ``f(z, inj)`` whose injection ``inj`` is built from the raw input ``x`` (for the
    tanh layers ``inj = x Uᵀ + b``, so its gradient reveals the adjoint), a target ``y`` and the forward options."""

    key: str
    label: str
    kind: str  # "tanh" or "conv"
    block: nn.Module
    x: Tensor
    y: Tensor
    forward: dict[str, Any]
    backward_tols: tuple[float, ...]

    @property
    def params(self) -> list[Tensor]:
        return list(self.block.parameters())

    @property
    def z0(self) -> Tensor:
        return torch.zeros_like(self.y)

    def inject(self, block: nn.Module, x: Tensor) -> Tensor:
        """The injection passed to the equilibrium; its gradient is the per-sample probe."""
        if self.kind == "tanh":
            return F.linear(x, block.inj, block.bias)
        return x.detach().requires_grad_()

    def f(self, block: nn.Module) -> Callable[[Tensor, Tensor], Tensor]:
        if self.kind == "tanh":
            return lambda z, inj: torch.tanh(F.linear(z, block.weight) + inj)
        return block

    def probe_adjoint(self, block: nn.Module, z: Tensor, inj: Tensor, grad_inj: Tensor) -> Tensor:
        """Per-sample quantity compared with the reference: the adjoint u for tanh (``∂ℓ/∂xe / (1 − f²)``), the input
        gradient ``∂ℓ/∂x`` for the conv block. Flat ``(B, N)``, float64."""
        b = z.shape[0]
        if self.kind == "tanh":
            with torch.no_grad():
                s = 1 - self.f(block)(z.double(), inj.detach().double()) ** 2
            return (grad_inj.double() / s).reshape(b, -1)
        return grad_inj.double().reshape(b, -1)


def make_case(key: str, seed: int) -> Case:
    cpu = torch.device("cpu")
    if key.startswith("tanh"):
        _, kind, s, xs = key.split("-")
        base = make_tol_problem(f"tanh-{'gauss' if kind == 'orth' else kind}-{s}-{xs}", seed, cpu)
        block = base.block.double()
        if kind == "orth":  # s × a random orthogonal matrix: spectrum on a circle
            g = torch.Generator().manual_seed(2000 + seed)
            q, _ = torch.linalg.qr(torch.randn(64, 64, generator=g, dtype=torch.float64))
            with torch.no_grad():
                block.weight.copy_(float(s) * q)
        x = base.x.double()
        g = torch.Generator().manual_seed(3000 + seed)
        y = torch.randn(x.shape, generator=g, dtype=torch.float64)
        forward = {"solver": "broyden", "solver_options": {"memory": 30}, "tol": 1e-10, "max_iter": 200}
        label = f"tanh {kind} {s}, xs={xs}"
        return Case(key, label, "tanh", block, x, y, forward, (1e-6, 1e-10))
    base = make_tol_problem("conv", seed, cpu)
    g = torch.Generator().manual_seed(3000 + seed)
    y = torch.randn(base.x.shape, generator=g)
    forward = {"solver": "broyden", "solver_options": {"memory": 30}, "tol": 1e-4, "max_iter": 100}
    return Case("conv", "conv block 32×16×16 (float32)", "conv", base.block, base.x, y, forward, (1e-6,))


# --------------------------------------------------------------------------------------------------- configurations
@dataclass
class Config:
    group: str  # "implicit", "phantom", "one_step", "shine", "shine refine"
    label: str
    options: dict[str, Any]
    opa: bool = False  # compute an OPA direction from a first solve and pass it as solver_state


def configs(case: Case) -> list[Config]:
    out: list[Config] = []
    solvers = (
        ("fixed_point", "fixed_point", {}),
        ("anderson", "anderson m5", {}),
        ("broyden", "broyden m30", {"memory": 30}),
        ("gmres", "gmres(10)", {"restart": 10}),
        ("gmres", "gmres(20)", {"restart": 20}),
    )
    for tol in case.backward_tols:
        for solver, label, opts in solvers:
            options = {
                "backward": "implicit",
                "backward_solver": solver,
                "backward_solver_options": opts,
                "backward_tol": tol,
                "backward_max_iter": 500,
            }
            out.append(Config("implicit", f"{label}, tol {tol:g}", options))
    for variant, steps, tau in (("unrolled", 5, 0.5), ("neumann", 5, 0.5), ("unrolled", 1, 1.0)):
        name = "UPG" if variant == "unrolled" else "NPG"
        options = {"backward": "phantom", "backward_options": {"steps": steps, "tau": tau, "variant": variant}}
        out.append(Config("phantom", f"{name} k={steps} τ={tau:g}", options))
    out.append(Config("one_step", "one-step (JFB)", {"backward": "one_step"}))
    adjoint = {"solver": "adjoint_broyden", "solver_options": {"memory": 30}}
    opa = {"solver": "adjoint_broyden", "solver_options": {"memory": 30, "opa_every": 5}}
    for label, options, use_opa in (
        ("good Broyden m30, fallback jfb", {}, False),
        ("good Broyden m30, no fallback", {"backward_options": {"fallback": "none"}}, False),
        ("adjoint Broyden m30, fallback jfb", adjoint, False),
        ("adjoint Broyden m30, no fallback", {**adjoint, "backward_options": {"fallback": "none"}}, False),
        ("adjoint Broyden m30 + OPA every 5, fallback jfb", opa, True),
        ("adjoint Broyden m30 + OPA every 5, no fallback", {**opa, "backward_options": {"fallback": "none"}}, True),
    ):
        out.append(Config("shine", label, {"backward": "shine", **options}, use_opa))
    memories = (30, 300) if case.kind == "tanh" else (30,)  # the conv forward stops before 30 steps: same rows
    for memory in memories:
        if memory != 30:  # no restart within the solve: SHINE's estimates with unlimited memory
            for label, solver in (("good Broyden", "broyden"), ("adjoint Broyden", "adjoint_broyden")):
                options = {"backward": "shine", "backward_options": {"fallback": "none"}, "solver": solver}
                options["solver_options"] = {"memory": memory}
                out.append(Config("shine", f"{label} m{memory}, no fallback", options))
            options = {"backward": "shine", "backward_options": {"fallback": "none"}, **opa}
            options["solver_options"] = {"memory": memory, "opa_every": 5}
            out.append(Config("shine", f"adjoint Broyden m{memory} + OPA every 5, no fallback", options, True))
        for tol in case.backward_tols:
            for estimate, label in (("transpose", "Hᵀ"), ("forward", "H"), ("identity", "−I")):
                options = {
                    "backward": "shine",
                    # u0 = u_SHINE for every sample (no fallback), as in SHINE's refine variant
                    "backward_options": {"refine": 300, "refine_estimate": estimate, "fallback": "none"},
                    "backward_tol": tol,
                    "solver_options": {"memory": memory},
                }
                out.append(Config("shine refine", f"good Broyden m{memory}, refine from {label}, tol {tol:g}", options))
    return out


# --------------------------------------------------------------------------------------------------- measurement
@dataclass
class Row:
    case: str
    group: str
    label: str
    fwd_nfe: int = 0
    presolve_nfe: int = 0
    fwd_vjps: int = 0
    tracked: int = 0
    bwd_vjps: int = 0
    bwd_vjps_sample: float = math.nan
    bwd_res: float = math.nan
    bwd_converged: str = ""
    fallback: str = ""
    cos_min: float = math.nan
    cos_mean: float = math.nan
    adj_err: float = math.nan
    grad_err: float = math.nan
    saved_mb: float = math.nan
    fwd_ms: Timing = field(default_factory=Timing)
    bwd_ms: Timing = field(default_factory=Timing)

    @property
    def fwd(self) -> float:
        return self.fwd_ms.median

    @property
    def bwd(self) -> float:
        return self.bwd_ms.median


class Runner:
    """Forward (grad mode) and backward of one configuration on one case."""

    def __init__(self, case: Case, config: Config) -> None:
        self.case, self.config = case, config
        self.options = {**case.forward, **config.options, "on_divergence": "ignore", "return_info": True}
        self.presolve_nfe = 0

    def opa_state(self, inj: Tensor) -> dict[str, Tensor]:
        """``∂ℓ/∂z*`` from a first, cheap solve (Broyden to rel. OPA_PRESOLVE_TOL)."""
        case = self.case
        f = case.f(case.block)
        b = case.y.shape[0]
        inj = inj.detach()
        with torch.no_grad():
            res = implicit.solve(
                lambda z: f(z.view(case.y.shape), inj).reshape(b, -1),
                case.z0.reshape(b, -1),
                solver="broyden",
                solver_options={"memory": 30},
                tol=OPA_PRESOLVE_TOL,
                max_iter=100,
            )
        self.presolve_nfe = res.nfe
        return {"opa_direction": res.z - case.y.reshape(b, -1)}

    def forward(self) -> tuple[Tensor, Any, Tensor, Tensor]:
        case = self.case
        inj = case.inject(case.block, case.x)
        state = self.opa_state(inj) if self.config.opa else None
        opts = {k: v for k, v in self.options.items() if k != "return_info"}
        z, info = implicit.equilibrium(case.f(case.block), inj, case.z0, solver_state=state, **opts)
        loss = 0.5 * (z - case.y).pow(2).sum()
        return loss, info, inj, z

    def backward(self, loss: Tensor, inj: Tensor) -> list[Tensor]:
        return list(torch.autograd.grad(loss, [*self.case.params, inj]))


@dataclass
class Reference:
    probe: Tensor  # (B, N) per-sample adjoint (tanh) or input gradient (conv), float64
    grads: list[Tensor]  # parameter gradients, float64
    residual: float


def reference_at(case: Case, z: Tensor) -> Reference:
    """Exact gradients at the point ``z``: float64 GMRES on ``u = v + u J`` to rel. REFERENCE_TOL (``v = z − y``)."""
    block = copy.deepcopy(case.block).double()
    f = case.f(block)
    b = z.shape[0]
    shape = z.shape
    with torch.enable_grad():
        inj = case.inject(block, case.x.double())
        zz = z.detach().double().requires_grad_()
        fz = f(zz, inj)
        v = (zz.detach() - case.y.double()).reshape(b, -1)

        def affine(u: Tensor) -> Tensor:
            (vjp,) = torch.autograd.grad(fz, zz, u.view(shape), retain_graph=True)
            return v + vjp.reshape(b, -1)

        restart = min(v.shape[1], 60)
        res = implicit.solve(
            affine,
            v,
            solver="gmres",
            solver_options={"restart": restart},
            tol=REFERENCE_TOL,
            max_iter=2000,
            state={"offset": v},
        )
        u = res.z
        grads = torch.autograd.grad(fz, [*block.parameters(), inj], u.view(shape))
    probe = case.probe_adjoint(block, zz.detach(), inj, grads[-1])
    return Reference(probe, [g.detach() for g in grads[:-1]], res.rel.max().item())


def measure(case: Case, cfgs: list[Config], repeats: int, warmup: int) -> list[Row]:
    runners = [Runner(case, c) for c in cfgs]
    rows = [Row(case.label, c.group, c.label) for c in cfgs]
    references: dict[bytes, Reference] = {}
    worst_reference = 0.0
    for runner, row in zip(runners, rows):  # untimed pass: counts and quality
        saved = SavedTensors()
        with count_vjps() as fwd_vjps, saved.recording():
            loss, info, inj, z = runner.forward()
        row.saved_mb = saved.alive_mb(case.params)
        with count_vjps() as bwd_vjps:
            grads = runner.backward(loss, inj)
        row.fwd_nfe = info.forward.nfe
        row.presolve_nfe = runner.presolve_nfe
        row.fwd_vjps = fwd_vjps[0]
        row.tracked = info.tracked_nfe
        row.bwd_vjps = info.backward_vjps
        if bwd_vjps[0] - 1 != info.backward_vjps:
            print(
                f"note: {case.label} / {row.label}: {bwd_vjps[0] - 1} autograd.grad calls in backward, "
                f"info.backward_vjps = {info.backward_vjps}",
                file=sys.stderr,
            )
        if info.backward is not None:
            row.bwd_vjps_sample = info.backward.nstep.float().mean().item()
            row.bwd_res = info.backward.rel.max().item()
            row.bwd_converged = f"{int(info.backward.converged.sum())}/{info.backward.converged.numel()}"
        flagged = info.extras.get("shine_fallback")
        if flagged is not None:
            row.fallback = f"{int(flagged.sum())}/{flagged.numel()}"
        key = z.detach().double().numpy().tobytes()
        if key not in references:
            references[key] = reference_at(case, z)
        ref = references[key]
        worst_reference = max(worst_reference, ref.residual)
        probe = case.probe_adjoint(case.block, z.detach(), inj, grads[-1])
        cos = cosines(probe, ref.probe)
        row.cos_min, row.cos_mean = cos.min().item(), cos.mean().item()
        row.adj_err = rel_error(probe, ref.probe)
        row.grad_err = rel_error(grads[:-1], ref.grads)
        del loss, info, inj, z, grads
    if worst_reference > 1e-9:
        print(f"note: {case.label}: reference GMRES residual {worst_reference:.1e}", file=sys.stderr)
    with gc_paused():
        pairs = list(zip(runners, rows))
        for r in range(warmup + repeats):
            shift = r % len(pairs)  # rotate the order: no case is always first after the collection below
            for runner, row in pairs[shift:] + pairs[:shift]:
                t0 = time.perf_counter()
                loss, _, inj, _ = runner.forward()
                t1 = time.perf_counter()
                runner.backward(loss, inj)
                t2 = time.perf_counter()
                if r >= warmup:
                    row.fwd_ms.samples.append((t1 - t0) * 1e3)
                    row.bwd_ms.samples.append((t2 - t1) * 1e3)
                del loss, inj
            gc.collect()
    return rows


# --------------------------------------------------------------------------------------------------- output
def rows_markdown(rows: list[Row]) -> str:
    header = [
        "mode",
        "configuration",
        "fwd NFE (+VJPs)",
        "tracked f-evals",
        "bwd VJPs batch (per sample)",
        "bwd max rel. res. (conv.)",
        "SHINE fallback",
        "adjoint cos min / mean",
        "adjoint rel. err",
        "∂θ rel. err",
        "saved MB",
        "ms fwd",
        "ms bwd",
    ]
    body = []
    for r in rows:
        nfe = str(r.fwd_nfe) + (f" (+{r.presolve_nfe} pre-solve)" if r.presolve_nfe else "")
        if r.fwd_vjps:
            nfe += f" +{r.fwd_vjps} VJPs"
        vjps = str(r.bwd_vjps) + (f" ({r.bwd_vjps_sample:.1f})" if not math.isnan(r.bwd_vjps_sample) else "")
        res = "—" if math.isnan(r.bwd_res) else f"{fmt(r.bwd_res)} ({r.bwd_converged})"
        body.append(
            [
                r.group,
                r.label,
                nfe,
                str(r.tracked),
                vjps,
                res,
                r.fallback or "—",
                f"{r.cos_min:.4f} / {r.cos_mean:.4f}",
                fmt(r.adj_err),
                fmt(r.grad_err),
                f"{r.saved_mb:.2f}",
                fmt(r.fwd),
                fmt(r.bwd),
            ]
        )
    return table(header, body)


def find(rows: list[Row], label: str) -> Row | None:
    return next((r for r in rows if r.label == label), None)


APPROXIMATE = (
    "UPG k=5 τ=0.5",
    "NPG k=5 τ=0.5",
    "one-step (JFB)",
    "good Broyden m30, fallback jfb",
    "adjoint Broyden m30 + OPA every 5, fallback jfb",
)


def speedup_markdown(results: dict[str, list[Row]]) -> str:
    """Approximate modes against exact implicit differentiation at backward tol 1e-6: the ratios the papers quote."""
    header = [
        "problem",
        "mode",
        "ms bwd",
        "bwd speed-up vs exact (anderson m5)",
        "vs fastest exact",
        "fwd + bwd speed-up vs exact (anderson m5)",
        "bwd VJPs (+1 tracked) vs exact",
        "adjoint cos min",
    ]
    body = []
    for case, rows in results.items():
        exact = [r for r in rows if r.group == "implicit" and r.label.endswith("tol 1e-06")]
        anderson = find(rows, "anderson m5, tol 1e-06")
        if not exact or anderson is None:
            continue
        best = min(exact, key=lambda r: r.bwd)
        body.append(
            [
                case,
                f"exact: anderson m5 (fastest: {best.label.split(',')[0]})",
                f"{fmt(anderson.bwd)} ({fmt(best.bwd)})",
                "1×",
                "—",
                "1×",
                f"{anderson.bwd_vjps} + 1",
                f"{anderson.cos_min:.4f}",
            ]
        )
        for label in APPROXIMATE:
            r = find(rows, label)
            if r is None:
                continue
            body.append(
                [
                    case,
                    label,
                    fmt(r.bwd),
                    ratio(anderson.bwd / r.bwd),
                    ratio(best.bwd / r.bwd),
                    ratio((anderson.fwd + anderson.bwd) / (r.fwd + r.bwd)),
                    f"{r.bwd_vjps} + 1 vs {anderson.bwd_vjps} + 1",
                    f"{r.cos_min:.4f}",
                ]
            )
    return table(header, body)


def refine_markdown(results: dict[str, list[Row]]) -> str:
    """SHINE refinement: backward VJPs from the three initial inverse estimates."""
    header = ["problem", "forward memory", "tol", "Hᵀ", "H", "−I", "−I / Hᵀ", "H / Hᵀ"]
    body = []
    for case, rows in results.items():
        for memory in (30, 300):
            for tol in ("1e-06", "1e-10"):
                got = [find(rows, f"good Broyden m{memory}, refine from {e}, tol {tol}") for e in ("Hᵀ", "H", "−I")]
                if not all(got):
                    continue
                t, h, i = got
                body.append(
                    [
                        case,
                        str(memory),
                        tol,
                        *(f"{r.bwd_vjps_sample:.1f} ({r.bwd_vjps})" for r in got),
                        ratio(i.bwd_vjps_sample / t.bwd_vjps_sample),
                        ratio(h.bwd_vjps_sample / t.bwd_vjps_sample),
                    ]
                )
    return table(header, body)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.backward_modes", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 timed rounds after 1 warm-up (smoke test)")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default 7, --quick 2)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up rounds (default 2, --quick 1)")
    parser.add_argument("--seed", type=int, default=0, help="problem instance (B=8 samples)")
    parser.add_argument("--only", default="tanh,conv", help="comma-separated subset of tanh,conv")
    parser.add_argument("--write", action="store_true", help=f"replace this script's section of {RESULTS_PATH.name}")
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.repeats = args.repeats or (2 if args.quick else 7)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    sections = {s.strip() for s in args.only.split(",") if s.strip()}
    started = time.perf_counter()
    load_before = load_note()
    extra = (
        f"timing: {args.repeats} interleaved rounds after {args.warmup} warm-up rounds, median; seed {args.seed}; "
        f"{load_before} at start"
    )
    out = ["### Backward modes: environment", "", *environment_lines("benchmarks.backward_modes", args.argv, extra), ""]

    def emit(text: str) -> None:
        print(text, flush=True)
        out.append(text)

    print("\n".join(out), flush=True)
    keys = [k for k in TANH_PROBLEMS if "tanh" in sections] + (["conv"] if "conv" in sections else [])
    results: dict[str, list[Row]] = {}
    for key in keys:
        case = make_case(key, args.seed)
        fwd = case.forward
        emit(
            f"### Backward modes: {case.label} (B=8; forward {fwd['solver']} memory 30 to rel. {fwd['tol']:g} unless "
            "the row says adjoint Broyden)\n"
        )
        rows = measure(case, configs(case), args.repeats, args.warmup)
        results[case.label] = rows
        emit(rows_markdown(rows) + "\n")
    emit("**Approximate modes against exact implicit differentiation** (backward tol 1e-6; medians):\n")
    emit(speedup_markdown(results) + "\n")
    emit("**SHINE refinement: backward VJPs per sample, mean (batch), from each initial inverse estimate**\n")
    emit(refine_markdown(results) + "\n")
    emit(
        "\nColumns: *fwd NFE* — f-evaluations of the forward solve (OPA rows: plus the first solve that gives the "
        "direction ∂ℓ/∂z*, to rel. 1e-3), *+VJPs* — VJPs spent in the forward (adjoint Broyden: one per step, one "
        "per OPA update); *tracked f-evals* — `info.tracked_nfe`; *bwd VJPs* — `info.backward_vjps` (batched calls; "
        "per sample: `info.backward.nstep` mean), on top of the one backpropagation through the tracked computation "
        "every mode does; *bwd max rel. res.* — the backward solve's residual and converged samples; *SHINE "
        "fallback* — samples whose SHINE estimate failed the 1.8 ratio test; *adjoint* — per-sample comparison with "
        "the float64 GMRES reference at the same z* (tanh: the adjoint u itself; conv: ∂ℓ/∂x); *∂θ rel. err* — "
        "parameter gradient; *saved MB* — distinct tensors autograd keeps for the backward after the forward "
        "(parameters excluded); *ms* — median wall time, one thread.\n"
    )
    elapsed = time.perf_counter() - started
    emit(f"Run time {elapsed:.0f} s; {load_before} at start, {load_note()} at end.")
    if args.write:
        write_section("\n".join(out), BEGIN_MARK, END_MARK)
        print(f"\nwrote {RESULTS_PATH}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
