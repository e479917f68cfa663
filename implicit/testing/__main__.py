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
import importlib
import importlib.util
import inspect
import random
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

import torch
from torch import nn

from ..backward import BACKWARD_MODES
from ..module import ImplicitMixin
from ..options import resolve_options
from ..solvers import SOLVERS, backward_rule, forward_rule
from .check import REFERENCES, GradientReport, check_gradients

PROG = "python -m implicit.testing"


class UsageError(Exception):
    """A mistake in the command line or the factory; exit status 2."""


def _fail(message: str) -> NoReturn:
    raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Check the equilibrium gradients of a DEQ built by a factory against long unrolling, finite "
        "differences and gradcheck (on a float64 copy). Exit status 0: all checks passed; 1: a check failed; "
        "2: usage error.",
    )
    parser.add_argument(
        "factory",
        metavar="module:factory",
        help="import path (or path/to/file.py) and attribute of a callable returning (layer_or_block, x) or "
        "(layer_or_block, x, z0); called with the example index if it takes one positional argument",
    )
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
        _fail(f"--option expects NAME=VALUE, got {text!r}")
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
            _fail(f"--{name.replace('_', '-')} {value} conflicts with --option {name}={options[name]!r}")
        options[name] = value
    return options


def parse_references(text: str) -> tuple[str, ...]:
    references = tuple(r.strip() for r in text.split(",") if r.strip())
    if not references:
        _fail("--references is empty")
    unknown = [r for r in references if r not in REFERENCES]
    if unknown:
        _fail(f"unknown reference(s) {', '.join(map(repr, unknown))}; valid: {', '.join(REFERENCES)}")
    return references


# ------------------------------------------------------------------------------------------------------ the factory
def load_factory(spec: str) -> Callable[..., Any]:
    """The callable named by ``module:attr`` (``attr`` may be dotted; ``module`` may be a ``.py`` file path)."""
    module_name, sep, attribute = spec.rpartition(":")
    if not sep or not module_name or not attribute:
        _fail(f"expected module:factory (e.g. my_pkg.models:make_block), got {spec!r}")
    try:
        if module_name.endswith(".py") or "/" in module_name or "\\" in module_name:
            module = _import_file(Path(module_name))
        else:
            module = importlib.import_module(module_name)
    except UsageError:
        raise
    except ModuleNotFoundError as error:
        if error.name is not None and (module_name == error.name or module_name.startswith(error.name + ".")):
            _fail(f"cannot import {module_name!r}: {error} (is its directory on PYTHONPATH?)")
        _fail(f"importing {module_name!r} failed:\n{traceback.format_exc()}")
    except Exception:
        _fail(f"importing {module_name!r} failed:\n{traceback.format_exc()}")
    target: Any = module
    for part in attribute.split("."):
        if not hasattr(target, part):
            _fail(f"{module_name!r} has no attribute {attribute!r}")
        target = getattr(target, part)
    if not callable(target):
        _fail(f"{spec} is a {type(target).__name__}, not a callable factory")
    return target


def _import_file(path: Path) -> Any:
    if not path.is_file():
        _fail(f"no such file: {path}")
    spec = importlib.util.spec_from_file_location(path.stem, path)
    if spec is None or spec.loader is None:
        _fail(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module  # dataclasses, pickling and relative lookups expect the module registered
    spec.loader.exec_module(module)
    return module


def takes_seed(factory: Callable[..., Any]) -> bool:
    """Whether the factory takes the example index (one positional argument); ``UsageError`` if it takes neither
    one nor zero arguments."""
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):  # some builtins: call without arguments
        return False
    for args in ((0,), ()):
        try:
            signature.bind(*args)
        except TypeError:
            continue
        return bool(args)
    _fail(f"the factory must take no argument or one (the example index); its signature is {signature}")


def make_example(factory: Callable[..., Any], index: int, seeded: bool, spec: str) -> tuple[nn.Module, Any, Any]:
    torch.manual_seed(index)
    random.seed(index)
    try:
        result = factory(index) if seeded else factory()
    except Exception as error:
        call = f"{spec}({index})" if seeded else f"{spec}()"
        _fail(f"the factory raised in {call}:\n{_user_traceback(error)}")
    if not isinstance(result, (tuple, list)) or len(result) not in (2, 3):
        _fail(
            f"the factory must return (layer_or_block, x) or (layer_or_block, x, z0), "
            f"got {type(result).__name__}{'' if not isinstance(result, (tuple, list)) else f' of {len(result)}'}"
        )
    target, x, z0 = (*result, None) if len(result) == 2 else result
    if not isinstance(target, nn.Module):
        _fail(
            f"the factory's first element must be an implicit layer or a block nn.Module, got {type(target).__name__}"
        )
    return target, x, z0


def _user_traceback(error: BaseException) -> str:
    """The traceback of ``error`` without this module's own frame (the caller's frame is the first)."""
    tb = error.__traceback__.tb_next if error.__traceback__ is not None else None
    return "".join(traceback.format_exception(type(error), error, tb)).rstrip()


def validate_options(target: nn.Module, options: dict[str, Any]) -> None:
    base = target.implicit_options if isinstance(target, ImplicitMixin) else None
    try:
        resolve_options(base, options)
    except (TypeError, ValueError) as error:
        _fail(f"bad option: {error}")


# ------------------------------------------------------------------------------------------------------ main
def run(args: argparse.Namespace, out: Any) -> int:
    started = time.perf_counter()
    if args.examples < 1:
        _fail(f"--examples must be ≥ 1, got {args.examples}")
    if args.threads < 0:
        _fail(f"--threads must be ≥ 0, got {args.threads}")
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
