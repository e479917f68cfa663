"""``python -m integrations.jiio demo``: train a DEQ-decoder autoencoder on scikit-learn's digits briefly, then
reconstruct corrupted test digits (denoising, inpainting) by latent-code optimisation with JIIO and with nested
optimisation (DEQ solve + implicit backward per projected Adam step) run until it reaches JIIO's objective; print
reconstruction errors, f-evaluations and times, write ``demo.png`` (clean / corrupted / JIIO / baseline rows per task)
and ``demo.json``."""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .tasks import (
    CORRUPTIONS,
    AutoEncoder,
    autoencoder_loss,
    corrupt,
    exact_objective,
    inverse_problem,
    load_digits,
    run_jiio,
    run_nested,
    split,
    train,
)

#: The baseline stops once its objective (batch sum) is within this fraction of JIIO's decrease from the start.
MATCH = 1e-3


def parser() -> argparse.ArgumentParser:
    main = argparse.ArgumentParser(prog="python -m integrations.jiio", description=__doc__)
    commands = main.add_subparsers(dest="command", required=True)
    d = commands.add_parser("demo", help="train the DEQ decoder, reconstruct corrupted digits (JIIO vs nested)")
    d.add_argument("--out", default="jiio_demo", help="folder for demo.png and demo.json")
    d.add_argument("--train-steps", type=int, default=300, help="autoencoder training steps (batch 128, Adam)")
    d.add_argument("--images", type=int, default=16, help="test digits reconstructed per task")
    d.add_argument("--latent", type=int, default=10, help="latent code size")
    d.add_argument("--max-iter", type=int, default=100, help="JIIO iterations at most")
    d.add_argument("--tol", type=float, default=1e-5, help="JIIO's tolerance (relative, augmented residual)")
    d.add_argument("--alpha-x", type=float, default=1.0, help="JIIO's step size on the latent code")
    d.add_argument("--memory", type=int, default=30, help="Anderson memory of the augmented solve")
    d.add_argument("--baseline", choices=("adam", "pgd"), default="adam", help="outer optimiser of the baseline")
    d.add_argument("--lr", type=float, default=0.1, help="baseline step size")
    d.add_argument("--baseline-steps", type=int, default=1000, help="baseline outer steps at most")
    d.add_argument("--dtype", choices=("float32", "float64"), default="float64")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--threads", type=int, default=1, help="torch threads (the problems are small: 1 is fastest)")
    d.add_argument("--quiet", action="store_true", help="no progress output")
    return main


def main(argv: Sequence[str] | None = None) -> None:
    args = parser().parse_args(argv)
    if args.command == "demo":
        demo(args)


def demo(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    say = (lambda *a: None) if args.quiet else print
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    images, labels = load_digits(dtype)
    train_idx, test_idx = split(len(images), args.seed)
    model = AutoEncoder(latent=args.latent).to(dtype)
    start = time.perf_counter()
    history = train(model, autoencoder_loss(model), images[train_idx], labels[train_idx], steps=args.train_steps)
    say(f"trained the DEQ decoder: {args.train_steps} steps in {time.perf_counter() - start:.1f} s, "
        f"reconstruction MSE {history[0]:.4f} -> {history[-1]:.4f}")  # fmt: skip
    model.requires_grad_(False)
    clean = images[test_idx[: args.images]]
    report: dict[str, Any] = {"train": {"steps": args.train_steps, "loss": [history[0], history[-1]]}}
    rows: list[tuple[str, Tensor]] = []
    say(f"{'task':8} {'method':24} {'objective':>11} {'MSE clean':>10} {'f-evals+VJPs':>12} {'time s':>7}")
    for kind in CORRUPTIONS:
        y, mask = corrupt(clean, kind, args.seed + 1)
        problem = inverse_problem(model, y, mask)
        problem.alpha_x = args.alpha_x
        start_value = float(exact_objective(problem, problem.x0).sum())
        mine = run_jiio(problem, max_iter=args.max_iter, tol=args.tol, memory=args.memory)
        mine_value = float(exact_objective(problem, mine.x).sum())
        target = mine_value + MATCH * abs(start_value - mine_value)
        theirs = run_nested(
            problem, target=target, method=args.baseline, lr=args.lr, max_steps=args.baseline_steps, tol=args.tol
        )
        results: dict[str, Any] = {}
        for name, outcome in (("jiio", mine), ("baseline", theirs)):
            value = float(exact_objective(problem, outcome.x).sum())
            error = float(((model.image(outcome.z) - clean) ** 2).mean())
            results[name] = {
                "objective": value,
                "error": error,
                "evaluations": outcome.evaluations,
                "steps": outcome.steps,
                "seconds": outcome.seconds,
                "capped": outcome.capped,
            }
            if name == "jiio":
                label = f"JIIO ({outcome.converged}/{len(clean)} converged)"
                results[name]["converged"] = outcome.converged
            else:
                label = f"nested {args.baseline} ({outcome.steps} steps)"
            say(f"{kind:8} {label:24} {value:11.5f} {error:10.5f} {outcome.evaluations:12d} {outcome.seconds:7.2f}")
        results["start_objective"] = start_value
        results["corrupted_error"] = float(((y - clean) ** 2).mean())  # hidden pixels count as 0
        results["ratio"] = theirs.evaluations / mine.evaluations
        say(f"{kind:8} nested / JIIO f-evaluations: {results['ratio']:.1f}x")
        report[kind] = results
        shown = torch.where(mask > 0, y, torch.full_like(y, 0.5)).clamp(0, 1)
        rows += [
            (f"{kind}: clean", clean),
            (f"{kind}: corrupted", shown),
            (f"{kind}: JIIO", model.image(mine.z)),
            (f"{kind}: nested", model.image(theirs.z)),
        ]
    save_grid(rows, out / "demo.png")
    (out / "demo.json").write_text(json.dumps(report, indent=2))
    say(f"wrote {out / 'demo.png'} and {out / 'demo.json'}")
    return report


def save_grid(rows: list[tuple[str, Tensor]], path: Path) -> None:
    """One row of 8×8 images per entry of ``rows`` (title, ``(n, 64)`` pixels in [0, 1])."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = max(len(images) for _, images in rows)
    fig, axes = plt.subplots(len(rows), n, figsize=(0.8 * n + 1.5, 0.85 * len(rows)), squeeze=False)
    for r, (title, images) in enumerate(rows):
        for c in range(n):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c < len(images):
                ax.imshow(images[c].detach().reshape(8, 8).cpu().float().numpy(), cmap="gray_r", vmin=0, vmax=1)
        axes[r][0].set_ylabel(title, rotation=0, ha="right", va="center", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
