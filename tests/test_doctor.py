"""The DEQ-readiness doctor: each verdict on a block built to earn it, the function checks, the report and the command.

Linear drift is the case the doctor exists for: a block whose iterates walk off at constant speed has a relative
residual that falls like 1/k and, started far enough out, is below any tolerance — it must still be "diverges".
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import adapters
from implicit import make_implicit
from implicit.doctor import diagnose, main

DTYPE = torch.float64


class Drift(nn.Module):
    """f(z, x) = z + x: no equilibrium; the iterates move by x every step."""

    def forward(self, z, x):
        return z + x


class Linear(nn.Module):
    """f(z, x) = q z + x: equilibrium x / (1 − q), fixed-point iteration contracts by q per step."""

    def __init__(self, q: float) -> None:
        super().__init__()
        self.q = q

    def forward(self, z, x):
        return self.q * z + x


class Dense(nn.Module):
    """A contractive tanh block with an optional module between the linear map and the nonlinearity."""

    def __init__(self, middle: nn.Module | None = None, n: int = 8) -> None:
        super().__init__()
        self.linear = nn.Linear(n, n).to(DTYPE)
        with torch.no_grad():
            self.linear.weight.mul_(0.5 / torch.linalg.matrix_norm(self.linear.weight, ord=2))
        self.middle = middle if middle is not None else nn.Identity()

    def forward(self, z, x):
        return torch.tanh(self.middle(self.linear(z)) + x)


def _x(batch: int = 4, n: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, n, dtype=DTYPE, generator=torch.Generator().manual_seed(seed))


def _check(report, name):
    return next(c for c in report.checks if c.name == name)


def test_linear_drift_diverges_even_where_the_relative_residual_is_below_tolerance():
    x = _x()
    report = diagnose(Drift(), x, 1e5 * x, solvers=("fixed_point",))
    curves = report.curves["fixed_point"]
    assert float(curves.rel[-1].max()) < 1e-4  # a test of the relative residual alone would call this converged
    assert curves.status(1e-4) == "drift" and report.verdict == "diverges"
    torch.testing.assert_close(curves.stalled(), torch.ones(4, dtype=DTYPE))
    torch.testing.assert_close(curves.alignment(), torch.ones(4, dtype=DTYPE))
    assert "linear drift" in report.reasons[0]


def test_linear_drift_from_zero_has_relative_residual_one_over_k():
    report = diagnose(Drift(), _x(), solvers=("fixed_point",), budget=40)
    curves = report.curves["fixed_point"]
    k = torch.arange(1, 41, dtype=DTYPE)[:, None]
    torch.testing.assert_close(curves.rel, (1 / k).expand(40, 4))
    assert float(curves.slope().mean()) == pytest.approx(-1.0, abs=1e-9)
    assert report.verdict == "diverges"


def test_slow_contraction_is_slow_not_divergent_and_anderson_makes_it_ready():
    x = _x()
    slow = diagnose(Linear(0.99), x, solvers=("fixed_point",))
    assert slow.verdict == "slow" and slow.curves["fixed_point"].status(1e-4) == "slow"
    assert not torch.isfinite(slow.curves["fixed_point"].calls_to(1e-4)).any()
    both = diagnose(Linear(0.99), x, solvers=("fixed_point", "anderson"))
    assert both.verdict == "ready"
    assert float(both.curves["anderson"].calls_to(1e-4).max()) <= 10  # a linear map: Anderson solves it in a few
    torch.testing.assert_close(both.spectral_radius, torch.full((4,), 0.99, dtype=DTYPE), rtol=1e-6, atol=0)


def test_contraction_meets_tolerance_after_the_predicted_number_of_calls():
    """r_k of fixed-point iteration from zero on f = q z + x: ‖q^k x‖ / ‖(1 − q^(k+1)) x / (1 − q)‖."""
    q = 0.5
    report = diagnose(Linear(q), _x(), solvers=("fixed_point",), budget=30)
    k = torch.arange(30, dtype=DTYPE)
    expected = q**k * (1 - q) / (1 - q ** (k + 1))
    torch.testing.assert_close(report.curves["fixed_point"].rel, expected[:, None].expand(30, 4))
    first = int(torch.nonzero(expected <= 1e-4)[0]) + 1
    assert report.verdict == "ready"
    assert torch.equal(report.curves["fixed_point"].calls_to(1e-4), torch.full((4,), float(first), dtype=DTYPE))


def test_explosion_and_non_finite_values_diverge():
    assert diagnose(Linear(1.5), _x(), solvers=("fixed_point",)).curves["fixed_point"].status(1e-4) == "explodes"

    class Nan(nn.Module):
        def forward(self, z, x):
            return z + x + torch.where(z.abs() > 2, torch.nan, 0.0)

    report = diagnose(Nan(), _x(), solvers=("fixed_point",))
    assert report.verdict == "diverges" and report.curves["fixed_point"].status(1e-4) == "non-finite"
    # at the best finite point visited ∂f/∂z = I
    torch.testing.assert_close(report.spectral_radius, torch.ones(4, dtype=DTYPE))


def test_pre_ln_layer_drifts_without_its_final_norm_and_is_ready_with_it_as_is_a_post_ln_layer():
    """A pre-LN layer is z + g(LN(z)): without a norm after it the update saturates and the iterates drift."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.1, batch_first=True, norm_first=True)
    x = adapters.transformer_input(torch.randn(3, 10, 32))
    bare = diagnose(adapters.transformer_block(layer, final_norm=False), x)
    assert bare.verdict == "diverges"
    assert bare.curves["fixed_point"].status(1e-4) == "drift"
    normed = diagnose(adapters.transformer_block(layer), x)
    assert normed.verdict == "ready", normed.table()
    assert all(c.passed for c in normed.checks)  # dropout runs with one mask per DEQ call: deterministic
    assert layer.training  # the module's mode as it was
    post_ln = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.1, batch_first=True)
    assert diagnose(adapters.transformer_block(post_ln), x).verdict == "ready"


def test_fresh_dropout_masks_are_not_a_function():
    report = diagnose(Dense(nn.Dropout(0.3)), _x())
    assert report.verdict == "not_a_function"
    assert _check(report, "deterministic in a DEQ call").passed is False
    assert _check(report, "samples independent").passed is None  # cannot be told apart from the noise
    assert diagnose(Dense(nn.Dropout(0.3)), _x(), train=False).verdict == "ready"


def test_batchnorm_in_training_mode_couples_samples_and_its_statistics_are_restored():
    block = Dense(nn.BatchNorm1d(8).to(DTYPE))
    before = {k: v.clone() for k, v in block.state_dict().items()}
    report = diagnose(block, _x())
    assert report.verdict == "not_a_function"
    assert _check(report, "samples independent").passed is False
    assert _check(report, "buffers unchanged").passed is False
    assert "running_mean" in _check(report, "buffers unchanged").detail
    for key, value in block.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert diagnose(block, _x(), train=False).verdict == "ready"


def test_in_place_modification_is_reported_and_the_callers_tensors_are_untouched():
    class InPlace(nn.Module):
        def forward(self, z, x):
            x.mul_(0.5)
            return 0.5 * z + x

    x = _x()
    kept = x.clone()
    report = diagnose(InPlace(), x)
    assert _check(report, "arguments unchanged").passed is False and report.verdict == "not_a_function"
    assert torch.equal(x, kept)


def test_wrong_output_structure_stops_before_the_solves():
    class Wrong(nn.Module):
        def forward(self, z, x):
            return torch.cat([z, x], dim=1)

    report = diagnose(Wrong(), _x())
    assert report.verdict == "not_a_function" and not report.curves
    assert report.checks[0].passed is False and "shape" in report.checks[0].detail


def test_structured_state_reports_every_leaf():
    class Pair(nn.Module):
        def forward(self, z, x):
            a, b = z
            return (0.5 * b + x, torch.tanh(0.5 * a))

    report = diagnose(Pair(), _x(), (torch.zeros(4, 8, dtype=DTYPE), torch.zeros(4, 8, dtype=DTYPE)))
    assert report.verdict == "ready"
    assert set(report.curves["anderson"].leaves) == {"[0]", "[1]"}
    assert "per leaf" in report.table()


def test_implicit_layer_is_diagnosed_through_its_block():
    torch.manual_seed(0)
    layer = make_implicit(Dense(), solver="anderson")
    report = diagnose(layer, _x())
    assert report.verdict == "ready"
    assert float(report.spectral_radius.max()) < 0.5 + 1e-6  # ‖W‖₂ = 0.5 and tanh' ≤ 1


def test_hrnet_stage_raw_couples_samples_and_converted_is_ready():
    hrnet = pytest.importorskip("timm.models.hrnet")
    resnet = pytest.importorskip("timm.models.resnet")
    torch.manual_seed(0)
    channels = [4, 8, 16, 32]
    stage = hrnet.SequentialList(
        hrnet.HighResolutionModule(4, resnet.BasicBlock, (1, 1, 1, 1), channels, tuple(channels), "SUM", True)
    )
    x = [3 * torch.randn(2, c, 8 // 2**i, 8 // 2**i) for i, c in enumerate(channels)]

    class Naive(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stage = stage

        def forward(self, z, x):
            return self.stage([a + b for a, b in zip(z, x)])

    raw = diagnose(Naive(), x, [torch.zeros_like(t) for t in x])
    assert raw.verdict == "not_a_function" and _check(raw, "samples independent").passed is False
    converted = diagnose(adapters.hrnet_stage_block(stage), x)
    assert converted.verdict == "ready", converted.table()


def test_report_table_and_plot(tmp_path):
    pytest.importorskip("matplotlib")
    report = diagnose(Linear(0.5), _x())
    text = report.table()
    assert text.startswith("DEQ readiness: ready")
    for solver in ("fixed_point", "anderson", "broyden"):
        assert solver in text
    path = tmp_path / "curves.png"
    report.plot(str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_options_are_named():
    with pytest.raises(ValueError, match="budget"):
        diagnose(Linear(0.5), _x(), budget=2)
    with pytest.raises(ValueError, match="solvers"):
        diagnose(Linear(0.5), _x(), solvers=("newton",))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_float32():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.1, batch_first=True).cuda()
    report = diagnose(adapters.transformer_block(layer), adapters.transformer_input(torch.randn(3, 10, 32).cuda()))
    assert report.verdict == "ready", report.table()


FACTORIES = """
import torch
from torch import nn


class Linear(nn.Module):
    def __init__(self, q):
        super().__init__()
        self.q = q

    def forward(self, z, x):
        return self.q * z + x


def ready(seed):
    torch.manual_seed(seed)
    return Linear(0.5), torch.randn(3, 4)


def drifting():
    return Linear(1.0), torch.randn(3, 4), torch.zeros(3, 4)
"""


@pytest.fixture(scope="module")
def factories(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("doctor")
    (directory / "doctor_factories.py").write_text(textwrap.dedent(FACTORIES))
    return directory


def test_command_exit_status_is_0_only_for_a_ready_block(factories):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(factories), env.get("PYTHONPATH")) if p)
    run = subprocess.run(
        [sys.executable, "-m", "implicit.doctor", "doctor_factories:ready"],
        capture_output=True,
        text=True,
        env=env,
        cwd=factories,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("DEQ readiness: ready")


def test_command_in_process(factories, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(factories))
    assert main(["doctor_factories:drifting", "--solvers", "fixed_point"]) == 1
    assert "DEQ readiness: diverges" in capsys.readouterr().out
    assert main(["doctor_factories:missing"]) == 2
    assert "has no attribute" in capsys.readouterr().err
    assert main(["doctor_factories:ready", "--solvers", "newton"]) == 2
    assert "newton" in capsys.readouterr().err
    assert main(["doctor_factories:ready", "--budget", "1"]) == 2
    if pytest.importorskip("matplotlib"):
        plot = factories / "curves.png"
        assert main([str(factories / "doctor_factories.py") + ":ready", "--plot", str(plot)]) == 0
        assert plot.stat().st_size > 0
