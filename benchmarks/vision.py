"""The vision integration on scikit-learn's digits: the multiscale DEQ classifier converted from timm's
hrnet_w18_small (stage 4 as the equilibrium) with and without Jacobian regularisation and with the exact implicit
gradient instead of the phantom one, and the same classifier with timm's stacked stage 4 (the baseline), each
trained from the same random initialisation on the same batches.

    python -m benchmarks.vision                       # 4 runs × 8 epochs, 1 thread (CPU: ~9 min)
    python -m benchmarks.vision --runs mdeq --epochs 4

Reported per run: held-out accuracy (360 digits never trained on), training wall time (the training steps only, not
the per-epoch evaluation) and thread count, parameters, bytes saved for backward by one training step (forward +
loss, batch 32: distinct storages recorded by a ``torch.autograd.graph.saved_tensors_hooks`` pack hook, parameters
excluded), and for the DEQs: f-evaluations per example at the tolerance, the relative residual at the budget
(``tol=0``: every example runs the whole budget), a Hutchinson estimate of ‖∂f/∂z‖²_F / N at z* (4 probes, the
first 128 test digits), the asymptotic-alignment score (Anil et al., NeurIPS 2022; starts: another digit's fixed
point and N(0, 1) noise, solves of ≤ 4× the budget to tol 1e-4) and its correlation with correctness, and accuracy at
0.25×, 0.5×, 1×, 2× and 4× the training budget (``tol=0``). Also f-evaluations per example in training (last
epoch) and the residual after 6 iterations (``tol=0``), where the residual at the budget is at float32 round-off.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from implicit.analysis import alignment_correlation, asymptotic_alignment, budget_table, format_table
from integrations.vision.data import ImageSet, image_dataset
from integrations.vision.model import MDEQClassifier
from integrations.vision.train import Run, TrainConfig, count_parameters, evaluate, train

# name → (method, engine options); the MDEQ defaults: Anderson, 18 iterations, tol 1e-3, 5-step phantom gradient
RUNS: dict[str, tuple[str, dict[str, Any]]] = {
    "mdeq": ("mdeq", {}),
    "mdeq_jac": ("mdeq", {"jac_loss_probes": 1}),
    "mdeq_ift": ("mdeq", {"backward": "implicit"}),
    "stacked": ("stacked", {}),
}
LABELS = {
    "mdeq": "MDEQ (stage 4 as equilibrium)",
    "mdeq_jac": "MDEQ + Jacobian reg.",
    "mdeq_ift": "MDEQ, implicit (IFT) gradient",
    "stacked": "timm stacked stage 4 (baseline)",
}


def saved_bytes(model: nn.Module, images: Tensor, labels: Tensor, jac_loss_weight: float) -> int:
    """Bytes autograd saves for backward in one training step's forward and loss (distinct storages, parameters
    excluded)."""
    excluded = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in excluded:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        if isinstance(model, MDEQClassifier):
            logits, info = model(images, return_info=True)
            loss = torch.nn.functional.cross_entropy(logits, labels)
            if info is not None and info.jac_loss is not None:
                loss = loss + jac_loss_weight * info.jac_loss
        else:
            loss = torch.nn.functional.cross_entropy(model(images), labels)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(storages.values())


def jacobian_estimate(model: MDEQClassifier, images: Tensor) -> float:
    """Hutchinson estimate of ‖∂f/∂z‖²_F / N at z* (4 Gaussian probes), eval mode."""
    model.eval()
    x = [t.detach() for t in model.injection(images)]
    _, info = model.deq(x, return_info=True, jac_loss_probes=4)
    assert info.jac_loss is not None
    return float(info.jac_loss.detach())


@torch.no_grad()
def alignment(model: MDEQClassifier, dataset: ImageSet, *, batch_size: int = 120) -> dict[str, float]:
    """Dataset AA (mean over examples and the two starts) and its correlation with correctness."""
    model.eval()
    budget = model.implicit_options.max_iter
    generator = torch.Generator().manual_seed(0)
    scores, correct, converged = [], [], []
    for index in torch.arange(len(dataset)).tensor_split(math.ceil(len(dataset) / batch_size)):
        images, labels = dataset.batch(index)
        result = asymptotic_alignment(
            model.deq, model.injection(images), generator=generator, max_iter=4 * budget, tol=1e-4
        )
        scores.append(result.per_example)
        correct.append(model.head(result.state).argmax(1) == labels)
        converged.append(torch.stack(list(result.converged.values())).all(0))
    aa, right = torch.cat(scores), torch.cat(correct)
    return {
        "aa": float(aa.mean()),
        "aa_min": float(aa.min()),
        "aa_correlation": alignment_correlation(aa, right),
        "aa_all_converged": float(torch.cat(converged).float().mean()),
    }


def measure(name: str, args: argparse.Namespace, train_set: ImageSet, test_set: ImageSet) -> dict[str, Any]:
    method, options = RUNS[name]
    config = TrainConfig(
        method=method,
        implicit={**options, **({"max_iter": args.max_iter} if method == "mdeq" else {})},
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        jac_loss_weight=args.jac_loss_weight,
        seed=args.seed,
    )
    run = Run.start(config, train_set)
    images, labels = train_set.batch(torch.arange(args.batch_size))
    memory = saved_bytes(run.model, images, labels, args.jac_loss_weight)
    run = Run.start(config, train_set)  # the same initial state as every other run (the measurement trained nothing,
    started = time.perf_counter()  # but moved BatchNorm statistics)
    run = train(run, progress=args.progress, train_set=train_set, test_set=test_set)
    wall = time.perf_counter() - started
    if args.out:
        run.save(Path(args.out) / name / "checkpoint.pt")
    model = run.model
    row: dict[str, Any] = {
        "run": LABELS[name],
        "accuracy": run.epochs[-1]["test_accuracy"],
        "best_epoch_accuracy": max(e["test_accuracy"] for e in run.epochs),
        "train_seconds": sum(e["seconds"] for e in run.epochs),
        "wall_seconds_with_evaluation": wall,
        "parameters": count_parameters(model),
        "saved_mib_per_step": memory / 2**20,
    }
    if isinstance(model, MDEQClassifier):
        at_tol, _ = evaluate(model, test_set)
        full, _ = evaluate(model, test_set, tol=0.0)
        early, _ = evaluate(model, test_set, tol=0.0, max_iter=6)
        last_epoch = run.history[-run.steps_per_epoch :]
        row.update(
            nfe_per_example=at_tol["nfe"],
            train_nfe_last_epoch=sum(r["nfe"] for r in last_epoch) / len(last_epoch),
            converged_at_tol=at_tol["converged"],
            residual_at_6=early["residual"],
            residual_at_budget=full["residual"],
            residual_at_budget_max=full["residual_max"],
            jacobian_frobenius=jacobian_estimate(model, test_set.batch(torch.arange(128))[0]),
            **alignment(model, test_set),
        )

        def accuracy_at(budget: int) -> dict[str, float]:
            metrics, _ = evaluate(model, test_set, max_iter=budget, tol=0.0)
            return {"accuracy": metrics["accuracy"], "residual": metrics["residual"]}

        row["budget_table"] = budget_table(accuracy_at, model.implicit_options.max_iter, args.budgets)
    return row


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--max-iter", type=int, default=18, help="the DEQs' training budget")
    parser.add_argument("--jac-loss-weight", type=float, default=0.4)
    parser.add_argument("--budgets", type=float, nargs="+", default=(0.25, 0.5, 1.0, 2.0, 4.0), help="× max-iter")
    parser.add_argument("--out", help="save each run's checkpoint under OUT/RUN/checkpoint.pt")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--progress", action="store_true")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    train_set = image_dataset("digits", split="train", size=32)
    test_set = image_dataset("digits", split="test", size=32)
    print(
        f"digits 32×32: {len(train_set)} training, {len(test_set)} held-out; hrnet_w18_small; {args.epochs} epochs, "
        f"batch {args.batch_size}, lr {args.lr:g}; torch {torch.__version__}, {platform.processor() or 'cpu'}, "
        f"{torch.get_num_threads()} thread(s)\n"
    )
    rows = []
    for name in args.runs:
        row = measure(name, args, train_set, test_set)
        rows.append(row)
        print(json.dumps(row))
    columns = ["run", "accuracy", "train_seconds", "parameters", "saved_mib_per_step"]
    print("\n" + format_table(rows, columns))
    deqs = [r for r in rows if "nfe_per_example" in r]
    if deqs:
        solver = [
            "run",
            "nfe_per_example",
            "train_nfe_last_epoch",
            "converged_at_tol",
            "residual_at_6",
            "residual_at_budget",
            "residual_at_budget_max",
            "jacobian_frobenius",
            "aa",
            "aa_min",
            "aa_correlation",
        ]
        print("\n" + format_table(deqs, solver))
        for r in deqs:
            print(f"\n{r['run']}: accuracy against the test-time budget (tol 0)")
            print(format_table(r["budget_table"]))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
