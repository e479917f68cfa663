"""``python -m integrations.flow train | eval | demo``: train DEQ-Flow (or RAFT, ``--baseline raft``) on synthetic or
real data, evaluate a checkpoint at several test-time budgets, or run the demo (convert ``raft_small``, train briefly
on synthetic data from random initialisation, report EPE and convergence before and after, write pictures)."""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from ..engine_options import add_option_argument, engine_options
from .data import AUGMENTATION_PRESETS, flow_dataset
from .metrics import endpoint_error
from .model import DEQFlow
from .train import MODELS, Run, TrainConfig, budget_table, evaluate, pairs_in, predict, train, write_history
from .visualize import save_curves, save_flow_figure, save_residual_curves


# ------------------------------------------------------------------------------------------------ arguments
def _engine_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("DEQ-Flow options (engine options and raft_to_deq_flow keywords)")
    group.add_argument("--solver", help="forward solver (default anderson)")
    group.add_argument("--max-iter", type=int, help="solver iterations in training (default 36)")
    group.add_argument("--eval-max-iter", type=int, help="solver iterations in evaluation (default 1.5 × max-iter)")
    group.add_argument("--tol", type=float, help="stopping tolerance (default 1e-3, absolute per element)")
    group.add_argument("--correction", type=int, help="supervised states of sparse fixed-point correction")
    group.add_argument("--preset", choices=("chairs", "things"), help="DEQ-Flow's correction schedule")
    group.add_argument("--backward", help="backward mode (default phantom, 1 step)")
    group.add_argument("--h0", choices=("tanh", "zeros"), help="initial hidden state (default tanh)")
    group.add_argument("--checkpoint-encoders", action="store_true", help="encoders under torch.utils.checkpoint")
    add_option_argument(group, example="jac_loss_probes=1")


def _implicit_options(args: argparse.Namespace) -> dict[str, Any]:
    names = ("solver", "max_iter", "eval_max_iter", "tol", "correction", "preset", "backward", "h0")
    options = engine_options(args, names, example="jac_loss_probes=1")
    if args.checkpoint_encoders:
        options["checkpoint_encoders"] = True
    return options


def parser() -> argparse.ArgumentParser:
    main = argparse.ArgumentParser(prog="python -m integrations.flow", description=__doc__)
    commands = main.add_subparsers(dest="command", required=True)

    t = commands.add_parser("train", help="train DEQ-Flow (or RAFT with --baseline raft)")
    t.add_argument("--baseline", choices=("raft",), help="train torchvision's RAFT itself (unrolled) instead")
    t.add_argument("--model", choices=MODELS, default="raft_small")
    t.add_argument("--weights", help="initial weights: a state dict or a checkpoint of this command")
    t.add_argument(
        "--data", default="synthetic", help="synthetic[:SEED], chairs:PATH, things:PATH, sintel:PATH, kitti:PATH"
    )
    t.add_argument("--val-data", help="validation data spec (default: --data's validation split)")
    t.add_argument("--size", type=int, nargs=2, default=(128, 160), metavar=("H", "W"), help="training crop")
    t.add_argument("--augment", default="auto", choices=("auto", "none", *AUGMENTATION_PRESETS))
    t.add_argument("--batch-size", type=int, default=4)
    t.add_argument("--steps", type=int, help="training steps (default 300; with --resume: the run's own)")
    t.add_argument("--lr", type=float, default=4e-4)
    t.add_argument("--weight-decay", type=float, default=1e-4)
    t.add_argument("--updates", type=int, default=12, help="RAFT's updates (baseline)")
    t.add_argument("--jac-loss-weight", type=float, default=1.0)
    t.add_argument("--freeze-bn", action="store_true", help="BatchNorm in eval mode (RAFT after Chairs)")
    t.add_argument("--val-every", type=int, default=50)
    t.add_argument("--val-pairs", type=int, default=32)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--workers", type=int, default=0, help="data-loader worker processes")
    t.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    t.add_argument("--out", default="runs/flow", help="folder for checkpoint.pt, history.json and the PNGs")
    t.add_argument("--resume", help="continue from this checkpoint (its config; --steps may extend the run)")
    t.add_argument("--no-progress", action="store_true")
    _engine_arguments(t)

    e = commands.add_parser("eval", help="evaluate a checkpoint at test-time budgets")
    e.add_argument("checkpoint")
    e.add_argument("--data", help="data spec (default: the run's validation data)")
    e.add_argument("--split", default="val", choices=("train", "val"))
    e.add_argument("--pairs", type=int, help="first N pairs (default all)")
    e.add_argument("--batch-size", type=int, default=1, help="pairs per batch (1 for real data of mixed sizes)")
    e.add_argument(
        "--budgets",
        type=float,
        nargs="+",
        default=(1.0, 2.0, 4.0),
        help="test-time budgets as multiples of the training budget",
    )
    e.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    e.add_argument("--out", help="folder for the PNGs (default: next to the checkpoint)")

    d = commands.add_parser("demo", help="convert raft_small, train briefly on synthetic data, show the result")
    d.add_argument("--out", default="flow_demo", help="folder for the PNGs and the checkpoint")
    d.add_argument("--steps", type=int, default=150)
    d.add_argument("--size", type=int, nargs=2, default=(128, 160), metavar=("H", "W"))
    d.add_argument("--batch-size", type=int, default=4)
    d.add_argument("--val-pairs", type=int, default=16)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    d.add_argument("--no-progress", action="store_true")
    _engine_arguments(d)
    return main


# ------------------------------------------------------------------------------------------------ pictures
def write_pictures(
    model: nn.Module,
    dataset: Dataset,
    out: Path,
    *,
    tag: str = "",
    device: str = "cpu",
    before: dict[str, Any] | None = None,
) -> list[Path]:
    """``flow{tag}.png`` (frames, ground truth, prediction of the first pair; ``before``'s prediction too) and, for
    DEQ-Flow, ``residual{tag}.png`` (residual per solver iteration on the first batch, ``before``'s curves too)."""
    pictures = snapshot(model, dataset, device=device)
    image1, image2, flow, valid = (t[0] for t in pictures["batch"])
    flows = {"ground truth": flow}
    if before is not None:
        flows[f"before, EPE {before['epe']:.2f}"] = before["flow"]
    flows[f"{'after' if before is not None else 'predicted'}, EPE {pictures['epe']:.2f}"] = pictures["flow"]
    paths = [save_flow_figure(out / f"flow{tag}.png", image1, image2, flows, valid=valid)]
    if "trace" in pictures:
        curves = {}
        if before is not None and "trace" in before:
            curves["before training"] = (before["trace_nfe"], before["trace"])
        curves["after training" if before is not None else "solve"] = (pictures["trace_nfe"], pictures["trace"])
        paths.append(save_residual_curves(out / f"residual{tag}.png", curves, ylabel="absolute residual (RMS)"))
    return paths


@torch.no_grad()
def snapshot(model: nn.Module, dataset: Dataset, *, device: str = "cpu", pairs: int = 4) -> dict[str, Any]:
    """The model's prediction for the first pair and, for DEQ-Flow, the per-iteration residual of the first
    ``pairs`` pairs (every iteration measured, the full eval budget)."""
    was_training = model.training
    model.eval()
    items = [dataset[i] for i in range(min(pairs, pairs_in(dataset)))]
    batch = [torch.stack([item[k] for item in items]).to(device) for k in range(4)]
    overrides: dict[str, Any] = {"check_every": 1, "tol": 0.0, "stop_mode": "abs"} if isinstance(model, DEQFlow) else {}
    flows, info = predict(model, batch[0], batch[1], **overrides)
    model.train(was_training)
    result: dict[str, Any] = {"batch": [t.cpu() for t in batch], "flow": flows[-1][0].cpu()}
    result["epe"] = float(endpoint_error(flows[-1][:1], batch[2][:1]).mean())
    if info is not None:
        result.update(trace=info.forward.trace.cpu(), trace_nfe=list(info.forward.trace_nfe))
    return result


def write_training_curves(run: Run, path: Path) -> Path:
    steps = [r["step"] for r in run.history]
    series = {"training loss": (steps, [r["loss"] for r in run.history])}
    if run.validations:
        series["validation EPE"] = ([v["step"] for v in run.validations], [v["epe"] for v in run.validations])
    return save_curves(path, series, xlabel="step", ylabel="loss / EPE (px)", log=True)


# ------------------------------------------------------------------------------------------------ commands
def train_command(args: argparse.Namespace) -> Run:
    out = Path(args.out)
    if args.resume:
        changes = {} if args.steps is None else {"steps": args.steps}
        run = Run.load(args.resume, **changes)
        print(f"resumed {args.resume} at step {run.step} of {run.config.steps}")
    else:
        config = TrainConfig(
            method=args.baseline or "deq",
            model=args.model,
            weights=args.weights,
            implicit={} if args.baseline else _implicit_options(args),
            updates=args.updates,
            data=args.data,
            val_data=args.val_data,
            size=tuple(args.size),
            augment=args.augment,
            batch_size=args.batch_size,
            steps=300 if args.steps is None else args.steps,
            lr=args.lr,
            weight_decay=args.weight_decay,
            jac_loss_weight=args.jac_loss_weight,
            freeze_bn=args.freeze_bn,
            val_every=args.val_every,
            val_pairs=args.val_pairs,
            seed=args.seed,
            workers=args.workers,
            device=args.device,
        )
        run = Run.start(config)
    print(f"training {describe(run.model)} on {run.config.data} for {run.config.steps} steps → {out}")
    run = train(run, out=out, progress=not args.no_progress)
    last = run.validations[-1] if run.validations else {}
    print(f"step {run.step}: validation {format_metrics(last)}")
    paths = [write_history(run, out / "history.json"), write_training_curves(run, out / "training.png")]
    val_set = flow_dataset(run.config.val_data or run.config.data, split="val", size=run.config.size)
    paths += write_pictures(run.model, val_set, out, device=run.config.device)
    print("wrote " + ", ".join(str(p) for p in [out / "checkpoint.pt", *paths]))
    return run


def eval_command(args: argparse.Namespace) -> list[dict[str, float]]:
    run = Run.load(args.checkpoint, device=args.device)
    config = run.config
    spec = args.data or config.val_data or config.data
    dataset = flow_dataset(spec, split=args.split, size=config.size)
    print(f"{describe(run.model)}, step {run.step}, on {spec} ({args.split}, {args.pairs or pairs_in(dataset)} pairs)")
    rows = budget_table(
        run.model,
        dataset,
        factors=args.budgets,
        pairs=args.pairs or pairs_in(dataset),
        batch_size=args.batch_size,
        updates=config.updates,
        device=args.device,
    )
    print(budget_markdown(rows, deq=isinstance(run.model, DEQFlow)))
    out = Path(args.out) if args.out else Path(args.checkpoint).parent
    paths = write_pictures(run.model, dataset, out, tag="_eval", device=args.device)
    print("wrote " + ", ".join(map(str, paths)))
    return rows


def demo_command(args: argparse.Namespace) -> Run:
    """Convert raft_small into DEQ-Flow, train it briefly on synthetic flow from random initialisation, and show EPE,
    convergence and pictures before and after."""
    out = Path(args.out)
    implicit = {"correction": 3, **_implicit_options(args)}  # DEQ-Flow's defaults: 36 iterations, tol 1e-3
    config = TrainConfig(
        method="deq",
        model="raft_small",
        implicit=implicit,
        size=tuple(args.size),
        batch_size=args.batch_size,
        steps=args.steps,
        val_every=max(1, args.steps // 3),
        val_pairs=args.val_pairs,
        seed=args.seed,
        device=args.device,
    )
    started = time.perf_counter()
    run = Run.start(config)
    model = run.model
    print(f"Converted torchvision's raft_small into DEQ-Flow: {describe(model)}")
    print(
        f"{sum(p.numel() for p in model.parameters()):,} parameters, shared with the RAFT instance; "
        f"training on synthetic layered-motion pairs of {config.size[0]}×{config.size[1]} (exact ground truth)"
    )
    val_set = flow_dataset(config.data, split="val", size=config.size)
    zero = flow_metrics_of_zero(val_set, config.val_pairs)
    before = evaluate(model, val_set, pairs=config.val_pairs, batch_size=config.batch_size, device=config.device)
    before_pictures = snapshot(model, val_set, device=config.device)
    print(
        f"before training ({config.val_pairs} validation pairs, eval budget {model.eval_max_iter} iterations): "
        f"{format_metrics(before)}   (zero flow: EPE {zero:.3f})"
    )
    run = train(run, out=out, progress=not args.no_progress)
    after = run.validations[-1]
    print(f"after {run.step} steps: {format_metrics(after)}")
    rows = budget_table(
        model,
        val_set,
        factors=(1.0, 2.0, 4.0),
        pairs=config.val_pairs,
        batch_size=config.batch_size,
        updates=config.updates,
        device=config.device,
    )
    print("EPE against the test-time budget (solver iterations, multiples of the training budget):")
    print(budget_markdown(rows, deq=True))
    paths = [write_history(run, out / "history.json"), write_training_curves(run, out / "training.png")]
    paths += write_pictures(model, val_set, out, device=config.device, before=before_pictures)
    print(f"pictures and checkpoint in {out.resolve()}: " + ", ".join(p.name for p in [out / "checkpoint.pt", *paths]))
    print(f"demo took {time.perf_counter() - started:.0f} s")
    return run


# ------------------------------------------------------------------------------------------------ formatting
def describe(model: nn.Module) -> str:
    if isinstance(model, DEQFlow):
        o = model.implicit_options
        correction = f", {len(o.supervised_steps)} supervised states" if o.supervised_steps else ""
        return (
            f"DEQ-Flow ({o.solver}, {o.max_iter} iterations in training, {model.eval_max_iter} in eval, "
            f"{o.backward} gradient{correction})"
        )
    return "RAFT (unrolled updates, backpropagation through all of them)"


def format_metrics(metrics: dict[str, float]) -> str:
    parts = [f"EPE {metrics['epe']:.3f}"] if "epe" in metrics else []
    parts += [f"{k} {metrics[k]:.1f}%" for k in ("1px", "3px", "5px") if k in metrics]
    if "nfe" in metrics:
        parts.append(
            f"NFE {metrics['nfe']:.0f}, residual {metrics['residual']:.2e} (max {metrics['residual_max']:.2e})"
        )
    return ", ".join(parts)


def budget_markdown(rows: Sequence[dict[str, float]], *, deq: bool) -> str:
    unit = "iterations" if deq else "updates"
    lines = [
        f"| budget | {unit} | EPE | 1px | 3px | 5px |" + (" NFE | residual |" if deq else ""),
        "|---|---|---|---|---|---|" + ("---|---|" if deq else ""),
    ]
    for r in rows:
        line = f"| {r['factor']:g}× | {r['budget']:.0f} | {r['epe']:.3f} | "
        line += " | ".join(f"{r[k]:.1f}" for k in ("1px", "3px", "5px")) + " |"
        if deq:
            line += f" {r['nfe']:.0f} | {r['residual']:.2e} |"
        lines.append(line)
    return "\n".join(lines)


def flow_metrics_of_zero(dataset: Dataset, pairs: int) -> float:
    """EPE of predicting zero flow on the first ``pairs`` pairs (the trivial baseline)."""
    errors = [torch.linalg.vector_norm(dataset[i][2], dim=0).mean() for i in range(min(pairs, pairs_in(dataset)))]
    return float(torch.stack(errors).mean())


def main(argv: Sequence[str] | None = None) -> Any:
    args = parser().parse_args(argv)
    command = {"train": train_command, "eval": eval_command, "demo": demo_command}[args.command]
    return command(args)
