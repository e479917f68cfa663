"""torchvision's RAFT update operator as a DEQ block (Teed and Deng, "RAFT: Recurrent All-Pairs Field Transforms for
Optical Flow", ECCV 2020; as an equilibrium: Bai, Chen and Kolter, "Deep Equilibrium Optical Flow Estimation", CVPR
2022).

f is one RAFT update over the state ``(hidden, flow)`` at 1/8 resolution: look the correlation pyramid up around
``coords0 + flow``, run the update block (motion encoder, ConvGRU, flow head) and add its flow change. Everything
that RAFT computes once per image pair — features, correlation pyramid, context, the pixel grid — is the injection
``x`` (:func:`prepare_injection`); the lookup is a pure function of the pyramid carried in x, because torchvision's
``CorrBlock`` keeps its pyramid on the module (not re-entrant: a second forward before the backward would index the
wrong pyramid). N applications of f from RAFT's own start reproduce RAFT's N-update output.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .registry import register_adapter

RAFT_MODEL = "torchvision.models.optical_flow.raft.RAFT"
STARTS = ("tanh", "zeros")


class RaftState(NamedTuple):
    """The state of the RAFT block at 1/8 resolution: the ConvGRU hidden state ``(B, hidden, h, w)`` and the flow
    ``(B, 2, h, w)`` in pixels of that resolution (x first)."""

    hidden: Tensor
    flow: Tensor


class RaftInjection(NamedTuple):
    """What RAFT computes once per image pair, in the order RAFT computes it.

    Attributes:
        pyramid: the correlation pyramid, level l of shape ``(B·h·w, 1, h/2^l, w/2^l)``.
        context: the context features, ``relu`` of the context encoder's second part, ``(B, C, h, w)``.
        coords0: the pixel grid ``(B, 2, h, w)`` (x first), in the features' dtype, at least float32.
        hidden: ``tanh`` of the context encoder's first part: RAFT's initial hidden state.
        radius: the lookup radius of the model's correlation block.
    """

    pyramid: tuple[Tensor, ...]
    context: Tensor
    coords0: Tensor
    hidden: Tensor
    radius: int


def coords_grid(batch: int, height: int, width: int, *, dtype: torch.dtype, device: torch.device) -> Tensor:
    """The pixel grid ``(B, 2, H, W)``, channel 0 the column (x), channel 1 the row (y), in ``dtype`` (torchvision's
    ``make_coords_grid`` always returns float32, which breaks float64 models)."""
    rows, columns = torch.meshgrid(
        torch.arange(height, device=device), torch.arange(width, device=device), indexing="ij"
    )
    return torch.stack((columns, rows)).to(dtype)[None].repeat(batch, 1, 1, 1)


def correlation_pyramid(fmap1: Tensor, fmap2: Tensor, levels: int) -> tuple[Tensor, ...]:
    """All-pairs correlation ``⟨fmap1(p), fmap2(q)⟩ / √C`` as ``(B·h·w, 1, h, w)`` and ``levels − 1`` average-pooled
    levels (as torchvision's ``CorrBlock.build_pyramid``, returned instead of stored)."""
    if fmap1.shape != fmap2.shape:
        raise ValueError(f"feature maps of different shapes: {tuple(fmap1.shape)} and {tuple(fmap2.shape)}")
    batch, channels, h, w = fmap1.shape
    if min(h, w) < 2**levels:
        raise ValueError(
            f"feature maps of {h}×{w} are too small for {levels} pyramid levels: the images need H and W of at least "
            f"{8 * 2**levels}"
        )
    corr = torch.matmul(fmap1.view(batch, channels, h * w).transpose(1, 2), fmap2.view(batch, channels, h * w))
    corr = (corr / torch.sqrt(torch.tensor(channels))).reshape(batch * h * w, 1, h, w)
    pyramid = [corr]
    for _ in range(levels - 1):
        pyramid.append(F.avg_pool2d(pyramid[-1], kernel_size=2, stride=2))
    return tuple(pyramid)


def lookup(pyramid: tuple[Tensor, ...], coords: Tensor, radius: int) -> Tensor:
    """Correlation features ``(B, levels·(2r+1)², h, w)``: every level sampled bilinearly on the (2r+1)² window around
    ``coords`` (absolute, ``(B, 2, h, w)``), halved per level (as torchvision's ``CorrBlock.index_pyramid``, as a
    pure function of the pyramid)."""
    from torchvision.models.optical_flow._utils import grid_sample

    side = 2 * radius + 1
    offsets = torch.linspace(-radius, radius, side, dtype=coords.dtype, device=coords.device)
    delta = torch.stack(torch.meshgrid(offsets, offsets, indexing="ij"), dim=-1).view(1, side, side, 2)
    batch, _, h, w = coords.shape
    centroids = coords.permute(0, 2, 3, 1).reshape(batch * h * w, 1, 1, 2)
    sampled = []
    for level in pyramid:
        window = grid_sample(level, centroids + delta, align_corners=True, mode="bilinear")
        sampled.append(window.view(batch, h, w, -1))
        centroids = centroids / 2
    return torch.cat(sampled, dim=-1).permute(0, 3, 1, 2).contiguous()


def prepare_injection(raft: nn.Module, image1: Tensor, image2: Tensor) -> RaftInjection:
    """The injection of :func:`raft_update_block` for an image pair ``(B, 3, H, W)`` in [−1, 1] (H, W divisible by 8):
    features of both images, their correlation pyramid, the context (split into RAFT's initial hidden state and the
    context features) and the pixel grid, computed as ``RAFT.forward`` does before its updates."""
    model: Any = raft
    if image1.shape != image2.shape:
        raise ValueError(f"images of different shapes: {tuple(image1.shape)} and {tuple(image2.shape)}")
    batch, _, height, width = image1.shape
    if height % 8 or width % 8:
        raise ValueError(f"image height and width must be divisible by 8, got {height}×{width}")
    fmap1, fmap2 = torch.chunk(model.feature_encoder(torch.cat([image1, image2], dim=0)), chunks=2, dim=0)
    pyramid = correlation_pyramid(fmap1, fmap2, model.corr_block.num_levels)
    context_out = model.context_encoder(image1)
    hidden_size = model.update_block.hidden_state_size
    hidden, context = torch.split(context_out, [hidden_size, context_out.shape[1] - hidden_size], dim=1)
    # The grid (and so the flow state) is at least float32, as in RAFT: under bf16 autocast the features are bf16,
    # whose 8-bit mantissa cannot hold sub-pixel coordinates.
    grid_dtype = torch.promote_types(fmap1.dtype, torch.float32)
    coords0 = coords_grid(batch, height // 8, width // 8, dtype=grid_dtype, device=fmap1.device)
    return RaftInjection(pyramid, F.relu(context), coords0, torch.tanh(hidden), int(model.corr_block.radius))


def upsample_flow(raft: nn.Module, state: RaftState | tuple[Tensor, Tensor]) -> Tensor:
    """The full-resolution flow ``(B, 2, H, W)`` of a state: RAFT's convex upsampling with the mask predicted from
    the hidden state (bilinear ×8 for models without a mask predictor, such as ``raft_small``)."""
    from torchvision.models.optical_flow._utils import upsample_flow as convex_upsample

    model: Any = raft
    hidden, flow = state
    mask = None if model.mask_predictor is None else model.mask_predictor(hidden)
    return convex_upsample(flow, up_mask=mask)


class RaftUpdateBlock(nn.Module):
    """``f((h, flow), x) = (h', flow_c + Δ)`` with ``flow_c`` = flow (detached when ``detach_coords``), ``(h', Δ)`` =
    RAFT's update block on ``(h, context, lookup(pyramid, coords0 + flow_c), flow_c)``. Holds the whole RAFT model by
    reference (its state dict loads under ``raft.``); f uses its update block, :func:`prepare_injection` its encoders
    and :func:`upsample_flow` its mask predictor."""

    def __init__(self, raft: nn.Module, *, detach_coords: bool, h0: str) -> None:
        super().__init__()
        self.raft = raft
        self.detach_coords = detach_coords
        self.h0 = h0

    def forward(self, z: RaftState, x: RaftInjection) -> RaftState:
        hidden, flow = z
        if self.detach_coords:  # RAFT does not backpropagate through the lookup coordinates
            flow = flow.detach()
        corr = lookup(x.pyramid, x.coords0 + flow, x.radius)
        update: Any = self.raft.update_block
        hidden, delta = update(hidden, x.context, corr, flow)
        return RaftState(hidden, flow + delta)

    def initial_state(self, x: RaftInjection) -> RaftState:
        """RAFT's start: the tanh of the context's hidden part (``h0="tanh"``) or zeros (``"zeros"``, DEQ-Flow's), and
        zero flow."""
        hidden = x.hidden if self.h0 == "tanh" else torch.zeros_like(x.hidden)
        return RaftState(hidden, torch.zeros_like(x.coords0))

    def extra_repr(self) -> str:
        return f"detach_coords={self.detach_coords}, h0={self.h0!r}"


@register_adapter(RAFT_MODEL)
def raft_update_block(raft: nn.Module, *, detach_coords: bool = True, h0: str = "tanh") -> RaftUpdateBlock:
    """torchvision's RAFT (``raft_small()`` / ``raft_large()``, any weights) update operator as a DEQ block over the
    state ``(hidden, flow)``; the injection comes from :func:`prepare_injection`, the full-resolution flow of a state
    from :func:`upsample_flow`.

    Args:
        raft: a ``torchvision.models.optical_flow.RAFT``, held by reference.
        detach_coords: detach the flow before the lookup and before it enters the update block, as RAFT does
            between its updates (gradients then reach the flow only through the update's change Δ).
        h0: the initial hidden state: ``"tanh"`` (RAFT's) or ``"zeros"`` (DEQ-Flow's).

    At random initialisation RAFT's update has no fixed point in the flow (it drifts by a roughly constant amount
    per call), so equilibria need DEQ-trained weights; N applications from :meth:`RaftUpdateBlock.initial_state`
    reproduce ``raft(image1, image2, num_flow_updates=N)[-1]`` through :func:`upsample_flow`.

    Example::

        >>> import torch
        >>> from torchvision.models.optical_flow import raft_small
        >>> import adapters, implicit
        >>> raft = raft_small().eval()
        >>> image1, image2 = torch.rand(1, 3, 128, 128) * 2 - 1, torch.rand(1, 3, 128, 128) * 2 - 1
        >>> x = adapters.raft.prepare_injection(raft, image1, image2)
        >>> deq = implicit.make_implicit(adapters.raft_update_block(raft), max_iter=6, on_divergence="ignore")
        >>> adapters.raft.upsample_flow(raft, deq(x)).shape
        torch.Size([1, 2, 128, 128])
    """
    if h0 not in STARTS:
        raise ValueError(f"raft_update_block: h0={h0!r} is not one of {', '.join(map(repr, STARTS))}")
    for part in ("feature_encoder", "context_encoder", "corr_block", "update_block", "mask_predictor"):
        if not hasattr(raft, part):
            raise TypeError(f"raft_update_block: {type(raft).__name__} has no {part}: not a torchvision RAFT")
    return RaftUpdateBlock(raft, detach_coords=detach_coords, h0=h0)
