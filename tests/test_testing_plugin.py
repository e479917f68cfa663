"""The pytest plugin is found through its entry point: a temporary project holding only a test file (no conftest, no
import of the plugin) gets the ``implicit_gradients`` fixture and marker from the installed package."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from problems import FLIPPED_BLOCK

README = Path(__file__).resolve().parents[1] / "README.md"

BLOCK = "import pytest\nimport torch\nfrom torch import nn\n" + FLIPPED_BLOCK

GOOD = """
pytestmark = pytest.mark.implicit_gradients(references=("unrolled", "gradcheck"), solver="broyden")


def test_module_marker(implicit_gradients):
    report = implicit_gradients(Block(), torch.randn(2, 4))
    assert report.passed
    assert {check.reference for check in report.checks} == {"unrolled", "gradcheck"}
    assert "solver='broyden'" in report.description


@pytest.mark.implicit_gradients(references=("finite_differences",), backward="phantom")
def test_closest_marker_and_call_overrides_win(implicit_gradients):
    report = implicit_gradients(Block(), torch.randn(2, 4), backward="implicit", train=False)
    assert {check.reference for check in report.checks} == {"finite_differences"}
    assert "backward='implicit'" in report.description and "solver='broyden'" in report.description
    assert "eval mode" in report.description
"""

BROKEN = """
@pytest.mark.implicit_gradients(references=("finite_differences",))
def test_broken_block(implicit_gradients):
    implicit_gradients(Block(broken=True), torch.randn(2, 4))


@pytest.mark.implicit_gradients("finite_differences")
def test_positional_marker_argument(implicit_gradients):
    pass
"""


def run_pytest(project: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}  # no addopts, plugin autoload on
    env["OMP_NUM_THREADS"] = "1"  # as in our conftest: multithreaded tiny kernels crawl on a busy 2-core machine
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "--strict-markers",
            "--hypothesis-seed=0",
            *args,
        ],
        capture_output=True,
        text=True,
        cwd=project,
        env=env,
        timeout=120,
    )


def make_project(tmp_path: Path, body: str) -> Path:
    project = tmp_path / "project"
    project.mkdir()
    (project / "test_my_deq.py").write_text(BLOCK + body)
    return project


def test_good_block_passes_with_marker_and_fixture(tmp_path):
    result = run_pytest(make_project(tmp_path, GOOD))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 passed" in result.stdout


def test_broken_block_fails_naming_the_parameter(tmp_path):
    result = run_pytest(make_project(tmp_path, BROKEN))
    assert result.returncode == 1, result.stdout + result.stderr
    assert "1 failed, 1 error" in result.stdout
    assert "takes keyword arguments only" in result.stdout  # the marker misused: an error, not a silent pass
    failing = [line for line in result.stdout.splitlines() if "FAIL " in line and "finite_differences" in line]
    assert failing and all("block.linear.weight" in line for line in failing), result.stdout


def test_marker_is_listed(tmp_path):
    project = tmp_path / "empty"
    project.mkdir()
    result = run_pytest(project, "--markers")
    assert result.returncode == 0, result.stderr
    assert "@pytest.mark.implicit_gradients(**kwargs)" in result.stdout


def readme_section_blocks() -> list[str]:
    text = README.read_text()
    section = text[text.index("## Check your own DEQ's gradients") : text.index("## Layout")]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_readme_section_examples_run(tmp_path):
    """The README section's examples run as written: the script and the factory in-process, the hypothesis and
    pytest examples as test files of a temporary project."""
    blocks = readme_section_blocks()
    scripts = [b for b in blocks if "def test_" not in b]
    tests = [b for b in blocks if "def test_" in b]
    assert len(scripts) == 2 and len(tests) == 2
    namespace: dict = {}
    exec(compile(scripts[0], str(README), "exec"), namespace)
    assert namespace["report"].passed and namespace["phantom"].approximate
    exec(compile(scripts[1], str(README), "exec"), namespace)
    namespace["assert_gradients"](*namespace["make_block"](0))
    project = tmp_path / "readme"
    project.mkdir()
    for i, block in enumerate(tests):
        (project / f"test_readme_{i}.py").write_text(block)
    result = run_pytest(project)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "4 passed" in result.stdout
