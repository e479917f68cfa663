"""The README's Python examples run as written and do what their comments say."""

from __future__ import annotations

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_quickstart_runs_and_converges():
    blocks = _python_blocks()
    assert blocks, "README has no python example"
    namespace: dict = {}
    exec(compile(blocks[0], str(README), "exec"), namespace)
    z, info, x = namespace["z"], namespace["info"], namespace["x"]
    assert z.shape == (32, 64)
    assert bool(info.forward.converged.all())
    assert info.backward is not None and bool(info.backward.converged.all())
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
