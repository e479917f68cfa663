"""Stress run: N seeded random forward/backward calls over the whole option space, with leak checks.

``python -m benchmarks.stress --calls 1000 --seed 0 [--device cuda]`` prints a summary table; ``--only I`` reruns
call I of a seed alone (a failure report names both). ``tests/test_stress.py`` runs a reduced size of the same driver
(:func:`run_stress`) as part of ``make test``.

Each call draws (from ``random.Random(f"{seed}:{index}")``, so any call is reproducible on its own):

* the state structure (tensor / tuple / dict / nested) of a contractive-or-not tanh block seen through a pytree
  (``tests/problems.py``'s ``PytreeBlock`` around its ``TanhBlock``, ``‖W‖₂ = s``, s ∈ {0.5, 0.9, 1.2}), width and
  batch size (1 included);
* the forward solver (every forward solver of ``implicit.SOLVERS``), the backward mode (every one of
  ``implicit.BACKWARD_MODES``), the backward solver (every registered solver), correction (None, 2 or 3), Jacobian
  loss probes (0 or 1), check_every, train/eval mode, float32/float64 and the on_divergence policy.

A construction that raises ``TypeError`` / ``ValueError`` is the documented answer to an invalid combination and
is counted, not failed. For the others: forward, loss ``Σ leaf²`` over every returned state (+ ``info.jac_loss``),
backward. A failure is any other exception, ``implicit.DivergenceError`` without ``on_divergence="raise"``, a sample
reported converged with a non-finite residual or state, a non-finite output or gradient when every sample converged.
Memory: resident set size (``/proc/self/statm``, the current RSS, not the peak) and, on CUDA,
``torch.cuda.memory_allocated()`` after a warm-up of the first 10 % of the calls and at the end; weak references to
every finished call's layer must be dead after ``gc.collect()``.
"""

from __future__ import annotations

import argparse
import collections
import gc
import os
import random
import resource
import sys
import time
import traceback
import warnings
import weakref
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch.utils import _pytree as pytree

import implicit
from implicit.solvers import forward_rule
from tests.problems import PytreeBlock, TanhBlock, widths_for

FORWARD_SOLVERS = implicit.SOLVERS.names(forward_rule)
ALL_SOLVERS = implicit.SOLVERS.names()
BACKWARD_MODES = implicit.BACKWARD_MODES.names()
STRUCTURES = ("tensor", "tuple", "dict", "nested")
EXPECTED_AT_CONSTRUCTION = (TypeError, ValueError)
MIB = 1 << 20


@dataclass(frozen=True)
class Config:
    """One call's draw (everything needed to rebuild it)."""

    seed: int
    index: int
    structure: str
    pieces: int
    width: int
    batch: int
    s: float
    dtype: str
    training: bool
    poison: bool
    options: dict[str, Any]

    def describe(self) -> str:
        return (
            f"seed={self.seed} index={self.index} structure={self.structure} pieces={self.pieces} width={self.width} "
            f"batch={self.batch} s={self.s} dtype={self.dtype} training={self.training} poison={self.poison} "
            f"options={self.options}"
        )

    @property
    def key(self) -> str:
        """The configuration's row in the summary: forward solver / backward mode."""
        return f"{self.options['solver']}/{self.options['backward']}"


def draw(seed: int, index: int) -> Config:
    rng = random.Random(f"{seed}:{index}")
    structure = rng.choice(STRUCTURES)
    dtype = rng.choice(("float32", "float64"))
    options: dict[str, Any] = {
        "solver": rng.choice(FORWARD_SOLVERS),
        "backward": rng.choice(BACKWARD_MODES),
        "backward_solver": rng.choice(ALL_SOLVERS),
        "correction": rng.choice((None, 2, 3)),
        "jac_loss_probes": rng.choice((0, 1)),
        "on_divergence": rng.choice(implicit.options.DIVERGENCE_POLICIES),
        "check_every": rng.choice((1, 4)),
        "tol": 1e-4 if dtype == "float32" else 1e-8,
        "backward_tol": 1e-4 if dtype == "float32" else 1e-8,
        "backward_max_iter": 40,
    }
    # the integrator spends dozens of f-evaluations on its first short steps (README, `stagnation`)
    options["max_iter"] = 300 if options["solver"] == "ode" else 40
    return Config(
        seed=seed,
        index=index,
        structure=structure,
        pieces=rng.choice((2, 3)),
        width=rng.choice((6, 9, 16)),
        batch=rng.choice((1, 1, 2, 5)),
        s=rng.choice((0.5, 0.9, 1.2)),
        dtype=dtype,
        training=rng.random() < 0.5,
        poison=rng.random() < 0.08,
        options=options,
    )


@dataclass
class Outcome:
    """What one call did: ``status`` is ok / invalid (expected construction error) / diverged (expected
    DivergenceError) / failed; ``layer`` a weak reference to the layer when one was built."""

    config: Config
    status: str
    exception: str | None = None
    converged: bool = False
    failure: str | None = None
    warnings: list[str] = field(default_factory=list)
    layer: weakref.ref | None = None


def _leaves(output: Any) -> list[torch.Tensor]:
    return [leaf for leaf in pytree.tree_leaves(output) if isinstance(leaf, torch.Tensor)]


def run_call(config: Config, device: str = "cpu") -> Outcome:
    """Build, forward, loss, backward and check one drawn call. Never raises: a failure is in the outcome."""
    dtype = getattr(torch, config.dtype)
    torch.manual_seed(config.seed * 1_000_003 + config.index)  # probes, Rademacher draws: reproducible per call
    widths = widths_for(config.width, config.pieces)
    inner = TanhBlock(config.width, s=config.s, seed=config.seed * 7919 + config.index, dtype=dtype)
    if config.poison:  # a NaN bias: every sample diverges at its first f-evaluation (exercises on_divergence)
        with torch.no_grad():
            inner.b[0] = float("nan")
    block = PytreeBlock(inner, config.structure, widths).to(device)
    try:
        layer = implicit.make_implicit(block, **config.options)
    except EXPECTED_AT_CONSTRUCTION as error:
        return Outcome(config, "invalid", exception=type(error).__name__)
    except Exception as error:  # any other construction error is a finding
        return Outcome(config, "failed", type(error).__name__, failure=traceback.format_exc())
    outcome = Outcome(config, "ok", layer=weakref.ref(layer))
    layer.train(config.training)
    x = torch.randn(config.batch, config.width, dtype=dtype, device=device, requires_grad=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            _forward_backward(layer, x, outcome)
        except implicit.DivergenceError as error:
            outcome.exception = type(error).__name__
            if config.options["on_divergence"] == "raise":
                outcome.status = "diverged"
            else:
                outcome.status, outcome.failure = "failed", traceback.format_exc()
        except Exception as error:
            outcome.status, outcome.exception, outcome.failure = "failed", type(error).__name__, traceback.format_exc()
    outcome.warnings = [w.category.__name__ for w in caught]
    return outcome


def _forward_backward(layer: implicit.ImplicitModule, x: torch.Tensor, outcome: Outcome) -> None:
    out, info = layer(x, return_info=True)
    states = out if isinstance(out, list) else [out]  # correction in training mode: the list of supervised states
    leaves = [leaf for state in states for leaf in _leaves(state)]
    loss = sum(leaf.square().sum() for leaf in leaves)
    if info.jac_loss is not None:
        loss = loss + info.jac_loss
    params = [p for p in layer.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, [x, *params], allow_unused=True)

    result = info.forward
    converged = result.converged
    problems = []
    if converged.any():
        finite_z = torch.isfinite(result.z.reshape(result.z.shape[0], -1)).all(dim=1)
        for name, bad in (
            ("abs residual", ~torch.isfinite(result.abs)),
            ("rel residual", ~torch.isfinite(result.rel)),
            ("z", ~finite_z),
        ):
            if (converged & bad).any():
                problems.append(
                    f"converged sample(s) {(converged & bad).nonzero().flatten().tolist()} with non-finite {name}"
                )
    outcome.converged = bool(converged.all())
    if outcome.converged:
        if not all(torch.isfinite(leaf).all() for leaf in leaves):
            problems.append("non-finite output although every sample converged")
        if info.jac_loss is not None and not torch.isfinite(info.jac_loss):
            problems.append("non-finite jac_loss although every sample converged")
        names = ["x", *(n for n, p in layer.named_parameters() if p.requires_grad)]
        for name, g in zip(names, grads):
            if g is not None and not torch.isfinite(g).all():
                problems.append(f"non-finite gradient of {name} although every sample converged")
    if problems:
        outcome.status, outcome.failure = "failed", "; ".join(problems)


def rss_bytes() -> int:
    """Current resident set size (``/proc/self/statm``); the peak from ``getrusage`` where there is no /proc."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@dataclass
class Report:
    seed: int
    calls: int
    outcomes: list[Outcome]
    rss_warm: int
    rss_end: int
    cuda_warm: int | None
    cuda_end: int | None
    alive_before_gc: int
    alive_after_gc: int
    seconds: float
    rss_trace: list[tuple[int, int]]  # (calls done, RSS) at every tenth of the run, after gc.collect()

    @property
    def failures(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status == "failed"]

    @property
    def rss_growth(self) -> int:
        return self.rss_end - self.rss_warm

    def table(self) -> str:
        rows: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        for o in self.outcomes:
            rows[o.config.key][o.status] += 1
            rows[o.config.key]["converged"] += o.converged
        statuses = ("ok", "converged", "invalid", "diverged", "failed")
        lines = [
            "| solver/backward | calls | " + " | ".join(statuses) + " |",
            "|---|---:|" + "---:|" * len(statuses),
        ]
        for key in sorted(rows):
            counts = rows[key]
            total = sum(counts[s] for s in ("ok", "invalid", "diverged", "failed"))
            lines.append(f"| {key} | {total} | " + " | ".join(str(counts[s]) for s in statuses) + " |")
        exceptions = collections.Counter(
            f"{o.exception} ({o.status})" for o in self.outcomes if o.exception is not None
        )
        caught = collections.Counter(w for o in self.outcomes for w in o.warnings)
        lines += [
            "",
            f"calls: {self.calls} (seed {self.seed}), wall time {self.seconds:.1f} s",
            "exceptions by type: " + (", ".join(f"{k}: {v}" for k, v in sorted(exceptions.items())) or "none"),
            "warnings by type: " + (", ".join(f"{k}: {v}" for k, v in sorted(caught.items())) or "none"),
            f"RSS after warm-up {self.rss_warm / MIB:.1f} MiB, at end {self.rss_end / MIB:.1f} MiB, "
            f"growth {self.rss_growth / MIB:+.2f} MiB",
            "RSS trace (calls: MiB): " + ", ".join(f"{n}: {r / MIB:.1f}" for n, r in self.rss_trace),
            f"layers alive before gc.collect(): {self.alive_before_gc}, after: {self.alive_after_gc}",
        ]
        if self.cuda_warm is not None:
            lines.append(
                f"CUDA allocated after warm-up {self.cuda_warm} B, at end {self.cuda_end} B, "
                f"growth {self.cuda_end - self.cuda_warm:+d} B"
            )
        lines.append(f"failures: {len(self.failures)}")
        for o in self.failures:
            lines += [f"  FAILED {o.config.describe()}", *("    " + s for s in (o.failure or "").splitlines())]
        return "\n".join(lines)


def _cuda_allocated(device: str) -> int | None:
    if not device.startswith("cuda"):
        return None
    torch.cuda.synchronize()
    return torch.cuda.memory_allocated()


def run_stress(
    calls: int, seed: int = 0, device: str = "cpu", only: int | None = None, warmup: int | None = None
) -> Report:
    """Run ``calls`` drawn calls (or the single call ``only``) and measure memory after the warm-up (``warmup`` calls,
    default a tenth of them; it should include the first use of every component, e.g. the lazy import of torchdiffeq
    by the first ODE call, ~40 MiB) and at the end."""
    indices = [only] if only is not None else list(range(calls))
    warmup = max(1, len(indices) // 10 if warmup is None else min(warmup, len(indices)))
    outcomes: list[Outcome] = []
    trace: list[tuple[int, int]] = []
    start = time.perf_counter()
    rss_warm, cuda_warm = rss_bytes(), _cuda_allocated(device)
    for i, index in enumerate(indices):
        outcomes.append(run_call(draw(seed, index), device))
        if (i + 1) % warmup == 0:
            gc.collect()
            trace.append((i + 1, rss_bytes()))
        if i + 1 == warmup:
            rss_warm, cuda_warm = trace[-1][1], _cuda_allocated(device)
    refs = [o.layer for o in outcomes if o.layer is not None]
    alive_before = sum(r() is not None for r in refs)
    gc.collect()
    alive_after = sum(r() is not None for r in refs)
    return Report(
        seed=seed,
        calls=len(indices),
        outcomes=outcomes,
        rss_warm=rss_warm,
        rss_end=rss_bytes(),
        cuda_warm=cuda_warm,
        cuda_end=_cuda_allocated(device),
        alive_before_gc=alive_before,
        alive_after_gc=alive_after,
        seconds=time.perf_counter() - start,
        rss_trace=trace,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--only", type=int, default=None, help="rerun this call index alone")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (tiny problems: 1)")
    parser.add_argument("--warmup", type=int, default=None, help="calls before the first memory reading (10 %%)")
    parser.add_argument("--rss-bound-mib", type=float, default=50.0)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    report = run_stress(args.calls, args.seed, args.device, args.only, args.warmup)
    print(report.table())
    if args.only is not None:
        print("\n".join(f"{k}: {v}" for k, v in asdict(report.outcomes[0].config).items()))
    ok = (
        not report.failures
        and report.alive_after_gc == 0
        and report.rss_growth < args.rss_bound_mib * MIB
        and (report.cuda_warm is None or report.cuda_end == report.cuda_warm)
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
