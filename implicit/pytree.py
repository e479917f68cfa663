"""Flat views of structured states.

A DEQ state is a tensor or a (nested) tuple / list / dict of tensors that share a leading batch dimension B.
Solvers work on one flat ``(B, N)`` matrix, N the number of elements per sample summed over leaves. A
:class:`StateLayout` is built once per solve from the initial state and converts in both directions; it also checks
that the block returns a state of the same structure, shapes and dtypes.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from functools import cached_property
from typing import Any

import torch
from torch import Tensor
from torch.utils import _pytree as pytree

from .types import State

# The pytree functions the package uses, imported from PyTorch's (private) module in this one place.
tree_map = pytree.tree_map
tree_leaves = pytree.tree_leaves
tree_flatten = pytree.tree_flatten
tree_unflatten = pytree.tree_unflatten
tree_flatten_with_path = pytree.tree_flatten_with_path
keystr = pytree.keystr
TreeSpec = pytree.TreeSpec


def leaf_names(tree: State) -> list[str]:
    """The path of every leaf of ``tree`` as written in messages (``[0]``, ``['h']``; ``<state>`` for a tensor)."""
    paths, _ = pytree.tree_flatten_with_path(tree)
    return [pytree.keystr(path) or "<state>" for path, _ in paths]


_WIDE = (torch.float32, torch.float64)


def working_dtype(dtypes: list[torch.dtype]) -> torch.dtype:
    """The dtype solvers compute in: the widest leaf dtype, at least float32 (half-precision states are solved in
    float32: a bf16 residual cannot resolve the tolerances a solve needs)."""
    if len(dtypes) == 1 and dtypes[0] in _WIDE:
        return dtypes[0]
    dtype = torch.float32
    for d in dtypes:
        dtype = torch.promote_types(dtype, d)
    return dtype


class StateLayout:
    """Converts a state pytree to a flat ``(B, N)`` matrix and back.

    Args:
        state: an example state (usually the initial state z0). Every leaf must be a floating-point tensor with at
            least one dimension; all leaves share the batch size ``shape[0]`` and the device.
    """

    def __init__(self, state: State) -> None:
        if isinstance(state, Tensor):  # the common case, without the pytree machinery
            leaves: list[Any] = [state]
            self.spec = _TENSOR_SPEC
        else:
            leaves, self.spec = pytree.tree_flatten(state)
            if not leaves:
                raise ValueError("the state has no tensors: expected a tensor or a tuple/list/dict of tensors")
        first = leaves[0]
        for i, leaf in enumerate(leaves):
            if not isinstance(leaf, Tensor):
                raise TypeError(f"state leaf {self.names[i]} is a {type(leaf).__name__}, expected a torch.Tensor")
            if leaf.dim() == 0:
                raise ValueError(f"state leaf {self.names[i]} is a scalar; every leaf needs a leading batch dimension")
            if not leaf.is_floating_point():
                raise TypeError(f"state leaf {self.names[i]} has dtype {leaf.dtype}; states must be floating point")
            if leaf.shape[0] != first.shape[0]:
                raise ValueError(
                    f"state leaf {self.names[i]} has batch size {leaf.shape[0]} but {self.names[0]} has "
                    f"{first.shape[0]}; all leaves share the leading batch dimension"
                )
            if leaf.device != first.device:
                raise ValueError(f"state leaf {self.names[i]} is on {leaf.device}, {self.names[0]} on {first.device}")
        self.batch = first.shape[0]
        self.shapes = [tuple(leaf.shape) for leaf in leaves]  # torch.Size compares equal to tuples
        self.dtypes = [leaf.dtype for leaf in leaves]
        self.sizes = [math.prod(shape[1:]) for shape in self.shapes]
        self.numel = sum(self.sizes)
        self.dtype = working_dtype(self.dtypes)
        self.device = first.device
        self.single = len(leaves) == 1 and self.spec.is_leaf()
        self.flat_shape = torch.Size((self.batch, self.numel))

    @cached_property
    def names(self) -> list[str]:
        """The leaves' paths, for messages (computed from the structure when first needed)."""
        return leaf_names(pytree.tree_unflatten([object() for _ in range(self.spec.num_leaves)], self.spec))

    # ------------------------------------------------------------------ conversions
    def flatten(self, tree: State, *, what: str = "state") -> Tensor:
        """Pytree -> ``(B, N)`` in the working dtype, after checking structure, shapes and dtypes against the layout.

        ``what`` names the value in error messages (e.g. "the block's output").
        """
        if self.single:
            if isinstance(tree, Tensor) and tree.shape == self.flat_shape and tree.dtype == self.dtype:
                return tree  # the common (B, N) state: nothing to convert
            if not isinstance(tree, Tensor):
                raise ValueError(f"{what} is a {type(tree).__name__}, expected a tensor of shape {self.shapes[0]}")
            self._check_leaf(0, tree, what)
            return tree.reshape(self.flat_shape).to(self.dtype)
        leaves, spec = pytree.tree_flatten(tree)
        if spec != self.spec:
            raise ValueError(
                f"{what} has structure {pytree.treespec_pprint(spec)} but the state has "
                f"{pytree.treespec_pprint(self.spec)}"
            )
        for i, leaf in enumerate(leaves):
            self._check_leaf(i, leaf, what)
        return torch.cat([leaf.reshape(self.batch, -1).to(self.dtype) for leaf in leaves], dim=1)

    def unflatten(self, flat: Tensor) -> State:
        """``(B, N)`` -> pytree with the layout's leaf shapes and dtypes (views where possible). A single-leaf state
        may also be given in its own shape; it is then returned as it is (cast to the leaf dtype)."""
        if self.single:
            leaf = flat if flat.shape == self.shapes[0] else flat.reshape(self.shapes[0])
            return leaf if leaf.dtype == self.dtypes[0] else leaf.to(self.dtypes[0])
        parts = flat.split(self.sizes, dim=1)
        leaves = [p.reshape(shape).to(dtype) for p, shape, dtype in zip(parts, self.shapes, self.dtypes)]
        return pytree.tree_unflatten(leaves, self.spec)

    def _check_leaf(self, i: int, leaf: Any, what: str) -> None:
        name = self.names[i]
        if not isinstance(leaf, Tensor):
            raise ValueError(f"{what}: leaf {name} is a {type(leaf).__name__}, expected a tensor")
        if tuple(leaf.shape) != self.shapes[i]:
            raise ValueError(
                f"{what}: leaf {name} has shape {tuple(leaf.shape)} but the state leaf has shape {self.shapes[i]}"
            )
        if leaf.dtype != self.dtypes[i] and not (leaf.is_floating_point() and _autocast_active(leaf.device)):
            raise ValueError(f"{what}: leaf {name} has dtype {leaf.dtype} but the state leaf has {self.dtypes[i]}")


_TENSOR_SPEC = pytree.tree_flatten(torch.empty(0))[1]


def _autocast_active(device: torch.device) -> bool:
    return torch.is_autocast_enabled(device.type)


def tree_tensors(tree: Any) -> list[Tensor]:
    """All tensors among the leaves of ``tree`` (non-tensor leaves are skipped)."""
    if isinstance(tree, Tensor):
        return [tree]
    return [leaf for leaf in pytree.tree_leaves(tree) if isinstance(leaf, Tensor)]


_HALF = (torch.float16, torch.bfloat16)


def all_finite(tensors: Iterable[Tensor]) -> bool:
    """True when every floating-point tensor is finite; one host synchronisation for the whole list.

    The sum of all entries is finite when every entry is (a NaN or an infinity makes it NaN or infinite), so one
    reduction per tensor decides the common case; only when the sum is not finite — non-finite entries, or finite
    ones whose sum overflows — are the entries themselves checked. (``s − s == 0`` tests a sum for finiteness in
    two cheap ops; ``torch.isfinite`` costs several.)"""
    floats = [t.detach() if t.requires_grad else t for t in tensors if t.is_floating_point() or t.is_complex()]
    if not floats:
        return True
    total = floats[0].sum(dtype=torch.float32) if floats[0].dtype in _HALF else floats[0].sum()
    for t in floats[1:]:
        total = total + (t.sum(dtype=torch.float32) if t.dtype in _HALF else t.sum())
    if bool((total - total) == 0):
        return True
    return all(bool(torch.isfinite(t).all()) for t in floats)
