"""Whole-model persistence: ``pickle``, ``copy.deepcopy`` and ``torch.save(model)`` / ``torch.load`` of every form of
``make_implicit`` (decorated class, ``make_implicit(Class)``, instance), in this process and in a fresh one."""

from __future__ import annotations

import copy
import pickle
import subprocess
import sys
import textwrap

import pytest
import torch
from problems import TanhBlock

import implicit

OPTIONS = {"solver": "broyden", "tol": 1e-10, "max_iter": 200}


@implicit.make_implicit(**OPTIONS)
class DecoratedTanh(TanhBlock):
    """A decorated block class at module level (pickled by reference, as usual)."""


FORMS = {
    "decorated": lambda: DecoratedTanh(6, seed=2),
    "make_implicit(Class)": lambda: implicit.make_implicit(TanhBlock, **OPTIONS)(6, seed=2),
    "instance": lambda: implicit.make_implicit(TanhBlock(6, seed=2), **OPTIONS),
}


def _x() -> torch.Tensor:
    return torch.randn(3, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("how", ["pickle", "deepcopy", "torch.save"])
def test_every_form_round_trips_and_solves_identically(form, how, tmp_path):
    layer = FORMS[form]()
    layer.configure(tol=1e-11)  # instance-level options travel with the object
    model = torch.nn.Sequential(torch.nn.Identity(), layer)
    x = _x()
    if how == "pickle":
        loaded = pickle.loads(pickle.dumps(model))
    elif how == "deepcopy":
        loaded = copy.deepcopy(model)
    else:
        torch.save(model, tmp_path / "model.pt")
        loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    restored = loaded[1]
    assert type(restored) is type(layer)  # the same class object, also for make_implicit(Class)
    assert restored.implicit_options == layer.implicit_options and restored.implicit_options.tol == 1e-11
    assert torch.equal(loaded(x), model(x))
    assert all(a is not b and torch.equal(a, b) for a, b in zip(restored.parameters(), layer.parameters()))
    # The copy trains on its own: gradients reach its parameters, not the original's.
    loaded(x).sum().backward()
    assert all(p.grad is not None for p in restored.parameters())
    assert all(p.grad is None for p in layer.parameters())


def test_make_implicit_of_a_class_gives_one_class_per_options():
    first = implicit.make_implicit(TanhBlock, tol=1e-6)
    assert implicit.make_implicit(TanhBlock, tol=1e-6) is first
    assert implicit.make_implicit(TanhBlock, tol=1e-7) is not first
    assert issubclass(first, TanhBlock) and first.__name__ == "TanhBlock"


SOURCE = """
import torch
from torch import nn

import implicit


class Tanh(nn.Module):
    def __init__(self, n=5):
        super().__init__()
        self.linear = nn.Linear(n, n).double()
        with torch.no_grad():
            self.linear.weight.mul_(0.3)

    def forward(self, z, x):
        return torch.tanh(self.linear(z) + x)


@implicit.make_implicit(solver="anderson", tol=1e-10)
class Decorated(Tanh):
    pass
"""

SAVE = """
import torch, implicit, blocks
torch.manual_seed(0)
x = torch.randn(2, 5, dtype=torch.float64)
models = {
    "decorated": blocks.Decorated(),
    "class": implicit.make_implicit(blocks.Tanh, solver="broyden", tol=1e-10)(),
    "instance": implicit.make_implicit(blocks.Tanh(), solver="fixed_point", tol=1e-10, max_iter=300),
}
for name, layer in models.items():
    model = torch.nn.Sequential(torch.nn.Linear(5, 5).double(), layer)
    torch.save({"model": model, "x": x, "out": model(x).detach()}, name + ".pt")
"""

LOAD = """
import torch
for name in ("decorated", "class", "instance"):
    saved = torch.load(name + ".pt", weights_only=False)
    layer = saved["model"][1]
    assert torch.equal(saved["model"](saved["x"]), saved["out"]), name
    print(name, type(layer).__name__, layer.implicit_options.solver)
"""


def test_a_saved_model_loads_in_a_fresh_process(tmp_path):
    """``torch.save(model)`` in one interpreter, ``torch.load`` in another: only the user's module is imported."""
    (tmp_path / "blocks.py").write_text(textwrap.dedent(SOURCE))
    for script in (SAVE, LOAD):
        done = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:3] == [
        "decorated Decorated anderson",
        "class Tanh broyden",
        "instance ImplicitModule fixed_point",
    ]
