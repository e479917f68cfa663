"""DEQ-Flow against RAFT in accuracy: validation EPE after the same number of training steps on the synthetic set,
and EPE against the test-time budget (1×, 2×, 4× the training budget: solver iterations for DEQ-Flow, updates for
RAFT).

    python -m benchmarks.flow_accuracy                       # raft_small, 128×160, batch 4, 300 steps (CPU: ~25 min)
    python -m benchmarks.flow_accuracy --steps 1000 --device cuda
    python -m benchmarks.flow --rows accuracy                # the same, from the flow benchmark

Every run starts from the same random initialisation (seed) and sees the same batches; validation uses the first
``--val-pairs`` pairs of the synthetic validation split (never trained on).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import time
from typing import Any

import torch

from integrations.flow.commands import flow_metrics_of_zero
from integrations.flow.data import flow_dataset
from integrations.flow.train import Run, TrainConfig, budget_table, train

# name → (method, DEQ options)
RUNS: dict[str, tuple[str, dict[str, Any]]] = {
    "RAFT-12 (BPTT)": ("raft", {}),
    "DEQ-Flow, defaults (36 it., 1-step phantom)": ("deq", {}),
    "DEQ-Flow, preset chairs (6 states × 1 step)": ("deq", {"preset": "chairs"}),
    "DEQ-Flow, 12 it., 3 states": ("deq", {"max_iter": 12, "correction": 3}),
    "DEQ-Flow, 12 it., 3 states, Jacobian reg.": ("deq", {"max_iter": 12, "correction": 3, "jac_loss_probes": 1}),
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="raft_small", choices=("raft_small", "raft_large"))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--size", type=int, nargs=2, default=(128, 160))
    parser.add_argument("--val-pairs", type=int, default=32)
    parser.add_argument("--budgets", type=float, nargs="+", default=(1.0, 2.0, 4.0))
    parser.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS), metavar="RUN")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    size = tuple(args.size)
    val_set = flow_dataset("synthetic", split="val", size=size)
    print(_header(args))
    print(f"zero-flow EPE on the validation pairs: {flow_metrics_of_zero(val_set, args.val_pairs):.3f}\n")
    rows = []
    for name in args.runs:
        method, options = RUNS[name]
        config = TrainConfig(
            method=method,
            model=args.model,
            implicit=options,
            size=size,
            batch_size=args.batch_size,
            steps=args.steps,
            val_every=args.steps,
            val_pairs=args.val_pairs,
            seed=args.seed,
            device=args.device,
        )
        started = time.perf_counter()
        run = train(Run.start(config), progress=False)
        seconds = time.perf_counter() - started
        step_time = statistics.median(r["seconds"] for r in run.history)
        # DEQ-Flow also with the same budgets spent in full (no stopping at the tolerance).
        variants = [(name, {}), (f"{name}, tol 0", {"tol": 0.0})] if method == "deq" else [(name, {})]
        for label, overrides in variants:
            table = budget_table(
                run.model,
                val_set,
                factors=args.budgets,
                pairs=args.val_pairs,
                batch_size=args.batch_size,
                updates=config.updates,
                device=args.device,
                **overrides,
            )
            rows.append((label, table, step_time, seconds))
        print(f"{name}: trained in {seconds:.0f} s ({step_time:.2f} s/step median)", flush=True)
    print()
    print(_markdown(rows, args.budgets))


def _markdown(rows: list[tuple[str, list[dict[str, float]], float, float]], budgets: list[float]) -> str:
    head = "| run | s/step | " + " | ".join(f"EPE at {b:g}× (budget)" for b in budgets) + " | 1px / 3px at 1× |"
    lines = [head, "|---|---|" + "---|" * len(budgets) + "---|"]
    for name, table, step_time, _ in rows:
        cells = []
        for r in table:
            nfe = f", NFE {r['nfe']:.0f}, res {r['residual']:.1e}" if "nfe" in r else ""
            cells.append(f"{r['epe']:.3f} ({r['budget']:.0f}{nfe})")
        first = table[0]
        lines.append(
            f"| {name} | {step_time:.2f} | " + " | ".join(cells) + f" | {first['1px']:.1f} / {first['3px']:.1f} |"
        )
    return "\n".join(lines)


def _header(args: argparse.Namespace) -> str:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    import torchvision

    return (
        f"{args.model}, {args.size[0]}×{args.size[1]}, batch {args.batch_size}, {args.steps} steps, seed {args.seed}, "
        f"device {args.device} ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads), "
        f"torch {torch.__version__}, torchvision {torchvision.__version__}, commit {commit}"
    )


if __name__ == "__main__":
    main()
