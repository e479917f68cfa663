"""``python -m implicit.testing module:factory``: check a DEQ's gradients from the command line (for CI).

The factory returns ``(layer_or_block, x)`` or ``(layer_or_block, x, z0)``. A factory that takes one positional
argument is called with the example index (0, 1, …), which is also the check's seed; one without arguments is called
once per example after ``torch.manual_seed(index)``. Layer options given here (``--solver``, ``--backward``,
``--backward-solver``, ``--option NAME=VALUE``) override the layer's own.

Exit status: 0 when every check of every example passed, 1 when one failed (or the check itself raised), 2 on usage
errors (bad module path, factory raising or returning something else, bad option).
"""

from __future__ import annotations

import argparse
import ast
import sys
import time
import traceback
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..backward import BACKWARD_MODES
from ..factory import UsageError, add_factory_argument, fail, load_factory, make_example, takes_seed
from ..module import ImplicitMixin
from ..options import resolve_options
from ..solvers import SOLVERS, backward_rule, forward_rule
from .check import REFERENCES, GradientReport, check_gradients

PROG = "python -m implicit.testing"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Check the equilibrium gradients of a DEQ built by a factory against long unrolling, finite "
        "differences and gradcheck (on a float64 copy). Exit status 0: all checks passed; 1: a check failed; "
        "2: usage error.",
    )
    add_factory_argument(parser, "(layer_or_block, x) or (layer_or_block, x, z0)")
    parser.add_argument("--solver", choices=SOLVERS.names(forward_rule), help="forward solver")
    parser.add_argument("--backward", choices=list(BACKWARD_MODES), help="backward mode")
    parser.add_argument(
        "--backward-solver", choices=SOLVERS.names(backward_rule), help="solver of the backward linear system"
    )
    parser.add_argument(
        "-o",
        "--option",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="any other layer option, VALUE a Python literal (e.g. -o tol=1e-6 -o \"backward_options={'steps': 8}\"); "
        "repeatable",
    )
    parser.add_argument("--examples", type=int, default=3, metavar="N", help="examples to check (default 3)")
    parser.add_argument(
        "--references",
        default=",".join(REFERENCES),
        metavar="LIST",
        help=f"comma-separated references (default {','.join(REFERENCES)})",
    )
    parser.add_argument("--rtol", type=float, default=1e-6, help="relative error allowed for exact modes (1e-6)")
    parser.add_argument("--min-cosine", type=float, default=0.5, help="cosine required of approximate modes (0.5)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--train", dest="train", action="store_true", default=None, help="check in train mode")
    mode.add_argument("--eval", dest="train", action="store_false", help="check in eval mode")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        metavar="N",
        help="intra-op CPU threads (default 1: the checked examples are small, and on a busy machine multithreaded "
        "small-matrix kernels such as Anderson's solves run many times slower; 0 keeps torch's default)",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="print the tables of failing examples only")
    return parser


# ------------------------------------------------------------------------------------------------------ arguments
def parse_option(text: str) -> tuple[str, Any]:
    name, sep, raw = text.partition("=")
    name = name.strip().replace("-", "_")
    if not sep or not name:
        fail(f"--option expects NAME=VALUE, got {text!r}")
    try:
        value = ast.literal_eval(raw.strip())
    except (ValueError, SyntaxError):
        value = raw.strip()  # a bare word: a string such as a solver name
    return name, value


def layer_options(args: argparse.Namespace) -> dict[str, Any]:
    options = dict(parse_option(text) for text in args.option)
    for name in ("solver", "backward", "backward_solver"):
        value = getattr(args, name)
        if value is None:
            continue
        if name in options and options[name] != value:
            fail(f"--{name.replace('_', '-')} {value} conflicts with --option {name}={options[name]!r}")
        options[name] = value
    return options


def parse_references(text: str) -> tuple[str, ...]:
    references = tuple(r.strip() for r in text.split(",") if r.strip())
    if not references:
        fail("--references is empty")
    unknown = [r for r in references if r not in REFERENCES]
    if unknown:
        fail(f"unknown reference(s) {', '.join(map(repr, unknown))}; valid: {', '.join(REFERENCES)}")
    return references


def validate_options(target: nn.Module, options: dict[str, Any]) -> None:
    base = target.implicit_options if isinstance(target, ImplicitMixin) else None
    try:
        resolve_options(base, options)
    except (TypeError, ValueError) as error:
        fail(f"bad option: {error}")


# ------------------------------------------------------------------------------------------------------ main
def run(args: argparse.Namespace, out: Any) -> int:
    started = time.perf_counter()
    if args.examples < 1:
        fail(f"--examples must be ≥ 1, got {args.examples}")
    if args.threads < 0:
        fail(f"--threads must be ≥ 0, got {args.threads}")
    if args.threads:
        torch.set_num_threads(args.threads)
    references = parse_references(args.references)
    options = layer_options(args)
    factory = load_factory(args.factory)
    seeded = takes_seed(factory)
    shown = ", ".join(f"{k}={v!r}" for k, v in options.items()) or "the layer's own"
    print(
        f"{PROG}: {args.factory}, {args.examples} example(s), options: {shown}, references: {', '.join(references)}",
        file=out,
    )
    reports: list[tuple[int, GradientReport | None]] = []
    for index in range(args.examples):
        target, x, z0 = make_example(factory, index, seeded, args.factory)
        validate_options(target, options)
        try:
            report = check_gradients(
                target,
                x,
                z0=z0,
                references=references,
                rtol=args.rtol,
                min_cosine=args.min_cosine,
                train=args.train,
                seed=index,
                **options,
            )
        except Exception:
            print(f"\nexample {index}: the check raised\n{traceback.format_exc()}", file=out, flush=True)
            reports.append((index, None))
            continue
        reports.append((index, report))
        if not (args.quiet and report.passed):
            print(f"\nexample {index} (seed {index}): {report.table()}", file=out, flush=True)
    elapsed = time.perf_counter() - started
    failed = [(i, r) for i, r in reports if r is None or not r.passed]
    checks = sum(len(r.checks) for _, r in reports if r is not None)
    if not failed:
        print(f"\npassed: {len(reports)} example(s), {checks} checks, in {elapsed:.1f} s", file=out)
        return 0
    names = sorted({f"{c.tensor} ({c.reference})" for _, r in failed if r is not None for c in r.failures})
    errors = [str(i) for i, r in failed if r is None]
    what = [f"failing: {', '.join(names)}"] if names else []
    what += [f"check raised in example(s) {', '.join(errors)}"] if errors else []
    print(
        f"\nFAILED: {len(failed)} of {len(reports)} example(s); {'; '.join(what)}; in {elapsed:.1f} s",
        file=out,
    )
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # exits 2 itself on argparse errors
    try:
        return run(args, sys.stdout)
    except UsageError as error:
        sys.stdout.flush()
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
