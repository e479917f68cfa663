"""``python -m integrations.vision train | eval | analyse``: train the multiscale DEQ classifier converted from a timm
HRNet (or the stacked-stage baseline, ``--baseline stacked``) on scikit-learn's digits or CIFAR-10 from disk,
evaluate a checkpoint, or analyse its path independence (asymptotic alignment, accuracy against the test-time
budget)."""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from implicit.analysis import STARTS, alignment_correlation, asymptotic_alignment, budget_table, format_table

from ..engine_options import add_option_argument, engine_options
from .data import image_dataset
from .model import HEADS, STAGES, MDEQClassifier
from .train import Run, TrainConfig, count_parameters, evaluate, load_model, train, write_history
from .visualize import save_alignment_distribution, save_residual_distribution, save_training_curves

DEFAULT_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


# ------------------------------------------------------------------------------------------------ arguments
def _engine_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("engine options of the MDEQ")
    group.add_argument("--solver", help="forward solver (default anderson)")
    group.add_argument("--max-iter", type=int, help="solver iterations (default 18)")
    group.add_argument("--tol", type=float, help="stopping tolerance (default 1e-3, relative)")
    group.add_argument("--backward", help="backward mode (default phantom)")
    group.add_argument("--jac-loss-probes", type=int, help="Jacobian regularisation probes (default 0: off)")
    add_option_argument(group, example="jac_loss_prob=0.5")


def _implicit_options(args: argparse.Namespace) -> dict[str, Any]:
    names = ("solver", "max_iter", "tol", "backward", "jac_loss_probes")
    options = engine_options(args, names, example="jac_loss_prob=0.5")
    return options


def parser() -> argparse.ArgumentParser:
    main = argparse.ArgumentParser(prog="python -m integrations.vision", description=__doc__)
    main.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    commands = main.add_subparsers(dest="command", required=True)

    t = commands.add_parser("train", help="train the MDEQ classifier (or the stacked baseline)")
    t.add_argument("--baseline", choices=("stacked",), help="train the classifier with timm's stacked stage instead")
    t.add_argument("--model", default="hrnet_w18_small", help="timm HRNet name (random initialisation)")
    t.add_argument("--stage", choices=STAGES, default="stage4")
    t.add_argument("--head", choices=HEADS, default="light")
    t.add_argument("--pretrain-steps", type=int, default=0, help="unrolled pre-training steps (MDEQ)")
    t.add_argument("--pretrain-depth", type=int, default=5, help="layers of the unrolled pre-training")
    t.add_argument("--data", default="digits", help="digits (default) or cifar10:PATH")
    t.add_argument("--size", type=int, default=32, help="image side the model sees (digits are upsampled)")
    t.add_argument("--shift", type=int, default=0, help="augmentation: random translations of up to N pixels")
    t.add_argument("--batch-size", type=int, default=32)
    t.add_argument("--epochs", type=int, help="epochs (default 8; with --resume: the run's own)")
    t.add_argument("--lr", type=float, default=2e-3)
    t.add_argument("--weight-decay", type=float, default=1e-4)
    t.add_argument("--jac-loss-weight", type=float, default=0.4)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", default=DEFAULT_DEVICE)
    t.add_argument("--out", default="runs/vision", help="folder for checkpoint.pt, history.json and the PNGs")
    t.add_argument("--resume", help="continue from this checkpoint (its config; --epochs may extend the run)")
    t.add_argument("--no-progress", action="store_true")
    _engine_arguments(t)

    e = commands.add_parser("eval", help="accuracy and residual statistics of a checkpoint")
    e.add_argument("checkpoint")
    e.add_argument("--data", help="data spec (default: the run's)")
    e.add_argument("--split", default="test", choices=("train", "test"))
    e.add_argument("--limit", type=int, help="first N examples (default all)")
    e.add_argument("--batch-size", type=int, default=256)
    e.add_argument("--max-iter", type=int, help="solver budget (default the training budget)")
    e.add_argument("--tol", type=float, help="tolerance (default the training one; 0 spends the budget in full)")
    e.add_argument("--device", default=DEFAULT_DEVICE)
    e.add_argument("--out", help="folder for residuals.png (default: next to the checkpoint)")

    a = commands.add_parser("analyse", help="path independence: asymptotic alignment and the budget table")
    a.add_argument("checkpoint")
    a.add_argument("--data", help="data spec (default: the run's)")
    a.add_argument("--split", default="test", choices=("train", "test"))
    a.add_argument("--limit", type=int, help="first N examples (default all)")
    a.add_argument("--batch-size", type=int, default=128)
    a.add_argument("--starts", nargs="+", choices=STARTS, default=list(STARTS), help="second starting points")
    a.add_argument("--aa-max-iter", type=int, help="budget of the alignment solves (default 4 × training)")
    a.add_argument("--aa-tol", type=float, default=1e-4, help="tolerance of the alignment solves")
    a.add_argument("--budgets", type=float, nargs="+", default=(1.0, 2.0, 4.0), help="multiples of the budget")
    a.add_argument("--full-budget", action="store_true", help="tol=0 in the budget table: spend every budget")
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--device", default=DEFAULT_DEVICE)
    a.add_argument("--out", help="folder for analysis.json and alignment.png (default: next to the checkpoint)")
    return main


# ------------------------------------------------------------------------------------------------ commands
def train_command(args: argparse.Namespace) -> Run:
    out = Path(args.out)
    if args.resume:
        run = Run.load(args.resume, **({} if args.epochs is None else {"epochs": args.epochs}))
        print(f"resumed {args.resume} after epoch {run.epoch} of {run.config.epochs}")
    else:
        config = TrainConfig(
            method=args.baseline or "mdeq",
            model=args.model,
            stage=args.stage,
            head=args.head,
            implicit={} if args.baseline else _implicit_options(args),
            pretrain_steps=args.pretrain_steps,
            pretrain_depth=args.pretrain_depth,
            data=args.data,
            size=args.size,
            shift=args.shift,
            batch_size=args.batch_size,
            epochs=8 if args.epochs is None else args.epochs,
            lr=args.lr,
            weight_decay=args.weight_decay,
            jac_loss_weight=args.jac_loss_weight,
            seed=args.seed,
            device=args.device,
        )
        run = Run.start(config)
        print(f"{config.method} on {config.data}: {count_parameters(run.model):,} parameters")
    run = train(run, out=out, progress=not args.no_progress, report=True)
    run.save(out / "checkpoint.pt")
    write_history(run, out / "history.json")
    paths = [save_training_curves(out / "curves.png", run.history, run.epochs)]
    c = run.config
    test_set = image_dataset(c.data, split="test", size=c.size)
    metrics, per_example = evaluate(run.model, test_set, batch_size=c.eval_batch_size, device=c.device)
    if "residual" in per_example:
        paths.append(_residual_picture(run.model, per_example, out / "residuals.png", "test set, after training"))
    print(json.dumps(metrics))
    print("wrote " + ", ".join(str(p) for p in [out / "checkpoint.pt", out / "history.json", *paths]))
    return run


def _residual_picture(model: Any, per_example: dict[str, torch.Tensor], path: Path, title: str) -> Path:
    tol = model.implicit_options.tol if isinstance(model, MDEQClassifier) else None
    correct = per_example["correct"]
    residual = per_example["residual"]
    sets = {"correct": residual[correct], "wrong": residual[~correct]}
    return save_residual_distribution(path, {k: v for k, v in sets.items() if v.numel()}, tol=tol, title=title)


def eval_command(args: argparse.Namespace) -> dict[str, float]:
    model, config = load_model(args.checkpoint, device=args.device)
    dataset = image_dataset(args.data or config.data, split=args.split, size=config.size)
    overrides = {k: v for k, v in (("max_iter", args.max_iter), ("tol", args.tol)) if v is not None}
    metrics, per_example = evaluate(
        model, dataset, batch_size=args.batch_size, device=args.device, limit=args.limit, **overrides
    )
    print(json.dumps(metrics, indent=1))
    if "residual" in per_example:
        out = Path(args.out) if args.out else Path(args.checkpoint).parent
        print(f"wrote {_residual_picture(model, per_example, out / 'residuals_eval.png', f'{args.split} set')}")
    return metrics


@torch.no_grad()
def analyse_command(args: argparse.Namespace) -> dict[str, Any]:
    model, config = load_model(args.checkpoint, device=args.device)
    if not isinstance(model, MDEQClassifier):
        raise SystemExit("analyse: the checkpoint holds the stacked baseline, which has no equilibrium to analyse")
    dataset = image_dataset(args.data or config.data, split=args.split, size=config.size)
    count = len(dataset) if args.limit is None else min(args.limit, len(dataset))
    budget = model.implicit_options.max_iter
    aa_budget = args.aa_max_iter or 4 * budget
    generator = torch.Generator().manual_seed(args.seed)
    dtype = next(model.parameters()).dtype
    scores: dict[str, list[torch.Tensor]] = {s: [] for s in args.starts}
    converged: dict[str, list[torch.Tensor]] = {s: [] for s in ("default", *args.starts)}
    correct: list[torch.Tensor] = []
    # Equal batches of at least two examples (the "other" start needs another input).
    for index in torch.arange(count).tensor_split(max(1, math.ceil(count / args.batch_size))):
        images, labels = dataset.batch(index)
        x = model.injection(images.to(args.device, dtype))
        alignment = asymptotic_alignment(
            model.deq, x, starts=args.starts, generator=generator, max_iter=aa_budget, tol=args.aa_tol
        )
        correct.append(model.head(alignment.state).argmax(1).cpu() == labels)
        for start in args.starts:
            scores[start].append(alignment.scores[start].cpu())
        for name in converged:
            converged[name].append(alignment.converged[name].cpu())
    right = torch.cat(correct)
    per_start = {s: torch.cat(v) for s, v in scores.items()}
    per_example = torch.stack(list(per_start.values())).mean(0)
    overrides: dict[str, Any] = {"tol": 0.0} if args.full_budget else {}

    def metrics_at(max_iter: int) -> dict[str, float]:
        metrics, _ = evaluate(model, dataset, limit=count, device=args.device, max_iter=max_iter, **overrides)
        return {k: metrics[k] for k in ("accuracy", "nfe", "residual", "residual_max", "converged")}

    table = budget_table(metrics_at, budget, args.budgets)
    result: dict[str, Any] = {
        "examples": count,
        "aa_solves": {"max_iter": aa_budget, "tol": args.aa_tol},
        "aa": float(per_example.mean()),
        "aa_per_start": {s: float(v.mean()) for s, v in per_start.items()},
        "aa_min": float(per_example.min()),
        "aa_converged": {name: float(torch.cat(v).float().mean()) for name, v in converged.items()},
        "accuracy_at_default_solve": float(right.float().mean()),
        "aa_accuracy_correlation": alignment_correlation(per_example, right),
        "aa_correct_mean": float(per_example[right].mean()) if bool(right.any()) else float("nan"),
        "aa_wrong_mean": float(per_example[~right].mean()) if bool((~right).any()) else float("nan"),
        "budget_table": table,
        "budget_table_tol": "0 (full budget)" if args.full_budget else model.implicit_options.tol,
    }
    out = Path(args.out) if args.out else Path(args.checkpoint).parent
    out.mkdir(parents=True, exist_ok=True)
    (out / "analysis.json").write_text(json.dumps(result, indent=1))
    picture = save_alignment_distribution(out / "alignment.png", per_example, right)
    shown = ", ".join(f"{name} 1 − {1 - value:.2e}" for name, value in result["aa_per_start"].items())
    print(
        f"asymptotic alignment on {count} {args.split} examples (solves of ≤ {aa_budget} iterations, tol "
        f"{args.aa_tol:g}): 1 − {1 - result['aa']:.2e} ({shown}); lowest 1 − {1 - result['aa_min']:.2e}; "
        f"correlation with correctness {result['aa_accuracy_correlation']:.3f}"
    )
    print(f"accuracy against the test-time budget (training budget {budget}, tol {result['budget_table_tol']}):")
    print(format_table(table, ["factor", "budget", "accuracy", "nfe", "residual", "residual_max", "converged"]))
    print(f"wrote {out / 'analysis.json'}, {picture}")
    return result


def main(argv: Sequence[str] | None = None) -> Any:
    args = parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        if args.command == "train":
            return train_command(args)
        if args.command == "eval":
            return eval_command(args)
        return analyse_command(args)
    except (ValueError, FileNotFoundError) as error:
        raise SystemExit(f"python -m integrations.vision {args.command}: {error}") from None
