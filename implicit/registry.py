"""Registries of named components (solvers, backward modes) and the validation every option goes through.

A component is a class with a ``name`` (the user-facing string) whose options are its keyword-only constructor
arguments (:class:`Configurable`). A :class:`Registry` maps names to such classes, like torchdiffeq's table of
methods; lookups name the closest valid value when a name is misspelled, and list only the values valid in the place
the name was given (a forward solver, a backward solver, ...).
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Iterable, Iterator, Mapping, MutableMapping
from typing import Any, ClassVar, Generic, TypeVar


def did_you_mean(value: Any, choices: Iterable[str]) -> str:
    """``" (did you mean 'x'?)"`` for the closest of ``choices`` to a misspelled string ``value``, else ``""``."""
    if not isinstance(value, str):
        return ""
    close = difflib.get_close_matches(value, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def check_choice(what: str, value: Any, choices: Iterable[str]) -> None:
    """Raise ``ValueError`` naming the closest valid value when ``value`` is not one of ``choices``; ``what`` names
    the setting (e.g. ``"option stop_mode"``, ``"phantom: variant"``)."""
    choices = tuple(choices)
    if not isinstance(value, str) or value not in choices:
        raise ValueError(
            f"{what} must be one of {', '.join(map(repr, choices))}, got {value!r}{did_you_mean(value, choices)}"
        )


class Configurable:
    """A component looked up by ``name`` whose options are its keyword-only constructor arguments.

    Constructors check option *values* and raise ``ValueError``; :meth:`check_options` checks option *names* first.
    """

    name: ClassVar[str] = ""
    kind: ClassVar[str] = "component"
    _option_names: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        params = inspect.signature(cls.__init__).parameters.values()  # once per class, not per validation
        cls._option_names = tuple(p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY)

    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        """The names of this component's options."""
        return cls._option_names

    @classmethod
    def check_options(cls, options: Mapping[str, Any], *, context: str) -> None:
        """Raise ``TypeError`` naming the closest and all valid options if ``options`` has a name this component does
        not take."""
        valid = cls._option_names
        unknown = [k for k in options if k not in valid]
        if unknown:
            names = ", ".join(f"{k!r}{did_you_mean(k, valid)}" for k in unknown)
            raise TypeError(
                f"{context}: unknown option(s) {names} for {cls.kind} {cls.name!r}; "
                f"valid options: {', '.join(valid) if valid else '(none)'}"
            )

    @classmethod
    def option_strategies(cls, st: Any) -> dict[str, Any]:
        """Hypothesis strategies of this component's own options, for property tests (``st`` is
        ``hypothesis.strategies``, passed in so that hypothesis stays a test dependency). The ranges must keep every
        contractive block (Lipschitz constant ≤ 0.9) converging; options left out keep their defaults."""
        return {}


C = TypeVar("C", bound=Configurable)

#: A rule of where a component may be used: ``None`` when ``cls`` is valid there, else the reason it is not.
Rule = Callable[[type[Any]], "str | None"]


class Registry(MutableMapping[str, type[C]], Generic[C]):
    """Components of one kind by name. A mutable mapping (``REGISTRY["name"] = cls``), or use :meth:`register` as a
    class decorator; the generic tests, the hypothesis strategies and the option validation all read it, so a
    registered component is validated, drawn and tested like the built-in ones."""

    def __init__(self, kind: str, classes: Iterable[type[C]] = ()) -> None:
        self.kind = kind
        self._classes: dict[str, type[C]] = {}
        for cls in classes:
            self.register(cls)

    def register(self, cls: type[C]) -> type[C]:
        """Add ``cls`` under ``cls.name`` (a class decorator)."""
        self[cls.name] = cls
        return cls

    def __setitem__(self, name: str, cls: type[C]) -> None:
        if not (isinstance(cls, type) and issubclass(cls, Configurable)):
            raise TypeError(f"a {self.kind} registry holds component classes, got {cls!r}")
        if not isinstance(name, str) or not name or name != cls.name:
            raise ValueError(f"{self.kind} {cls.__name__} must be registered under its name {cls.name!r}, got {name!r}")
        self._classes[name] = cls

    def __getitem__(self, name: str) -> type[C]:
        return self._classes[name]

    def __delitem__(self, name: str) -> None:
        del self._classes[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._classes)

    def __len__(self) -> int:
        return len(self._classes)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {list(self._classes)})"

    def names(self, rule: Rule | None = None) -> tuple[str, ...]:
        """Registered names, in registration order, valid under ``rule`` (all without one)."""
        return tuple(name for name, cls in self._classes.items() if rule is None or rule(cls) is None)

    def lookup(
        self, name: Any, *, option: str | None = None, role: str | None = None, rule: Rule | None = None
    ) -> type[C]:
        """The class registered under ``name``.

        ``ValueError`` when ``name`` is unknown (naming the closest valid name and listing the names valid under
        ``rule`` as ``role``s, e.g. "forward solver") or when ``rule`` refuses the class (giving its reason, in which
        ``{valid}`` stands for the valid choices, e.g. "solver='broyden' or 'adjoint_broyden'"). ``option`` names the
        option the value came from.
        """
        role = role or self.kind
        valid = self.names(rule)
        where = f"option {option}={name!r}" if option else f"{self.kind} {name!r}"
        listing = f"valid {role}s: {', '.join(valid) if valid else '(none)'}"
        cls = self._classes.get(name) if isinstance(name, str) else None
        if cls is None:
            prefix = f"option {option}: " if option else ""
            raise ValueError(f"{prefix}unknown {self.kind} {name!r}{did_you_mean(name, valid)}; {listing}")
        reason = rule(cls) if rule is not None else None
        if reason is None:
            return cls
        if "{valid}" in reason:
            choices = " or ".join(map(repr, valid))
            reason = reason.replace("{valid}", f"{option}={choices}" if option else f"one of {choices}")
            raise ValueError(f"{where}: {reason}")
        raise ValueError(f"{where}: {reason}; {listing}")
