"""pytest-benchmark versions of the core overhead rows of ``benchmarks/solver_overhead.py``.

Run with ``python -m pytest benchmarks/ --benchmark-only`` (not part of ``make test``, whose testpaths is ``tests``).
Each benchmark is one solve forced to ``ITERS`` iterations (``tol=0``) on the nearly free problems P1 (64×256,
``z @ R + x``) and P2 (8×32×32×32, pairwise rotation), or the bare loop ``z = f(z, x)`` of the same length; one
thread, float32, no autograd. ``extra_info`` holds the f-evaluations per call, so µs per f-evaluation is
``mean / nfe``; compare a solver with the bare loop of its group (``--benchmark-group-by=group``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

import implicit

from .solver_overhead import OUR_OPTIONS, OVERHEAD_TARGETS, Counter, OverheadProblem, make_p1, make_p2

ITERS = 200
PROBLEMS: dict[str, Callable[[torch.device], OverheadProblem]] = {"P1": make_p1, "P2": make_p2}
VARIANTS = ("bare", *OVERHEAD_TARGETS)


@pytest.fixture(autouse=True)
def _one_thread_no_grad() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            yield
    finally:
        torch.set_num_threads(threads)


def _runner(p: OverheadProblem, variant: str, block: Callable[..., torch.Tensor]) -> Callable[[], Any]:
    if variant == "bare":
        x, z0 = p.x, p.z0

        def bare() -> torch.Tensor:
            z = z0
            for _ in range(ITERS):
                z = block(z, x)
            return z

        return bare
    fn, flat0 = p.flat(block), p.z0.reshape(p.z0.shape[0], -1)
    options = OUR_OPTIONS[variant]
    return lambda: implicit.solve(fn, flat0, solver=variant, solver_options=options, tol=0.0, max_iter=ITERS)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("problem", list(PROBLEMS))
def test_overhead(benchmark: Any, problem: str, variant: str) -> None:
    p = PROBLEMS[problem](torch.device("cpu"))
    counter = Counter(p.block)
    _runner(p, variant, counter)()
    benchmark.group = f"{problem}: {ITERS} forced iterations"
    benchmark.extra_info["nfe"] = counter.calls
    benchmark.extra_info["target_ratio_to_bare"] = OVERHEAD_TARGETS.get(variant, 1.0)
    result = benchmark(_runner(p, variant, p.block))
    if variant != "bare":
        assert result.nfe == ITERS + 1
