"""Types shared across the engine (a leaf module: it imports nothing from the package)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor

#: A DEQ state: a tensor, or a nested tuple / list / dict of tensors sharing a leading batch dimension.
State = Any

#: A flat batched map ``(B, N) -> (B, N)`` that does not mix samples: the block with its injection bound, acting on
#: the state flattened by :class:`implicit.pytree.StateLayout`.
FlatMap = Callable[[Tensor], Tensor]
