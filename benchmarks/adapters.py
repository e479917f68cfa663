"""The adapters as DEQs: f-evaluations to a relative residual of 1e-4 per solver, and what a solve costs against the
same block stacked as many times (the weight-tied network of that depth), side by side with TorchDEQ 0.1.0 solving the
same block.

Usage::

    python -m benchmarks.adapters [--quick] [--repeats 5] [--device cpu|cuda] [--only transformer,conv,...] [--write]

Every case is an adapter block at random initialisation, float32, in training mode (dropout 0): PyTorch's post-LN and
pre-LN ``TransformerEncoderLayer`` (residual injection; post-LN also with the DEQ-Transformer qkv injection), timm's
ViT ``Block``, Hugging Face's GPT-2 and BERT layers (d = 64, 4 heads, 8 sequences of 32 tokens), the MDEQ conv block
(32 channels, 8×16×16) and stage 4 of timm's ``hrnet_w18_small`` (4 branches, 4 images, 16×16 at the highest
resolution; injections 3·N(0, 1), the scale its stem feeds it). The injection is N(0, 1) tokens for transformers.

Table 1: per-sample f-evaluations to rel. 1e-4 (``check_every=1``, at most 100 steps) of fixed-point iteration,
Anderson (m = 5) and Broyden (memory 10), and TorchDEQ's Anderson on the same block (HRNet's list state through
TorchDEQ's multiscale wrapper). TorchDEQ stops when the worst sample of the batch is within tolerance.

Table 2: Anderson to rel. 1e-4 (checked every 4 steps, the default) against the block applied L times, L = the
f-evaluations of that solve (the weight-tied network that spends the same compute, so the ratio is the solver's
cost): forward time (no grad), forward + backward time (exact implicit
gradient, Anderson adjoint to rel. 1e-4; the stack by autograd through all L applications) for the parameters' and
the injection's gradients, and the activation memory the backward keeps (tensors saved by autograd, parameters
excluded). TorchDEQ: its Anderson forward and IFT backward (Anderson, rel. 1e-4) on the same block.

Not here: the RAFT update operator — at random initialisation it has no equilibrium (its flow drifts by a roughly
constant amount per update), so a solve to a tolerance is not defined; DEQ-Flow's benchmarks use trained-as-DEQ
weights. Timing: interleaved rounds, median over ``--repeats``.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

import adapters
import implicit

from .backward_modes import SavedTensors, environment_lines
from .solver_overhead import fmt, load_torchdeq, make_sync, ratio, replace_block, table, time_interleaved

BEGIN_MARK = "<!-- BEGIN GENERATED (python -m benchmarks.adapters --write) -->"
END_MARK = "<!-- END GENERATED (benchmarks.adapters) -->"
HEADING = "## Adapters: solves against stacked blocks"
TOL = 1e-4
MAX_ITER = 100
SOLVERS = {"fixed_point": {}, "anderson": {"m": 5}, "broyden": {"memory": 10}}
Runner = Callable[[], Any]


@dataclass
class Case:
    key: str
    label: str
    block: nn.Module
    x: Any


def _tokens(device: torch.device, batch: int = 8, length: int = 32, width: int = 64) -> Tensor:
    return torch.randn(batch, length, width, generator=torch.Generator().manual_seed(1)).to(device)


def _transformer_cases(device: torch.device) -> list[Case]:
    cases = []
    for key, label, norm_first, injection in (
        ("post-ln", "torch post-LN layer", False, "residual"),
        ("pre-ln", "torch pre-LN layer + final LN", True, "residual"),
        ("post-ln-qkv", "torch post-LN layer, qkv injection", False, "qkv"),
    ):
        torch.manual_seed(0)
        layer = nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0, batch_first=True, norm_first=norm_first)
        block = adapters.transformer_block(layer.to(device), injection=injection)
        cases.append(Case(key, label, block, _tokens(device)))
    return cases


def _timm_case(device: torch.device) -> list[Case]:
    from timm.models.vision_transformer import Block

    torch.manual_seed(0)
    return [
        Case(
            "timm", "timm ViT Block + final LN", adapters.adapt(Block(64, 4, mlp_ratio=2.0).to(device)), _tokens(device)
        )
    ]


def _hugging_face_cases(device: torch.device) -> list[Case]:
    import transformers
    from transformers.models.bert.modeling_bert import BertLayer
    from transformers.models.gpt2.modeling_gpt2 import GPT2Block

    torch.manual_seed(0)
    gpt2 = transformers.GPT2Config(n_embd=64, n_head=4, n_inner=128, n_layer=1, resid_pdrop=0.0, attn_pdrop=0.0)
    gpt2._attn_implementation = "sdpa"
    torch.manual_seed(0)
    bert = transformers.BertConfig(
        hidden_size=64, num_attention_heads=4, intermediate_size=128, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    bert._attn_implementation = "sdpa"
    return [
        Case(
            "gpt2", "HF GPT2Block + final LN", adapters.adapt(GPT2Block(gpt2, layer_idx=0).to(device)), _tokens(device)
        ),
        Case("bert", "HF BertLayer", adapters.adapt(BertLayer(bert).to(device)), _tokens(device)),
    ]


def _conv_case(device: torch.device) -> list[Case]:
    torch.manual_seed(0)
    x = torch.randn(8, 32, 16, 16, generator=torch.Generator().manual_seed(1)).to(device)
    block = adapters.conv.mdeq_block(32).to(device)
    return [Case("conv", "MDEQ conv block 32×16×16", block, x)]


def _hrnet_case(device: torch.device) -> list[Case]:
    import timm

    torch.manual_seed(0)
    model = timm.create_model("hrnet_w18_small", pretrained=False)
    block = adapters.hrnet_stage_block(model.stage4).to(device)
    gen = torch.Generator().manual_seed(1)
    x = [
        3 * torch.randn(4, c, 16 // 2**i, 16 // 2**i, generator=gen).to(device) for i, c in enumerate((16, 32, 64, 128))
    ]
    return [Case("hrnet", "hrnet_w18_small stage 4", block, x)]


FAMILIES: dict[str, Callable[[torch.device], list[Case]]] = {
    "transformer": _transformer_cases,
    "timm": _timm_case,
    "hf": _hugging_face_cases,
    "conv": _conv_case,
    "hrnet": _hrnet_case,
}


# --------------------------------------------------------------------------------------------------- runners
def _solve(case: Case, solver: str, *, check_every: int = 4) -> tuple[Any, Any]:
    return implicit.equilibrium(
        case.block,
        case.x,
        case.block.initial_state(case.x),
        solver=solver,
        solver_options=SOLVERS[solver],
        tol=TOL,
        stop_mode="rel",
        max_iter=MAX_ITER,
        check_every=check_every,
        on_divergence="ignore",
        backward="implicit",
        backward_solver="anderson",
        backward_tol=TOL,
        backward_stop_mode="rel",
        backward_max_iter=MAX_ITER,
    )


def _stacked(case: Case, depth: int) -> Any:
    z = case.block.initial_state(case.x)
    for _ in range(depth):
        z = case.block(z, case.x)
    return z


def _loss(z: Any, cotangents: list[Tensor]) -> Tensor:
    return sum((leaf * c).sum() for leaf, c in zip(torch.utils._pytree.tree_leaves(z), cotangents))


def _inputs_with_grad(case: Case) -> Case:
    x = torch.utils._pytree.tree_map(lambda t: t.detach().requires_grad_(), case.x)
    return Case(case.key, case.label, case.block, x)


def _differentiated(case: Case) -> list[Tensor]:
    return [*case.block.parameters(), *torch.utils._pytree.tree_leaves(case.x)]


def _peer_layer(training: bool) -> Any:
    from torchdeq import get_deq

    layer = get_deq(
        f_solver="anderson",
        b_solver="anderson",
        f_max_iter=MAX_ITER,
        b_max_iter=MAX_ITER,
        f_tol=TOL,
        f_stop_mode="rel",
        b_tol=TOL,
        b_stop_mode="rel",
        ift=True,
    )
    layer.train(training)
    return layer


def _peer_solve(layer: Any, case: Case) -> tuple[Any, Any]:
    """TorchDEQ's solve of the block: a tensor state as it is, a list state through TorchDEQ's multiscale wrapper
    (which calls the function with the list unpacked)."""
    f, x = case.block, case.x
    z0 = case.block.initial_state(x)
    if isinstance(z0, Tensor):
        z_out, info = layer(lambda z: f(z, x), z0, solver_kwargs={"m": 5})
    else:
        z_out, info = layer(lambda *zs: f(list(zs), x), z0, solver_kwargs={"m": 5})
    return z_out[-1], info


def _saved_mb(run: Callable[[], Any], exclude: list[Tensor]) -> float:
    """MiB of the tensors autograd keeps for the backward of ``run()``'s graph (``exclude``: the parameters)."""
    recorder = SavedTensors()
    with recorder.recording():
        out = run()
    mib = recorder.alive_mb(exclude)
    del out
    return mib


@dataclass
class Measured:
    nfe: dict[str, tuple[float, float, str]]  # solver -> (mean, max per-sample NFE, converged "k/B")
    depth: int
    ms: dict[str, float]  # runner name -> median ms
    saved: dict[str, float]  # "deq" / "stacked" / "torchdeq" -> MiB
    peer_nfe: tuple[float, float, str] | None


def measure(case: Case, torchdeq: Any, device: torch.device, repeats: int, warmup: int) -> Measured:
    sync = make_sync(device)
    nfe: dict[str, tuple[float, float, str]] = {}
    batch = torch.utils._pytree.tree_leaves(case.x)[0].shape[0]
    with torch.no_grad():
        for solver in SOLVERS:
            _, info = _solve(case, solver, check_every=1)
            steps = info.forward.nstep.double()
            done = int((info.forward.rel <= TOL).sum())
            nfe[solver] = (float(steps.mean()), float(steps.max()), f"{done}/{batch}")
        depth = int(_solve(case, "anderson")[1].forward.nfe)  # the timed configuration's f-evaluations
    peer_nfe = None
    if torchdeq is not None:
        with torch.no_grad():
            _, info = _peer_solve(_peer_layer(False), case)
            rel = torch.as_tensor(info["rel_lowest"]).flatten()
            steps = torch.as_tensor(info["nstep"]).double().flatten()
            peer_nfe = (float(steps.mean()), float(steps.max()), f"{int((rel <= TOL).sum())}/{batch}")

    grad_case = _inputs_with_grad(case)
    wrt = _differentiated(grad_case)
    cotangents = [torch.randn_like(t) for t in torch.utils._pytree.tree_leaves(case.block.initial_state(case.x))]

    def step(forward: Callable[[], Any]) -> Runner:
        return lambda: torch.autograd.grad(_loss(forward(), cotangents), wrt, allow_unused=True)

    def deq_forward() -> Any:
        return _solve(grad_case, "anderson")[0]

    def stacked_forward() -> Any:
        return _stacked(grad_case, depth)

    no_grad = torch.no_grad()  # as a decorator: the forward-only runners record no graph
    runners: dict[str, Runner] = {
        "deq|f": no_grad(lambda: _solve(case, "anderson")),
        "stacked|f": no_grad(lambda: _stacked(case, depth)),
        "deq|fb": step(deq_forward),
        "stacked|fb": step(stacked_forward),
    }
    saved = {"deq": _saved_mb(deq_forward, wrt), "stacked": _saved_mb(stacked_forward, wrt)}
    if peer_nfe is not None:
        eval_layer, train_layer = _peer_layer(False), _peer_layer(True)

        def peer_forward() -> Any:
            return _peer_solve(train_layer, grad_case)[0]

        runners["torchdeq|f"] = no_grad(lambda: _peer_solve(eval_layer, case))
        runners["torchdeq|fb"] = step(peer_forward)
        saved["torchdeq"] = _saved_mb(peer_forward, wrt)
    timings = time_interleaved(runners, repeats=repeats, warmup=warmup, sync=sync)
    return Measured(nfe, depth, {name: t.median * 1e3 for name, t in timings.items()}, saved, peer_nfe)


# --------------------------------------------------------------------------------------------------- report
def markdown(results: list[tuple[Case, Measured]], peer_status: str, environment: list[str]) -> str:
    lines = ["### Adapters: environment", "", *environment, ""]
    header = ["block", *[f"{s} mean / max (conv.)" for s in SOLVERS], "TorchDEQ anderson mean / max (conv.)"]
    rows = []
    for case, m in results:
        cells = [f"{fmt(mean)} / {fmt(high)} ({conv})" for mean, high, conv in m.nfe.values()]
        peer = m.peer_nfe
        peer_cell = f"{fmt(peer[0])} / {fmt(peer[1])} ({peer[2]})" if peer is not None else "not installed"
        rows.append([case.label, *cells, peer_cell])
    lines += [
        f"### 1. f-evaluations per sample to rel. {TOL:g} (check every step, at most {MAX_ITER} steps)",
        "",
        table(header, rows),
        "",
    ]
    header = [
        "block",
        "L",
        "fwd: DEQ ms",
        "stacked ×L ms",
        "ratio",
        "fwd+bwd: DEQ ms",
        "stacked ×L ms",
        "ratio",
        "saved MiB: DEQ",
        "stacked ×L",
        "TorchDEQ fwd ms",
        "TorchDEQ fwd+bwd ms",
        "TorchDEQ saved MiB",
    ]
    rows = []
    for case, m in results:
        ms = m.ms
        peer = "torchdeq|f" in ms
        rows.append(
            [
                case.label,
                str(m.depth),
                fmt(ms["deq|f"]),
                fmt(ms["stacked|f"]),
                ratio(ms["deq|f"] / ms["stacked|f"]),
                fmt(ms["deq|fb"]),
                fmt(ms["stacked|fb"]),
                ratio(ms["deq|fb"] / ms["stacked|fb"]),
                fmt(m.saved["deq"]),
                fmt(m.saved["stacked"]),
                fmt(ms["torchdeq|f"]) if peer else "—",
                fmt(ms["torchdeq|fb"]) if peer else "—",
                fmt(m.saved["torchdeq"]) if peer else "—",
            ]
        )
    lines += [
        f"### 2. Anderson to rel. {TOL:g} (checked every 4 steps) against the block applied L times (L = that "
        "solve's f-evaluations)",
        "",
        table(header, rows),
        "",
        f"TorchDEQ: {peer_status}.",
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.adapters", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one timed round (smoke test)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default 5, --quick 1)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up rounds (default 1)")
    parser.add_argument("--only", default=",".join(FAMILIES), help=f"comma-separated subset of {','.join(FAMILIES)}")
    parser.add_argument("--write", action="store_true", help="replace the generated adapters section of RESULTS.md")
    args = parser.parse_args(argv)
    args.repeats = args.repeats or (1 if args.quick else 5)
    args.warmup = args.warmup or 1
    unknown = set(args.only.split(",")) - set(FAMILIES)
    if unknown:
        parser.error(f"unknown --only entries {sorted(unknown)}; valid: {', '.join(FAMILIES)}")
    return args


def main(argv: list[str] | None = None) -> int:
    raw = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(raw)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torchdeq, peer_status = load_torchdeq()
    peer_status = f"torchdeq {peer_status}" if torchdeq is not None else peer_status
    started = time.perf_counter()
    results = []
    for family in args.only.split(","):
        for case in FAMILIES[family](device):
            print(f"{case.label} …", file=sys.stderr, flush=True)
            results.append((case, measure(case, torchdeq, device, args.repeats, args.warmup)))
    device_note = str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
    environment = environment_lines(
        "benchmarks.adapters",
        raw,
        f"device {device_note}; float32; {args.repeats} timed rounds after {args.warmup} warm-up; run time "
        f"{math.ceil(time.perf_counter() - started)} s",
    )
    text = markdown(results, peer_status, environment)
    print(text)
    if args.write:
        replace_block(text, BEGIN_MARK, END_MARK, heading=HEADING)
    return 0


if __name__ == "__main__":
    sys.exit(main())
