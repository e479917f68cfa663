"""JIIO against nested optimisation: f-evaluations and wall time to the same objective value.

Usage::

    python -m benchmarks.jiio [--images 32] [--train-steps 300] [--threads 1] [--only denoise,inpaint,linf,l2]

Tasks (scikit-learn digits, float64, :mod:`integrations.jiio.tasks`): latent-code reconstruction with a DEQ decoder
(denoising σ = 0.3 and inpainting a hidden 4×4 square; latent 10, box ±2, objective ``½‖M ⊙ (image − y)‖² +
0.005‖x‖²``, from the code 0) and adversarial perturbations of a DEQ classifier (``min −CE`` over the L∞ ball of
radius 0.1 and the L2 ball of radius 0.8 around the clean digit). Models: 300 Adam steps from a fixed seed.

Per task, table 1: JIIO (max_iter 100, tol 1e-5; Anderson memory 30 for the inverse problems; plain iteration with a
large α_x for the adversarial ones, Anderson as a second row) ends at the objective ``V_J`` (batch sum, always
measured with z*(x) solved to 1e-10); the target is ``V_J + 1e-3·(V_0 − V_J)`` (within 0.1 % of JIIO's decrease from
the start). JIIO's cost to the target is that of the first budget in ``BUDGETS`` (iterations, tol 0) whose result
reaches it; nested optimisation (DEQ solve to ``inner tol``, warm-started, + implicit backward per projected Adam /
gradient step, ≤ 1000 steps) runs until its objective reaches it. Cost = f-evaluations + VJPs through f (JIIO: 2 per
augmented evaluation; nested: forward solve + tracked call + backward solve + the VJP through the tracked call).
Table 2: the cost to reach ``V_best + δ·(V_0 − V_best)``, ``V_best`` the lowest objective any run found.

The step sizes were picked from small sweeps on the same batches. JIIO α_x with Anderson: {0.3, 1, 3} (inverse
problems), {0.3, 1, 3, 10, 30, 100} (L∞), {1, 3, 10} (L2); plain iteration: {30, 100} with α_z = α_μ = 1 on L∞,
reused for L2. Baselines: Adam lr {0.05, 0.1, 0.2} / {0.01, 0.03} / {0.03, 0.1}, gradient-step lr {1, 2} /
{0.1, 0.5, 5} / {1, 5} (inverse / L∞ / L2), and lr 100 on the adversarial tasks (JIIO's α_x there: a step that lands
on the ball's boundary, close to the sign (L∞) and normalised (L2) gradient steps of the usual PGD attacks). Wall
times are single runs, one thread.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass
from typing import Any

import torch

from benchmarks.backward_modes import environment_lines, load_note
from integrations.jiio.tasks import (
    AutoEncoder,
    Classifier,
    Outcome,
    Problem,
    adversarial_problem,
    autoencoder_loss,
    classifier_loss,
    corrupt,
    exact_objective,
    inverse_problem,
    jiio_curve,
    load_digits,
    run_jiio,
    run_nested,
    split,
    train,
)

MATCH = 1e-3
BUDGETS = [*range(5, 101, 5), 120, 150, 200]


@dataclass
class Task:
    name: str
    label: str
    jiio: list[dict[str, Any]]  # JIIO configurations (keywords of run_jiio); the first sets the target
    baselines: list[tuple[str, float, float]]  # (method, lr, inner tol)


INVERSE_JIIO = [{"alpha_x": 1.0}]
# Plain iteration with a step that reaches the ball's boundary at once (the x-update is then close to the normalised
# gradient step of the published adversarial variant); Anderson over the non-smooth projected map is the second row.
ADVERSARIAL_JIIO: dict[str, Any] = {"alpha_x": 100.0, "solver": "fixed_point", "alpha_z": 1.0, "alpha_mu": 1.0}
TASKS = {
    "denoise": Task(
        "denoise", "denoising", INVERSE_JIIO, [("adam", 0.1, 1e-5), ("pgd", 1.0, 1e-5), ("pgd", 1.0, 1e-4)]
    ),
    "inpaint": Task(
        "inpaint", "inpainting", INVERSE_JIIO, [("adam", 0.1, 1e-5), ("pgd", 1.0, 1e-5), ("pgd", 1.0, 1e-4)]
    ),
    "linf": Task(
        "linf",
        "adversarial L∞ ε=0.1",
        [ADVERSARIAL_JIIO, {"alpha_x": 30.0}],
        [("adam", 0.03, 1e-5), ("pgd", 5.0, 1e-5), ("pgd", 5.0, 1e-4), ("pgd", 100.0, 1e-5)],
    ),
    "l2": Task(
        "l2",
        "adversarial L2 ε=0.8",
        [ADVERSARIAL_JIIO, {"alpha_x": 1.0}],
        [("adam", 0.1, 1e-5), ("pgd", 5.0, 1e-5), ("pgd", 5.0, 1e-4), ("pgd", 100.0, 1e-5)],
    ),
}


def build(name: str, models: dict[str, Any], images: torch.Tensor, labels: torch.Tensor, idx: torch.Tensor) -> Problem:
    if name in ("denoise", "inpaint"):
        y, mask = corrupt(images[idx], name, 1)
        return inverse_problem(models["decoder"], y, mask)
    return adversarial_problem(models["classifier"], images[idx], labels[idx], 0.1 if name == "linf" else 0.8, name)


def first_reaching(history: list[tuple[int, float]], target: float) -> int | None:
    return next((e for e, v in history if v <= target), None)


def jiio_label(options: dict[str, Any]) -> str:
    solver = options.get("solver", "anderson")
    text = f"JIIO {solver}{' m=30' if solver == 'anderson' else ''}, α_x={options['alpha_x']:g}"
    if "alpha_z" in options:
        text += f", α_z=α_μ={options['alpha_z']:g}"
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=32, help="digits per task (one batch)")
    parser.add_argument("--train-steps", type=int, default=300)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", default="denoise,inpaint,linf,l2")
    args = parser.parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    torch.set_num_threads(args.threads)
    dtype = torch.float64
    started = time.perf_counter()
    print("\n".join(environment_lines("benchmarks.jiio", argv, f"seed {args.seed}; {load_note()} at start")))
    torch.manual_seed(args.seed)
    images, labels = load_digits(dtype)
    train_idx, test_idx = split(len(images), args.seed)
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    models: dict[str, Any] = {}
    if {"denoise", "inpaint"} & set(names):
        torch.manual_seed(args.seed)
        models["decoder"] = decoder = AutoEncoder().to(dtype)
        loss = train(decoder, autoencoder_loss(decoder), images[train_idx], labels[train_idx], steps=args.train_steps)
        decoder.requires_grad_(False)
        print(f"- decoder: reconstruction MSE {loss[-1]:.4f} after {args.train_steps} steps")
    if {"linf", "l2"} & set(names):
        torch.manual_seed(args.seed + 1)
        models["classifier"] = classifier = Classifier().to(dtype)
        train(classifier, classifier_loss(classifier), images[train_idx], labels[train_idx], steps=args.train_steps)
        classifier.requires_grad_(False)
        with torch.no_grad():
            accuracy = float((classifier(images[test_idx]).argmax(1) == labels[test_idx]).to(dtype).mean())
        print(f"- classifier: test accuracy {accuracy:.3f} after {args.train_steps} steps")
    idx = test_idx[: args.images]
    warm = build(names[0], models, images, labels, idx)  # warm-up (first calls allocate and dispatch slowly)
    run_jiio(warm, max_iter=5)
    run_nested(warm, target=-float("inf"), max_steps=2)

    print(
        "\n| task | method | objective (sum) at the end | f-evals + VJPs, whole run | to the target | wall s to the "
        "target | nested / JIIO (to the target) |"
    )
    print("|---|---|---|---|---|---|---|")
    curves: dict[str, tuple[float, float, dict[str, list[tuple[int, float]]]]] = {}
    for name in names:
        task = TASKS[name]
        problem = build(name, models, images, labels, idx)
        v0 = float(exact_objective(problem, problem.x0).sum())
        histories: dict[str, list[tuple[int, float]]] = {}
        finals: list[float] = []
        target = reference = math.nan
        for i, options in enumerate(task.jiio):
            problem.alpha_x = options["alpha_x"]
            extra = {k: v for k, v in options.items() if k != "alpha_x"}
            mine = run_jiio(problem, **extra)
            v_mine = float(exact_objective(problem, mine.x).sum())
            if i == 0:
                target = v_mine + MATCH * abs(v0 - v_mine)
            curve = jiio_curve(problem, BUDGETS, **extra)
            label = jiio_label(options)
            histories[label] = [(e, v) for e, v, _ in curve]
            finals += [v_mine, *(v for _, v, _ in curve)]
            reach = first_reaching(histories[label], target)
            seconds = next((f"{t:.2f}" for e, _, t in curve if e == reach), "—")
            if i == 0:
                reference = math.nan if reach is None else reach
            print(
                f"| {task.label} | {label} | {v_mine:.4f} | {mine.evaluations} ({mine.steps} aug. evals) | "
                f"{_cell(reach)} | {seconds} | {_ratio(reach, reference) if i else '—'} |"
            )
        for method, lr, inner in task.baselines:
            theirs: Outcome = run_nested(problem, target=target, method=method, lr=lr, max_steps=1000, tol=inner)
            v = float(exact_objective(problem, theirs.x).sum())
            reach = None if theirs.capped else theirs.evaluations
            label = f"nested {method} lr={lr:g}, inner tol {inner:g}"
            ratio = _ratio(reach, reference)
            if reach is None:
                ratio = f"not reached in {theirs.steps} steps"
            print(
                f"| {task.label} | {label} | {v:.4f} | {theirs.evaluations} ({theirs.steps} steps) | {_cell(reach)} | "
                f"{f'{theirs.seconds:.2f}' if reach is not None else '—'} | {ratio} |"
            )
            full = run_nested(problem, target=-math.inf, method=method, lr=lr, max_steps=300, tol=inner)
            histories[label] = full.history
            finals.append(min(value for _, value in full.history))
        curves[name] = (v0, min(finals), histories)

    print("\nf-evals + VJPs to reach `V_best + δ·(V_0 − V_best)`, V_best the lowest objective any run found (JIIO: the")
    print(f"first budget of {BUDGETS[0]}, {BUDGETS[1]}, … iterations whose result reaches it; nested: ≤ 300 steps):\n")
    print("| task | method | δ = 1e-1 | δ = 1e-2 | δ = 1e-3 |")
    print("|---|---|---|---|---|")
    for name, (v0, best, histories) in curves.items():
        gaps = (1e-1, 1e-2, 1e-3)
        for label, history in histories.items():
            cells = [first_reaching(history, best + g * (v0 - best)) for g in gaps]
            print(f"| {TASKS[name].label} | {label} | " + " | ".join(_cell(c) for c in cells) + " |")
    print(f"\n(total {time.perf_counter() - started:.0f} s; {load_note()} at the end)")
    return 0


def _cell(value: int | None) -> str:
    return "not reached" if value is None else str(value)


def _ratio(value: int | None, reference: float) -> str:
    if value is None or math.isnan(reference):
        return "—"
    return f"{value / reference:.1f}×"


if __name__ == "__main__":
    raise SystemExit(main())
