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


def check_block(forward: Callable[..., Any], owner: str, *, bound: bool = True) -> None:
    """Raise ``TypeError`` unless ``forward`` can be called as ``forward(z, x)`` (``bound=False``: as
    ``forward(self, z, x)``, an unbound method). ``owner`` names the block's class in the message."""
    if getattr(forward, "__func__", forward) is nn.Module.forward:
        raise TypeError(f"{owner} defines no forward: a DEQ block needs forward(z, x) -> z (see implicit.Block)")
    try:
        signature = inspect.signature(forward)
    except (TypeError, ValueError):  # a builtin or C extension: nothing to check
        return
    try:
        signature.bind(*([None] * (2 if bound else 3)))
    except TypeError as error:
        if not bound:  # shown as on an instance, without self
            signature = signature.replace(parameters=list(signature.parameters.values())[1:])
        raise TypeError(
            f"{owner}.forward{signature} cannot be called as forward(z, x) ({error}): a DEQ block maps the state z and "
            "the injection x to the next state, forward(z, x) -> z (see implicit.Block)"
        ) from None
