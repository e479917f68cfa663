"""``execution="graph"``: the forward solve captured in a CUDA graph once per input signature, then replayed.

A solve of ``max_iter`` steps launches a few dozen small kernels per iteration; on a GPU with small states the launch
overhead dominates. The fixed-budget loop (:func:`~implicit.solvers.base.iterate` with ``execution="graph"``: no host
reads, samples frozen on the device when they stop) is captured once in a ``torch.cuda.CUDAGraph`` (warm-up on a side
stream first, as PyTorch's CUDA-graph notes prescribe) and each later call copies its injection and ``z0`` into the
captured input buffers, replays the graph and copies the results out: one launch per solve.

What a capture is keyed on (a change captures anew, the latest few per block are kept, so memory stays bounded):

* the injection's structure, and its tensor leaves' shapes, dtypes and devices (their values are copied in at every
  call); non-tensor leaves by value (by identity when unhashable);
* ``z0``'s shape, dtype and device, the solver's configuration and the loop's settings;
* the block's parameters and buffers by storage (an optimizer updates them in place, which the graph sees; a
  parameter replaced by another tensor, e.g. ``.to()`` or ``load_state_dict(assign=True)``, captures anew), its
  modules' ``training`` flags and the autocast state.

Everything else the block reads is baked into the graph by address: a tensor it holds outside its parameters and
buffers, or captures in a closure, must be updated in place. Blocks with parametrised weights
(``torch.nn.utils.parametrize``) are rejected (their weights are recomputed outside the solve at every call). The
backward pass is not captured: the backward modes attach their gradient at the returned z* as in eager mode (their
linear solve runs eagerly); ``backward="unrolled"`` is rejected by option validation.
"""

from __future__ import annotations

import dataclasses
import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .lowrank import LowRankInverse
from .pytree import StateLayout, tree_flatten, tree_unflatten
from .result import SolverResult
from .solvers import Solve
from .types import State

#: Captures kept per block (least recently used dropped first).
MAX_CAPTURES = 4
#: Device types whose solves are captured (the tests add a stand-in recorder for the CPU).
CAPTURE_DEVICES = ("cuda",)


@dataclass
class _Capture:
    """One captured solve: its replay, its input buffers (the injection's tensor leaves and ``z0``) and its result
    (tensors each replay overwrites)."""

    replay: Callable[[], None]
    inputs: list[Tensor]
    z0: Tensor
    result: SolverResult


# Per block (module, or function for the functional form): its captures by signature. Weak keys: a capture holds no
# reference to the block (the graph replays without calling it), so a block's captures go when the block does.
_CAPTURES: weakref.WeakKeyDictionary[Any, OrderedDict[Hashable, _Capture]] = weakref.WeakKeyDictionary()


def graph_solve(
    solve: Solve,
    f: Callable[[State, Any], State],
    x: Any,
    z0: Tensor,
    layout: StateLayout,
    changes: dict[str, Any],
) -> SolverResult:
    """Solve ``z = f(z, x)`` from the flat ``z0`` (``(B, N)``) with ``solve``'s solver and loop (``changes`` applied)
    by replaying a CUDA graph, capturing it first if this signature has none."""
    if z0.device.type not in CAPTURE_DEVICES:
        raise ValueError(
            f"execution='graph' captures CUDA graphs, but the state is on {z0.device}: use execution='compiled' "
            "(CPU) or 'eager'"
        )
    if changes.get("state") or changes.get("initial_active") is not None:
        raise ValueError("execution='graph' does not capture a warm-start solver_state: use 'compiled' or 'eager'")
    loop = solve.loop.replace(**changes)
    owner = getattr(f, "__self__", f)  # a bound block_forward: the layer
    leaves, spec = tree_flatten(x)
    tensors = [leaf for leaf in leaves if isinstance(leaf, Tensor)]
    key = (
        spec,
        tuple(_leaf_key(leaf) for leaf in leaves),
        (tuple(z0.shape), z0.dtype, z0.device),
        (type(solve.solver), tuple(sorted(vars(solve.solver).items()))),
        (loop.tol, loop.max_iter, loop.stop_mode, loop.check_every, loop.explode, tuple(loop.record_at)),
        loop.stagnation,
        _module_key(owner) if isinstance(owner, nn.Module) else None,
        torch.is_autocast_enabled("cuda") and torch.get_autocast_dtype("cuda"),
    )
    try:
        captures = _CAPTURES.setdefault(owner, OrderedDict())
    except TypeError:  # not weakly referenceable
        raise ValueError(
            f"execution='graph' keeps its captures per block, and a {type(owner).__name__} cannot be weakly "
            "referenced: pass an nn.Module or a function as the block"
        ) from None
    capture = captures.get(key)
    if capture is None:
        capture = captures[key] = _capture(solve, f, leaves, spec, z0, layout, loop)
        while len(captures) > MAX_CAPTURES:
            captures.popitem(last=False)
    captures.move_to_end(key)
    with torch.no_grad():
        for buffer, value in zip(capture.inputs, tensors):
            buffer.copy_(value)
        capture.z0.copy_(z0)
        capture.replay()
        return _copy(capture.result)


def _leaf_key(leaf: Any) -> Hashable:
    if isinstance(leaf, Tensor):
        return ("tensor", tuple(leaf.shape), leaf.dtype, leaf.device)
    try:
        hash(leaf)
    except TypeError:
        return ("id", id(leaf))
    return ("value", type(leaf), leaf)


def _module_key(module: nn.Module) -> Hashable:
    """What of a block the graph depends on beyond its tensors' values: their storages and the modules' modes."""
    modes = []
    for name, child in module.named_modules():
        if "parametrizations" in child._modules:
            raise ValueError(
                f"execution='graph' cannot capture the parametrised weights of {name or 'the block'} (they are "
                "recomputed at every call, outside the solve): use execution='compiled' or 'eager'"
            )
        modes.append(child.training)
    storages = tuple(t.data_ptr() for t in (*module.parameters(), *module.buffers()))
    return storages, tuple(modes)


def _capture(
    solve: Solve,
    f: Callable[[State, Any], State],
    leaves: list[Any],
    spec: Any,
    z0: Tensor,
    layout: StateLayout,
    loop: Any,
) -> _Capture:
    """Warm up on a side stream, then capture the fixed-budget solve on static copies of the inputs."""
    inputs = [leaf.detach().clone() for leaf in leaves if isinstance(leaf, Tensor)]
    buffers = iter(inputs)
    static_x = tree_unflatten([next(buffers) if isinstance(leaf, Tensor) else leaf for leaf in leaves], spec)
    static_z0 = z0.detach().clone()

    def fn(z: Tensor) -> Tensor:
        return layout.flatten(f(layout.unflatten(z), static_x), what="the block's output")

    replay, result = record(lambda: solve.solver.run(fn, static_z0, loop), z0.device)
    return _Capture(replay=replay, inputs=inputs, z0=static_z0, result=result)


def record(run: Callable[[], SolverResult], device: torch.device) -> tuple[Callable[[], None], SolverResult]:
    """Capture ``run`` (a solve on static buffers, no host reads) in a CUDA graph on ``device``, after a warm-up on a
    side stream; return the graph's replay and the result tensors it overwrites."""
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.no_grad(), torch.cuda.device(device):
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):  # lazy initialisations (cuBLAS/cuSOLVER handles) happen outside the capture
                run()
            torch.cuda.current_stream(device).wait_stream(side)
            with torch.cuda.graph(graph):
                result = run()
    except RuntimeError as error:
        raise RuntimeError(
            "execution='graph': the solve could not be captured in a CUDA graph (the block or the solver "
            f"synchronises with the host or runs an operation CUDA graphs do not support: {error}); use "
            "execution='compiled' or 'eager'"
        ) from error
    return graph.replay, result


def _copy(result: SolverResult) -> SolverResult:
    """The replay's result in fresh tensors (the next replay overwrites the captured ones)."""
    inverse = result.inverse_jacobian
    return dataclasses.replace(
        result,
        z=result.z.clone(),
        abs=result.abs.clone(),
        rel=result.rel.clone(),
        nstep=result.nstep.clone(),
        converged=result.converged.clone(),
        diverged=result.diverged.clone(),
        stalled=result.stalled.clone(),
        trace=result.trace.clone(),
        trace_nfe=list(result.trace_nfe),
        inverse_jacobian=None if inverse is None else LowRankInverse(inverse.U.clone(), inverse.V.clone()),
        trajectory=[t.clone() for t in result.trajectory],
    )


__all__ = ["CAPTURE_DEVICES", "MAX_CAPTURES", "graph_solve", "record"]
