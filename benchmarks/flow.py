"""DEQ-Flow against torchvision's RAFT: the activation memory one training step keeps for its backward, and the time
of one training step.

Usage::

    python -m benchmarks.flow [--models raft_small raft_large] [--batch 1 2] [--size 368 496]
        [--rows memory steptime] [--step-size 256 320] [--step-batch 2] [--repeats 3] [--warmup 1]
        [--threads 1] [--device cpu|cuda]

Every model is a torchvision ``raft_small()`` / ``raft_large()`` at random initialisation (seed 0), float32, in training
mode; the images are uniform in [−1, 1], the target a random flow; the loss is RAFT's sequence loss (L1, γ = 0.8,
:func:`integrations.flow.metrics.sequence_loss` without a validity mask) over the flows the model returns. Rows:

* ``RAFT-12``: ``raft(image1, image2, num_flow_updates=12)``, backpropagation through all 12 updates.
* ``RAFT-12 ckpt``: the same (a deep copy) with its feature and context encoders each wrapped to run under
  ``torch.utils.checkpoint(..., use_reentrant=False)``; the correlation pyramid is built outside the checkpoints.
* ``DEQ 1 grad call``: :func:`integrations.flow.raft_to_deq_flow` with its defaults (Anderson, 36 iterations, 1-step
  phantom gradient τ = 1: one grad-tracked update call); ``ckpt``: ``checkpoint_encoders=True`` (encoders and the
  pyramid build under one checkpoint).
* ``DEQ chairs`` / ``DEQ things``: ``preset="chairs"`` (6 supervised states of a 36-iteration solve, 1-step phantom
  gradient each) and ``preset="things"`` (2 states of 40 iterations, 3-step phantom gradients).

Memory (table 1, size ``--size``, each ``--batch``): the bytes autograd saves for backward in one training-mode forward
plus the loss, recorded by a ``torch.autograd.graph.saved_tensors_hooks`` pack hook, counted once per storage
(``untyped_storage().data_ptr()``), parameters and buffers excluded, only what the graph still holds when the loss is
computed (a transient graph freed earlier is not counted). Tensors saved inside a checkpointed region are not seen by
the hook (the checkpoint's own hooks take them): that is the memory checkpointing saves. Each storage is attributed to
the phase in which it was *created* (a ``TorchDispatchMode`` notes the phase of every new output storage; tensors made
before the forward, such as the images, count as encoders): ``encoders`` until the first call of ``update_block`` (a
forward pre-hook switches the phase; that first call follows the encoders and the pyramid build in both models) or of
RAFT's ``corr_block.index_pyramid`` (its first lookup precedes its first update; wrapped on the instance while
recording), ``update`` (lookups, update block, mask predictor, upsampling) until the forward returns, then ``loss``.
So the pyramid counts as encoders whether it was built inside a checkpoint (DEQ ckpt) or not (RAFT-12 ckpt). A
checkpoint's inputs are saved outside it (non-reentrant checkpoints save them for the recomputation) and count. The DEQ
solves run their full budget (``tol=0``: 36, 36 and 40 iterations); the memory does not depend on it. With
``--device cuda`` a second table gives the peak of ``torch.cuda.max_memory_allocated()`` above what was allocated
before the step (parameters, inputs) over forward + loss + backward (the parameters' gradients count), per row (peak
statistics reset per row); without a GPU its rows read "not run".

Step time (table 2, ``--step-size`` × ``--step-batch``; the defaults keep a CPU run short): forward + loss + backward +
``torch.optim.AdamW`` step (lr 4e-4, weight decay 1e-4, eps 1e-8), each row on its own copy of the same initial
weights; interleaved rounds (every row once per round), ``--warmup`` rounds first, median (and min) over
``--repeats``. The DEQ rows use the library's stopping rule (absolute residual 1e-3); at random initialisation RAFT's
update has no fixed point, so they run their full budget — the NFE column gives the solver's f-evaluations per call and
the grad-tracked ones. ``DEQ 1 grad call, max_iter 12`` is the equal-budget row (RAFT applies its update 12 times).

One thread by default (``--threads``): on a shared 2-core machine, two OpenMP threads competing with another process
made a RAFT step up to 10× slower, one thread only about 2×.
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
import sys
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torchvision
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.checkpoint import checkpoint
from torchvision.models.optical_flow import raft_large, raft_small
from torchvision.models.optical_flow.raft import RAFT

from integrations.flow import raft_to_deq_flow
from integrations.flow.metrics import sequence_loss

from .solver_overhead import Timing, cpu_name, source_state

PROG = "benchmarks.flow"
MEASURED = ("implicit", "adapters", "integrations")  # the code whose changes the environment line reports
MODELS: dict[str, Callable[[], RAFT]] = {"raft_small": raft_small, "raft_large": raft_large}
PHASES = ("encoders", "update", "loss")
MIB = 2**20
GAMMA = 0.8
# Returns (flows, solver f-evaluations per call or None, grad-tracked f-calls).
Forward = Callable[[nn.Module, Tensor, Tensor], tuple[list[Tensor], int | None, int]]


# --------------------------------------------------------------------------------------------------- the rows
class Checkpointed(nn.Module):
    """Runs ``module`` under non-reentrant ``torch.utils.checkpoint`` while gradients are recorded."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: Tensor) -> Tensor:
        if not torch.is_grad_enabled():
            return self.module(x)
        out: Tensor = checkpoint(self.module, x, use_reentrant=False)
        return out


def release_pyramid(model: nn.Module) -> None:
    """Drop the correlation pyramid torchvision's ``CorrBlock`` keeps on the module after a forward (with the graph
    behind it; it also blocks ``copy.deepcopy``)."""
    corr_block: Any = model.corr_block
    corr_block.corr_pyramid = [torch.tensor(0)]


def raft_checkpointed(raft: RAFT) -> RAFT:
    """A deep copy of ``raft`` whose feature and context encoders run under a checkpoint (the pyramid build, between
    them in RAFT's forward, does not)."""
    release_pyramid(raft)
    model = copy.deepcopy(raft)
    model.feature_encoder = Checkpointed(model.feature_encoder)
    model.context_encoder = Checkpointed(model.context_encoder)
    return model


def _raft_forward(model: nn.Module, image1: Tensor, image2: Tensor) -> tuple[list[Tensor], int | None, int]:
    return model(image1, image2, num_flow_updates=12), None, 12


def _deq_forward(model: nn.Module, image1: Tensor, image2: Tensor) -> tuple[list[Tensor], int | None, int]:
    flows, info = model(image1, image2, return_info=True)
    return flows, info.forward.nfe, info.tracked_nfe


@dataclass
class Row:
    """One way to train: how to build it from a RAFT (sharing or copying its weights) and how to run its forward."""

    label: str
    build: Callable[[RAFT], nn.Module]
    forward: Forward
    ckpt: bool
    kind: str  # "raft" or "deq"


def rows_for(kind: str, deq_options: dict[str, Any]) -> list[Row]:
    """The rows of the memory table (``kind="memory"``) or of the step-time table (``"steptime"``)."""

    def deq(ckpt: bool, **options: Any) -> Callable[[RAFT], nn.Module]:
        return lambda raft: raft_to_deq_flow(raft, checkpoint_encoders=ckpt, **{**deq_options, **options})

    rows = [
        Row("RAFT-12", lambda raft: raft, _raft_forward, False, "raft"),
        Row("RAFT-12 ckpt", raft_checkpointed, _raft_forward, True, "raft"),
        Row("DEQ 1 grad call", deq(False), _deq_forward, False, "deq"),
        Row("DEQ 1 grad call ckpt", deq(True), _deq_forward, True, "deq"),
    ]
    if kind == "steptime":
        rows += [
            Row("DEQ 1 grad call, max_iter 12", deq(False, max_iter=12), _deq_forward, False, "deq"),
            Row("DEQ 1 grad call ckpt, max_iter 12", deq(True, max_iter=12), _deq_forward, True, "deq"),
        ]
    for preset in ("chairs", "things"):
        rows.append(Row(f"DEQ {preset}", deq(False, preset=preset), _deq_forward, False, "deq"))
        rows.append(Row(f"DEQ {preset} ckpt", deq(True, preset=preset), _deq_forward, True, "deq"))
    return rows


def make_raft(name: str, device: torch.device) -> RAFT:
    torch.manual_seed(0)
    return MODELS[name]().to(device).train()


def make_inputs(batch: int, size: tuple[int, int], device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """``(image1, image2, gt)``: images uniform in [−1, 1], a random target flow (its values cost nothing here)."""
    gen = torch.Generator().manual_seed(1)
    h, w = size
    # Two tensors, not views of one: a saved image would otherwise count (by storage) both images' bytes.
    image1, image2 = ((torch.rand(batch, 3, h, w, generator=gen) * 2 - 1).to(device) for _ in range(2))
    gt = (4 * torch.randn(batch, 2, h, w, generator=gen)).to(device)
    return image1, image2, gt


# --------------------------------------------------------------------------------------------------- memory
class _Saved:
    """What the pack hook stores: a detached alias, its storage, size and phase (weakly referenced by the recorder,
    so that a graph freed before the end is not counted)."""

    __slots__ = ("__weakref__", "nbytes", "phase", "ptr", "tensor")

    def __init__(self, t: Tensor, phase: str) -> None:
        self.tensor = t.detach()
        storage = t.untyped_storage()
        self.ptr, self.nbytes, self.phase = storage.data_ptr(), storage.nbytes(), phase


def _storage_ptr(t: Tensor) -> int:
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # tensors without storage (none in RAFT; be safe)
        return 0


class _CreationPhases(TorchDispatchMode):
    """Notes, for every storage an op creates (an output whose storage is none of the op's inputs'), the phase the
    recorder is in."""

    def __init__(self, recorder: PhaseRecorder) -> None:
        super().__init__()
        self.recorder = recorder

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        inputs = {_storage_ptr(t) for t in tree_leaves((args, kwargs)) if isinstance(t, Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, Tensor):
                ptr = _storage_ptr(t)
                if ptr and ptr not in inputs:
                    self.recorder.created[ptr] = self.recorder.phase
        return out


class PhaseRecorder:
    """The bytes saved for backward in one forward + loss, per phase (see the module docstring)."""

    def __init__(self, model: nn.Module) -> None:
        self.phase = "encoders"
        self.created: dict[int, str] = {}
        self.refs: list[weakref.ref[_Saved]] = []
        self.excluded = {_storage_ptr(t) for t in (*model.parameters(), *model.buffers())}
        self._model = model

    def _pack(self, t: Tensor) -> _Saved:
        ptr = _storage_ptr(t)
        saved = _Saved(t, self.created.get(ptr, self.phase))
        self.refs.append(weakref.ref(saved))
        return saved

    def _enter_update(self, module: nn.Module, args: Any) -> None:
        if self.phase == "encoders":
            self.phase = "update"

    @contextlib.contextmanager
    def recording(self) -> Iterator[PhaseRecorder]:
        update_block: nn.Module = self._model.update_block  # type: ignore[assignment]
        handle = update_block.register_forward_pre_hook(self._enter_update)
        # RAFT looks the pyramid up (CorrBlock.index_pyramid, not a module call) before its first update_block call;
        # the lookups belong to the update phase. (DEQ-Flow's first lookup is inside its graph-free solve.)
        corr_block: Any = self._model.corr_block
        index_pyramid = corr_block.index_pyramid

        def index_in_update(*args: Any, **kwargs: Any) -> Tensor:
            self._enter_update(corr_block, args)
            return index_pyramid(*args, **kwargs)

        corr_block.index_pyramid = index_in_update  # on this instance only, removed below
        try:
            with (
                _CreationPhases(self),
                torch.autograd.graph.saved_tensors_hooks(self._pack, lambda saved: saved.tensor),
            ):
                yield self
        finally:
            handle.remove()
            del corr_block.index_pyramid

    def mib(self) -> dict[str, float]:
        """MiB per phase and ``"total"``, over the distinct storages the graph still holds."""
        phases: dict[int, str] = {}
        sizes: dict[int, int] = {}
        for ref in self.refs:
            saved = ref()
            if saved is None or saved.ptr in self.excluded or saved.ptr == 0:
                continue
            sizes[saved.ptr] = saved.nbytes
            if saved.ptr not in phases or PHASES.index(saved.phase) < PHASES.index(phases[saved.ptr]):
                phases[saved.ptr] = saved.phase
        out = {phase: 0.0 for phase in PHASES}
        for ptr, nbytes in sizes.items():
            out[phases[ptr]] += nbytes / MIB
        out["total"] = sum(out[phase] for phase in PHASES)
        return out


@dataclass
class MemoryResult:
    model: str
    batch: int
    row: Row
    mib: dict[str, float]
    nfe: int | None
    tracked: int
    peak_mib: float | None = None  # CUDA only


def saved_for_backward(model: nn.Module, row: Row, inputs: tuple[Tensor, Tensor, Tensor]) -> MemoryResult:
    image1, image2, gt = inputs
    recorder = PhaseRecorder(model)
    with recorder.recording():
        flows, nfe, tracked = row.forward(model, image1, image2)
        recorder.phase = "loss"
        loss = sequence_loss(flows, gt, None, gamma=GAMMA)
    mib = recorder.mib()
    del loss, flows
    release_pyramid(model)
    return MemoryResult("", image1.shape[0], row, mib, nfe, tracked)


def cuda_peak(model: nn.Module, row: Row, inputs: tuple[Tensor, Tensor, Tensor]) -> float:
    """Peak allocated CUDA memory (MiB) above what was allocated before, over forward + loss + backward."""
    image1, image2, gt = inputs
    model.zero_grad(set_to_none=True)
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    flows, _, _ = row.forward(model, image1, image2)
    sequence_loss(flows, gt, None, gamma=GAMMA).backward()
    del flows
    release_pyramid(model)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    model.zero_grad(set_to_none=True)
    return peak / MIB


def run_memory(args: argparse.Namespace, device: torch.device, log: Callable[[str], None]) -> list[MemoryResult]:
    results = []
    deq_options = {"tol": 0.0}  # full budget: 36 (default, chairs) or 40 (things) iterations
    for name in args.models:
        raft = make_raft(name, device)
        for batch in args.batch:
            inputs = make_inputs(batch, tuple(args.size), device)
            for row in rows_for("memory", deq_options):
                t0 = time.perf_counter()
                model = row.build(raft).train()
                result = saved_for_backward(model, row, inputs)
                result.model = name
                if device.type == "cuda":
                    result.peak_mib = cuda_peak(model, row, inputs)
                release_pyramid(model)
                del model
                gc.collect()
                log(f"  memory {name} batch {batch} {row.label}: {result.mib['total']:.1f} MiB saved "
                    f"({time.perf_counter() - t0:.1f} s)")  # fmt: skip
                results.append(result)
    return results


def _ratio(a: float, b: float) -> str:
    return "—" if not b or math.isnan(a) or math.isnan(b) else f"{a / b:.2f}×"


def _calls(result: MemoryResult) -> str:
    return "12 (BPTT)" if result.nfe is None else f"{result.nfe} + {result.tracked}"


def memory_markdown(results: list[MemoryResult]) -> str:
    header = [
        "model", "batch", "row", "f-calls: solve + tracked", "encoders MiB", "update MiB", "loss MiB", "total MiB",
        "RAFT-12 ÷ row", "RAFT-12, same ckpt ÷ row",
    ]  # fmt: skip
    lines = [_table_head(header)]
    for r in results:
        same = [x for x in results if x.model == r.model and x.batch == r.batch and x.row.kind == "raft"]
        stock = next(x for x in same if not x.row.ckpt).mib["total"]
        matched = next(x for x in same if x.row.ckpt == r.row.ckpt).mib["total"]
        cells = [r.model, str(r.batch), r.row.label, _calls(r), *(f"{r.mib[p]:.1f}" for p in (*PHASES, "total"))]
        cells += [_ratio(stock, r.mib["total"]), _ratio(matched, r.mib["total"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def peak_markdown(results: list[MemoryResult], device: torch.device) -> str:
    header = ["model", "batch", "row", "peak MiB above parameters", "RAFT-12 ÷ row", "RAFT-12, same ckpt ÷ row"]
    lines = [_table_head(header)]
    if device.type != "cuda":
        why = "no GPU" if not torch.cuda.is_available() else "--device cpu"
        seen = sorted({(r.model, r.batch) for r in results}, key=lambda k: (list(MODELS).index(k[0]), k[1]))
        for model, batch in seen:
            lines.append(f"| {model} | {batch} | all rows | CUDA: not run ({why}) | — | — |")
        return "\n".join(lines)
    for r in results:
        same = [x for x in results if x.model == r.model and x.batch == r.batch and x.row.kind == "raft"]
        stock = next(x for x in same if not x.row.ckpt).peak_mib or math.nan
        matched = next(x for x in same if x.row.ckpt == r.row.ckpt).peak_mib or math.nan
        peak = r.peak_mib or math.nan
        cells = [r.model, str(r.batch), r.row.label, f"{peak:.0f}", _ratio(stock, peak), _ratio(matched, peak)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------- step time
@dataclass
class StepResult:
    model: str
    row: Row
    timing: Timing = field(default_factory=Timing)
    nfe: int | None = None
    tracked: int = 0


def run_steptime(args: argparse.Namespace, device: torch.device, log: Callable[[str], None]) -> list[StepResult]:
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    image1, image2, gt = make_inputs(args.step_batch, tuple(args.step_size), device)
    results: list[StepResult] = []
    for name in args.models:
        raft = make_raft(name, device)
        steps: list[tuple[StepResult, Callable[[], None]]] = []
        for row in rows_for("steptime", {}):
            release_pyramid(raft)
            model = row.build(copy.deepcopy(raft)).train()
            opt = torch.optim.AdamW(model.parameters(), lr=4e-4, weight_decay=1e-4, eps=1e-8)
            result = StepResult(name, row)

            def step(model: nn.Module = model, opt: torch.optim.Optimizer = opt, result: StepResult = result) -> None:
                opt.zero_grad(set_to_none=True)
                flows, result.nfe, result.tracked = result.row.forward(model, image1, image2)
                sequence_loss(flows, gt, None, gamma=GAMMA).backward()
                opt.step()

            steps.append((result, step))
            results.append(result)
        enabled = gc.isenabled()
        for round_ in range(args.warmup + args.repeats):
            for result, step in steps:
                gc.collect()
                gc.disable()
                sync()
                t0 = time.perf_counter()
                step()
                sync()
                elapsed = time.perf_counter() - t0
                if enabled:
                    gc.enable()
                if round_ >= args.warmup:
                    result.timing.samples.append(elapsed)
            log(f"  step time {name} round {round_ + 1}/{args.warmup + args.repeats} done")
        del steps
        gc.collect()
    return results


def steptime_markdown(results: list[StepResult]) -> str:
    header = ["model", "row", "f-calls: solve + tracked", "step s (median)", "step s (min)", "÷ RAFT-12 (median)"]
    lines = [_table_head(header)]
    for r in results:
        stock = next(x for x in results if x.model == r.model and x.row.kind == "raft" and not x.row.ckpt)
        calls = "12 (BPTT)" if r.nfe is None else f"{r.nfe} + {r.tracked}"
        cells = [
            r.model,
            r.row.label,
            calls,
            f"{r.timing.median:.3f}",
            f"{r.timing.min:.3f}",
            _ratio(r.timing.median, stock.timing.median),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------- report
def _table_head(header: list[str]) -> str:
    return "| " + " | ".join(header) + " |\n|" + "|".join("---" for _ in header) + "|"


def environment(args: argparse.Namespace, device: torch.device) -> list[str]:
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "none used"
    load = f"; load average (1 min) at start {os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else ""
    return [
        f"- date (UTC): {_dt.datetime.now(_dt.timezone.utc).strftime('%Y-%m-%d %H:%M')}",
        f"- CPU: {cpu_name()}, {os.cpu_count()} logical cores; torch threads: {torch.get_num_threads()}{load}",
        f"- GPU: {gpu}; device {device}; float32",
        f"- torch {torch.__version__}, torchvision {torchvision.__version__}, Python {platform.python_version()}; "
        f"{source_state(MEASURED)}",
        f"- command: `{shlex.join(['python', '-m', PROG, *args.argv])}`",
    ]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=f"python -m {PROG}", description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--batch", nargs="+", type=int, default=[1, 2], help="batch sizes of the memory rows")
    parser.add_argument("--size", nargs=2, type=int, default=[368, 496], metavar=("H", "W"), help="memory rows")
    parser.add_argument(
        "--rows",
        nargs="+",
        default=["memory", "steptime"],
        choices=["memory", "steptime", "accuracy"],
        help="accuracy: training runs of DEQ-Flow and RAFT-12 (benchmarks.flow_accuracy, its defaults; ~20 CPU min)",
    )
    parser.add_argument("--step-size", nargs=2, type=int, default=None, metavar=("H", "W"),
                        help="step-time image size (default 256 320 on CPU, --size on CUDA)")  # fmt: skip
    parser.add_argument("--step-batch", type=int, default=2, help="step-time batch size (default 2)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds of the step-time rows (default 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default 1)")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.step_size is None:
        args.step_size = [256, 320] if args.device == "cpu" else list(args.size)
    for h, w in (args.size, args.step_size):
        if h % 8 or w % 8 or min(h, w) < 128:
            parser.error(f"image size {h}×{w}: H and W must be divisible by 8 and at least 128")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    cuda = args.device == "cuda" and torch.cuda.is_available()
    if args.device == "cuda" and not cuda:
        print("--device cuda: no CUDA device available; measuring on the CPU, CUDA rows not run", file=sys.stderr)
    device = torch.device("cuda" if cuda else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)

    def log(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    print("### Environment\n\n" + "\n".join(environment(args, device)) + "\n", flush=True)
    if "memory" in args.rows:
        results = run_memory(args, device, log)
        h, w = args.size
        print(f"### 1. Saved for backward, one training forward + loss, {h}×{w} (MiB)\n", flush=True)
        print(memory_markdown(results) + "\n", flush=True)
        print("### 1b. CUDA: peak allocated over forward + loss + backward, above the parameters (MiB)\n", flush=True)
        print(peak_markdown(results, device) + "\n", flush=True)
    if "steptime" in args.rows:
        steps = run_steptime(args, device, log)
        h, w = args.step_size
        print(
            f"### 2. Step time: forward + loss + backward + AdamW, {h}×{w}, batch {args.step_batch}, "
            f"median of {args.repeats} after {args.warmup} warm-up round(s)\n",
            flush=True,
        )
        print(steptime_markdown(steps) + "\n", flush=True)
    if "accuracy" in args.rows:
        from .flow_accuracy import main as accuracy

        print("### 3. Accuracy after the same training steps, and against the test-time budget\n", flush=True)
        accuracy(["--device", device.type, "--threads", str(args.threads or torch.get_num_threads())])
    load = f"; load average (1 min) at the end {os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else ""
    print(f"Run time: {time.perf_counter() - started:.0f} s{load}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
