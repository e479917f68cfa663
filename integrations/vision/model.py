"""A timm HRNet classifier whose stage is a multiscale deep equilibrium (Bai, Koltun and Kolter, "Multiscale Deep
Equilibrium Models", NeurIPS 2020).

HRNet (Wang et al., TPAMI 2020) keeps parallel feature maps at several resolutions and refines them with stages of
stacked ``HighResolutionModule``\\ s. MDEQ replaces the stacked modules by the equilibrium of one weight-tied
multiscale block, solved for all resolutions at once. :func:`hrnet_to_mdeq` converts a timm HRNet: the stem, the
earlier stages and the transitions up to the chosen stage are the timm model's own modules (by reference), the
chosen stage becomes one implicit layer over :func:`adapters.hrnet_stage_block` (its convolutions shared with timm's
stage; its BatchNorms become GroupNorms, so no statistic inside f depends on the batch or changes during a solve), and
a classification head reads the equilibrium's branches. :func:`hrnet_classifier` builds the same classifier with
timm's stacked stage as it is (the baseline).
"""

from __future__ import annotations

from typing import Any, cast

import timm
import torch
from torch import Tensor, nn

from adapters.hrnet import HRNetStageBlock, hrnet_stage_block
from implicit import ImplicitInfo, ImplicitModule, ImplicitOptions
from implicit.options import check_number

STAGES = ("stage2", "stage3", "stage4")
HEADS = ("light", "timm")
# What the input is divided by at the lowest resolution of each stage (stem 4, then ×2 per new branch).
STAGE_STRIDES = {"stage2": 8, "stage3": 16, "stage4": 32}

# The defaults of a converted model where the caller sets nothing: Anderson with MDEQ's CIFAR budget (18), a relative
# tolerance of 1e-3 and the engine's phantom gradient (5 damped steps, τ = 0.5): training memory independent of the
# budget.
DEFAULTS: dict[str, Any] = {"solver": "anderson", "max_iter": 18, "tol": 1e-3, "backward": "phantom"}


class LightHead(nn.Module):
    """Per branch a 1×1 convolution to ``width`` channels and a ReLU, global average pooling, the branches
    concatenated, a linear classifier. Input: the branches ``(B, Cᵢ, Hᵢ, Wᵢ)``; output ``(B, num_classes)``."""

    def __init__(self, channels: list[int], num_classes: int, *, width: int = 64, **factory: Any) -> None:
        super().__init__()
        self.reduce = nn.ModuleList(nn.Conv2d(c, width, 1, **factory) for c in channels)
        self.classifier = nn.Linear(width * len(channels), num_classes, **factory)

    def forward(self, z: list[Tensor]) -> Tensor:
        pooled = [torch.relu(conv(zi)).mean((2, 3)) for conv, zi in zip(self.reduce, z)]
        return self.classifier(torch.cat(pooled, dim=1))


class TimmHead(nn.Module):
    """timm's HRNet classification head on the four branches of stage 4: ``incre_modules`` (Bottlenecks widening
    each branch), ``downsamp_modules`` (stride-2 merge from high to low resolution), ``final_layer`` (1×1 to
    ``num_features``), average pooling and a new linear classifier of ``num_classes`` outputs. All but the classifier
    are the timm model's modules, by reference."""

    def __init__(self, net: nn.Module, num_classes: int, **factory: Any) -> None:
        super().__init__()
        self.incre_modules = cast(nn.ModuleList, net.incre_modules)
        self.downsamp_modules = cast(nn.ModuleList, net.downsamp_modules)
        self.final_layer = cast(nn.Module, net.final_layer)
        self.classifier = nn.Linear(cast(int, net.num_features), num_classes, **factory)

    def forward(self, z: list[Tensor]) -> Tensor:
        y = self.incre_modules[0](z[0])
        for i in range(1, len(self.incre_modules)):
            y = self.incre_modules[i](z[i]) + self.downsamp_modules[i - 1](y)
        return self.classifier(self.final_layer(y).mean((2, 3)))


class HRNetClassifier(nn.Module):
    """timm's HRNet up to ``stage`` (stem, ``layer1``, earlier stages and transitions: the timm model's modules under
    their timm names, by reference) and a classification head. Here the stage is timm's stacked stage as it is (the
    baseline); :class:`MDEQClassifier` solves an equilibrium instead.

    Input: images ``(B, C, H, W)``, H and W multiples of the stage's stride (32 for stage 4: 8×8 digits must be
    upsampled, or their lowest-resolution branch has no pixel). Output: logits ``(B, num_classes)``.
    """

    conv1: nn.Module
    bn1: nn.Module
    act1: nn.Module
    conv2: nn.Module
    bn2: nn.Module
    act2: nn.Module
    layer1: nn.Module
    transition1: nn.ModuleList

    def __init__(self, net: nn.Module, *, stage: str, num_classes: int, head: str, stacked: bool = True) -> None:
        super().__init__()
        self.stage_name = stage
        self.stride = STAGE_STRIDES[stage]
        index = STAGES.index(stage) + 2  # stage2 → 2
        for name in ("conv1", "bn1", "act1", "conv2", "bn2", "act2", "layer1", "transition1"):
            setattr(self, name, getattr(net, name))
        for k in range(2, index):
            setattr(self, f"stage{k}", getattr(net, f"stage{k}"))
            setattr(self, f"transition{k}", getattr(net, f"transition{k}"))
        self._earlier = index - 2  # full stages before the chosen one
        weight = cast(Tensor, cast(nn.Module, net.conv1).weight)
        factory: dict[str, Any] = {"device": weight.device, "dtype": weight.dtype}
        self.channels: list[int] = list(getattr(net, stage)[-1].num_in_chs)
        if head == "light":
            self.head: nn.Module = LightHead(self.channels, num_classes, **factory)
        else:
            self.head = TimmHead(net, num_classes, **factory)
        if stacked:  # under its timm name: the baseline's state dict keys are timm's
            setattr(self, stage, getattr(net, stage))

    def injection(self, images: Tensor) -> list[Tensor]:
        """What the chosen stage receives: the stem, ``layer1``, the earlier stages and the transitions applied to
        ``images``. Returns the branches ``(B, Cᵢ, H / 2^(i+2), W / 2^(i+2))``, highest resolution first."""
        if images.dim() != 4:
            raise ValueError(f"{type(self).__name__}: images must be (B, C, H, W), got shape {tuple(images.shape)}")
        h, w = images.shape[-2:]
        if h % self.stride or w % self.stride:
            raise ValueError(
                f"{type(self).__name__}: images of {h}×{w}; {self.stage_name} needs sides that are multiples of "
                f"{self.stride} (its lowest resolution is 1/{self.stride}); upsample them (8×8 digits → 32×32)"
            )
        x = self.act1(self.bn1(self.conv1(images)))
        x = self.layer1(self.act2(self.bn2(self.conv2(x))))
        branches = [t(x) for t in self.transition1]
        for k in range(2, 2 + self._earlier):
            y = getattr(self, f"stage{k}")(branches)
            transition = getattr(self, f"transition{k}")
            branches = [y[i] if isinstance(t, nn.Identity) else t(y[-1]) for i, t in enumerate(transition)]
        return branches

    def forward(self, images: Tensor) -> Tensor:
        """Logits ``(B, num_classes)`` of ``images`` ``(B, C, H, W)``."""
        stage = getattr(self, self.stage_name)
        return self.head(stage(self.injection(images)))  # a fresh list: timm's stage overwrites it


class MDEQClassifier(HRNetClassifier):
    """An HRNet classifier whose ``stage`` is the equilibrium of one weight-tied multiscale block (built by
    :func:`hrnet_to_mdeq`, see there).

    Attributes:
        deq: the implicit layer over :class:`adapters.hrnet.HRNetStageBlock` (state: the stage's branches).
        pretrain_steps, pretrain_depth: MDEQ's unrolled pre-training: the first ``pretrain_steps`` training calls
            (training mode with gradients recorded) apply the block ``pretrain_depth`` times from z = 0 and
            backpropagate through them, without a solver.
        steps_seen: training calls so far (saved in the state dict, so a resumed run continues the schedule).
    """

    def __init__(
        self,
        net: nn.Module,
        *,
        stage: str,
        num_classes: int,
        head: str,
        pretrain_steps: int,
        pretrain_depth: int,
        options: ImplicitOptions,
    ) -> None:
        super().__init__(net, stage=stage, num_classes=num_classes, head=head, stacked=False)
        self.deq = ImplicitModule(hrnet_stage_block(getattr(net, stage)), options)
        self.pretrain_steps = pretrain_steps
        self.pretrain_depth = pretrain_depth
        self.steps_seen = 0

    # ------------------------------------------------------------------ options and schedule
    @property
    def implicit_options(self) -> ImplicitOptions:
        """The engine options of the solve (validated)."""
        return self.deq.implicit_options

    def configure(self, **options: Any) -> MDEQClassifier:
        """Change the engine options (as :meth:`implicit.ImplicitMixin.configure`). Returns the model."""
        self.deq.configure(**options)
        return self

    @property
    def pretraining(self) -> bool:
        """Whether the next training call is an unrolled pre-training step."""
        return self.steps_seen < self.pretrain_steps

    def get_extra_state(self) -> dict[str, int]:
        return {"steps_seen": self.steps_seen}

    def set_extra_state(self, state: dict[str, int]) -> None:
        self.steps_seen = int(state["steps_seen"])

    # ------------------------------------------------------------------ forward
    def unrolled(self, x: list[Tensor]) -> list[Tensor]:
        """The block applied ``pretrain_depth`` times from z = 0 (pre-training; no solver)."""
        block = cast(HRNetStageBlock, self.deq.block)
        z = block.initial_state(x)
        for _ in range(self.pretrain_depth):
            z = block(z, x)
        return z

    def forward(  # type: ignore[override]
        self, images: Tensor, *, z0: list[Tensor] | None = None, return_info: bool = False, **overrides: Any
    ) -> Tensor | tuple[Tensor, ImplicitInfo | None]:
        """Logits ``(B, num_classes)`` of ``images`` ``(B, C, H, W)``.

        Args:
            z0: the solver's start (default zeros at every branch), e.g. ``info.state`` of an earlier call.
            return_info: also return the engine's :class:`~implicit.ImplicitInfo` (``info.forward``: per-sample
                residuals ``abs``/``rel``, f-evaluations ``nstep``, ``converged``; ``info.state``: the branches at
                equilibrium); ``None`` for an unrolled pre-training step.
            **overrides: engine options for this call (``max_iter``, ``tol``, ...).
        """
        x = self.injection(images)
        info: ImplicitInfo | None = None
        if self.training and torch.is_grad_enabled():
            pretrain = self.pretraining
            self.steps_seen += 1
        else:
            pretrain = False
        if pretrain:
            z = self.unrolled(x)
        else:
            out, info = self.deq(x, z0, return_info=True, **overrides)
            z = out[-1] if isinstance(out, list) and isinstance(out[0], list) else out  # with correction: z*
        logits = self.head(z)
        return (logits, info) if return_info else logits

    def extra_repr(self) -> str:
        o = self.implicit_options
        return (
            f"stage={self.stage_name!r}, solver={o.solver!r}, max_iter={o.max_iter}, tol={o.tol:g}, "
            f"backward={o.backward!r}, pretrain_steps={self.pretrain_steps}"
        )


def _network(model_or_name: nn.Module | str, caller: str) -> nn.Module:
    if isinstance(model_or_name, str):
        try:
            model_or_name = timm.create_model(model_or_name, pretrained=False)
        except RuntimeError as error:  # timm: "Unknown model (...)"
            raise ValueError(f"{caller}: {error}") from None
    if not isinstance(model_or_name, nn.Module):
        raise TypeError(f"{caller}: expected a timm HRNet or its name, got {type(model_or_name).__name__}")
    missing = [p for p in ("conv1", "layer1", "transition1", "stage2", "stage4") if not hasattr(model_or_name, p)]
    if missing:
        raise TypeError(f"{caller}: {type(model_or_name).__name__} has no {missing[0]}: not a timm HRNet")
    return model_or_name


def _check(net: nn.Module, stage: str, num_classes: int, head: str, caller: str) -> None:
    if stage not in STAGES:
        raise ValueError(f"{caller}: unknown stage {stage!r}; valid: {', '.join(map(repr, STAGES))}")
    if head not in HEADS:
        raise ValueError(f"{caller}: unknown head {head!r}; valid: {', '.join(map(repr, HEADS))}")
    if not (isinstance(num_classes, int) and not isinstance(num_classes, bool) and num_classes >= 1):
        raise ValueError(f"{caller}: num_classes must be an integer ≥ 1, got {num_classes!r}")
    if head == "timm":
        if stage != "stage4":
            raise ValueError(f"{caller}: head='timm' reads the four branches of stage 4; use stage='stage4'")
        if getattr(net, "incre_modules", None) is None or getattr(net, "downsamp_modules", None) is None:
            raise ValueError(f"{caller}: head='timm' needs a timm HRNet built with its classification head")


def hrnet_to_mdeq(
    model_or_name: nn.Module | str,
    *,
    num_classes: int,
    stage: str = "stage4",
    pretrain_steps: int = 0,
    pretrain_depth: int = 5,
    head: str = "light",
    **implicit_options: Any,
) -> MDEQClassifier:
    """Convert a timm HRNet (``timm.create_model("hrnet_w18_small")``, any variant and weights) into a multiscale
    DEQ classifier.

    Args:
        model_or_name: the timm model, or its name (created with ``pretrained=False``). Its modules up to ``stage``
            and the stage's convolutions are shared by reference: training the classifier trains them. The model
            itself is not modified (the stage's BatchNorms are replaced in a copy of its module tree only).
        num_classes: outputs of the new classifier.
        stage: ``"stage2"``, ``"stage3"`` or ``"stage4"`` (default): the stage whose stacked modules become one
            weight-tied block (:func:`adapters.hrnet_stage_block`: BatchNorm → GroupNorm, a GroupNorm on every
            branch output, the injection — what the transitions feed the stage — added at every scale). Later
            stages are not used.
        pretrain_steps: MDEQ's unrolled pre-training: the first N training calls apply the block ``pretrain_depth``
            times (no solver) and backpropagate through them.
        pretrain_depth: layers of the unrolled pre-training (MDEQ: 5 to 10).
        head: ``"light"`` (default; per-branch 1×1 conv to 64 channels, pooled, linear: ~17 k parameters for 10
            classes on hrnet_w18_small) or ``"timm"`` (timm's own head by reference, ~11.7 M parameters, stage 4
            only, with a new classifier).
        **implicit_options: any engine option (:class:`implicit.ImplicitOptions`: ``solver``, ``max_iter``, ``tol``,
            ``backward``, ``jac_loss_probes``, ...). Defaults: Anderson, 18 iterations, relative tolerance 1e-3,
            phantom gradient.

    Example::

        >>> import timm, torch
        >>> model = hrnet_to_mdeq(timm.create_model("hrnet_w18_small"), num_classes=10, max_iter=8)
        >>> model(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """
    net = _network(model_or_name, "hrnet_to_mdeq")
    _check(net, stage, num_classes, head, "hrnet_to_mdeq")
    check_number("pretrain_steps of hrnet_to_mdeq", pretrain_steps, minimum=0, integer=True)
    check_number("pretrain_depth of hrnet_to_mdeq", pretrain_depth, minimum=1, integer=True)
    options = ImplicitOptions().replace(**{**DEFAULTS, **implicit_options})
    return MDEQClassifier(
        net,
        stage=stage,
        num_classes=num_classes,
        head=head,
        pretrain_steps=pretrain_steps,
        pretrain_depth=pretrain_depth,
        options=options,
    )


def hrnet_classifier(
    model_or_name: nn.Module | str, *, num_classes: int, stage: str = "stage4", head: str = "light"
) -> HRNetClassifier:
    """The same classifier as :func:`hrnet_to_mdeq` with timm's stacked ``stage`` as it is (BatchNorm, no
    equilibrium): the baseline. Every module but the new head is the timm model's, by reference."""
    net = _network(model_or_name, "hrnet_classifier")
    _check(net, stage, num_classes, head, "hrnet_classifier")
    return HRNetClassifier(net, stage=stage, num_classes=num_classes, head=head)
