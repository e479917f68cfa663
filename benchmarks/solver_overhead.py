"""Solver overhead, NFE / time to tolerance and backward cost, side by side with TorchDEQ 0.1.0.

Usage::

    python -m benchmarks.solver_overhead [--quick] [--device cpu|cuda] [--threads 1] [--repeats 7] [--write]

Three tables (markdown on stdout; ``--write`` also replaces the generated section of ``benchmarks/RESULTS.md``):

1. Overhead: time per f-evaluation of a solve forced to run ``--iters`` (200) iterations (``tol=0``), as a multiple
   of the bare eager loop ``for _ in range(K): z = f(z, x)``. P1 and P2 have a nearly free f: a 64×256 state,
   ``f = z @ R + x`` with ‖R‖₂ = 0.5, and an 8×32×32×32 state, a pairwise channel rotation scaled by 0.5 (5
   element-wise ops). P3 is MDEQ's conv block on a 16×64×56×56 state (``--conv-iters`` iterations: 10 on the CPU).
   torch-implicit through :func:`implicit.solve` (flat map) and :func:`implicit.equilibrium` (block ``f(z, x)``,
   state layout included); TorchDEQ through its solver functions and through ``get_deq`` (evaluation mode).
2. NFE and wall time to rel. tol 1e-4 (B=8): tanh layers ``tanh(z Wᵀ + x Uᵀ + b)`` and a conv residual block.
3. Backward: one forward + backward with exact implicit differentiation against TorchDEQ's IFT, with VJP counts and
   the gradient error against a dense float64 solve.

With ``--only execution`` (not part of the default run, which is the generated section): table 4, the execution
modes (eager, ``torch.compile``d and, on CUDA, CUDA-graph) of a fixed-budget solve beside the bare loop in each mode.

All timings: interleaved rounds (every case once per round, so load changes hit all cases alike), warm-up rounds
first, median (and min) over ``--repeats`` rounds; float32; ``torch.set_num_threads(--threads)``; autograd off
except in table 3. Ratios are per f-evaluation, so solvers that evaluate f once more or less than K times compare
fairly (each row's f-evaluation count is measured with a counting wrapper in a separate, untimed run).
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
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import implicit

RESULTS_PATH = Path(__file__).with_name("RESULTS.md")
BEGIN_MARK = "<!-- BEGIN GENERATED (python -m benchmarks.solver_overhead --write) -->"
END_MARK = "<!-- END GENERATED -->"

Block = Callable[[Tensor, Tensor], Tensor]
Runner = Callable[[], Any]

OURS = "torch-implicit"
PEER = "TorchDEQ 0.1.0"
# Targets: overhead per f-evaluation of the adaptive eager solve as a multiple of the bare eager loop. On the CPU for
# the small states P1 and P2; on a GPU (where a kernel launch costs more than these f) 2× on P1 and P2; on the conv
# block P3 (where f dominates) on every device.
OVERHEAD_TARGETS = {"fixed_point": 1.5, "anderson": 3.0, "broyden": 5.0}
GPU_SMALL_TARGETS = {"fixed_point": 2.0, "anderson": 2.0, "broyden": 2.0}
CONV_TARGETS = {"fixed_point": 1.1, "anderson": 1.3, "broyden": 1.6}


def overhead_targets(key: str, device: torch.device) -> dict[str, float]:
    """The overhead targets of problem ``key`` ("P1", "P2", "P3") on ``device``, per solver."""
    if key == "P3":
        return CONV_TARGETS
    return GPU_SMALL_TARGETS if device.type == "cuda" else OVERHEAD_TARGETS


ANDERSON_M = 5
BROYDEN_MEMORY = 10


# --------------------------------------------------------------------------------------------------- TorchDEQ
def load_torchdeq() -> tuple[Any, str]:
    """``(torchdeq module or None, version or reason it is unavailable)``."""
    try:
        import torchdeq
        import torchdeq.solver
    except Exception as exc:  # any import failure means "not installed" for the report
        return None, f"not installed ({type(exc).__name__}: {exc})"
    try:
        from importlib.metadata import version

        return torchdeq, version("torchdeq")
    except Exception:
        return torchdeq, getattr(torchdeq, "__version__", "unknown version")


# TorchDEQ names and the options that make its solvers comparable to ours.
PEER_SOLVERS = {
    "fixed_point": ("fixed_point_iter", {}),
    "anderson": ("anderson", {"m": ANDERSON_M}),
    "broyden": ("broyden", {"LBFGS_thres": BROYDEN_MEMORY}),
}
OUR_OPTIONS = {"fixed_point": {}, "anderson": {"m": ANDERSON_M}, "broyden": {"memory": BROYDEN_MEMORY}}


# --------------------------------------------------------------------------------------------------- timing
class Counter:
    """Wraps a block and counts its calls (used only in untimed runs)."""

    def __init__(self, fn: Callable[..., Tensor]) -> None:
        self.fn, self.calls = fn, 0

    def __call__(self, *args: Any, **kwargs: Any) -> Tensor:
        self.calls += 1
        return self.fn(*args, **kwargs)


def make_sync(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


@dataclass
class Timing:
    samples: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.samples) if self.samples else math.nan

    @property
    def min(self) -> float:
        return min(self.samples) if self.samples else math.nan


def time_interleaved(
    runners: dict[str, Runner],
    *,
    repeats: int,
    warmup: int,
    sync: Callable[[], None],
    slow_s: float = 2.0,
    slow_repeats: int = 3,
    very_slow_s: float = 10.0,
) -> dict[str, Timing]:
    """Seconds per call of each runner: ``warmup`` untimed rounds, then ``repeats`` rounds that call every runner
    once, in a fixed order. Runners slower than ``slow_s`` per call get one warm-up and ``slow_repeats`` rounds;
    slower than ``very_slow_s``, their (second) warm-up call is the only sample (callers run every case once
    before, to count f-evaluations, so that call is warm)."""
    timings = {name: Timing() for name in runners}
    slow: set[str] = set()
    done: set[str] = set()  # very slow: the warm-up call is the only sample
    with gc_paused():
        for name, run in runners.items():
            for i in range(max(warmup, 1)):
                sync()
                t0 = time.perf_counter()
                run()
                sync()
                elapsed = time.perf_counter() - t0
                if elapsed > very_slow_s:
                    timings[name].samples.append(elapsed)
                    done.add(name)
                if elapsed > slow_s:
                    slow.add(name)
                    break
                if i == 0:
                    gc.collect()
        for r in range(repeats):
            for name, run in runners.items():
                if name in done or (name in slow and r >= slow_repeats):
                    continue
                sync()
                t0 = time.perf_counter()
                run()
                sync()
                timings[name].samples.append(time.perf_counter() - t0)
    return timings


# --------------------------------------------------------------------------------------------------- problems
@dataclass
class OverheadProblem:
    key: str
    label: str
    block: Block
    x: Tensor
    z0: Tensor

    def flat(self, block: Block) -> Callable[[Tensor], Tensor]:
        """The flat ``(B, N) -> (B, N)`` map of ``block`` for :func:`implicit.solve`."""
        x, shape = self.x, self.z0.shape
        if self.z0.dim() == 2:
            return lambda z: block(z, x)
        batch = shape[0]
        return lambda z: block(z.view(shape), x).view(batch, -1)


def make_p1(device: torch.device, dtype: torch.dtype = torch.float32, seed: int = 0) -> OverheadProblem:
    """64×256 state, ``f(z) = z @ R + x`` with ‖R‖₂ = 0.5: a matmul and an add."""
    g = torch.Generator().manual_seed(seed)
    batch, n = 64, 256
    r = torch.randn(n, n, generator=g, dtype=torch.float64)
    r = (0.5 * r / torch.linalg.matrix_norm(r, 2)).to(device=device, dtype=dtype)
    x = torch.randn(batch, n, generator=g).to(device=device, dtype=dtype)

    def block(z: Tensor, x: Tensor) -> Tensor:
        return z @ r + x

    return OverheadProblem("P1", "P1: 64×256 state, `f = z @ R + x`, ‖R‖₂ = 0.5", block, x, torch.zeros_like(x))


def make_p2(device: torch.device, dtype: torch.dtype = torch.float32, seed: int = 0) -> OverheadProblem:
    """8×32×32×32 state; channel pairs (2i, 2i+1) rotated by an angle θ_i and scaled by 0.5, plus x:
    ``f(z) = z·a + swap(z)·b + x`` (swap = flip within each pair): flip, 2 muls, 2 adds."""
    g = torch.Generator().manual_seed(seed)
    shape = (8, 32, 32, 32)
    theta = torch.rand(shape[1] // 2, generator=g) * math.pi
    a = (0.5 * torch.cos(theta)).repeat_interleave(2)
    b = torch.stack([-0.5 * torch.sin(theta), 0.5 * torch.sin(theta)], dim=1).reshape(-1)
    a = a.view(1, -1, 1, 1).to(device=device, dtype=dtype)
    b = b.view(1, -1, 1, 1).to(device=device, dtype=dtype)
    x = torch.randn(shape, generator=g).to(device=device, dtype=dtype)
    paired = (shape[0], shape[1] // 2, 2, *shape[2:])

    def block(z: Tensor, x: Tensor) -> Tensor:
        return z * a + z.view(paired).flip(2).view(shape) * b + x

    label = "P2: 8×32×32×32 state, pairwise channel rotation × 0.5 (5 element-wise ops)"
    return OverheadProblem("P2", label, block, x, torch.zeros_like(x))


def make_p3(device: torch.device, dtype: torch.dtype = torch.float32, seed: int = 0) -> OverheadProblem:
    """16×64×56×56 state, the MDEQ residual block (Wang et al., "Multiscale Deep Equilibrium Models", NeurIPS 2020) at
    ResNet's first stage size: two 3×3 convolutions and three GroupNorms, where f costs far more than bookkeeping."""
    g = torch.Generator().manual_seed(seed)
    channels = 64
    module = MDEQBlock(channels, 8, 1.0, g).to(device=device, dtype=dtype).eval()
    x = torch.randn(16, channels, 56, 56, generator=g).to(device=device, dtype=dtype)
    label = "P3: MDEQ conv block, 16×64×56×56 state (two 3×3 convs, three GroupNorms)"
    return OverheadProblem("P3", label, module, x, torch.zeros_like(x))


class TanhLayer(nn.Module):
    """``f(z, x) = tanh(z Wᵀ + x Uᵀ + b)``: ‖W‖₂ = s, kind ``sym`` ((A + Aᵀ) rescaled) or
    ``gauss`` (iid rescaled), ``U ~ N(0, 1)/√N``, ``b ~ 0.1·N(0, 1)``."""

    def __init__(self, n: int, s: float, kind: str, generator: torch.Generator) -> None:
        super().__init__()
        a = torch.randn(n, n, generator=generator, dtype=torch.float64)
        if kind == "sym":
            a = a + a.T
        w = s * a / torch.linalg.matrix_norm(a, 2)
        self.weight = nn.Parameter(w.float())
        self.inj = nn.Parameter(torch.randn(n, n, generator=generator) / math.sqrt(n))
        self.bias = nn.Parameter(0.1 * torch.randn(n, generator=generator))

    def forward(self, z: Tensor, x: Tensor) -> Tensor:
        return torch.tanh(F.linear(z, self.weight) + F.linear(x, self.inj, self.bias))


class ConvBlock(nn.Module):
    """MDEQ-style residual block ``f(z, x) = GN(z + conv2(relu(GN(conv1(z)))) + x)``, 3×3 convs without bias, conv
    weights ``scale`` × PyTorch's default initialisation (2 keeps fixed-point iteration convergent but slow)."""

    def __init__(self, channels: int, groups: int, scale: float, generator: torch.Generator) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.norm1 = nn.GroupNorm(groups, channels)
        self.norm2 = nn.GroupNorm(groups, channels)
        bound = scale / math.sqrt(channels * 9)  # kaiming_uniform(a=√5) bound is 1/√fan_in
        with torch.no_grad():
            for conv in (self.conv1, self.conv2):
                conv.weight.copy_((torch.rand(conv.weight.shape, generator=generator) * 2 - 1) * bound)

    def forward(self, z: Tensor, x: Tensor) -> Tensor:
        return self.norm2(z + self.conv2(F.relu(self.norm1(self.conv1(z)))) + x)


class MDEQBlock(ConvBlock):
    """MDEQ's residual block ``f(z, x) = GN(relu(z + GN(conv2(relu(GN(conv1(z))))) + x))``: :class:`ConvBlock` with
    the injection inside and a third GroupNorm after the residual sum."""

    def __init__(self, channels: int, groups: int, scale: float, generator: torch.Generator) -> None:
        super().__init__(channels, groups, scale, generator)
        self.norm3 = nn.GroupNorm(groups, channels)

    def forward(self, z: Tensor, x: Tensor) -> Tensor:
        inner = self.norm2(self.conv2(F.relu(self.norm1(self.conv1(z)))) + x)
        return self.norm3(F.relu(z + inner))


@dataclass
class TolProblem:
    key: str
    label: str
    block: nn.Module
    x: Tensor
    z0: Tensor


def make_tol_problem(key: str, seed: int, device: torch.device) -> TolProblem:
    g = torch.Generator().manual_seed(1000 + seed)
    batch = 8
    if key.startswith("tanh"):
        _, kind, s, xs = key.split("-")  # e.g. "tanh-sym-0.9-0.1"
        n = 64
        block = TanhLayer(n, float(s), kind, g)
        x = float(xs) * torch.randn(batch, n, generator=g)
        label = f"tanh {kind} {s}, xs={xs} (N=64)"
    elif key == "conv":
        channels = 32
        block = ConvBlock(channels, 8, 2.0, g)
        x = torch.randn(batch, channels, 16, 16, generator=g)
        label = "conv block 32×16×16"
    else:
        raise ValueError(key)
    block = block.to(device)
    x = x.to(device)
    return TolProblem(key, label, block, x, torch.zeros_like(x))


TOL_PROBLEMS = ("tanh-sym-0.9-0.1", "tanh-gauss-0.9-1", "conv")


# --------------------------------------------------------------------------------------------------- formatting
def fmt(v: float, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    if isinstance(v, int):
        return str(v)
    if v == 0:
        return "0"
    if abs(v) >= 1000:
        return f"{v:.0f}"
    if abs(v) >= 1e-2:
        return f"{v:.{digits}g}" if abs(v) < 100 else f"{v:.0f}"
    return f"{v:.1e}"


def ratio(v: float) -> str:
    return "—" if math.isnan(v) else (f"{v:.2f}×" if v < 10 else f"{v:.1f}×" if v < 100 else f"{v:.0f}×")


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------- table 1
@dataclass
class OverheadCase:
    label: str
    library: str
    path: str  # "eager loop", "solve", "equilibrium", "solver function", "get_deq"
    solver: str | None
    make: Callable[[Block], Runner]  # block -> zero-argument runner
    note: str = ""
    nfe: int | None = None  # known f-evaluations (captured or compiled loops, which a counting wrapper cannot see)


def overhead_cases(p: OverheadProblem, iters: int, deq: Any, device: torch.device) -> list[OverheadCase]:
    x, z0 = p.x, p.z0
    batch = z0.shape[0]
    cases: list[OverheadCase] = []

    def bare(block: Block) -> Runner:
        def run() -> Tensor:
            z = z0
            for _ in range(iters):
                z = block(z, x)
            return z

        return run

    cases.append(OverheadCase("bare loop `z = f(z, x)`", "eager", "eager loop", None, bare))

    if device.type == "cuda":

        def graph(block: Block) -> Runner:
            static = z0.clone()
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):
                    bare(block)()
            torch.cuda.current_stream().wait_stream(stream)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                z = static
                for _ in range(iters):
                    z = block(z, x)
            return g.replay

        cases.append(OverheadCase("bare loop, CUDA graph", "eager", "CUDA graph", None, graph))

    def ours_solve(solver: str, check_every: int = 4) -> Callable[[Block], Runner]:
        def make(block: Block) -> Runner:
            fn, flat0 = p.flat(block), z0.reshape(batch, -1)
            opts = OUR_OPTIONS[solver]
            return lambda: implicit.solve(
                fn, flat0, solver=solver, solver_options=opts, tol=0.0, max_iter=iters, check_every=check_every
            )

        return make

    def ours_equilibrium(solver: str) -> Callable[[Block], Runner]:
        def make(block: Block) -> Runner:
            opts = OUR_OPTIONS[solver]
            return lambda: implicit.equilibrium(
                block, x, z0, solver=solver, solver_options=opts, tol=0.0, max_iter=iters
            )

        return make

    for solver in OVERHEAD_TARGETS:
        cases.append(OverheadCase(f"{solver}", OURS, "solve", solver, ours_solve(solver)))
    # Where the overhead goes: residual checks every step / every 8, and none but the first and last (the solver
    # step alone: ratio − 1 is the step's cost, ratio(check_every=4) − this ratio the checks' cost).
    for solver, check_every, note in (
        ("fixed_point", 1, "residual every step"),
        ("fixed_point", 8, ""),
        *((s, iters, "checks at start and end only") for s in OVERHEAD_TARGETS),
    ):
        label = f"{solver}, check_every={check_every}"
        cases.append(OverheadCase(label, OURS, "solve", None, ours_solve(solver, check_every), note))
    for solver in OVERHEAD_TARGETS:
        cases.append(OverheadCase(f"{solver}", OURS, "equilibrium", solver, ours_equilibrium(solver)))

    if deq is not None:
        from torchdeq import get_deq
        from torchdeq.solver import get_solver

        def peer_fn(solver: str, **extra: Any) -> Callable[[Block], Runner]:
            name, kw = PEER_SOLVERS[solver]
            kw = {**kw, **extra}
            fn = get_solver(name)

            def make(block: Block) -> Runner:
                return lambda: fn(lambda z: block(z, x), z0, max_iter=iters, tol=0.0, stop_mode="rel", **kw)

            return make

        def peer_deq(solver: str) -> Callable[[Block], Runner]:
            name, kw = PEER_SOLVERS[solver]
            layer = get_deq(f_solver=name, f_max_iter=iters, f_tol=0.0, f_stop_mode="rel")
            layer.eval()

            def make(block: Block) -> Runner:
                return lambda: layer(lambda z: block(z, x), z0, solver_kwargs=dict(kw))

            return make

        for solver in OVERHEAD_TARGETS:
            cases.append(OverheadCase(PEER_SOLVERS[solver][0], PEER, "solver function", solver, peer_fn(solver)))
        cases.append(
            OverheadCase(
                "broyden, default memory (= max_iter)",
                PEER,
                "solver function",
                None,
                peer_fn("broyden", LBFGS_thres=None),
                "as shipped",
            )
        )
        for solver in OVERHEAD_TARGETS:
            cases.append(OverheadCase(PEER_SOLVERS[solver][0], PEER, "get_deq (eval)", solver, peer_deq(solver)))
    return cases


def execution_cases(p: OverheadProblem, iters: int, deq: Any, device: torch.device) -> list[OverheadCase]:
    """Fixed budgets of ``iters`` iterations: the bare loop eager, under ``torch.compile`` and (CUDA) in a CUDA graph,
    :func:`implicit.equilibrium` with ``execution="eager"`` / ``"compiled"`` / (CUDA) ``"graph"`` (``tol=0``: the
    whole budget in every mode; the per-sample bookkeeping included), and TorchDEQ's solver functions (eager, its
    only mode) when installed."""
    x, z0 = p.x, p.z0
    known = overhead_cases(p, iters, deq, device)
    eager_cases = [case for case in known if case.library == "eager"]
    peer_cases = [case for case in known if case.library == PEER and case.path == "solver function" and case.solver]

    def bare_compiled(block: Block) -> Runner:
        def loop(z: Tensor, x: Tensor) -> Tensor:
            for _ in range(iters):
                z = block(z, x)
            return z

        compiled = torch.compile(loop, fullgraph=True, dynamic=False)
        return lambda: compiled(z0, x)

    compiled_bare = OverheadCase("bare loop, `torch.compile`", "eager", "compiled loop", None, bare_compiled, nfe=iters)
    cases = [eager_cases[0], compiled_bare, *eager_cases[1:]]
    executions = ["eager", "compiled"] + (["graph"] if device.type == "cuda" else [])
    for execution in executions:
        for solver in OVERHEAD_TARGETS:

            def make(block: Block, solver: str = solver, execution: str = execution) -> Runner:
                opts = OUR_OPTIONS[solver]
                return lambda: implicit.equilibrium(
                    block, x, z0, solver=solver, solver_options=opts, tol=0.0, max_iter=iters, execution=execution
                )

            path = f'equilibrium, execution="{execution}"'
            cases.append(OverheadCase(solver, OURS, path, solver, make, nfe=iters + 1))
    return cases + peer_cases


def execution_markdown(p: OverheadProblem, rows: list[OverheadRow]) -> str:
    """The execution table: per f-evaluation, as a multiple of each bare loop."""
    bases = {r.case.path: r for r in rows if r.case.library == "eager"}
    header = ["library", "path", "solver", "f-evals", "µs / f-eval (median)", *(f"× {path}" for path in bases)]
    body = []
    for r in rows:
        cells = [ratio(r.us_per_eval / base.us_per_eval) for base in bases.values()]
        body.append([r.case.library, r.case.path, r.case.label, str(r.nfe), fmt(r.us_per_eval), *cells])
    return f"**{p.label}**\n\n" + table(header, body)


#: Targets of the execution modes: per f-evaluation, × the bare loop in the same mode (CPU: compiled).
COMPILED_TARGETS = {"fixed_point": 1.2, "anderson": 2.0, "broyden": 3.0}
GRAPH_TARGET = 1.2


def execution_summary(results: dict[str, list[OverheadRow]]) -> str:
    header = ["problem", "solver", "compiled × compiled bare (target)", "graph × graph bare (target)", "met"]
    body = []
    for key, rows in results.items():
        bases = {r.case.path: r for r in rows if r.case.library == "eager"}
        ours = {(r.case.path, r.case.solver): r for r in rows if r.case.library == OURS}
        for solver, target in COMPILED_TARGETS.items():
            compiled = ours[('equilibrium, execution="compiled"', solver)].us_per_eval
            compiled_ratio = compiled / bases["compiled loop"].us_per_eval
            graph_row = ours.get(('equilibrium, execution="graph"', solver))
            graph_ratio = graph_row.us_per_eval / bases["CUDA graph"].us_per_eval if graph_row else None
            met = compiled_ratio <= target and (graph_ratio is None or graph_ratio <= GRAPH_TARGET)
            graph_cell = f"{ratio(graph_ratio)} (≤ {GRAPH_TARGET:g}×)" if graph_ratio is not None else "— (no GPU)"
            body.append([key, solver, f"{ratio(compiled_ratio)} (≤ {target:g}×)", graph_cell, "yes" if met else "no"])
    return table(header, body)


@dataclass
class OverheadRow:
    case: OverheadCase
    nfe: int
    us_per_eval: float
    us_per_eval_min: float
    ratio: float
    ratio_min: float
    runs: int


def run_overhead(
    p: OverheadProblem,
    iters: int,
    deq: Any,
    device: torch.device,
    repeats: int,
    warmup: int,
    cases: list[OverheadCase] | None = None,
) -> list[OverheadRow]:
    """Time ``cases`` (default :func:`overhead_cases`); ratios are to the first case (the bare eager loop)."""
    cases = overhead_cases(p, iters, deq, device) if cases is None else cases
    nfe: dict[str, int] = {}
    runners: dict[str, Runner] = {}
    for i, case in enumerate(cases):
        key = f"{i}:{case.label}"
        if case.path == "CUDA graph":
            nfe[key] = iters
        elif case.nfe is not None:
            nfe[key] = case.nfe
            case.make(p.block)()  # untimed: compilation / capture happen here (cached for the timed runner)
        else:
            counter = Counter(p.block)
            case.make(counter)()
            nfe[key] = counter.calls
        runners[key] = case.make(p.block)
    sync = make_sync(device)
    timings = time_interleaved(runners, repeats=repeats, warmup=warmup, sync=sync)
    bare_key = next(iter(runners))
    bare_med = timings[bare_key].median / nfe[bare_key]
    bare_min = timings[bare_key].min / nfe[bare_key]
    rows = []
    for i, case in enumerate(cases):
        key = f"{i}:{case.label}"
        per_med = timings[key].median / nfe[key]
        per_min = timings[key].min / nfe[key]
        runs = len(timings[key].samples)
        rows.append(
            OverheadRow(case, nfe[key], per_med * 1e6, per_min * 1e6, per_med / bare_med, per_min / bare_min, runs)
        )
    return rows


def overhead_markdown(p: OverheadProblem, rows: list[OverheadRow], peer_status: str) -> str:
    header = ["library", "path", "solver", "f-evals", "µs / f-eval (median)", "× bare (median)", "× bare (min)"]
    body = []
    for r in rows:
        notes = [r.case.note] if r.case.note else []
        if r.runs < max(x.runs for x in rows):
            notes.append(f"{r.runs} timed run{'s' if r.runs > 1 else ''}")
        solver = r.case.label + (f" ({'; '.join(notes)})" if notes else "")
        body.append(
            [
                r.case.library,
                r.case.path,
                solver,
                str(r.nfe),
                fmt(r.us_per_eval),
                ratio(r.ratio),
                ratio(r.ratio_min),
            ]
        )
    if not any(r.case.library == PEER for r in rows):
        for solver in OVERHEAD_TARGETS:
            body.append([PEER, "—", PEER_SOLVERS[solver][0], "—", peer_status, "—", "—"])
    return f"**{p.label}**\n\n" + table(header, body)


def overhead_summary(results: dict[str, list[OverheadRow]], device: torch.device) -> str:
    header = [
        "problem",
        "solver",
        "target",
        "ours `solve`",
        "ours `equilibrium`",
        "TorchDEQ solver fn",
        "TorchDEQ `get_deq`",
        "target met (ours, median)",
    ]
    body = []
    for key, rows in results.items():
        index = {(r.case.library, r.case.path, r.case.solver): r for r in rows}
        for solver, target in overhead_targets(key, device).items():
            ours = [index.get((OURS, path, solver)) for path in ("solve", "equilibrium")]
            peers = [index.get((PEER, path, solver)) for path in ("solver function", "get_deq (eval)")]
            cells = [ratio(r.ratio) if r else "—" for r in ours + peers]
            met = [r.ratio <= target for r in ours if r]
            verdict = "yes" if met and all(met) else ("`solve` only" if met and met[0] else "no")
            body.append([key, solver, f"≤ {target:g}×", *cells, verdict])
    return table(header, body)


# --------------------------------------------------------------------------------------------------- table 2
def rel_residual(block: Callable[[Tensor, Tensor], Tensor], z: Tensor, x: Tensor) -> Tensor:
    """Per-sample ‖f(z) − z‖ / ‖f(z)‖, measured independently of either library's bookkeeping."""
    fz = block(z, x)
    b = z.shape[0]
    return torch.linalg.vector_norm((fz - z).reshape(b, -1), dim=1) / torch.linalg.vector_norm(fz.reshape(b, -1), dim=1)


@dataclass
class TolRow:
    problem: str
    library: str
    solver: str
    check_every: str
    nfe_sample_mean: float
    nfe_sample_max: float
    nfe_batch_mean: float
    max_rel: float
    ms: float
    converged: str


def ours_tol_runner(prob: TolProblem, block: Block, solver: str, check_every: int, tol: float, max_iter: int) -> Runner:
    """One solve of ``prob`` with our ``equilibrium`` (returns ``(z, info)``)."""
    options = OUR_OPTIONS[solver]
    return lambda: implicit.equilibrium(
        block,
        prob.x,
        prob.z0,
        solver=solver,
        solver_options=options,
        tol=tol,
        stop_mode="rel",
        max_iter=max_iter,
        check_every=check_every,
        on_divergence="ignore",
    )


def peer_tol_runner(prob: TolProblem, block: Block, layer: Any, kw: dict[str, Any]) -> Runner:
    """One solve of ``prob`` with a TorchDEQ layer in evaluation mode (returns ``(z_list, info)``)."""
    x, z0 = prob.x, prob.z0
    return lambda: layer(lambda z: block(z, x), z0, solver_kwargs=dict(kw))


def run_tolerance(
    seeds: list[int], deq: Any, device: torch.device, repeats: int, warmup: int, tol: float, max_iter: int
) -> list[TolRow]:
    sync = make_sync(device)
    rows: list[TolRow] = []
    for key in TOL_PROBLEMS:
        per_case: dict[str, dict[str, list[Any]]] = {}  # case -> lists over seeds

        def record(name: str, nstep: Tensor, calls: int, res: Tensor, per_case: dict = per_case) -> None:
            entry = per_case.setdefault(name, {"nstep": [], "batch": [], "res": [], "conv": [], "ms": []})
            entry["nstep"].append(nstep.float().cpu())
            entry["batch"].append(calls)
            entry["res"].append(res.max().item())
            entry["conv"].append(int((res <= tol).sum()))

        for seed in seeds:
            prob = make_tol_problem(key, seed, device)
            runners: dict[str, Runner] = {}
            for solver in OVERHEAD_TARGETS:
                for check_every in (1, 4):
                    name = f"{OURS}|{solver}|{check_every}"
                    counter = Counter(prob.block)
                    z, info = ours_tol_runner(prob, counter, solver, check_every, tol, max_iter)()
                    record(name, info.forward.nstep, counter.calls, rel_residual(prob.block, z, prob.x))
                    runners[name] = ours_tol_runner(prob, prob.block, solver, check_every, tol, max_iter)
            if deq is not None:
                from torchdeq import get_deq

                for peer_name, peer_kw in PEER_SOLVERS.values():
                    kw = {k: v for k, v in peer_kw.items() if k != "LBFGS_thres"}  # Broyden: full memory, as shipped
                    layer = get_deq(f_solver=peer_name, f_max_iter=max_iter, f_tol=tol, f_stop_mode="rel")
                    layer.eval()
                    name = f"{PEER}|{peer_name}|every step"
                    counter = Counter(prob.block)
                    z_out, info = peer_tol_runner(prob, counter, layer, kw)()
                    record(name, info["nstep"], counter.calls, rel_residual(prob.block, z_out[-1], prob.x))
                    runners[name] = peer_tol_runner(prob, prob.block, layer, kw)
            timings = time_interleaved(runners, repeats=repeats, warmup=warmup, sync=sync)
            for name, t in timings.items():
                per_case[name]["ms"].append(t.median * 1e3)
        label = make_tol_problem(key, seeds[0], device).label
        n_samples = 8 * len(seeds)
        for name, e in per_case.items():
            library, solver, check_every = name.split("|")
            nsteps = torch.cat(e["nstep"])
            rows.append(
                TolRow(
                    label,
                    library,
                    solver,
                    check_every,
                    nsteps.mean().item(),
                    nsteps.max().item(),
                    statistics.mean(e["batch"]),
                    max(e["res"]),
                    statistics.mean(e["ms"]),
                    f"{sum(e['conv'])}/{n_samples}",
                )
            )
    return rows


def tolerance_markdown(rows: list[TolRow], peer_status: str) -> str:
    header = [
        "problem",
        "library",
        "solver",
        "check_every",
        "NFE / sample, mean (max)",
        "batch NFE",
        "max rel. residual",
        "converged",
        "ms / solve",
    ]
    body = []
    for r in rows:
        body.append(
            [
                r.problem,
                r.library,
                r.solver,
                r.check_every,
                f"{r.nfe_sample_mean:.1f} ({r.nfe_sample_max:.0f})",
                f"{r.nfe_batch_mean:.1f}",
                fmt(r.max_rel),
                r.converged,
                fmt(r.ms),
            ]
        )
    if not any(r.library == PEER for r in rows):
        body.append(["all", PEER, "—", "—", peer_status, "—", "—", "—", "—"])
    return table(header, body)


def anderson_check(rows: list[TolRow]) -> list[tuple[str, str, bool, str]]:
    """Per problem and check_every: is our Anderson's per-sample NFE ≤ fixed-point's (mean and max)?"""
    out = []
    for problem in dict.fromkeys(r.problem for r in rows):
        for ce in ("1", "4"):
            sel = {r.solver: r for r in rows if r.problem == problem and r.library == OURS and r.check_every == ce}
            if "anderson" in sel and "fixed_point" in sel:
                a, f = sel["anderson"], sel["fixed_point"]
                ok = a.nfe_sample_mean <= f.nfe_sample_mean and a.nfe_sample_max <= f.nfe_sample_max
                detail = (
                    f"Anderson {a.nfe_sample_mean:.1f} ({a.nfe_sample_max:.0f}) vs "
                    f"fixed point {f.nfe_sample_mean:.1f} ({f.nfe_sample_max:.0f})"
                )
                out.append((problem, ce, ok, detail))
    return out


# --------------------------------------------------------------------------------------------------- table 3
@contextlib.contextmanager
def count_vjps() -> Iterator[list[int]]:
    """Counts ``torch.autograd.grad`` calls (both libraries call it once per VJP of their backward solve)."""
    original = torch.autograd.grad
    count = [0]

    def counting(*args: Any, **kwargs: Any) -> Any:
        count[0] += 1
        return original(*args, **kwargs)

    torch.autograd.grad = counting
    try:
        yield count
    finally:
        torch.autograd.grad = original


def exact_gradient(prob: TolProblem, cotangent: Tensor) -> list[Tensor]:
    """Parameter gradient of ``sum(z* · cotangent)`` in float64 by a dense solve ``u (I − J) = v`` per sample."""
    block = copy.deepcopy(prob.block).double().cpu()
    x = prob.x.double().cpu()
    with torch.no_grad():
        res = implicit.solve(lambda z: block(z, x), torch.zeros_like(x), solver="broyden", tol=1e-13, max_iter=500)
    z = res.z
    fz = block(z, x)
    n = z.shape[1]
    jac = (1 - fz.detach() ** 2)[:, :, None] * block.weight.detach()[None]  # J_b[i, j] = (1 − f_i²) W_ij
    v = cotangent.double().cpu()
    eye = torch.eye(n, dtype=torch.float64)
    u = torch.linalg.solve((eye - jac).transpose(1, 2), v[:, :, None])[:, :, 0]  # u (I − J) = v
    return list(torch.autograd.grad(fz, [block.weight, block.inj, block.bias], u))


def grad_error(grads: list[Tensor], ref: list[Tensor]) -> float:
    g = torch.cat([t.detach().double().cpu().reshape(-1) for t in grads])
    r = torch.cat([t.reshape(-1) for t in ref])
    return (torch.linalg.vector_norm(g - r) / torch.linalg.vector_norm(r)).item()


@dataclass
class BackwardRow:
    problem: str
    library: str
    setup: str
    fwd_nfe: int
    vjps: int
    residuals: tuple[float, float]  # max rel. residual of the forward and the backward solve
    ms: float
    ms_fwd: float
    err: float


def ours_grad_forward(prob: TolProblem, block: Block) -> Callable[[], tuple[Tensor, Any]]:
    """Our forward in grad mode with exact implicit differentiation (anderson forward and backward)."""
    return lambda: implicit.equilibrium(
        block,
        prob.x,
        prob.z0,
        solver="anderson",
        solver_options={"m": ANDERSON_M},
        tol=1e-4,
        stop_mode="rel",
        max_iter=50,
        backward="implicit",
        backward_solver="anderson",
        backward_tol=1e-6,
        backward_stop_mode="rel",
        backward_max_iter=50,
    )


def peer_grad_forward(
    prob: TolProblem, block: Block, layer: Any, writer: Callable[[Any], None] | None = None
) -> Callable[[], tuple[Tensor, Any]]:
    """TorchDEQ's forward in training mode (IFT attached to the returned state); ``writer`` receives the backward
    solver's stats."""
    x, z0 = prob.x, prob.z0

    def run() -> tuple[Tensor, Any]:
        z_out, info = layer(lambda z: block(z, x), z0, solver_kwargs={"m": ANDERSON_M}, backward_writer=writer)
        return z_out[-1], info

    return run


def grad_step(forward: Callable[[], tuple[Tensor, Any]], cot: Tensor, params: list[Tensor]) -> Runner:
    """Forward, then the parameter gradient of ``sum(z* · cot)``."""
    return lambda: torch.autograd.grad((forward()[0] * cot).sum(), params)


def run_backward(seed: int, deq: Any, device: torch.device, repeats: int, warmup: int) -> list[BackwardRow]:
    sync = make_sync(device)
    rows: list[BackwardRow] = []
    for key in ("tanh-sym-0.9-0.1", "tanh-gauss-0.9-1"):
        prob = make_tol_problem(key, seed, device)
        params = list(prob.block.parameters())
        g = torch.Generator().manual_seed(7 + seed)
        cot = torch.randn(prob.x.shape, generator=g).to(device)
        ref = exact_gradient(prob, cot)

        forward = ours_grad_forward(prob, prob.block)
        runners: dict[str, Runner] = {f"{OURS}|fb": grad_step(forward, cot, params), f"{OURS}|f": forward}
        with count_vjps() as vjps:
            z, info = forward()
            grads = torch.autograd.grad((z * cot).sum(), params)
        if info.backward is not None and info.backward.nfe != vjps[0] - 1:
            print(f"note: counted {vjps[0] - 1} VJPs, info.backward.nfe = {info.backward.nfe}", file=sys.stderr)
        setup = f"anderson m={ANDERSON_M} → IFT, anderson backward, rel tol 1e-6, warm start u=v"
        residuals = (
            info.forward.rel.max().item(),
            math.nan if info.backward is None else info.backward.rel.max().item(),
        )
        entries = {OURS: (setup, info.forward.nfe + info.tracked_nfe, vjps[0] - 1, residuals, grad_error(grads, ref))}
        if deq is not None:
            from torchdeq import get_deq

            layer = get_deq(
                f_solver="anderson",
                b_solver="anderson",
                f_max_iter=50,
                b_max_iter=50,
                f_tol=1e-4,
                f_stop_mode="rel",
                b_tol=1e-6,
                b_stop_mode="rel",
                ift=True,
            )
            layer.train()
            forward = peer_grad_forward(prob, prob.block, layer)
            runners[f"{PEER}|fb"] = grad_step(forward, cot, params)
            runners[f"{PEER}|f"] = forward
            counter = Counter(prob.block)
            stats: list[Any] = []
            with count_vjps() as vjps:
                z, peer_info = peer_grad_forward(prob, counter, layer, stats.append)()
                fwd_calls = counter.calls
                grads = torch.autograd.grad((z * cot).sum(), params)
            residuals = (
                peer_info["rel_lowest"].max().item(),
                stats[-1]["rel_lowest"].max().item() if stats else math.nan,
            )
            setup = f"anderson m={ANDERSON_M} → IFT (autograd.Function), anderson backward (m=6), rel tol 1e-6, from 0"
            entries[PEER] = (setup, fwd_calls, vjps[0] - 1, residuals, grad_error(grads, ref))
        timings = time_interleaved(runners, repeats=repeats, warmup=warmup, sync=sync)
        for library, (setup, nfe, nvjp, residuals, err) in entries.items():
            rows.append(
                BackwardRow(
                    prob.label,
                    library,
                    setup,
                    nfe,
                    nvjp,
                    residuals,
                    timings[f"{library}|fb"].median * 1e3,
                    timings[f"{library}|f"].median * 1e3,
                    err,
                )
            )
    return rows


def backward_markdown(rows: list[BackwardRow], peer_status: str) -> str:
    header = [
        "problem",
        "library",
        "setup",
        "forward f-evals (incl. tracked)",
        "backward VJPs",
        "max rel. residual fwd / bwd",
        "ms forward (grad mode)",
        "ms forward + backward",
        "grad rel. error vs exact",
    ]
    body = [
        [
            r.problem,
            r.library,
            r.setup,
            str(r.fwd_nfe),
            str(r.vjps),
            f"{fmt(r.residuals[0])} / {fmt(r.residuals[1])}",
            fmt(r.ms_fwd),
            fmt(r.ms),
            fmt(r.err),
        ]
        for r in rows
    ]
    if not any(r.library == PEER for r in rows):
        body.append(["all", PEER, peer_status, "—", "—", "—", "—", "—", "—"])
    return table(header, body)


# --------------------------------------------------------------------------------------------------- driver
def environment(args: argparse.Namespace, device: torch.device, peer_status: str) -> list[str]:
    cpu = cpu_name()
    dev = str(device)
    if device.type == "cuda":
        dev += f" ({torch.cuda.get_device_name(device)})"
    return [
        f"- date (UTC): {_dt.datetime.now(_dt.timezone.utc).strftime('%Y-%m-%d %H:%M')}",
        f"- device: {dev}; CPU: {cpu}, {os.cpu_count()} logical cores; torch threads: {torch.get_num_threads()}",
        f"- torch {torch.__version__}, Python {platform.python_version()}, TorchDEQ: {peer_status}; "
        f"torch-implicit {implicit.__version__}, {source_state()}",
        f"- command: `{command_line(args)}`",
        f"- repeats: {args.repeats} interleaved rounds after {args.warmup} warm-up rounds; float32; overhead solves "
        f"forced to {args.iters} iterations (`tol=0`)",
    ]


def source_state(paths: tuple[str, ...] = ("implicit",)) -> str:
    """The checked-out commit, and which files under ``paths`` (the code measured) differ from it."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", *paths], cwd=root, capture_output=True, text=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    changed = sorted({line[3:] for line in dirty.splitlines()})
    return f"commit {head}" + (f" + uncommitted: {', '.join(changed)}" if changed else "")


def cpu_name() -> str:
    """The CPU model from ``/proc/cpuinfo`` (``platform.processor()`` elsewhere)."""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def command_line(args: argparse.Namespace) -> str:
    return shlex.join(["python", "-m", "benchmarks.solver_overhead", *args.argv])


def replace_block(text: str, begin: str, end: str, path: Path = RESULTS_PATH, heading: str | None = None) -> None:
    """Replace the block between the ``begin`` and ``end`` markers in ``path``; without the markers, append it (under
    ``heading``, added when missing) at the end of the file."""
    block = f"{begin}\n\n{text.strip()}\n\n{end}"
    old = path.read_text() if path.exists() else "# Benchmark results\n"
    if begin in old and end in old:
        head, rest = old.split(begin, 1)
        _, tail = rest.split(end, 1)
        new = head + block + tail
    else:
        if heading and heading not in old:
            old = old.rstrip() + f"\n\n{heading}\n"
        new = old.rstrip() + "\n\n" + block + "\n"
    path.write_text(new)


def write_results(text: str, path: Path = RESULTS_PATH) -> None:
    replace_block(text, BEGIN_MARK, END_MARK, path)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.solver_overhead", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="few repeats, short loops, one seed (smoke test)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default 7, --quick 3)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up rounds (default 2, --quick 1)")
    parser.add_argument("--iters", type=int, default=None, help="forced iterations of table 1 (default 200)")
    parser.add_argument(
        "--conv-iters",
        type=int,
        default=None,
        help="forced iterations of P3, the conv block, in table 1 (default: --iters on CUDA, 10 on the CPU, where one "
        "f-evaluation takes about 80 ms)",
    )
    parser.add_argument("--seeds", type=int, default=None, help="problem instances in tables 2 (default 3)")
    parser.add_argument(
        "--only",
        default="overhead,tolerance,backward",
        help="comma-separated subset of overhead,tolerance,backward,execution (default: the first three, the "
        "generated section of RESULTS.md; execution compiles for minutes and has a section of its own)",
    )
    parser.add_argument(
        "--compile-iters",
        type=int,
        default=None,
        help="iterations of the execution-mode table (default 40, --quick 20; compiled loops are unrolled)",
    )
    parser.add_argument("--write", action="store_true", help=f"replace the generated section of {RESULTS_PATH.name}")
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.repeats = args.repeats or (3 if args.quick else 7)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    args.iters = args.iters or (50 if args.quick else 200)
    args.seeds = args.seeds or (1 if args.quick else 3)
    args.conv_iters = args.conv_iters or (args.iters if args.device == "cuda" else 10)
    args.compile_iters = args.compile_iters or (20 if args.quick else 40)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device available", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    deq, peer_version = load_torchdeq()
    peer_status = peer_version if deq is not None else "not installed"  # short form for table cells
    sections = {s.strip() for s in args.only.split(",") if s.strip()}
    started = time.perf_counter()
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    out: list[str] = ["### Environment", "", *environment(args, device, peer_version), ""]

    def emit(text: str) -> None:
        print(text, flush=True)
        out.append(text)

    print("\n".join(out), flush=True)
    if "overhead" in sections:
        iters = f"{args.iters} forced iterations"
        if args.conv_iters != args.iters:
            iters += f" ({args.conv_iters} on P3)"
        emit(f"### 1. Per-iteration overhead ({iters}, no autograd)\n")
        results: dict[str, list[OverheadRow]] = {}
        for make in (make_p1, make_p2, make_p3):
            p = make(device)
            p_iters = args.conv_iters if p.key == "P3" else args.iters
            with torch.no_grad():
                rows = run_overhead(p, p_iters, deq, device, args.repeats, args.warmup)
            results[p.key] = rows
            bare = rows[0]
            emit(overhead_markdown(p, rows, peer_status))
            per_eval = f"{fmt(bare.us_per_eval)} µs per f-evaluation (median), {fmt(bare.us_per_eval_min)} (min)"
            emit(f"\nBare loop: {per_eval}.\n")
        emit("**Summary: overhead per f-evaluation, × bare loop (median)**\n")
        emit(overhead_summary(results, device) + "\n")
    if "execution" in sections:
        emit(
            f"### 4. Execution modes ({args.compile_iters} forced iterations, no autograd; compilation and capture "
            "happen in the untimed first call)\n"
        )
        exec_results: dict[str, list[OverheadRow]] = {}
        for make in (make_p1, make_p2):
            p = make(device)
            cases = execution_cases(p, args.compile_iters, deq, device)
            with torch.no_grad():
                rows = run_overhead(p, args.compile_iters, None, device, args.repeats, args.warmup, cases)
            exec_results[p.key] = rows
            emit(execution_markdown(p, rows) + "\n")
        emit("**Summary: execution modes, per f-evaluation (median), × the bare loop in the same mode**\n")
        emit(execution_summary(exec_results) + "\n")
    if "tolerance" in sections:
        seeds = list(range(args.seeds))
        emit(
            f"### 2. NFE and wall time to rel. tol 1e-4 (B=8, {len(seeds)} seed(s) = {8 * len(seeds)} samples, "
            "max_iter 200, no autograd)\n"
        )
        with torch.no_grad():
            tol_rows = run_tolerance(seeds, deq, device, args.repeats, args.warmup, tol=1e-4, max_iter=200)
        emit(tolerance_markdown(tol_rows, peer_status))
        emit(
            "\nNFE / sample: ours `info.forward.nstep` (f-evaluations until that sample stopped); TorchDEQ "
            "`info['nstep']` (step of its best iterate; its loop runs until the worst sample converges). Batch NFE: "
            "calls of f counted by a wrapper. Max rel. residual: ‖f(z) − z‖/‖f(z)‖ of the returned z, recomputed "
            "outside both libraries. Ours: m=5 / memory 10; TorchDEQ: m=5, Broyden with its default full memory.\n"
        )
        emit("**Anderson needs no more NFE than fixed-point iteration (ours, per sample, mean and max):**\n")
        for problem, ce, ok, detail in anderson_check(tol_rows):
            emit(f"- {problem}, check_every={ce}: {'yes' if ok else '**no**'} — {detail}")
        emit("")
    if "backward" in sections:
        emit("### 3. Forward + backward, exact implicit differentiation (seed 0, B=8, N=64)\n")
        bw_rows = run_backward(0, deq, device, args.repeats, args.warmup)
        emit(backward_markdown(bw_rows, peer_status))
        emit(
            "\nLoss `sum(z* · c)`, gradient w.r.t. the layer's parameters (W, U, b). VJPs counted as "
            "`torch.autograd.grad` calls during backward (ours equals `info.backward.nfe`). Exact gradient: float64, "
            "z* to 1e-13, dense solve `u (I − J) = c` per sample.\n"
        )
    elapsed = time.perf_counter() - started
    load_after = os.getloadavg() if hasattr(os, "getloadavg") else None
    tail = f"Run time {elapsed:.0f} s."
    if load_before and load_after:
        tail += f" Load average (1 min) {load_before[0]:.2f} at start, {load_after[0]:.2f} at end."
    emit(tail)
    if args.write:
        write_results("\n".join(out))
        print(f"\nwrote {RESULTS_PATH}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
