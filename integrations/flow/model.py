"""DEQ-Flow from torchvision's RAFT (Bai, Chen and Kolter, "Deep Equilibrium Optical Flow Estimation", CVPR 2022).

RAFT (Teed and Deng, ECCV 2020) refines the flow with a fixed number of weight-tied updates and backpropagates through
all of them. DEQ-Flow solves for the equilibrium of one update instead, ``(h*, flow*) = f((h*, flow*), x)``, with the
injection ``x`` (features, correlation pyramid, context) computed once per image pair, and trains it with inexact
(phantom) gradients and sparse fixed-point correction: a few states of the solve are upsampled and supervised with
RAFT's own sequence loss. Training memory is then independent of the number of solver iterations.

:func:`raft_to_deq_flow` converts a torchvision RAFT: the returned :class:`DEQFlow` *is* a RAFT (same parts, held by
reference, same state dict), whose forward runs the solver through :mod:`implicit`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from torchvision.models.optical_flow.raft import RAFT

from adapters.raft import STARTS, RaftInjection, RaftState, prepare_injection, raft_update_block, upsample_flow
from implicit import ImplicitInfo, ImplicitModule, ImplicitOptions

# DEQ-Flow's published correction schedules (sparse fixed-point correction, §3.3 of the paper; its training scripts):
# FlyingChairs supervises 6 states of a 36-step solve, each with a 1-step phantom gradient; FlyingThings3D 2 states
# of a 40-step solve with 3-step phantom gradients (τ = 1; the loss weights are γ = 0.8 in both).
PRESETS: dict[str, dict[str, Any]] = {
    "chairs": {
        "max_iter": 36,
        "correction": 6,
        "correction_steps": 1,
        "backward": "phantom",
        "backward_options": {"steps": 1, "tau": 1.0},
    },
    "things": {
        "max_iter": 40,
        "correction": 2,
        "correction_steps": 3,
        "backward": "phantom",
        "backward_options": {"steps": 3, "tau": 1.0},
    },
}

# The defaults of a converted model where the caller sets nothing: DEQ-Flow's solver, training budget (its Chairs
# f_thres) and gradient (a 1-step phantom gradient, τ = 1); the residual on the (hidden, flow) state, per element.
DEFAULTS: dict[str, Any] = {
    "solver": "anderson",
    "max_iter": 36,
    "tol": 1e-3,
    "stop_mode": "abs",
    "backward": "phantom",
    "backward_options": {"steps": 1, "tau": 1.0},
}

EVAL_FACTOR = 1.5  # DEQ-Flow's test-time budget: 1.5 × the training iterations


class DEQFlow(RAFT):
    """A torchvision RAFT whose forward solves for the equilibrium of its update instead of unrolling it.

    Built by :func:`raft_to_deq_flow` (see there for the options). The RAFT parts (``feature_encoder``,
    ``context_encoder``, ``corr_block``, ``update_block``, ``mask_predictor``) are the converted model's, by
    reference, so the state dict is exactly RAFT's. The implicit layer (:attr:`deq`, over the state
    :class:`~adapters.raft.RaftState` ``(hidden, flow)`` at 1/8 resolution) holds no parameters of its own.
    """

    def __init__(
        self,
        raft: RAFT,
        *,
        checkpoint_encoders: bool,
        h0: str,
        detach_coords: bool,
        eval_max_iter: int | None,
        options: ImplicitOptions,
    ) -> None:
        super().__init__(
            feature_encoder=raft.feature_encoder,
            context_encoder=raft.context_encoder,
            corr_block=raft.corr_block,
            update_block=raft.update_block,
            mask_predictor=raft.mask_predictor,
        )
        self.checkpoint_encoders = checkpoint_encoders
        self._eval_max_iter = eval_max_iter
        layer = ImplicitModule(raft_update_block(self, detach_coords=detach_coords, h0=h0), options)
        # Outside the module tree: the layer's block refers back to this model (its parts), which would otherwise
        # appear twice in state_dict() and make the module graph cyclic.
        self.__dict__["deq"] = layer

    deq: ImplicitModule

    def train(self, mode: bool = True) -> DEQFlow:
        """Training or eval mode, for the RAFT parts and the implicit layer (which is outside the module tree)."""
        super().train(mode)
        # Not deq.train(mode): its block holds this model, whose train() would be called again.
        self.deq.training = self.deq.block.training = mode
        return self

    # ------------------------------------------------------------------ options
    @property
    def implicit_options(self) -> ImplicitOptions:
        """The options of the solve in training mode (validated)."""
        return self.deq.implicit_options

    def configure(self, **options: Any) -> DEQFlow:
        """Change the engine options (as :meth:`implicit.ImplicitMixin.configure`). Returns the model."""
        self.deq.configure(**options)
        return self

    @property
    def eval_max_iter(self) -> int:
        """The solver budget in eval mode: as given, else ``1.5 × max_iter`` (DEQ-Flow's test-time factor)."""
        if self._eval_max_iter is not None:
            return self._eval_max_iter
        return math.ceil(EVAL_FACTOR * self.implicit_options.max_iter)

    # ------------------------------------------------------------------ forward
    def injection(self, image1: Tensor, image2: Tensor) -> RaftInjection:
        """Everything RAFT computes once per pair (:func:`adapters.raft.prepare_injection`); under
        ``torch.utils.checkpoint`` with ``checkpoint_encoders`` while gradients are recorded."""
        if not (self.checkpoint_encoders and torch.is_grad_enabled()):
            return prepare_injection(self, image1, image2)
        encoders = (self.feature_encoder, self.context_encoder)
        injection: RaftInjection = checkpoint(
            prepare_injection,
            self,
            image1,
            image2,
            use_reentrant=False,
            context_fn=lambda: (nullcontext(), _batch_norm_statistics_restored(encoders)),
        )
        return injection

    def initial_state(self, injection: RaftInjection) -> RaftState:
        """The solver's start: ``(tanh(context hidden part) or zeros, zero flow)`` (see ``h0``)."""
        state: RaftState = self.deq.initial_state(injection)
        return state

    def forward(
        self,
        image1: Tensor,
        image2: Tensor,
        *,
        warm_start: RaftState | None = None,
        return_info: bool = False,
        **overrides: Any,
    ) -> list[Tensor] | tuple[list[Tensor], ImplicitInfo]:
        """Flow from ``image1`` to ``image2`` (both ``(B, 3, H, W)`` in [−1, 1], H and W divisible by 8 and ≥ 128).

        Args:
            warm_start: a previous solution (``info.state`` of an earlier call, e.g. the previous frame pair of a
                video) to start the solver from instead of :meth:`initial_state` (fixed-point reuse); detached.
            return_info: also return the engine's :class:`~implicit.ImplicitInfo` (``info.forward``: per-sample
                residuals of the (hidden, flow) state, f-evaluations; ``info.state``: the solution, for
                ``warm_start``).
            **overrides: engine options for this call (``max_iter``, ``tol``, ...).

        Returns:
            Training mode: the full-resolution flows ``(B, 2, H, W)`` of the supervised states, earliest first (one
            per correction state, or only the solution without ``correction``), as RAFT returns its updates, so RAFT's
            sequence loss is DEQ-Flow's fixed-point correction loss. Eval mode: ``[flow]`` of the solution after at
            most :attr:`eval_max_iter` iterations.
        """
        x = self.injection(image1, image2)
        z0 = self.initial_state(x) if warm_start is None else _warm_start(warm_start, x)
        if not self.training:  # the engine's eval mode returns z* alone, without the correction states
            overrides = {"max_iter": self.eval_max_iter, **overrides}
        out, info = self.deq(x, z0, return_info=True, **overrides)
        states = out if isinstance(out, list) else [out]
        flows = [upsample_flow(self, state) for state in states]
        return (flows, info) if return_info else flows

    def extra_repr(self) -> str:
        o = self.implicit_options
        return (
            f"solver={o.solver!r}, max_iter={o.max_iter}, eval_max_iter={self.eval_max_iter}, "
            f"backward={o.backward!r}, correction={o.correction!r}, checkpoint_encoders={self.checkpoint_encoders}"
        )


def raft_to_deq_flow(
    raft: RAFT,
    *,
    checkpoint_encoders: bool = False,
    h0: str = "tanh",
    eval_max_iter: int | None = None,
    preset: str | None = None,
    detach_coords: bool = True,
    **implicit_options: Any,
) -> DEQFlow:
    """Convert a torchvision RAFT (``raft_small()`` / ``raft_large()``, any weights) into DEQ-Flow.

    Args:
        raft: the model; its parts are reused by reference (no copies): training one trains the other.
        checkpoint_encoders: run the feature and context encoders (and the correlation pyramid) under
            ``torch.utils.checkpoint``, so that the whole training memory, not only the update part, is independent
            of the number of solver iterations. BatchNorm statistics are updated once per forward, not again in the
            recomputation.
        h0: the initial hidden state: ``"tanh"`` (RAFT's: tanh of the context encoder's hidden part) or
            ``"zeros"`` (DEQ-Flow's; the hidden part of the context stays in the state dict, unused).
        eval_max_iter: the solver budget in eval mode (default ``1.5 × max_iter``).
        preset: ``"chairs"`` or ``"things"``: DEQ-Flow's published sparse fixed-point correction schedules (6 states
            of 36 steps with 1-step phantom gradients; 2 states of 40 steps with 3-step gradients). Options given
            explicitly take precedence.
        detach_coords: detach the flow before the correlation lookup, as RAFT does (``False``: DEQ-Flow's
            ``--all_grad``).
        **implicit_options: any engine option (:class:`implicit.ImplicitOptions`: ``solver``, ``max_iter``, ``tol``,
            ``backward``, ``correction``, ``jac_loss_probes``, ...). Defaults: Anderson, 36 iterations, stop at an
            absolute (per-element root-mean-square) residual of 1e-3, 1-step phantom gradient (τ = 1).

    RAFT's released weights were trained by unrolling 12 updates, not for an equilibrium: its update keeps moving the
    flow after those 12 calls (as does a randomly initialised one), so a converted pretrained model needs fine-tuning
    as DEQ-Flow before its solves converge.

    Example::

        >>> import torch
        >>> from torchvision.models.optical_flow import raft_small
        >>> model = raft_to_deq_flow(raft_small(), max_iter=8, correction=2).train()
        >>> image1, image2 = torch.rand(2, 1, 3, 128, 128) * 2 - 1
        >>> [tuple(flow.shape) for flow in model(image1, image2)]
        [(1, 2, 128, 128), (1, 2, 128, 128)]
    """
    for part in ("feature_encoder", "context_encoder", "corr_block", "update_block", "mask_predictor"):
        if not hasattr(raft, part):
            raise TypeError(f"raft_to_deq_flow: {type(raft).__name__} has no {part}: not a torchvision RAFT")
    if h0 not in STARTS:
        raise ValueError(f"raft_to_deq_flow: h0={h0!r} is not one of {', '.join(map(repr, STARTS))}")
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"raft_to_deq_flow: unknown preset {preset!r}; valid: {', '.join(map(repr, PRESETS))}")
    if eval_max_iter is not None and not (
        isinstance(eval_max_iter, int) and not isinstance(eval_max_iter, bool) and eval_max_iter >= 1
    ):
        raise ValueError(f"raft_to_deq_flow: eval_max_iter must be an integer ≥ 1, got {eval_max_iter!r}")
    options = ImplicitOptions().replace(**{**DEFAULTS, **(PRESETS[preset] if preset else {}), **implicit_options})
    return DEQFlow(
        raft,
        checkpoint_encoders=checkpoint_encoders,
        h0=h0,
        detach_coords=detach_coords,
        eval_max_iter=eval_max_iter,
        options=options,
    )


def _warm_start(state: RaftState | tuple[Tensor, Tensor], x: RaftInjection) -> RaftState:
    """A previous solution as the start for the pair ``x``, detached, checked against the pair's shapes."""
    if not (isinstance(state, tuple) and len(state) == 2 and all(isinstance(t, Tensor) for t in state)):
        raise TypeError(
            f"warm_start must be a RaftState (hidden, flow), such as info.state, got {type(state).__name__}"
        )
    hidden, flow = state
    expected = {"hidden": tuple(x.hidden.shape), "flow": tuple(x.coords0.shape)}
    for name, tensor in (("hidden", hidden), ("flow", flow)):
        if tuple(tensor.shape) != expected[name]:
            raise ValueError(
                f"warm_start.{name} has shape {tuple(tensor.shape)} but this image pair needs {expected[name]} "
                "(warm starts need the same batch size and image size)"
            )
    return RaftState(hidden.detach().to(x.hidden.dtype), flow.detach().to(x.coords0.dtype))


@contextmanager
def _batch_norm_statistics_restored(modules: tuple[nn.Module, ...]) -> Iterator[None]:
    """BatchNorm layers of ``modules`` compute as usual, but their running statistics are put back afterwards: a
    checkpoint's recomputation must not count the batch twice (and must save the same tensors as the forward did,
    so the layers cannot simply stop tracking)."""
    buffers = [
        buffer
        for module in modules
        for m in module.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
        for buffer in (m.running_mean, m.running_var, m.num_batches_tracked)
        if buffer is not None
    ]
    saved = [buffer.clone() for buffer in buffers]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in zip(buffers, saved):
                buffer.copy_(value)
