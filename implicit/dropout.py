"""Variational (fixed-mask) dropout for DEQ blocks (Gal and Ghahramani, "A Theoretically Grounded Application of
Dropout in Recurrent Neural Networks", NeurIPS 2016; used in DEQs by Bai et al., "Deep Equilibrium Models", NeurIPS
2019): one mask per implicit-layer call, reused by every f-evaluation. Ordinary dropout inside f would draw a new mask
per iteration, so the block would have no fixed point. :class:`VariationalDropout` is a module to put in a block;
:func:`fixed_randomness` gives a block built from existing modules (with their own dropout layers) the same property
by replaying one random stream per call."""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn


class _Call:
    """One implicit-layer call: what variational dropout keys its mask on, and the seed of :func:`fixed_randomness`
    (drawn when first needed)."""

    __slots__ = ("seed",)

    def __init__(self) -> None:
        self.seed: int | None = None


_CALL: contextvars.ContextVar[_Call | None] = contextvars.ContextVar("implicit_call", default=None)
# The calls being traced by torch.compile, innermost last: dynamo cannot trace a ContextVar's mutation (a graph break
# at every layer call), but traces a list's. Tracing runs in one thread, so a plain list is enough there.
_TRACED_CALLS: list[_Call] = []


def current_call() -> _Call | None:
    """The implicit-layer call in progress (``None`` outside one)."""
    if torch.compiler.is_compiling():
        return _TRACED_CALLS[-1] if _TRACED_CALLS else None
    return _CALL.get()


class implicit_call:
    """Mark one implicit-layer call (``with implicit_call(): ...``): variational dropout modules draw one mask inside
    it. (A class rather than a generator-based context manager: it runs on every layer call.)"""

    def __enter__(self) -> None:
        if torch.compiler.is_compiling():
            self.token = None
            _TRACED_CALLS.append(_Call())
        else:
            self.token = _CALL.set(_Call())

    def __exit__(self, *exc: object) -> None:
        if self.token is None:
            _TRACED_CALLS.pop()
        else:
            _CALL.reset(self.token)


@contextlib.contextmanager
def fixed_randomness(device: torch.device | str = "cpu") -> Iterator[None]:
    """Replay one random stream per implicit-layer call: every entry within the same call starts the global random
    generators (CPU and, for a CUDA ``device``, that device's) from the same seed and restores them on exit.

    Wrapped around a block's use of a module with ordinary dropout (``nn.Dropout``, attention-probability dropout
    inside ``scaled_dot_product_attention``, drop-path), every f-evaluation of one solve draws the same masks — the
    variational dropout a DEQ needs, without replacing the module's dropout layers. The seed is drawn from the global
    CPU generator once per call, so consecutive calls draw new masks and ``torch.manual_seed`` makes them
    reproducible. Outside an implicit-layer call it does nothing (fresh draws, as usual).
    """
    call = current_call()
    if call is None:
        yield
        return
    if call.seed is None:
        call.seed = int(torch.randint(0, 2**62, (1,)).item())
    device = torch.device(device)
    cuda = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.default_generator.manual_seed(call.seed)
        if cuda:
            with torch.cuda.device(device):
                torch.cuda.manual_seed(call.seed)
        yield


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
        call = current_call()
        shape = [1 if d in self.shared_dims or d - x.dim() in self.shared_dims else s for d, s in enumerate(x.shape)]
        mask = self._mask if call is not None and call is self._mask_call else None
        if mask is None or list(mask.shape) != shape or mask.device != x.device or mask.dtype != x.dtype:
            keep = torch.empty(shape, device=x.device, dtype=x.dtype).bernoulli_(1 - self.p)
            mask = keep / (1 - self.p)
            self._mask, self._mask_call = (mask, call) if call is not None else (None, None)
        return x * mask
