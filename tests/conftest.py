"""Shared pytest configuration: deterministic hypothesis profile, float64 helpers, one thread per test run."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

# CI must be reproducible: the same examples on every run. HYPOTHESIS_PROFILE=explore draws fresh examples locally.
_COMMON = {
    "deadline": None,
    "print_blob": True,
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
}
settings.register_profile("ci", derandomize=True, **_COMMON)
settings.register_profile("explore", derandomize=False, **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# The test problems are tiny: intra-op threads only add synchronisation, and on a busy 2-core machine OpenMP barriers
# in batched small-matrix kernels (Anderson's m×m solves) made solves 10-60× slower than on one thread.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _deterministic_torch():
    """Each test starts from the same global RNG state and default dtype, whatever ran before it."""
    torch.manual_seed(0)
    dtype = torch.get_default_dtype()
    yield
    torch.set_default_dtype(dtype)
