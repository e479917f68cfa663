"""``adapt(module)``: one entry point that finds the adapter for a module's type, as timm's ``create_model`` finds a
model by name.

Adapters register under the import path of the classes they accept (``"torch.nn.modules.transformer.
TransformerEncoderLayer"``), so that looking one up imports no optional library; a subclass of a registered class
uses its base's adapter.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from torch import nn

Adapter = Callable[..., nn.Module]
T = TypeVar("T")

_ADAPTERS: dict[str, Adapter] = {}


def class_path(cls: type) -> str:
    """``module.QualifiedName`` of a class, the key adapters register under."""
    return f"{cls.__module__}.{cls.__qualname__}"


def by_class(table: Mapping[str, T], obj: object) -> T | None:
    """The entry of ``table`` (keyed by :func:`class_path`) for the type of ``obj`` or its nearest base class."""
    for cls in type(obj).__mro__:
        entry = table.get(class_path(cls))
        if entry is not None:
            return entry
    return None


def register_adapter(*class_paths: str) -> Callable[[Adapter], Adapter]:
    """Decorator: ``adapt`` dispatches modules of these classes (and their subclasses) to the decorated function."""

    def decorate(adapter: Adapter) -> Adapter:
        for path in class_paths:
            _ADAPTERS[path] = adapter
        return adapter

    return decorate


def supported() -> list[str]:
    """The class paths ``adapt`` accepts."""
    return sorted(_ADAPTERS)


def adapt(module: nn.Module, **adapter_options: Any) -> nn.Module:
    """The block ``f(z, x)`` of ``module``, built by the adapter registered for its type (or a base class of it);
    ``adapter_options`` are that adapter's keyword options. ``make_implicit(adapt(module), **options)`` is the DEQ.

    Raises ``TypeError`` listing the supported types when none matches.

    Example::

        >>> import torch
        >>> from torch import nn
        >>> import adapters, implicit
        >>> layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        >>> deq = implicit.make_implicit(adapters.adapt(layer), tol=1e-6, max_iter=100)
        >>> deq(torch.randn(2, 5, 16)).shape
        torch.Size([2, 5, 16])
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"adapters.adapt takes an nn.Module, got {type(module).__name__}")
    adapter = by_class(_ADAPTERS, module)
    if adapter is not None:
        return adapter(module, **adapter_options)
    raise TypeError(
        f"adapters.adapt: no adapter for {class_path(type(module))}; supported types: {', '.join(supported())}. "
        "A block of your own needs no adapter: give it forward(z, x) -> z (implicit.Block)"
    )
