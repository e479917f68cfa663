"""The contract of a weight-tied block, which ``make_implicit`` and every adapter build on."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

from torch import nn

from .types import State


@runtime_checkable
class Block(Protocol):
    """A weight-tied block ``f``: ``forward(z, x) -> z`` maps the state ``z`` and the injection ``x`` to the next state.

    * ``z``: a tensor or a (nested) tuple / list / dict of tensors sharing a leading batch dimension B; ``forward``
      returns the same structure, shapes and dtypes.
    * ``x``: anything (a tensor, a pytree, an object); it is passed through untouched. Gradients reach the tensors in
      it that require grad.
    * optional ``initial_state(x) -> z``: the solve's default starting point (default: zeros shaped like ``x``),
      needed when the state differs in shape or structure from the injection.

    ``make_implicit(block)`` checks the signature and turns the block into an equilibrium layer ``x -> z*``. The
    protocol is runtime-checkable, but ``isinstance`` only sees that a ``forward`` exists (every ``nn.Module`` has
    one); :func:`check_block` checks that it takes ``(z, x)``.
    """

    def forward(self, z: State, x: Any) -> State: ...


# Libraries whose layers take (input, *optional arguments): wrapped as they are, x would become a mask or an option.
_LIBRARIES = ("torch.nn.", "timm.", "transformers.", "torchvision.")


def check_block(forward: Callable[..., Any], owner: str, *, bound: bool = True, owner_module: str = "") -> None:
    """Raise ``TypeError`` unless ``forward`` can be called as ``forward(z, x)`` (``bound=False``: as
    ``forward(self, z, x)``, an unbound method). ``owner`` names the block's class in the message, ``owner_module``
    the module that defines it: a layer of torch.nn, timm, transformers or torchvision whose second argument is
    optional (a mask, a flag) is refused with a pointer to the adapters."""
    if getattr(forward, "__func__", forward) is nn.Module.forward:
        raise TypeError(f"{owner} defines no forward: a DEQ block needs forward(z, x) -> z (see implicit.Block)")
    try:
        signature = inspect.signature(forward)
    except (TypeError, ValueError):  # a builtin or C extension: nothing to check
        return
    parameters = list(signature.parameters.values())[0 if bound else 1 :]
    if owner_module.startswith(_LIBRARIES) and len(parameters) > 1 and parameters[1].default is not parameters[1].empty:
        raise TypeError(
            f"{owner} is a layer of {next(p for p in _LIBRARIES if owner_module.startswith(p))[:-1]}, not a block "
            "f(z, x) -> z: its forward's second "
            f"argument {parameters[1].name!r} is optional, so the injection x would land there. Turn it into a block "
            "with adapters.adapt(layer) (transformer layers, HRNet stages, RAFT), or write a module whose "
            "forward(z, x) calls it (see implicit.Block)"
        )
    try:
        signature.bind(*([None] * (2 if bound else 3)))
    except TypeError as error:
        if not bound:  # shown as on an instance, without self
            signature = signature.replace(parameters=list(signature.parameters.values())[1:])
        raise TypeError(
            f"{owner}.forward{signature} cannot be called as forward(z, x) ({error}): a DEQ block maps the state z and "
            "the injection x to the next state, forward(z, x) -> z (see implicit.Block)"
        ) from None
