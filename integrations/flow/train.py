"""Training and evaluation of DEQ-Flow (and of torchvision's RAFT as the baseline) on the data of
:mod:`integrations.flow.data`.

RAFT's recipe (Teed and Deng, ECCV 2020, §4; kept by DEQ-Flow): AdamW (ε 1e-8, weight decay 1e-4), a one-cycle
learning rate with linear warm-up over 5 % and linear decay, gradient clipping at norm 1, the γ = 0.8 sequence loss
over the returned flows. A run is a deterministic function of its :class:`TrainConfig`: batch ``k`` is fixed by the
seed and ``k`` (a per-epoch permutation), so a resumed run continues exactly where the checkpoint left it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.models import optical_flow

from implicit import ImplicitInfo

from ..checkpoints import read_training_state, restore_training_state, save_training_state
from ..runs import RunConfig, progress_bar, save_history
from .data import AUGMENTATION_PRESETS, FlowAugmentation, flow_dataset, pad_to_multiple
from .metrics import FlowMetrics, sequence_loss
from .model import DEQFlow, raft_to_deq_flow

METHODS = ("deq", "raft")
MODELS = ("raft_small", "raft_large")
# raft_to_deq_flow's own keywords, passed through TrainConfig.implicit next to the engine options
CONVERSION_KEYWORDS = ("checkpoint_encoders", "h0", "eval_max_iter", "preset", "detach_coords")


@dataclass
class TrainConfig(RunConfig):
    """Everything that defines a training run (saved in its checkpoints).

    Attributes:
        method: ``"deq"`` (DEQ-Flow, :func:`~integrations.flow.raft_to_deq_flow`) or ``"raft"`` (torchvision's RAFT
            unrolled for ``updates`` updates with backpropagation through all of them: the baseline).
        model: ``"raft_small"`` or ``"raft_large"`` (random initialisation from ``seed``; see ``weights``).
        weights: a checkpoint or state-dict file to start from (e.g. torchvision's released RAFT weights saved with
            ``torch.save(raft_large(weights=...).state_dict(), path)``), or None.
        implicit: DEQ-Flow's options: engine options (``solver``, ``max_iter``, ``correction``, ...) and
            ``raft_to_deq_flow``'s keywords (``preset``, ``checkpoint_encoders``, ``h0``, ``eval_max_iter``).
        updates: RAFT's number of updates in training and evaluation (baseline).
        data, val_data: data-set specs of :func:`~integrations.flow.data.flow_dataset`; ``val_data`` defaults to
            ``data``'s validation split.
        size: training crop (and synthetic image size) ``(H, W)``.
        augment: a :class:`~integrations.flow.data.FlowAugmentation` preset name (``"chairs"``, ``"things"``,
            ``"sintel"``, ``"kitti"``), ``"auto"`` (the preset of the data set's name; none for synthetic data) or
            ``"none"``.
        val_pairs: validation pairs (the first ones of the validation split); ``val_every``: steps between
            validations (and checkpoints).
        jac_loss_weight: weight of the Jacobian regulariser when the options enable it (``jac_loss_probes``).
        freeze_bn: keep BatchNorm layers in eval mode while training (RAFT after its Chairs stage).
    """

    method: str = "deq"
    model: str = "raft_small"
    weights: str | None = None
    implicit: dict[str, Any] = field(default_factory=dict)
    updates: int = 12
    data: str = "synthetic"
    val_data: str | None = None
    size: tuple[int, int] = (128, 160)
    augment: str = "auto"
    batch_size: int = 4
    steps: int = 300
    lr: float = 4e-4
    weight_decay: float = 1e-4
    clip: float = 1.0
    gamma: float = 0.8
    jac_loss_weight: float = 1.0
    freeze_bn: bool = False
    val_every: int = 50
    val_pairs: int = 32
    seed: int = 0
    workers: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        self.size = (int(self.size[0]), int(self.size[1]))
        self.check_choice("method", METHODS)
        self.check_choice("model", MODELS)
        self.check_choice("augment", ("auto", "none", *AUGMENTATION_PRESETS), label="augmentation")
        self.check_at_least(1, "batch_size", "steps", "val_every", "updates")
        if self.method == "raft" and self.implicit:
            raise ValueError("TrainConfig: the RAFT baseline takes no DEQ options (implicit=...)")


# ------------------------------------------------------------------------------------------------ model
def build_model(config: TrainConfig) -> nn.Module:
    """The model of a run: DEQ-Flow converted from a fresh RAFT, or the RAFT itself (random init from the seed, then
    ``config.weights`` if given)."""
    torch.manual_seed(config.seed)
    raft = getattr(optical_flow, config.model)()
    if config.weights:
        raft.load_state_dict(_state_dict(torch.load(config.weights, map_location="cpu", weights_only=True)))
    if config.method == "raft":
        return raft
    return raft_to_deq_flow(raft, **config.implicit)


def _state_dict(loaded: dict[str, Any]) -> dict[str, Any]:
    """A model state dict, from a plain state dict or from a checkpoint of :func:`train`."""
    return loaded["model"] if "model" in loaded and isinstance(loaded["model"], dict) else loaded


def predict(
    model: nn.Module,
    image1: Tensor,
    image2: Tensor,
    *,
    updates: int = 12,
    budget: int | None = None,
    warm_start: Any = None,
    **overrides: Any,
) -> tuple[list[Tensor], ImplicitInfo | None]:
    """The model's flows and, for DEQ-Flow, the engine's info. ``budget``: solver iterations (DEQ-Flow, default its
    ``eval_max_iter`` in eval mode) or updates (RAFT, default ``updates``); ``overrides``: DEQ-Flow's engine options
    for this call (e.g. ``tol=0.0`` to run the whole budget)."""
    if isinstance(model, DEQFlow):
        if budget is not None:
            overrides["max_iter"] = budget
        flows, info = model(image1, image2, warm_start=warm_start, return_info=True, **overrides)
        return flows, info
    return model(image1, image2, num_flow_updates=updates if budget is None else budget), None


# ------------------------------------------------------------------------------------------------ evaluation
@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: Dataset,
    *,
    updates: int = 12,
    budget: int | None = None,
    batch_size: int = 4,
    pairs: int | None = None,
    device: str | torch.device = "cpu",
    **overrides: Any,
) -> dict[str, float]:
    """Flow metrics (:class:`~integrations.flow.metrics.FlowMetrics`) of the model in eval mode over the first
    ``pairs`` pairs of ``dataset`` at full resolution (images padded to multiples of 8, predictions cropped back),
    plus, for DEQ-Flow, the mean f-evaluations ``"nfe"`` and the mean and largest final residual; ``overrides`` are
    DEQ-Flow's engine options for these calls."""
    was_training = model.training
    model.eval()
    count = pairs_in(dataset) if pairs is None else min(pairs, pairs_in(dataset))
    metrics, nfe, residuals = FlowMetrics(), [], []
    try:
        for start in range(0, count, batch_size):
            items = [dataset[i] for i in range(start, min(start + batch_size, count))]
            if any(item[2] is None for item in items):
                raise ValueError("evaluate: the data set has no ground truth (a test split?)")
            image1, image2, flow, valid = (_stack([item[k] for item in items], device) for k in range(4))
            padded1, padded2, unpad = pad_to_multiple(image1, image2)
            flows, info = predict(model, padded1, padded2, updates=updates, budget=budget, **overrides)
            metrics.update(unpad(flows[-1]), flow, valid)
            if info is not None:
                nfe.append(float(info.forward.nfe))
                residuals.append(info.forward.residual.detach().float().cpu())
    finally:
        model.train(was_training)
    result = metrics.compute()
    if residuals:
        everything = torch.cat(residuals)
        result.update(nfe=sum(nfe) / len(nfe), residual=float(everything.mean()), residual_max=float(everything.max()))
    return result


def pairs_in(dataset: Dataset) -> int:
    """The number of pairs of a sized data set (map-style sets of this package and torchvision's all are)."""
    if not hasattr(dataset, "__len__"):
        raise TypeError(f"{type(dataset).__name__} has no length: flow data sets must be map-style")
    return len(dataset)


def _stack(tensors: Sequence[Tensor], device: str | torch.device) -> Tensor:
    """Items of one batch; images of different sizes (real data) must come one at a time."""
    if len({tuple(t.shape) for t in tensors}) > 1:
        raise ValueError("evaluate: pairs of different sizes in one batch: use batch_size=1 for this data set")
    return torch.stack(list(tensors)).to(device)


# ------------------------------------------------------------------------------------------------ data order
class StepBatches(Sampler[list[int]]):
    """The batches of steps ``start, start + 1, …`` of a run: step k takes positions ``kB … kB + B − 1`` of the
    concatenated per-epoch permutations of the data set (epoch e's from a generator seeded with ``(seed, e)``), so a
    run resumed at step k draws exactly the batches it would have drawn."""

    def __init__(self, length: int, batch_size: int, *, seed: int, start: int, stop: int) -> None:
        if length < batch_size:
            raise ValueError(f"the training set has {length} pairs, fewer than one batch of {batch_size}")
        self.length, self.batch_size, self.seed, self.start, self.stop = length, batch_size, seed, start, stop

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def __iter__(self) -> Iterator[list[int]]:
        epoch, order = -1, torch.empty(0, dtype=torch.long)
        for step in range(self.start, self.stop):
            batch = []
            for position in range(step * self.batch_size, (step + 1) * self.batch_size):
                if position // self.length != epoch:
                    epoch = position // self.length
                    generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
                    order = torch.randperm(self.length, generator=generator)
                batch.append(int(order[position % self.length]))
            yield batch


class _Drawn(Dataset):
    """A training set whose item ``i`` of draw ``t`` (the t-th pair the run sees) is augmented with a generator
    seeded by ``(seed, t)``: reproducible however the steps are split between runs."""

    def __init__(self, dataset: Dataset, augment: FlowAugmentation | None, seed: int) -> None:
        self.dataset, self.augment, self.seed = dataset, augment, seed

    def __len__(self) -> int:
        return pairs_in(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> tuple[Tensor, ...]:
        index, draw = key
        item = self.dataset[index]
        if self.augment is not None:
            item = self.augment(item, torch.Generator().manual_seed((self.seed * 1_000_003 + draw) % 2**63))
        return tuple(item)


class _DrawBatches(Sampler[list[tuple[int, int]]]):
    """:class:`StepBatches` with each index paired with its draw number."""

    def __init__(self, batches: StepBatches) -> None:
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        size = self.batches.batch_size
        for step, batch in enumerate(self.batches, start=self.batches.start):
            yield [(index, step * size + i) for i, index in enumerate(batch)]


def training_data(config: TrainConfig) -> tuple[Dataset, Dataset]:
    """The training set (with the run's augmentation) and the validation set of ``config``."""
    name = config.data.partition(":")[0].split("-")[0]
    preset = (name if name in AUGMENTATION_PRESETS else None) if config.augment == "auto" else config.augment
    augment = None if preset in (None, "none") else FlowAugmentation.preset(preset, crop_size=config.size)
    train_set = flow_dataset(config.data, split="train", size=config.size)  # synthetic: 100 000 pairs per epoch
    val_set = flow_dataset(config.val_data or config.data, split="val", size=config.size, length=None)
    return _Drawn(train_set, augment, config.seed), val_set


# ------------------------------------------------------------------------------------------------ training
@dataclass
class Run:
    """A training run's state: what a checkpoint holds."""

    config: TrainConfig
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    step: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    validations: list[dict[str, float]] = field(default_factory=list)

    @classmethod
    def start(cls, config: TrainConfig) -> Run:
        model = build_model(config).to(config.device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay, eps=1e-8)
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer,
            max_lr=config.lr,
            total_steps=config.steps + 100,  # RAFT's schedule: the decay ends 100 steps after the run
            pct_start=0.05,
            cycle_momentum=False,
            anneal_strategy="linear",
        )
        return cls(config, model, optimizer, scheduler)

    def save(self, path: str | Path) -> Path:
        """Model (RAFT's state dict), optimiser, scheduler, step, histories and random states."""
        return save_training_state(
            path,
            self.model,
            self.optimizer,
            self.scheduler,
            config=self.config.to_dict(),
            step=self.step,
            history=self.history,
            validations=self.validations,
        )

    @classmethod
    def load(cls, path: str | Path, **changes: Any) -> Run:
        """A run resumed from a checkpoint; ``changes`` replace config fields (e.g. ``steps`` to extend it,
        ``device``)."""
        state = read_training_state(path)
        run = cls.start(TrainConfig.from_dict({**state["config"], **changes}))
        restore_training_state(
            state, run.model, run.optimizer, run.scheduler, step=state["step"], rescheduled="steps" in changes
        )
        run.step, run.history, run.validations = state["step"], state["history"], state["validations"]
        return run

    def validate(self, val_set: Dataset) -> dict[str, float]:
        c = self.config
        result = evaluate(
            self.model, val_set, updates=c.updates, batch_size=c.batch_size, pairs=c.val_pairs, device=c.device
        )
        self.validations.append({"step": float(self.step), **result})
        return result


def train(
    config_or_run: TrainConfig | Run,
    *,
    out: str | Path | None = None,
    progress: bool = True,
    stop_at: int | None = None,
) -> Run:
    """Train (or continue) a run to ``config.steps`` (or ``stop_at``), validating every ``val_every`` steps and at
    the end, and saving ``out/checkpoint.pt`` at each validation when ``out`` is given."""
    run = Run.start(config_or_run) if isinstance(config_or_run, TrainConfig) else config_or_run
    c, model = run.config, run.model
    stop = c.steps if stop_at is None else min(stop_at, c.steps)
    train_set, val_set = training_data(c)
    batches = StepBatches(pairs_in(train_set), c.batch_size, seed=c.seed, start=run.step, stop=stop)
    loader = DataLoader(train_set, batch_sampler=_DrawBatches(batches), num_workers=c.workers)
    bar = progress_bar(progress, initial=run.step, total=c.steps)
    for image1, image2, flow, valid in loader:
        model.train()
        if c.freeze_bn:
            for module in model.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        started = time.perf_counter()
        image1, image2, flow, valid = (t.to(c.device) for t in (image1, image2, flow, valid))
        flows, info = predict(model, image1, image2, updates=c.updates)
        loss = sequence_loss(flows, flow, valid, gamma=c.gamma)
        total = loss if info is None or info.jac_loss is None else loss + c.jac_loss_weight * info.jac_loss
        run.optimizer.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), c.clip)
        run.optimizer.step()
        run.scheduler.step()
        run.step += 1
        record = {"step": float(run.step), "loss": float(loss.detach()), "seconds": time.perf_counter() - started}
        if info is not None:
            record.update(nfe=float(info.forward.nfe), residual=float(info.forward.residual.mean()))
        run.history.append(record)
        if run.step % c.val_every == 0 or run.step == stop:
            validation = run.validate(val_set)
            if out is not None:
                run.save(Path(out) / "checkpoint.pt")
            _postfix(bar, record, validation)
        else:
            _postfix(bar, record, None)
        bar.update(1)
    bar.close()
    return run


def _postfix(bar: Any, record: dict[str, float], validation: dict[str, float] | None) -> None:
    shown = {"loss": f"{record['loss']:.3f}"}
    if "nfe" in record:
        shown["res"] = f"{record['residual']:.1e}"
    if validation is not None:
        shown["val_epe"] = f"{validation['epe']:.3f}"
    bar.set_postfix(shown, refresh=False)


def budget_table(
    model: nn.Module,
    dataset: Dataset,
    *,
    factors: Sequence[float],
    pairs: int,
    batch_size: int,
    updates: int,
    device: str | torch.device = "cpu",
    **overrides: Any,
) -> list[dict[str, float]]:
    """Validation metrics at test-time budgets ``factor × the training budget`` (DEQ-Flow: solver iterations,
    ``max_iter``; RAFT: ``updates``), one row per factor; ``overrides``: DEQ-Flow's engine options (``tol=0.0``
    spends every budget in full instead of stopping at the tolerance)."""
    base = model.implicit_options.max_iter if isinstance(model, DEQFlow) else updates
    rows = []
    for factor in factors:
        budget = max(1, math.ceil(factor * base))
        result = evaluate(
            model,
            dataset,
            updates=updates,
            budget=budget,
            batch_size=batch_size,
            pairs=pairs,
            device=device,
            **overrides,
        )
        rows.append({"factor": float(factor), "budget": float(budget), **result})
    return rows


def write_history(run: Run, path: str | Path) -> Path:
    """The run's per-step records and validations as JSON."""
    return save_history(path, run.config, history=run.history, validations=run.validations)
