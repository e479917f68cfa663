"""The README's Python examples run as written and do what their comments say."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
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


def _section_blocks(heading: str) -> list[str]:
    text = README.read_text()
    start = text.index(heading)
    end = text.find("\n## ", start + len(heading))
    return re.findall(r"```python\n(.*?)```", text[start : end if end >= 0 else None], flags=re.S)


def test_adapter_examples_run_and_assert_what_they_say():
    """The transformer example (its asserts: a ready doctor verdict, drift without the final norm) and the RAFT
    example (12 block applications are RAFT's 12 updates)."""
    pytest.importorskip("torchvision")
    blocks = _section_blocks("## Existing blocks as DEQs")
    assert len(blocks) == 2
    torch.manual_seed(0)
    for block in blocks:
        namespace: dict = {}
        exec(compile(block, str(README), "exec"), namespace)
    assert namespace["flow"].shape == (1, 2, 128, 160)


def test_deq_flow_example_runs_as_written():
    pytest.importorskip("torchvision")
    blocks = _section_blocks("## Convert RAFT into DEQ-Flow")
    assert len(blocks) == 1
    torch.manual_seed(0)
    namespace: dict = {}
    exec(compile(blocks[0], str(README), "exec"), namespace)
    model = namespace["model"]
    assert model.eval_max_iter == 36 and model.checkpoint_encoders
    assert all(p.grad is not None for p in model.update_block.parameters())


def test_vision_examples_run_as_written():
    """The HRNet → MDEQ example (logits, the Jacobian term, gradients reaching timm's stage) and the alignment example
    that follows it, in one namespace."""
    pytest.importorskip("timm")
    blocks = _section_blocks("## Convert a timm HRNet into a multiscale DEQ")
    assert len(blocks) == 2
    torch.manual_seed(0)
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)
    model, aa = namespace["model"], namespace["aa"]
    assert namespace["logits"].shape == (8, 10) and torch.isfinite(namespace["loss"])
    assert all(p.grad is not None for p in model.deq.parameters())
    assert aa.per_example.shape == (8,) and bool(((aa.per_example > -1 - 1e-6) & (aa.per_example < 1 + 1e-6)).all())
