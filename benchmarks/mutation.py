"""Mutation testing of the test suite: how many small semantic bugs does it catch?

Each mutant is one string replacement in one source file — a wrong sign, a dropped factor, a loosened bound — that
leaves the code importable and plausible. The working tree (tracked and untracked, not ignored, files) is copied
once into a temporary directory; for each mutant the file is mutated there, ``pytest -x -q`` runs the mutant's
test files (the likeliest killers first) against the copy, and the file is restored. A mutant is *killed* when a
test fails (or the tests time out), *survived* when they all pass: every survivor is a missing test.

Every mutant must match its target text exactly once, checked before anything runs (a target that the code no
longer contains is an error, so the list cannot rot silently); an unmutated baseline run of the selected test files
must pass first.

    python -m benchmarks.mutation                       # every mutant, its own test files
    python -m benchmarks.mutation --mutants broyden_restart_pair checker_abs_cosine
    python -m benchmarks.mutation --tests tests/test_solvers.py --timeout 120
    python -m benchmarks.mutation --list

Exit status: 0 when every mutant was killed, 1 when one survived, 2 on a usage error (unknown mutant, target text
not found exactly once, failing baseline). Not part of ``make test``: a full run takes minutes.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Test files per area, the likeliest killers first (pytest -x stops at the first failure).
SOLVER_TESTS = (
    "tests/test_mutants.py",
    "tests/test_solvers.py",
    "tests/test_lowrank.py",
    "tests/test_adjoint_broyden.py",
)
BACKWARD_TESTS = ("tests/test_mutants.py", "tests/test_backward_modes.py", "tests/test_gradients.py")
CHECKER_TESTS = ("tests/test_mutants.py", "tests/test_testing_check.py", "tests/test_testing_cli.py")
OPTION_TESTS = (
    "tests/test_mutants.py",
    "tests/test_options.py",
    "tests/test_backward_modes.py",
    "tests/test_solvers.py",
)


@dataclass(frozen=True)
class Mutant:
    """One semantic bug: ``old`` replaced by ``new`` in ``path`` (relative to the repository root)."""

    name: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]
    bug: str


MUTANTS = (
    # --- the four that survived the suite before tests/test_mutants.py
    Mutant(
        "broyden_restart_pair",
        "implicit/solvers/broyden.py",
        "minus_h_g, direction = torch.neg(s, out=v_out), g_row, s + y",
        "minus_h_g, direction = torch.neg(s, out=v_out), g_row, s - y",
        SOLVER_TESTS,
        "Broyden's restart pair built from s − y (not s + y): H y ≠ s after a restart; still converges, slower",
    ),
    Mutant(
        "checker_fd_eps_ignored",
        "implicit/testing/check.py",
        "if t.dtype != torch.float64 else eps\n        analytic",
        "if t.dtype != torch.float64 else 1e-5\n        analytic",
        CHECKER_TESTS,
        "the gradient checker's finite differences ignore a non-default fd_eps",
    ),
    Mutant(
        "checker_abs_cosine",
        "implicit/testing/check.py",
        'return "cosine", cosine, min_cosine, cosine >= min_cosine',
        'return "cosine", cosine, min_cosine, abs(cosine) >= min_cosine',
        CHECKER_TESTS,
        "approximate modes accept |cosine| ≥ min_cosine: a reversed gradient passes",
    ),
    Mutant(
        "checker_nan_passes",
        "implicit/testing/check.py",
        'return "rel. error", value, rtol, value <= rtol',
        'return "rel. error", value, rtol, not value > rtol',
        CHECKER_TESTS,
        "a NaN relative error passes (not value > rtol)",
    ),
    # --- the gradient checker
    Mutant(
        "checker_held_tensors_skipped",
        "implicit/testing/check.py",
        "    if unreached:\n",
        "    if False:\n",
        CHECKER_TESTS,
        "held tensors that require grad but never reach the graph are left out of the report",
    ),
    Mutant(
        "checker_held_tensors_never_fail",
        "implicit/testing/check.py",
        '"FAIL" if changes else "not used"',
        '"not used"',
        CHECKER_TESTS,
        "a detached tensor the block's output depends on is reported as not used",
    ),
    Mutant(
        "checker_one_direction_for_approximate",
        "implicit/testing/check.py",
        "directions = fd_directions or (8 if approximate else 1)",
        "directions = fd_directions or 1",
        CHECKER_TESTS,
        "approximate modes compare one directional derivative by cosine (always ±1)",
    ),
    # --- solvers
    Mutant(
        "broyden_step_sign",
        "implicit/solvers/broyden.py",
        "estimate.matvec(g, negate=True), estimate.rmatvec",
        "estimate.matvec(g, negate=False), estimate.rmatvec",
        SOLVER_TESTS,
        "Broyden's quasi-Newton direction −H g computed as H g",
    ),
    Mutant(
        "broyden_update_denominator",
        "implicit/solvers/broyden.py",
        "v_y = v_g + _row_dot(s, s, self.traced)",
        "v_y = v_g - _row_dot(s, s, self.traced)",
        SOLVER_TESTS,
        "Broyden's rank-one update divided by vᵀg − sᵀs instead of vᵀy = vᵀg + sᵀs",
    ),
    Mutant(
        "anderson_unnormalised_weights",
        "implicit/solvers/anderson.py",
        "return w / w.sum(dim=1, keepdim=True)",
        "return w",
        SOLVER_TESTS,
        "Anderson's mixing weights not normalised to sum 1",
    ),
    Mutant(
        "fixed_point_damping_reversed",
        "implicit/solvers/fixed_point.py",
        "return torch.lerp(z, fz, self.tau)",
        "return torch.lerp(fz, z, self.tau)",
        SOLVER_TESTS,
        "damped iteration takes τ z + (1 − τ) f(z) (the same only at τ = 0.5)",
    ),
    Mutant(
        "lowrank_transpose_noop",
        "implicit/lowrank.py",
        "return LowRankInverse(self.V, self.U)",
        "return LowRankInverse(self.U, self.V)",
        SOLVER_TESTS,
        "LowRankInverse.transpose returns H itself",
    ),
    # --- backward modes
    Mutant(
        "implicit_adjoint_sign",
        "implicit/backward/implicit.py",
        "return v + tracked.vjp(u)",
        "return v - tracked.vjp(u)",
        BACKWARD_TESTS,
        "the implicit backward solves u = v − u J instead of u = v + u J",
    ),
    Mutant(
        "phantom_neumann_without_tau",
        "implicit/backward/phantom.py",
        "return self.tau * total",
        "return total",
        BACKWARD_TESTS,
        "the Neumann phantom gradient drops its factor τ",
    ),
    Mutant(
        "phantom_undamped",
        "implicit/backward/phantom.py",
        "h = torch.lerp(h, problem.fn(h), self.tau)",
        "h = problem.fn(h)",
        BACKWARD_TESTS,
        "the unrolled phantom gradient ignores its damping τ",
    ),
    Mutant(
        "shine_sign",
        "implicit/backward/shine.py",
        "u = estimate.rmatvec(v, negate=True)",
        "u = estimate.rmatvec(v)",
        BACKWARD_TESTS,
        "SHINE uses v H instead of −v H",
    ),
    # --- option validation
    Mutant(
        "options_phantom_tau_zero",
        "implicit/backward/phantom.py",
        "math.isfinite(tau) and 0 < tau <= 1",
        "math.isfinite(tau) and 0 <= tau <= 1",
        OPTION_TESTS,
        "phantom accepts τ = 0 (a zero gradient)",
    ),
    Mutant(
        "options_shine_ratio_one",
        "implicit/backward/shine.py",
        "math.isfinite(fallback_ratio) and fallback_ratio > 1",
        "math.isfinite(fallback_ratio) and fallback_ratio >= 1",
        OPTION_TESTS,
        "SHINE accepts fallback_ratio = 1",
    ),
    Mutant(
        "options_broyden_memory_zero",
        "implicit/solvers/broyden.py",
        "isinstance(memory, int) and memory >= 1",
        "isinstance(memory, int) and memory >= 0",
        OPTION_TESTS,
        "Broyden accepts memory = 0",
    ),
    Mutant(
        "options_gmres_restart_zero",
        "implicit/solvers/gmres.py",
        "isinstance(restart, int) and restart >= 1",
        "isinstance(restart, int) and restart >= 0",
        OPTION_TESTS,
        "GMRES accepts restart = 0",
    ),
    Mutant(
        "options_anderson_beta_zero",
        "implicit/solvers/anderson.py",
        "0 < beta <= 1",
        "0 <= beta <= 1",
        OPTION_TESTS,
        "Anderson accepts β = 0 (no progress)",
    ),
)
BY_NAME = {mutant.name: mutant for mutant in MUTANTS}


@dataclass
class Outcome:
    """What running a mutant's tests gave: ``status`` is killed, survived, timeout (counted as killed) or error."""

    mutant: Mutant
    status: str
    killer: str
    seconds: float


class UsageError(Exception):
    """A bad selection, a target text not found exactly once, or a failing baseline."""


# ------------------------------------------------------------------------------------------------------ the copy
def working_tree_files(root: Path) -> list[str]:
    """Tracked and untracked (not ignored) files of the working tree, relative to ``root``."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=root,
        capture_output=True,
        check=True,
    ).stdout.decode()
    return [name for name in listed.split("\0") if name and (root / name).is_file()]


def copy_tree(root: Path, target: Path) -> None:
    """The working tree of ``root`` (no git metadata, no virtual environment, no caches) under ``target``."""
    for name in working_tree_files(root):
        destination = target / name
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / name, destination)


def check_targets(copy: Path, mutants: Sequence[Mutant]) -> None:
    """``UsageError`` listing every mutant whose target text is not in its file exactly once."""
    problems = []
    for mutant in mutants:
        path = copy / mutant.path
        count = path.read_text().count(mutant.old) if path.is_file() else -1
        if count != 1:
            where = "file not found" if count < 0 else f"found {count} times"
            problems.append(f"{mutant.name}: {mutant.old!r} in {mutant.path}: {where} (expected exactly once)")
    if problems:
        raise UsageError("mutant targets do not apply:\n  " + "\n  ".join(problems))


# ------------------------------------------------------------------------------------------------------ running
def environment(copy: Path) -> dict[str, str]:
    """The copy first on the path (before the editable install of the original) and no bytecode written: a mutated
    file and its restored original can have the same size and modification second, which a cached ``.pyc`` would
    not tell apart."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(copy), env.get("PYTHONPATH")) if p)
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def check_imports_from(copy: Path) -> None:
    """``UsageError`` unless ``import implicit`` in the copy's environment imports the copy's package."""
    found = subprocess.run(
        [sys.executable, "-c", "import implicit; print(implicit.__file__)"],
        cwd=copy,
        env=environment(copy),
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    if not found or not Path(found).resolve().is_relative_to(copy.resolve()):
        raise UsageError(f"the copy's tests would import implicit from {found or '(nothing)'}, not from {copy}")


def run_tests(copy: Path, tests: Sequence[str], timeout: float) -> tuple[int | None, str]:
    """``pytest -x -q`` on ``tests`` in the copy: (exit status, or None on timeout; output). The whole process
    group is killed on timeout (the CLI tests start subprocesses)."""
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    process = subprocess.Popen(
        command,
        cwd=copy,
        env=environment(copy),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        return None, output
    return process.returncode, output


_FAILED = re.compile(r"^(?:FAILED|ERROR) (.+?)(?: - .*)?$", re.MULTILINE)


def first_failure(output: str) -> str:
    """The first failing test (or erroring collection) that pytest's summary names."""
    match = _FAILED.search(output)
    return match.group(1) if match else ""


def run_mutant(copy: Path, mutant: Mutant, tests: Sequence[str], timeout: float) -> Outcome:
    """Apply ``mutant`` in the copy, run ``tests``, restore the file."""
    path = copy / mutant.path
    original = path.read_text()
    path.write_text(original.replace(mutant.old, mutant.new, 1))
    started = time.perf_counter()
    try:
        code, output = run_tests(copy, tests, timeout)
    finally:
        path.write_text(original)
    seconds = time.perf_counter() - started
    if code is None:
        return Outcome(mutant, "timeout", f"(no result in {timeout:g} s)", seconds)
    if code == 0:
        return Outcome(mutant, "survived", "", seconds)
    if code in (1, 2):  # tests failed, or collection / import failed
        return Outcome(mutant, "killed", first_failure(output) or f"pytest exit status {code}", seconds)
    tail = output.strip().splitlines()[-1] if output.strip() else ""
    return Outcome(mutant, "error", f"pytest exit status {code}: {tail}", seconds)


# ------------------------------------------------------------------------------------------------------ report
def table(outcomes: Sequence[Outcome]) -> str:
    rows = [("mutant", "file", "status", "seconds", "killed by")]
    rows += [(o.mutant.name, o.mutant.path, o.status, f"{o.seconds:.1f}", o.killer) for o in outcomes]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    return "\n".join(("  ".join(c.ljust(w) for c, w in zip(row[:4], widths)) + "  " + row[4]).rstrip() for row in rows)


def summary(outcomes: Sequence[Outcome], seconds: float) -> str:
    detected = [o for o in outcomes if o.status in ("killed", "timeout")]
    survived = [o.mutant.name for o in outcomes if o.status == "survived"]
    errors = [o.mutant.name for o in outcomes if o.status == "error"]
    line = f"killed {len(detected)} of {len(outcomes)} mutants ({100 * len(detected) / max(len(outcomes), 1):.0f} %)"
    if survived:
        line += f"; survived: {', '.join(survived)}"
    if errors:
        line += f"; errors: {', '.join(errors)}"
    return f"{line}; in {seconds:.0f} s"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.mutation",
        description="Mutation testing: apply each small semantic bug to a copy of the working tree, run pytest -x "
        "on its test files, report killed / survived. Exit status 0: all killed; 1: a mutant survived; 2: usage "
        "error (unknown mutant, target text not found exactly once, failing baseline).",
    )
    parser.add_argument("--mutants", nargs="+", metavar="NAME", help="run only these mutants (default: all)")
    parser.add_argument(
        "--tests",
        nargs="+",
        metavar="FILE",
        help="test files (relative to the repository root) for every mutant, instead of each mutant's own",
    )
    parser.add_argument(
        "--timeout", type=float, default=300.0, metavar="S", help="seconds per mutant; a timeout counts as killed"
    )
    parser.add_argument("--no-baseline", action="store_true", help="skip the unmutated run of the selected tests")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    return parser


def select(names: Sequence[str] | None) -> list[Mutant]:
    if not names:
        return list(MUTANTS)
    unknown = [name for name in names if name not in BY_NAME]
    if unknown:
        raise UsageError(f"unknown mutant(s) {', '.join(unknown)}; valid: {', '.join(BY_NAME)}")
    return [BY_NAME[name] for name in dict.fromkeys(names)]


def run(args: argparse.Namespace) -> int:
    mutants = select(args.mutants)
    if args.list:
        for mutant in mutants:
            print(f"{mutant.name:38s} {mutant.path:32s} {mutant.bug}")
        return 0
    if args.timeout <= 0:
        raise UsageError(f"--timeout must be > 0, got {args.timeout}")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mutation-") as directory:
        copy = Path(directory)
        copy_tree(ROOT, copy)
        check_targets(copy, mutants)
        check_imports_from(copy)
        missing = sorted({t for m in mutants for t in (args.tests or m.tests) if not (copy / t).is_file()})
        if missing:
            raise UsageError(f"test file(s) not found: {', '.join(missing)}")
        if not args.no_baseline:
            tests = list(dict.fromkeys(t for m in mutants for t in (args.tests or m.tests)))
            code, output = run_tests(copy, tests, args.timeout * 2)
            if code != 0:
                raise UsageError(f"the unmutated baseline fails ({first_failure(output) or code}):\n{output[-3000:]}")
            print(f"baseline: {' '.join(tests)} pass ({time.perf_counter() - started:.0f} s)", flush=True)
        outcomes = []
        for mutant in mutants:
            outcome = run_mutant(copy, mutant, args.tests or mutant.tests, args.timeout)
            outcomes.append(outcome)
            print(f"{mutant.name}: {outcome.status} {outcome.killer} ({outcome.seconds:.0f} s)", flush=True)
    print()
    print(table(outcomes))
    print(summary(outcomes, time.perf_counter() - started))
    return 0 if all(o.status in ("killed", "timeout") for o in outcomes) else 1


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except UsageError as error:
        print(f"python -m benchmarks.mutation: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
