"""Variational (fixed-mask) dropout for DEQ blocks (Gal and Ghahramani, "A Theoretically Grounded Application of
Dropout in Recurrent Neural Networks", NeurIPS 2016; used in DEQs by Bai et al., "Deep Equilibrium Models", NeurIPS
2019): one mask per implicit-layer call, reused by every f-evaluation. Ordinary dropout inside f would draw a new mask
per iteration, so the block would have no fixed point."""

from __future__ import annotations

import contextvars
from collections.abc import Sequence

import torch
from torch import Tensor, nn

_CALL: contextvars.ContextVar[object | None] = contextvars.ContextVar("implicit_call", default=None)


class implicit_call:
    """Mark one implicit-layer call (``with implicit_call(): ...``): variational dropout modules draw one mask inside
    it. (A class rather than a generator-based context manager: it runs on every layer call.)"""

    def __enter__(self) -> None:
        self.token = _CALL.set(object())

    def __exit__(self, *exc: object) -> None:
        _CALL.reset(self.token)


class VariationalDropout(nn.Module):
    """Dropout whose mask is drawn once per implicit-layer call (and once per forward outside one).

    The mask has the input's shape with the dimensions in ``shared_dims`` set to 1 (e.g. ``shared_dims=(2, 3)``
    drops whole channels of a ``(B, C, H, W)`` state, ``(1,)`` the same features at every position of a
    ``(B, L, D)`` sequence), lives on the input's device and dtype, and scales kept entries by ``1 / (1 − p)``.
    Identity in ``eval()`` mode or with ``p = 0``.
    """

    def __init__(self, p: float = 0.1, shared_dims: Sequence[int] = ()) -> None:
        super().__init__()
        if not 0 <= p < 1:
            raise ValueError(f"dropout probability must be in [0, 1), got {p!r}")
        self.p = p
        self.shared_dims = tuple(shared_dims)
        self._mask: Tensor | None = None
        self._mask_call: object | None = None

    def extra_repr(self) -> str:
        return f"p={self.p}, shared_dims={self.shared_dims}"

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0:
            return x
        call = _CALL.get()
        shape = [1 if d in self.shared_dims or d - x.dim() in self.shared_dims else s for d, s in enumerate(x.shape)]
        mask = self._mask if call is not None and call is self._mask_call else None
        if mask is None or list(mask.shape) != shape or mask.device != x.device or mask.dtype != x.dtype:
            keep = torch.empty(shape, device=x.device, dtype=x.dtype).bernoulli_(1 - self.p)
            mask = keep / (1 - self.p)
            self._mask, self._mask_call = (mask, call) if call is not None else (None, None)
        return x * mask
