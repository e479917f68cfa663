"""Training features: the ODE solver against the discrete solvers, fixed-point reuse (warm starts), sparse fixed-point
correction and Jacobian regularisation — what each costs.

Usage::

    python -m benchmarks.training_features [--quick] [--repeats 7] [--only ode,warm,correction,jac] [--write]

Four tables (markdown on stdout; ``--write`` also replaces this script's generated block of
``benchmarks/RESULTS.md``):

a. **ODE vs discrete solvers.** NFE per sample (mean, max) to rel. tol 1e-4 on the four tanh problems
   ``tanh(z Wᵀ + x Uᵀ + b)`` (3 seeds × B=8, N=64, float64): dopri5 (rtol 1e-5, atol 1e-8) against fixed-point, Anderson
   (m=5) and Broyden (memory 30), with the distance to a Broyden solution at rel. 1e-10 and the wall time of one
   batched solve. Then the linear ``rot`` problem (B=4, N=16, ρ(J) = 1.58 but max Re λ = 0.5) to abs. tol 1e-6,
   where plain iteration diverges.
b. **Fixed-point reuse.** A second solve started from the first solve's z* (``z0=`` the previous result) for the same
   input and for inputs perturbed by 1 %, 5 % and 20 % (per-sample relative norm, as consecutive video frames or
   training steps), against a cold start from 0; Anderson and Broyden, rel. tol 1e-4.
c. **Sparse fixed-point correction** on the conv block (fixed-point forward, max_iter 36): forward + backward time,
   tracked f-evaluations and saved activation memory for n = 1, 2, 6 supervised states, with exact (implicit) and
   one-step gradients for the last state.
d. **Jacobian regularisation**: one training step (forward, loss + ``info.jac_loss``, parameter gradients) with
   0, 1 and 4 Hutchinson probes, on the conv block and the tanh layer.

Timing: one thread, interleaved rounds (every case once per round; tables c and d rotate the order from round to
round), median over ``--repeats`` rounds after warm-up.
NFE in tables a and b are measured with ``check_every=1`` (the stop is detected at the first point within tol).
"""

from __future__ import annotations

import argparse
import gc
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

import implicit
from implicit.correction import correction_loss

from .backward_modes import SavedTensors, environment_lines, load_note, write_section
from .solver_overhead import fmt, gc_paused, make_tol_problem, ratio, table, time_interleaved

BEGIN_MARK = "<!-- BEGIN GENERATED (python -m benchmarks.training_features --write) -->"
END_MARK = "<!-- END GENERATED (benchmarks.training_features) -->"
CPU = torch.device("cpu")
NO_SYNC: Callable[[], None] = lambda: None  # noqa: E731

ODE_PROBLEMS = ("tanh-sym-0.9-0.1", "tanh-sym-0.9-1", "tanh-gauss-0.9-1", "tanh-gauss-0.5-1")
# (label, solver, options, max_iter)
ODE_SOLVERS: tuple[tuple[str, str, dict[str, Any], int], ...] = (
    ("dopri5, rtol 1e-5", "ode", {"method": "dopri5", "rtol": 1e-5, "atol": 1e-8}, 3000),
    ("fixed point", "fixed_point", {}, 500),
    ("anderson m5", "anderson", {"m": 5}, 500),
    ("broyden m30", "broyden", {"memory": 30}, 500),
)
ROT_SOLVERS: tuple[tuple[str, str, dict[str, Any], int], ...] = (
    ("fixed point τ=1", "fixed_point", {}, 60),
    ("fixed point τ=0.2", "fixed_point", {"tau": 0.2}, 3000),
    ("fixed point τ=0.3", "fixed_point", {"tau": 0.3}, 3000),
    ("anderson m5", "anderson", {"m": 5}, 500),
    ("broyden m30", "broyden", {"memory": 30}, 500),
    ("dopri5, rtol 1e-6", "ode", {"method": "dopri5", "rtol": 1e-6, "atol": 1e-9}, 5000),
)
WARM_PROBLEMS = ("tanh-sym-0.9-0.1", "tanh-gauss-0.9-1", "conv")
# (label, solver, options, whether the warm start also reuses the previous solve's Broyden factors)
WARM_SOLVERS: tuple[tuple[str, str, dict[str, Any], bool], ...] = (
    ("anderson m5", "anderson", {"m": 5}, False),
    ("broyden m30", "broyden", {"memory": 30}, False),
    ("broyden m30, warm z0 + previous H", "broyden", {"memory": 30}, True),
)
PERTURBATIONS = (0.0, 0.01, 0.05, 0.2)


def flat_problem(key: str, seed: int, dtype: torch.dtype) -> tuple[Callable[[Tensor], Tensor], Tensor, str, Any]:
    """``(fn, z0, label, problem)``: the flat ``(B, N)`` map of a problem of ``solver_overhead.make_tol_problem``."""
    prob = make_tol_problem(key, seed, CPU)
    block = prob.block.to(dtype)
    x = prob.x.to(dtype)
    shape, b = x.shape, x.shape[0]
    z0 = torch.zeros(b, x[0].numel(), dtype=dtype)
    return (lambda z: block(z.view(shape), x).reshape(b, -1)), z0, prob.label, prob


def rel_dist(z: Tensor, ref: Tensor) -> Tensor:
    return torch.linalg.vector_norm(z - ref, dim=1) / torch.linalg.vector_norm(ref, dim=1)


# --------------------------------------------------------------------------------------------------- a. ODE
@dataclass
class SolveRow:
    problem: str
    solver: str
    nstep: list[Tensor] = field(default_factory=list)
    batch_nfe: list[int] = field(default_factory=list)
    dist: list[float] = field(default_factory=list)
    converged: list[int] = field(default_factory=list)
    samples: list[int] = field(default_factory=list)
    ms: list[float] = field(default_factory=list)
    status: str = ""
    znorm: float = math.nan

    def nfe_cell(self) -> str:
        n = torch.cat(self.nstep).double()
        return f"{n.mean().item():.1f} ({n.max().item():.0f})"


def run_ode(seeds: list[int], repeats: int, warmup: int) -> list[SolveRow]:
    rows: list[SolveRow] = []
    for key in ODE_PROBLEMS:
        per: dict[str, SolveRow] = {}
        for seed in seeds:
            fn, z0, label, _ = flat_problem(key, seed, torch.float64)
            with torch.no_grad():
                ref = implicit.solve(fn, z0, solver="broyden", solver_options={"memory": 100}, tol=1e-10, max_iter=500)
                runners = {}
                for name, solver, options, max_iter in ODE_SOLVERS:

                    def run(
                        solver: str = solver,
                        options: dict[str, Any] = options,
                        max_iter: int = max_iter,
                        fn: Callable[[Tensor], Tensor] = fn,
                        z0: Tensor = z0,
                    ) -> Any:
                        return implicit.solve(
                            fn, z0, solver=solver, solver_options=options, tol=1e-4, max_iter=max_iter, check_every=1
                        )

                    res = run()
                    row = per.setdefault(name, SolveRow(label, name))
                    row.nstep.append(res.nstep)
                    row.batch_nfe.append(res.nfe)
                    row.dist.append(rel_dist(res.z, ref.z).max().item())
                    row.converged.append(int(res.converged.sum()))
                    row.samples.append(res.converged.numel())
                    runners[name] = run
                timings = time_interleaved(runners, repeats=repeats, warmup=warmup, sync=NO_SYNC)
            for name, t in timings.items():
                per[name].ms.append(t.median * 1e3)
        rows.extend(per.values())
    return rows


def ode_markdown(rows: list[SolveRow]) -> str:
    header = [
        "problem",
        "solver",
        "NFE / sample, mean (max)",
        "batch NFE (mean)",
        "× NFE of broyden",
        "converged",
        "max ‖z − z*‖/‖z*‖",
        "ms / solve (B=8)",
    ]
    body = []
    for r in rows:
        broyden = next(b for b in rows if b.problem == r.problem and b.solver.startswith("broyden"))
        mean = torch.cat(r.nstep).double().mean().item()
        body.append(
            [
                r.problem,
                r.solver,
                r.nfe_cell(),
                f"{statistics.mean(r.batch_nfe):.1f}",
                ratio(mean / torch.cat(broyden.nstep).double().mean().item()),
                f"{sum(r.converged)}/{sum(r.samples)}",
                fmt(max(r.dist)),
                fmt(statistics.mean(r.ms)),
            ]
        )
    return table(header, body)


def make_rot(seed: int = 0) -> tuple[Callable[[Tensor], Tensor], Tensor, Tensor, Tensor]:
    """``rot``: ``f(z) = z Jᵀ + x``, ``J = Q D Qᵀ``, D = 2×2 blocks ``[[a, −b], [b, a]]``;
    returns ``(fn, z0, z*, J)``."""
    g = torch.Generator().manual_seed(seed)
    a = torch.linspace(-0.5, 0.5, 8, dtype=torch.float64)
    b = torch.linspace(1.0, 1.5, 8, dtype=torch.float64)
    d = torch.block_diag(*[torch.stack([torch.stack([ai, -bi]), torch.stack([bi, ai])]) for ai, bi in zip(a, b)])
    q, _ = torch.linalg.qr(torch.randn(16, 16, generator=g, dtype=torch.float64))
    jac = q @ d @ q.T
    x = torch.randn(4, 16, generator=g, dtype=torch.float64)
    z_star = torch.linalg.solve(torch.eye(16, dtype=torch.float64) - jac.T, x, left=False)  # z (I − Jᵀ) = x
    return (lambda z: z @ jac.T + x), torch.zeros_like(x), z_star, jac


def run_rot(repeats: int, warmup: int) -> tuple[list[SolveRow], float, float]:
    fn, z0, z_star, jac = make_rot()
    eig = torch.linalg.eigvals(jac)
    rows, runners = [], {}
    with torch.no_grad():
        for name, solver, options, max_iter in ROT_SOLVERS:

            def run(solver: str = solver, options: dict[str, Any] = options, max_iter: int = max_iter) -> Any:
                return implicit.solve(
                    fn,
                    z0,
                    solver=solver,
                    solver_options=options,
                    tol=1e-6,
                    stop_mode="abs",
                    max_iter=max_iter,
                    check_every=1,
                )

            res = run()
            row = SolveRow("rot", name, [res.nstep], [res.nfe], [rel_dist(res.z, z_star).max().item()])
            row.converged, row.samples, row.status = [int(res.converged.sum())], [4], res.status
            rows.append(row)
            runners[name] = run
        # plain iteration without the divergence guard: how far it goes in 60 steps
        z = z0
        for _ in range(60):
            z = fn(z)
        plain_norm = torch.linalg.vector_norm(z, dim=1).max().item()
        timings = time_interleaved(runners, repeats=repeats, warmup=warmup, sync=NO_SYNC)
    for row in rows:
        row.ms.append(timings[row.solver].median * 1e3)
    return rows, plain_norm, eig.abs().max().item()


def rot_markdown(rows: list[SolveRow]) -> str:
    header = ["solver", "status", "NFE / sample, mean (max)", "batch NFE", "max ‖z − z*‖/‖z*‖", "ms / solve (B=4)"]
    body = [[r.solver, r.status, r.nfe_cell(), str(r.batch_nfe[0]), fmt(r.dist[0]), fmt(r.ms[0])] for r in rows]
    return table(header, body)


# --------------------------------------------------------------------------------------------------- b. warm start
@dataclass
class WarmRow:
    problem: str
    perturbation: float
    solver: str
    shift: list[float] = field(default_factory=list)
    cold: list[Tensor] = field(default_factory=list)
    warm: list[Tensor] = field(default_factory=list)
    cold_batch: list[int] = field(default_factory=list)
    warm_batch: list[int] = field(default_factory=list)
    cold_ms: list[float] = field(default_factory=list)
    warm_ms: list[float] = field(default_factory=list)


def perturbed(x: Tensor, p: float, seed: int) -> Tensor:
    """``x + p ‖x_b‖ ε_b/‖ε_b‖`` per sample: a relative perturbation of norm p."""
    if p == 0:
        return x
    g = torch.Generator().manual_seed(500 + seed)
    eps = torch.randn(x.shape, generator=g, dtype=x.dtype)
    dims = tuple(range(1, x.dim()))
    scale = torch.linalg.vector_norm(x, dim=dims, keepdim=True) / torch.linalg.vector_norm(eps, dim=dims, keepdim=True)
    return x + p * scale * eps


def run_warm(seeds: list[int], repeats: int, warmup: int) -> list[WarmRow]:
    rows: dict[tuple[str, float, str], WarmRow] = {}
    for key in WARM_PROBLEMS:
        dtype = torch.float32 if key == "conv" else torch.float64
        for seed in seeds:
            prob = make_tol_problem(key, seed, CPU)
            block, x = prob.block.to(dtype), prob.x.to(dtype)
            b = x.shape[0]
            runners = {}
            with torch.no_grad():
                for name, solver, options, reuse_h in WARM_SOLVERS:

                    def solve(
                        inp: Tensor,
                        z0: Tensor,
                        state: dict[str, Tensor] | None = None,
                        solver: str = solver,
                        options: dict[str, Any] = options,
                        block: Any = block,
                    ) -> Any:
                        return implicit.equilibrium(
                            block,
                            inp,
                            z0,
                            solver=solver,
                            solver_options=options,
                            tol=1e-4,
                            max_iter=200,
                            check_every=1,
                            return_info=True,
                            solver_state=state,
                        )

                    z_prev, info_prev = solve(x, torch.zeros_like(x))
                    # Broyden warm-started from the first solve's inverse-Jacobian estimate H
                    state = {"inverse_jacobian": info_prev.forward.inverse_jacobian} if reuse_h else None
                    for p in PERTURBATIONS:
                        x_new = perturbed(x, p, seed)
                        row = rows.setdefault((prob.label, p, name), WarmRow(prob.label, p, name))
                        z_cold, info_cold = solve(x_new, torch.zeros_like(x))
                        _, info_warm = solve(x_new, z_prev, state)
                        shift = rel_dist(z_cold.reshape(b, -1), z_prev.reshape(b, -1))
                        row.shift.append(shift.mean().item())
                        row.cold.append(info_cold.forward.nstep)
                        row.warm.append(info_warm.forward.nstep)
                        row.cold_batch.append(info_cold.forward.nfe)
                        row.warm_batch.append(info_warm.forward.nfe)
                        zero = torch.zeros_like(x)
                        runners[f"{name}|{p}|cold"] = lambda s=solve, xn=x_new, z0=zero: s(xn, z0)
                        runners[f"{name}|{p}|warm"] = lambda s=solve, xn=x_new, z0=z_prev, st=state: s(xn, z0, st)
                timings = time_interleaved(runners, repeats=repeats, warmup=warmup, sync=NO_SYNC)
            for (label, p, name), row in rows.items():
                if label == prob.label:
                    row.cold_ms.append(timings[f"{name}|{p}|cold"].median * 1e3)
                    row.warm_ms.append(timings[f"{name}|{p}|warm"].median * 1e3)
    return list(rows.values())


def warm_markdown(rows: list[WarmRow]) -> str:
    header = [
        "problem",
        "input change",
        "‖z*_new − z*_old‖/‖z*_old‖ (mean)",
        "solver",
        "cold NFE / sample, mean (max)",
        "warm NFE / sample, mean (max)",
        "warm / cold NFE",
        "ms cold",
        "ms warm",
    ]
    body = []
    for r in rows:
        cold, warm = torch.cat(r.cold).double(), torch.cat(r.warm).double()
        body.append(
            [
                r.problem,
                "same input" if r.perturbation == 0 else f"{r.perturbation:.0%}",
                fmt(statistics.mean(r.shift)),
                r.solver,
                f"{cold.mean().item():.1f} ({cold.max().item():.0f})",
                f"{warm.mean().item():.1f} ({warm.max().item():.0f})",
                f"{warm.mean().item() / cold.mean().item():.2f}",
                fmt(statistics.mean(r.cold_ms)),
                fmt(statistics.mean(r.warm_ms)),
            ]
        )
    return table(header, body)


# ---------------------------------------------------------------------------------------------- c, d. training steps
@dataclass
class StepCase:
    """One training-step configuration: ``forward() -> (loss, info)``, then gradients of the loss w.r.t. params."""

    label: str
    group: str
    forward: Callable[[], tuple[Tensor, Any]]
    params: list[Tensor]
    fwd_nfe: int = 0
    tracked: int = 0
    vjps: int = 0
    states: int = 1
    saved_mb: float = math.nan
    jac_loss: float = math.nan
    fwd_ms: list[float] = field(default_factory=list)
    bwd_ms: list[float] = field(default_factory=list)

    @property
    def fwd(self) -> float:
        return statistics.median(self.fwd_ms)

    @property
    def bwd(self) -> float:
        return statistics.median(self.bwd_ms)


def time_steps(cases: list[StepCase], repeats: int, warmup: int) -> None:
    """Untimed pass (counts, saved memory), then interleaved timed rounds of forward and backward."""
    for c in cases:
        saved = SavedTensors()
        with saved.recording():
            loss, info = c.forward()
        c.saved_mb = saved.alive_mb(c.params)
        del loss
        loss, info = c.forward()
        torch.autograd.grad(loss, c.params)
        c.fwd_nfe, c.tracked, c.vjps = info.forward.nfe, info.tracked_nfe, info.backward_vjps
        if info.jac_loss is not None:
            c.jac_loss = info.jac_loss.item()
        del loss, info
    with gc_paused():
        for r in range(warmup + repeats):
            shift = r % len(cases)  # rotate the order: no case is always first after the collection below
            for c in cases[shift:] + cases[:shift]:
                t0 = time.perf_counter()
                loss, _ = c.forward()
                t1 = time.perf_counter()
                torch.autograd.grad(loss, c.params)
                t2 = time.perf_counter()
                if r >= warmup:
                    c.fwd_ms.append((t1 - t0) * 1e3)
                    c.bwd_ms.append((t2 - t1) * 1e3)
                del loss
            gc.collect()


def conv_problem(seed: int = 0) -> tuple[Any, Tensor, Tensor]:
    prob = make_tol_problem("conv", seed, CPU)
    g = torch.Generator().manual_seed(3000 + seed)
    return prob.block, prob.x, torch.randn(prob.x.shape, generator=g)


BACKWARDS = {
    "implicit (anderson, 1e-6)": {"backward": "implicit"},
    "one-step": {"backward": "one_step"},
}


def correction_cases(seed: int) -> list[StepCase]:
    block, x, y = conv_problem(seed)
    params = list(block.parameters())
    cases = []
    for bname, boptions in BACKWARDS.items():
        for n in (None, 1, 2, 6):

            def forward(n: int | None = n, boptions: dict[str, Any] = boptions) -> tuple[Tensor, Any]:
                out, info = implicit.equilibrium(
                    block,
                    x,
                    torch.zeros_like(x),
                    solver="fixed_point",
                    tol=1e-4,
                    max_iter=36,
                    correction=n,
                    on_divergence="ignore",
                    return_info=True,
                    **boptions,
                )
                states = out if n is not None else [out]
                losses = [0.5 * (s - y).pow(2).sum() for s in states]
                return (correction_loss(losses) if n is not None else losses[0]), info

            label = "none (plain)" if n is None else f"n={n}"
            cases.append(StepCase(label, bname, forward, params, states=n or 1))
    return cases


def correction_markdown(cases: list[StepCase]) -> str:
    header = [
        "backward (last state)",
        "correction",
        "forward NFE",
        "tracked f-evals",
        "bwd VJPs",
        "saved MB",
        "ms fwd",
        "ms bwd",
        "ms fwd + bwd",
        "× plain",
    ]
    body = []
    for c in cases:
        plain = next(p for p in cases if p.group == c.group and p.label.startswith("none"))
        body.append(
            [
                c.group,
                c.label,
                str(c.fwd_nfe),
                str(c.tracked),
                str(c.vjps),
                f"{c.saved_mb:.2f}",
                fmt(c.fwd),
                fmt(c.bwd),
                fmt(c.fwd + c.bwd),
                ratio((c.fwd + c.bwd) / (plain.fwd + plain.bwd)),
            ]
        )
    return table(header, body)


def jac_cases(seed: int) -> list[StepCase]:
    cases = []
    conv_block, conv_x, conv_y = conv_problem(seed)
    tanh = make_tol_problem("tanh-sym-0.9-0.1", seed, CPU)
    g = torch.Generator().manual_seed(3000 + seed)
    tanh_y = torch.randn(tanh.x.shape, generator=g)
    for label, block, x, y in (
        ("conv block 32×16×16", conv_block, conv_x, conv_y),
        ("tanh sym 0.9, xs=0.1 (N=64, float32)", tanh.block, tanh.x, tanh_y),
    ):
        for bname, boptions in BACKWARDS.items():
            for probes in (0, 1, 4):

                def forward(
                    probes: int = probes, block: Any = block, x: Tensor = x, y: Tensor = y, boptions: Any = boptions
                ) -> tuple[Tensor, Any]:
                    z, info = implicit.equilibrium(
                        block,
                        x,
                        torch.zeros_like(x),
                        solver="anderson",
                        tol=1e-4,
                        max_iter=50,
                        jac_loss_probes=probes,
                        on_divergence="ignore",
                        return_info=True,
                        **boptions,
                    )
                    loss = 0.5 * (z - y).pow(2).sum()
                    if info.jac_loss is not None:
                        loss = loss + info.jac_loss
                    return loss, info

                cases.append(StepCase(f"{probes}", f"{label}|{bname}", forward, list(block.parameters())))
    return cases


def jac_markdown(cases: list[StepCase]) -> str:
    header = [
        "problem",
        "backward",
        "probes",
        "jac_loss",
        "saved MB",
        "ms fwd",
        "ms bwd",
        "ms step",
        "× no regulariser",
    ]
    body = []
    for c in cases:
        base = next(p for p in cases if p.group == c.group and p.label == "0")
        body.append(
            [
                *c.group.split("|"),
                c.label,
                "—" if math.isnan(c.jac_loss) else f"{c.jac_loss:.3f}",
                f"{c.saved_mb:.2f}",
                fmt(c.fwd),
                fmt(c.bwd),
                fmt(c.fwd + c.bwd),
                ratio((c.fwd + c.bwd) / (base.fwd + base.bwd)),
            ]
        )
    return table(header, body)


# --------------------------------------------------------------------------------------------------- driver
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.training_features", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, 2 timed rounds after 1 warm-up (smoke test)")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default 7, --quick 2)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up rounds (default 2, --quick 1)")
    parser.add_argument("--seeds", type=int, default=None, help="problem instances of 8 samples (default 3)")
    parser.add_argument("--only", default="ode,warm,correction,jac", help="subset of ode,warm,correction,jac")
    parser.add_argument("--write", action="store_true", help="replace this script's block of RESULTS.md")
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.repeats = args.repeats or (2 if args.quick else 7)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    args.seeds = args.seeds or (1 if args.quick else 3)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    sections = {s.strip() for s in args.only.split(",") if s.strip()}
    seeds = list(range(args.seeds))
    started = time.perf_counter()
    load_before = load_note()
    extra = (
        f"timing: {args.repeats} interleaved rounds after {args.warmup} warm-up rounds, median; {len(seeds)} seed(s); "
        f"{load_before} at start"
    )
    out = [
        "### Training features: environment",
        "",
        *environment_lines("benchmarks.training_features", args.argv, extra),
        "",
    ]

    def emit(text: str) -> None:
        print(text, flush=True)
        out.append(text)

    print("\n".join(out), flush=True)
    if "ode" in sections:
        emit(
            f"### a. ODE solver vs discrete solvers: NFE to rel. tol 1e-4 ({len(seeds)} seed(s) × B=8, N=64, "
            "float64, `check_every=1`)\n"
        )
        emit(ode_markdown(run_ode(seeds, args.repeats, args.warmup)) + "\n")
        rot_rows, plain_norm, rho = run_rot(args.repeats, args.warmup)
        emit(f"**`rot`** (B=4, N=16, linear, ρ(J) = {rho:.3f}, max Re λ = 0.5; abs. tol 1e-6, `check_every=1`)\n")
        emit(rot_markdown(rot_rows) + "\n")
        emit(
            f"Plain iteration without the divergence guard: max ‖z_60‖ = {plain_norm:.2g} after 60 steps. The "
            "fixed-point rows stop a sample once its residual exceeds 10⁶ × the first one (returning its best "
            "iterate).\n"
        )
    if "warm" in sections:
        emit(
            f"### b. Fixed-point reuse: second solve from the previous z* ({len(seeds)} seed(s) × B=8; rel. tol 1e-4, "
            "`check_every=1`; tanh float64, conv float32)\n"
        )
        emit(warm_markdown(run_warm(seeds, args.repeats, args.warmup)) + "\n")
    if "correction" in sections:
        emit(
            "### c. Sparse fixed-point correction: conv block 32×16×16, B=8, float32, fixed-point forward, "
            "max_iter 36, rel. tol 1e-4\n"
        )
        cases = correction_cases(0)
        time_steps(cases, args.repeats, args.warmup)
        emit(correction_markdown(cases) + "\n")
        emit(
            "Loss: `correction_loss` (exponential weights γ = 0.8) of `½‖z_i − y‖²` over the returned states; "
            "intermediate states carry a 1-step phantom gradient (`correction_steps=1`, τ = 1). *saved MB*: "
            "distinct tensors autograd keeps for the backward after the forward, parameters excluded.\n"
        )
    if "jac" in sections:
        emit("### d. Jacobian regularisation: one training step (anderson forward to rel. 1e-4, B=8)\n")
        cases = jac_cases(0)
        time_steps(cases, args.repeats, args.warmup)
        emit(jac_markdown(cases) + "\n")
        emit(
            "Step: forward with `jac_loss_probes` = p (Hutchinson estimate at z*: one extra tracked f-evaluation and "
            "p VJPs with `create_graph=True`), loss `½‖z* − y‖² + jac_loss`, gradients w.r.t. the parameters "
            "(double backward through the probes). No optimiser update, so every round sees the same problem.\n"
        )
    elapsed = time.perf_counter() - started
    emit(f"Run time {elapsed:.0f} s; {load_before} at start, {load_note()} at end.")
    if args.write:
        write_section("\n".join(out), BEGIN_MARK, END_MARK)
        print("\nwrote benchmarks/RESULTS.md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
