"""Fixed cost of one DEQ layer call, side by side with TorchDEQ 0.1.0 (and, optionally, an earlier torch-implicit).

A small model calls its DEQ layer thousands of times per epoch; on a GPU this fixed cost is pure launch and Python
overhead. Measured on a nearly free block, ``f(z, x) = 0.5 z + x`` on a 4×8 state, with ``max_iter=1`` (two
f-evaluations: one step and the measurement of the returned point), float32, CPU, one thread:

* no grad: the call under ``torch.no_grad()`` (TorchDEQ: ``get_deq(...)`` in eval mode);
* grad: the forward call with an injection that requires grad (TorchDEQ: train mode, ``ift=True``), which records
  the tracked call and attaches the backward;
* forward + backward: the call, then ``z.sum().backward()`` (ours: implicit backward, Anderson adjoint solve to
  rel. 1e-6; TorchDEQ: its IFT backward with its defaults).

Each library runs in its own worker process (so an earlier torch-implicit can be imported from a ``git archive`` of
that revision); the workers alternate ``--reps`` times, each timing ``--rounds`` interleaved rounds of ``--calls``
calls per case; the table gives the median over all rounds.

Run: ``python -m benchmarks.call_overhead [--baseline REV] [--write]``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .solver_overhead import RESULTS_PATH, fmt, replace_block, source_state, table

BEGIN_MARK = "<!-- BEGIN GENERATED (python -m benchmarks.call_overhead --write) -->"
END_MARK = "<!-- END GENERATED (call_overhead) -->"
HEADING = "## Fixed cost of one layer call"
SOLVERS = {"fixed_point": "fixed_point_iter", "anderson": "anderson"}  # ours → TorchDEQ's name
MODES = ("no grad", "grad", "forward + backward")
ROOT = Path(__file__).resolve().parent.parent


class Half(nn.Module):
    """``f(z, x) = 0.5 z + x``: two element-wise ops, so the layer's own cost dominates."""

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * z + x


# --------------------------------------------------------------------------------------------------- workers
def our_cases() -> dict[str, Callable[[], Any]]:
    import implicit

    x = torch.randn(4, 8)
    xg = x.clone().requires_grad_()
    cases: dict[str, Callable[[], Any]] = {}
    for solver in SOLVERS:
        layer = implicit.make_implicit(Half(), solver=solver, max_iter=1)

        def no_grad(layer: Any = layer) -> Any:
            with torch.no_grad():
                return layer(x)

        def backward(layer: Any = layer) -> None:
            layer(xg).sum().backward()

        cases[f"{solver}|no grad"] = no_grad
        cases[f"{solver}|grad"] = lambda layer=layer: layer(xg)
        cases[f"{solver}|forward + backward"] = backward
    return cases


def peer_cases() -> dict[str, Callable[[], Any]]:
    from torchdeq import get_deq

    x = torch.randn(4, 8)
    xg = x.clone().requires_grad_()
    z0 = torch.zeros_like(x)
    cases: dict[str, Callable[[], Any]] = {}
    for solver, name in SOLVERS.items():
        evaluation = get_deq(f_solver=name, f_max_iter=1, ift=True)
        evaluation.eval()
        training = get_deq(f_solver=name, f_max_iter=1, ift=True)
        training.train()

        def no_grad(layer: Any = evaluation) -> Any:
            with torch.no_grad():
                return layer(lambda z: 0.5 * z + x, z0)

        def grad(layer: Any = training) -> Any:
            return layer(lambda z: 0.5 * z + xg, z0)

        def backward(layer: Any = training) -> None:
            states, _ = layer(lambda z: 0.5 * z + xg, z0)
            states[-1].sum().backward()

        cases[f"{solver}|no grad"] = no_grad
        cases[f"{solver}|grad"] = grad
        cases[f"{solver}|forward + backward"] = backward
    return cases


def bare_cases() -> dict[str, Callable[[], Any]]:
    x = torch.randn(4, 8)

    def two_evaluations() -> Any:
        with torch.no_grad():
            z = torch.zeros_like(x)
            return 0.5 * (0.5 * z + x) + x

    return {"f only|no grad": two_evaluations}


def run_worker(library: str, calls: int, rounds: int, warmup: int) -> dict[str, Any]:
    """Time every case of ``library``; returns µs per call for each round, and where the code came from."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    if library == "torchdeq":
        cases = peer_cases()
        from importlib.metadata import version

        origin = f"TorchDEQ {version('torchdeq')}"
    else:
        import implicit

        cases = {**our_cases(), **bare_cases()}
        origin = str(Path(implicit.__file__).resolve().parent)
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for round_index in range(warmup + rounds):
        for name, case in cases.items():
            n = max(calls // 10, 1) if "backward" in name else calls
            gc.collect()
            gc.disable()
            started = time.perf_counter()
            for _ in range(n):
                case()
            elapsed = time.perf_counter() - started
            gc.enable()
            if round_index >= warmup:
                samples[name].append(elapsed / n * 1e6)
    return {"origin": origin, "samples": samples}


# --------------------------------------------------------------------------------------------------- driver
def export_revision(revision: str, into: Path) -> Path:
    """The ``implicit`` package as of ``revision``, extracted under ``into`` (``git archive``)."""
    archive = subprocess.run(
        ["git", "archive", "--format=tar", revision, "implicit"], cwd=ROOT, capture_output=True, check=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def spawn(library: str, args: argparse.Namespace, path: Path | None = None) -> dict[str, Any]:
    command = [sys.executable, "-m", "benchmarks.call_overhead", "--worker", library]
    command += ["--calls", str(args.calls), "--rounds", str(args.rounds), "--warmup", str(args.warmup)]
    env = dict(os.environ)
    if path is not None:  # the exported package first (also as the working directory, which -m puts first)
        env["PYTHONPATH"] = os.pathsep.join([str(path), str(ROOT)])
    done = subprocess.run(command, cwd=path or ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"worker {library} failed:\n{done.stderr}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if path is not None and not result["origin"].startswith(str(path)):
        raise RuntimeError(f"the baseline worker imported {result['origin']}, not the exported revision")
    return result


def peer_available() -> str | None:
    try:
        from importlib.metadata import version

        import torchdeq  # noqa: F401

        return version("torchdeq")
    except Exception:
        return None


def collect(args: argparse.Namespace) -> dict[str, dict[str, list[float]]]:
    """``{column: {case: samples}}`` over ``args.reps`` alternations of the workers."""
    columns: dict[str, dict[str, list[float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        libraries: list[tuple[str, str, Path | None]] = [("torch-implicit (this tree)", "ours", None)]
        if args.baseline:
            libraries.append((f"torch-implicit at {args.baseline}", "ours", export_revision(args.baseline, Path(tmp))))
        if peer_available():
            libraries.append(("TorchDEQ 0.1.0", "torchdeq", None))
        for rep in range(args.reps):
            for column, library, path in libraries:
                print(f"rep {rep + 1}/{args.reps}: {column}", file=sys.stderr, flush=True)
                result = spawn(library, args, path)
                for case, values in result["samples"].items():
                    columns.setdefault(column, {}).setdefault(case, []).extend(values)
    return columns


def markdown(columns: dict[str, dict[str, list[float]]], args: argparse.Namespace) -> str:
    names = list(columns)
    header = ["solver", "mode", *[f"{name}, µs" for name in names]]
    ours = names[0]
    if "TorchDEQ 0.1.0" in columns:
        header.append("ours / TorchDEQ")
    if args.baseline:
        header.append(f"ours / at {args.baseline}")
    rows = []
    for solver in SOLVERS:
        for mode in MODES:
            case = f"{solver}|{mode}"
            medians = [statistics.median(columns[name].get(case, [float("nan")])) for name in names]
            row = [solver, mode, *[fmt(m, 3) for m in medians]]
            by_name = dict(zip(names, medians))
            if "TorchDEQ 0.1.0" in columns:
                row.append(f"{by_name[ours] / by_name['TorchDEQ 0.1.0']:.2f}×")
            if args.baseline:
                row.append(f"{by_name[ours] / by_name[f'torch-implicit at {args.baseline}']:.2f}×")
            rows.append(row)
    bare = statistics.median(columns[ours]["f only|no grad"])
    cpu = platform.processor() or platform.machine()
    with open("/proc/cpuinfo") as fh:
        cpu = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), cpu)
    command = shlex.join(["python", "-m", "benchmarks.call_overhead", *args.argv])
    lines = [
        f"- date (UTC): {_dt.datetime.now(_dt.timezone.utc).strftime('%Y-%m-%d %H:%M')}; CPU: {cpu}, "
        f"{os.cpu_count()} logical cores, 1 torch thread; torch {torch.__version__}, "
        f"Python {platform.python_version()}",
        f"- torch-implicit: {source_state()}; command: `{command}`",
        f"- {args.reps} alternations of the worker processes × {args.rounds} rounds of {args.calls} calls per case "
        f"({args.calls // 10} for forward + backward) after {args.warmup} warm-up rounds; medians over all rounds",
        "",
        table(header, rows),
        "",
        f"The two f-evaluations themselves (bare `0.5 z + x` twice, no grad) cost {fmt(bare, 3)} µs.",
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.call_overhead", description=__doc__.split("\n")[0])
    parser.add_argument("--worker", choices=("ours", "torchdeq"), help=argparse.SUPPRESS)
    parser.add_argument("--baseline", help="also measure torch-implicit at this git revision (e.g. 8eef200)")
    parser.add_argument("--reps", type=int, default=3, help="alternations of the worker processes (3)")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per worker (5)")
    parser.add_argument("--warmup", type=int, default=1, help="warm-up rounds per worker (1)")
    parser.add_argument("--calls", type=int, default=2000, help="calls per case and round (2000)")
    parser.add_argument("--write", action="store_true", help=f"replace this section of {RESULTS_PATH.name}")
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(run_worker(args.worker, args.calls, args.rounds, args.warmup)))
        return 0
    text = markdown(collect(args), args)
    print(text)
    if args.write:
        replace_block(text, BEGIN_MARK, END_MARK, heading=HEADING)
        print(f"\nwrote {RESULTS_PATH}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
