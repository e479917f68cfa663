"""Engine options on the integrations' command lines: named flags for the common ones, ``--option NAME=JSON`` for
any other option of :class:`implicit.ImplicitOptions` (or of the converted model)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable
from typing import Any


def add_option_argument(group: argparse._ArgumentGroup, *, example: str) -> None:
    """The repeatable ``--option NAME=JSON`` argument (``example``: a ``NAME=VALUE`` shown in the help)."""
    group.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="NAME=JSON",
        help=f"another engine option, its value in JSON (repeatable): --option {example}",
    )


def engine_options(args: argparse.Namespace, names: Iterable[str], *, example: str) -> dict[str, Any]:
    """The options given on the command line: the arguments ``names`` that were set (not ``None``), then the
    ``--option`` items (see :func:`parse_engine_options`)."""
    options = {name: value for name in names if (value := getattr(args, name)) is not None}
    options.update(parse_engine_options(args.option, example=example))
    return options


def parse_engine_options(items: Iterable[str], *, example: str = "jac_loss_probes=1") -> dict[str, Any]:
    """``--option NAME=VALUE`` arguments as engine options: VALUE is JSON (``1``, ``1e-4``, ``[30, 1.3]``) or, when
    it is not, a bare string (``stop_mode=abs``); ``SystemExit`` for an item without ``=``."""
    options: dict[str, Any] = {}
    for item in items:
        name, separator, value = item.partition("=")
        if not separator:
            raise SystemExit(f"--option {item!r}: expected NAME=JSON, e.g. {example}")
        try:
            options[name] = json.loads(value)
        except json.JSONDecodeError:
            options[name] = value
    return options
