"""Registered components (solvers, backward modes) declare their options as keyword-only ``__init__`` arguments;
this mixin turns that signature into option validation with a clear error."""

from __future__ import annotations

import inspect
from typing import Any, ClassVar


class Configurable:
    """A component looked up by ``name`` whose options are its keyword-only constructor arguments."""

    name: ClassVar[str] = ""
    kind: ClassVar[str] = "component"

    @classmethod
    def option_names(cls) -> list[str]:
        params = inspect.signature(cls.__init__).parameters.values()
        return [p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY]

    @classmethod
    def check_options(cls, options: dict[str, Any], *, context: str) -> None:
        """Raise ``TypeError`` naming the valid options if ``options`` has a name this component does not take."""
        valid = cls.option_names()
        unknown = [k for k in options if k not in valid]
        if unknown:
            raise TypeError(
                f"{context}: unknown option(s) {', '.join(map(repr, unknown))} for {cls.kind} {cls.name!r}; "
                f"valid options: {', '.join(valid) if valid else '(none)'}"
            )


def lookup(registry: dict[str, type], name: Any, what: str) -> type:
    """``registry[name]``, or ``ValueError`` listing the valid names."""
    try:
        return registry[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown {what} {name!r}; valid {what}s: {', '.join(registry)}") from None
