"""Pieces shared by the integrations' training runs: the base of their configurations (dataclasses saved in their
checkpoints: validation with messages that name the configuration, the dict round trip), the progress bar and the
history file."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TypeVar

ConfigT = TypeVar("ConfigT", bound="RunConfig")


class RunConfig:
    """Mixed into a ``@dataclass`` configuration; the helpers raise ``ValueError`` naming the class and the field."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]  # the subclasses are dataclasses

    @classmethod
    def from_dict(cls: type[ConfigT], values: dict[str, Any]) -> ConfigT:
        return cls(**values)

    def check_choice(self, field: str, choices: Iterable[str], *, label: str | None = None) -> None:
        """``field``'s value must be one of ``choices`` (``label`` names it in the message; default ``field``)."""
        value, choices = getattr(self, field), tuple(choices)
        if value not in choices:
            raise ValueError(f"{type(self).__name__}: unknown {label or field} {value!r}; valid: {', '.join(choices)}")

    def check_at_least(self, minimum: int, *fields: str) -> None:
        """Each of ``fields`` must be ≥ ``minimum``."""
        for name in fields:
            if getattr(self, name) < minimum:
                raise ValueError(f"{type(self).__name__}: {name} must be ≥ {minimum}, got {getattr(self, name)}")


def progress_bar(enabled: bool, *, initial: int, total: int) -> Any:
    """A tqdm bar over training steps (disabled: a bar that prints nothing)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True, leave=True)


def save_history(path: str | Path, config: RunConfig, **records: Any) -> Path:
    """``{"config": ..., **records}`` as JSON at ``path`` (folders created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"config": config.to_dict(), **records}, indent=1))
    return path
