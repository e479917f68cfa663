"""Checkpoints of the integrations' training runs that resume a run exactly: model, optimiser, learning-rate
schedule and random states, written atomically."""

from __future__ import annotations

import random
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn


def rng_state() -> dict[str, Any]:
    """The torch (CPU and, when present, every CUDA device) and Python random states."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Set the random states saved by :func:`rng_state` (CUDA's only where a device is present)."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_training_state(
    path: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    **extra: Any,
) -> Path:
    """Write model, optimiser, scheduler, random states and ``extra`` (config, position, histories) to ``path``
    through a temporary file: never a half-written checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        **extra,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": rng_state(),
    }
    temporary = path.with_suffix(path.suffix + ".tmp")
    torch.save(state, temporary)
    temporary.replace(path)
    return path


def read_training_state(path: str | Path) -> dict[str, Any]:
    """A checkpoint written by :func:`save_training_state` (on the CPU); ``FileNotFoundError`` naming the path."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    return torch.load(path, map_location="cpu", weights_only=False)


def restore_training_state(
    state: dict[str, Any],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    *,
    step: int,
    rescheduled: bool = False,
) -> None:
    """Load ``state`` into a freshly started run's parts and restore the random states. ``rescheduled``: the run was
    extended, so its schedule was rebuilt over the new length; it is advanced to ``step`` instead of loaded."""
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if rescheduled:  # the same schedule shape over the new length, at the reached step
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "scheduler.step() before optimizer.step()"
            for _ in range(step):
                scheduler.step()
    else:
        scheduler.load_state_dict(state["scheduler"])
    restore_rng(state["rng"])
