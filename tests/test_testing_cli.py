"""``python -m implicit.testing module:factory``: exit status 0 / 1 / 2, the printed table and the elapsed time.

The exit-status contract is tested on the real command in a subprocess (factories written to a temporary directory on
PYTHONPATH); the other usage errors and the factory calling convention in-process through ``main``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from problems import FLIPPED_BLOCK

from implicit.testing.__main__ import main

FACTORIES = (
    """import torch
from torch import nn

from implicit import make_implicit

"""
    + FLIPPED_BLOCK
    + """

SEEDS = []


def good(seed):
    SEEDS.append(seed)
    return Block(), torch.randn(2, 4)


def good_layer():
    return make_implicit(Block(), solver="broyden"), torch.randn(3, 4), torch.zeros(3, 4)


def broken(seed):
    return Block(broken=True), torch.randn(2, 4)


class Detached(Block):  # holds offset, which requires grad, as a plain attribute and uses it detached

    def __init__(self):
        super().__init__()
        self.offset = torch.full((4,), 0.1, requires_grad=True)

    def forward(self, z, x):
        return super().forward(z, x + self.offset.detach())


def detached(seed):
    return Detached(), torch.randn(2, 4)


def raises():
    raise RuntimeError("no weights on disk")


def two_arguments(a, b):
    return Block(), torch.randn(2, 4)


def not_a_pair():
    return Block()
"""
)


@pytest.fixture(scope="module")
def factories(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("factories")
    (directory / "deq_factories.py").write_text(textwrap.dedent(FACTORIES))
    return directory


def run_command(directory: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(directory), env.get("PYTHONPATH")) if p)
    return subprocess.run(
        [sys.executable, "-m", "implicit.testing", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=directory,
        timeout=120,
    )


def test_good_factory_exits_0_with_table_and_elapsed_time(factories):
    result = run_command(factories, "deq_factories:good", "--examples", "2")
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert out.count("DEQ gradient check") == 2 and "FAIL" not in out
    for tensor in ("block.linear.weight", "block.linear.bias", "block.gain", "x"):
        assert f"\n{tensor} " in out
    summary = out.strip().splitlines()[-1]
    assert summary.startswith("passed: 2 example(s)") and summary.endswith(" s")
    assert float(summary.rsplit(" in ", 1)[1][:-2]) >= 0


def test_broken_factory_exits_1_naming_the_parameter(factories):
    result = run_command(factories, "deq_factories:broken", "--examples", "1", "--backward", "implicit")
    assert result.returncode == 1, result.stdout + result.stderr
    failing = [line for line in result.stdout.splitlines() if "FAIL " in line]
    assert failing and all(line.startswith("block.linear.weight ") for line in failing)
    summary = result.stdout.strip().splitlines()[-1]
    assert summary.startswith("FAILED: 1 of 1 example(s)") and "block.linear.weight" in summary
    assert summary.endswith(" s")


def test_a_detached_tensor_that_requires_grad_is_named_and_fails_the_command(factories):
    result = run_command(factories, "deq_factories:detached", "--examples", "1", "--references", "unrolled")
    assert result.returncode == 1, result.stdout + result.stderr
    failing = [line for line in result.stdout.splitlines() if " FAIL " in line]
    assert len(failing) == 1 and failing[0].startswith("block.offset ")
    assert failing[0].endswith("requires grad but receives no gradient; the block's output changes with it")
    summary = result.stdout.strip().splitlines()[-1]
    assert summary.startswith("FAILED: 1 of 1 example(s); failing: block.offset (finite_differences)")


def test_bad_module_path_exits_2(factories):
    result = run_command(factories, "no_such_package.models:make_block")
    assert result.returncode == 2
    assert "cannot import 'no_such_package.models'" in result.stderr
    assert "Traceback" not in result.stderr


# ------------------------------------------------------------------------------------------------------ in-process
@pytest.fixture
def on_path(factories, monkeypatch):
    monkeypatch.syspath_prepend(str(factories))
    monkeypatch.delitem(sys.modules, "deq_factories", raising=False)
    return factories


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["deq_factories"], "expected module:factory"),
        (["deq_factories:missing"], "has no attribute 'missing'"),
        (["deq_factories:raises"], "no weights on disk"),
        (["deq_factories:two_arguments"], "must take no argument or one"),
        (["deq_factories:not_a_pair"], "must return (layer_or_block, x)"),
        (["deq_factories:good", "--backward", "shine"], "needs solver='broyden'"),
        (["deq_factories:good", "-o", "max_iters=10"], "did you mean 'max_iter'"),
        (["deq_factories:good", "--references", "unrolled,exact"], "unknown reference(s) 'exact'"),
        (["deq_factories:good", "--examples", "0"], "--examples must be ≥ 1"),
    ],
)
def test_usage_errors_exit_2_with_a_message(on_path, capsys, args, message):
    assert main(args) == 2
    assert message in capsys.readouterr().err


def test_argparse_errors_exit_2(on_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["deq_factories:good", "--solver", "newton"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'newton'" in capsys.readouterr().err


def test_seeded_factory_gets_the_example_index_and_options_override(on_path, capsys):
    assert main(["deq_factories:good", "--examples", "3", "--solver", "fixed_point", "--eval", "-q"]) == 0
    assert sys.modules["deq_factories"].SEEDS == [0, 1, 2]
    out = capsys.readouterr().out
    assert "solver='fixed_point'" in out and "DEQ gradient check" not in out  # -q: passing tables not printed
    assert main(["deq_factories:good_layer", "--examples", "1", "--backward", "phantom", "--eval"]) == 0
    out = capsys.readouterr().out
    assert "backward='phantom' (approximate), solver='broyden'" in out and "eval mode" in out
