"""Loading a user's ``module:factory`` for the command-line tools (``python -m implicit.testing``,
``python -m implicit.doctor``): the callable that builds an example, and what it returns."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import inspect
import random
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import torch
from torch import nn


class UsageError(Exception):
    """A mistake in the command line or the factory; the tools exit with status 2."""


def fail(message: str) -> NoReturn:
    raise UsageError(message)


def load_factory(spec: str) -> Callable[..., Any]:
    """The callable named by ``module:attr`` (``attr`` may be dotted; ``module`` may be a ``.py`` file path)."""
    module_name, sep, attribute = spec.rpartition(":")
    if not sep or not module_name or not attribute:
        fail(f"expected module:factory (e.g. my_pkg.models:make_block), got {spec!r}")
    try:
        if module_name.endswith(".py") or "/" in module_name or "\\" in module_name:
            module = _import_file(Path(module_name))
        else:
            module = importlib.import_module(module_name)
    except UsageError:
        raise
    except ModuleNotFoundError as error:
        if error.name is not None and (module_name == error.name or module_name.startswith(error.name + ".")):
            fail(f"cannot import {module_name!r}: {error} (is its directory on PYTHONPATH?)")
        fail(f"importing {module_name!r} failed:\n{traceback.format_exc()}")
    except Exception:
        fail(f"importing {module_name!r} failed:\n{traceback.format_exc()}")
    target: Any = module
    for part in attribute.split("."):
        if not hasattr(target, part):
            fail(f"{module_name!r} has no attribute {attribute!r}")
        target = getattr(target, part)
    if not callable(target):
        fail(f"{spec} is a {type(target).__name__}, not a callable factory")
    return target


def _import_file(path: Path) -> Any:
    if not path.is_file():
        fail(f"no such file: {path}")
    spec = importlib.util.spec_from_file_location(path.stem, path)
    if spec is None or spec.loader is None:
        fail(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module  # dataclasses, pickling and relative lookups expect the module registered
    spec.loader.exec_module(module)
    return module


def add_factory_argument(parser: argparse.ArgumentParser, returns: str) -> None:
    """The commands' positional ``module:factory`` argument; ``returns`` names what the factory returns."""
    parser.add_argument(
        "factory",
        metavar="module:factory",
        help=f"import path (or path/to/file.py) and attribute of a callable returning {returns}; called with the "
        "example index if it takes one positional argument",
    )


def takes_seed(factory: Callable[..., Any]) -> bool:
    """Whether the factory takes the example index (one positional argument); ``UsageError`` if it takes neither
    one nor zero arguments."""
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):  # some builtins: call without arguments
        return False
    for args in ((0,), ()):
        try:
            signature.bind(*args)
        except TypeError:
            continue
        return bool(args)
    fail(f"the factory must take no argument or one (the example index); its signature is {signature}")


def make_example(factory: Callable[..., Any], index: int, seeded: bool, spec: str) -> tuple[nn.Module, Any, Any]:
    """``(layer_or_block, x, z0 or None)`` from the factory, called with ``index`` (or after seeding with it)."""
    torch.manual_seed(index)
    random.seed(index)
    try:
        result = factory(index) if seeded else factory()
    except Exception as error:
        call = f"{spec}({index})" if seeded else f"{spec}()"
        fail(f"the factory raised in {call}:\n{user_traceback(error)}")
    if not isinstance(result, (tuple, list)) or len(result) not in (2, 3):
        fail(
            f"the factory must return (layer_or_block, x) or (layer_or_block, x, z0), "
            f"got {type(result).__name__}{'' if not isinstance(result, (tuple, list)) else f' of {len(result)}'}"
        )
    target, x, z0 = (*result, None) if len(result) == 2 else result
    if not isinstance(target, nn.Module):
        fail(f"the factory's first element must be an implicit layer or a block nn.Module, got {type(target).__name__}")
    return target, x, z0


def user_traceback(error: BaseException) -> str:
    """The traceback of ``error`` without the caller's own frame (the factory's frames first)."""
    tb = error.__traceback__.tb_next if error.__traceback__ is not None else None
    return "".join(traceback.format_exception(type(error), error, tb)).rstrip()
