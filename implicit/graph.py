"""Walking an autograd graph: which leaf tensors requiring grad an output depends on.

Used by the backward modes (is there anything to differentiate besides the state?) and by the gradient checker (which
closed-over tensors does the block reach?).
"""

from __future__ import annotations

from collections.abc import Iterator

from torch import Tensor


def graph_leaves(output: Tensor) -> Iterator[Tensor]:
    """The leaf tensors requiring grad that ``output``'s autograd graph reaches, lazily, each once."""
    stack = [output.grad_fn] if output.grad_fn is not None else []
    seen: set[int] = set()
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        variable = getattr(node, "variable", None)  # AccumulateGrad nodes hold their leaf
        if variable is not None:
            yield variable
            continue
        stack.extend(next_node for next_node, _ in node.next_functions if next_node is not None)


def depends_on_more_than(output: Tensor, leaf: Tensor) -> bool:
    """Whether ``output``'s graph reaches a tensor requiring grad other than ``leaf`` (parameters, injection,
    closures); stops at the first one. (A plain loop: this runs once per layer call.)"""
    stack = [output.grad_fn]
    seen: set[int] = set()
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        variable = getattr(node, "variable", None)  # AccumulateGrad nodes hold their leaf
        if variable is not None:
            if variable is not leaf:
                return True
            continue
        stack.extend([next_node for next_node, _ in node.next_functions])
    return False
