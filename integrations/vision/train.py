"""Training and evaluation of the multiscale DEQ classifier (and of the stacked-stage baseline).

Recipe: AdamW, a one-cycle cosine learning rate (10 % warm-up), gradient clipping at norm 1, cross-entropy, plus
``jac_loss_weight × info.jac_loss`` when the options enable Jacobian regularisation (Bai, Koltun and Kolter,
"Stabilizing Equilibrium Models by Jacobian Regularization", ICML 2021). Optional augmentation: random translations
by up to ``shift`` pixels (zero padding). A run is a deterministic function of its :class:`TrainConfig`: epoch
``e``'s order and step ``k``'s shifts come from generators seeded with ``(seed, e)`` and ``(seed, k)``, and the
checkpoint holds the random states, so a resumed run continues as the uninterrupted one would.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from implicit import ImplicitInfo

from ..checkpoints import read_training_state, restore_training_state, save_training_state
from ..runs import RunConfig, progress_bar, save_history
from .data import ImageSet, image_dataset
from .model import HEADS, STAGES, MDEQClassifier, hrnet_classifier, hrnet_to_mdeq

METHODS = ("mdeq", "stacked")


@dataclass
class TrainConfig(RunConfig):
    """Everything that defines a training run (saved in its checkpoints).

    Attributes:
        method: ``"mdeq"`` (:func:`~integrations.vision.hrnet_to_mdeq`) or ``"stacked"`` (timm's stage as it is,
            :func:`~integrations.vision.hrnet_classifier`: the baseline).
        model: a timm HRNet name (random initialisation from ``seed``; no weights are downloaded).
        stage, head, pretrain_steps, pretrain_depth: as :func:`~integrations.vision.hrnet_to_mdeq`.
        implicit: engine options of the MDEQ (``solver``, ``max_iter``, ``tol``, ``jac_loss_probes``, ...).
        data: ``"digits"`` or ``"cifar10:PATH"``; ``size``: the image side the model sees.
        shift: augmentation, random translations of up to ``shift`` pixels (0: none).
        jac_loss_weight: weight of the Jacobian regulariser when ``implicit`` enables it.
    """

    method: str = "mdeq"
    model: str = "hrnet_w18_small"
    stage: str = "stage4"
    head: str = "light"
    implicit: dict[str, Any] = field(default_factory=dict)
    pretrain_steps: int = 0
    pretrain_depth: int = 5
    data: str = "digits"
    size: int = 32
    shift: int = 0
    batch_size: int = 32
    epochs: int = 8
    lr: float = 2e-3
    weight_decay: float = 1e-4
    clip: float = 1.0
    jac_loss_weight: float = 0.4
    eval_batch_size: int = 256
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        self.check_choice("method", METHODS)
        self.check_choice("stage", STAGES)
        self.check_choice("head", HEADS)
        self.check_at_least(1, "batch_size", "epochs", "size", "eval_batch_size")
        self.check_at_least(0, "shift")
        if self.method == "stacked" and (self.implicit or self.pretrain_steps):
            raise ValueError("TrainConfig: the stacked baseline takes no DEQ options (implicit, pretrain_steps)")


def build_model(config: TrainConfig, num_classes: int = 10) -> nn.Module:
    """The run's classifier from a fresh timm model (random initialisation seeded by ``config.seed``)."""
    torch.manual_seed(config.seed)
    net = timm.create_model(config.model, pretrained=False)
    if config.method == "stacked":
        return hrnet_classifier(net, num_classes=num_classes, stage=config.stage, head=config.head)
    return hrnet_to_mdeq(
        net,
        num_classes=num_classes,
        stage=config.stage,
        head=config.head,
        pretrain_steps=config.pretrain_steps,
        pretrain_depth=config.pretrain_depth,
        **config.implicit,
    )


def predict(model: nn.Module, images: Tensor, **overrides: Any) -> tuple[Tensor, ImplicitInfo | None]:
    """Logits and, for the MDEQ, the engine's info (``overrides``: engine options for this call)."""
    if isinstance(model, MDEQClassifier):
        logits, info = model(images, return_info=True, **overrides)
        return logits, info
    if overrides:
        raise ValueError(f"engine options {sorted(overrides)} given for a model without an equilibrium")
    return model(images), None


# ------------------------------------------------------------------------------------------------ evaluation
@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: ImageSet,
    *,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    limit: int | None = None,
    **overrides: Any,
) -> tuple[dict[str, float], dict[str, Tensor]]:
    """The model in eval mode on (the first ``limit`` examples of) ``dataset``.

    Returns:
        ``(metrics, per_example)``: ``accuracy``, ``loss`` and, for the MDEQ, ``nfe`` (f-evaluations per example,
        mean), ``residual`` / ``residual_median`` / ``residual_max`` (relative residual of the returned state) and
        ``converged`` (fraction); per example ``correct`` ``(N,)`` and, for the MDEQ, ``residual``, ``abs_residual``
        and ``nfe``.
    """
    was_training = model.training
    model.eval()
    count = len(dataset) if limit is None else min(limit, len(dataset))
    parts: dict[str, list[Tensor]] = {"correct": [], "loss": [], "residual": [], "abs_residual": [], "nfe": []}
    converged: list[Tensor] = []
    try:
        for start in range(0, count, batch_size):
            images, labels = dataset.batch(torch.arange(start, min(start + batch_size, count)))
            images, labels = images.to(device, _dtype(model)), labels.to(device)
            logits, info = predict(model, images, **overrides)
            parts["correct"].append((logits.argmax(1) == labels).cpu())
            parts["loss"].append(F.cross_entropy(logits.float(), labels, reduction="none").cpu())
            if info is not None:
                parts["residual"].append(info.forward.rel.float().cpu())
                parts["abs_residual"].append(info.forward.abs.float().cpu())
                parts["nfe"].append(info.forward.nstep.float().cpu())
                converged.append(info.forward.converged.cpu())
    finally:
        model.train(was_training)
    per_example = {name: torch.cat(values) for name, values in parts.items() if values}
    metrics = {
        "accuracy": float(per_example["correct"].float().mean()),
        "loss": float(per_example.pop("loss").mean()),
    }
    if "residual" in per_example:
        residual = per_example["residual"]
        metrics.update(
            nfe=float(per_example["nfe"].mean()),
            residual=float(residual.mean()),
            residual_median=float(residual.median()),
            residual_max=float(residual.max()),
            converged=float(torch.cat(converged).float().mean()),
        )
    return metrics, per_example


def _dtype(model: nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


# ------------------------------------------------------------------------------------------------ training
@dataclass
class Run:
    """A training run's state: what a checkpoint holds. ``history``: one record per step (loss, seconds, NFE,
    residual); ``epochs``: one per epoch (training loss and accuracy, test metrics, residual statistics)."""

    config: TrainConfig
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    steps_per_epoch: int
    epoch: int = 0
    step: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    epochs: list[dict[str, float]] = field(default_factory=list)

    @classmethod
    def start(cls, config: TrainConfig, train_set: ImageSet | None = None) -> Run:
        train_set = train_set or image_dataset(config.data, split="train", size=config.size)
        model = build_model(config, train_set.num_classes).to(config.device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        steps_per_epoch = len(train_set) // config.batch_size
        if steps_per_epoch < 1:
            raise ValueError(
                f"the training set has {len(train_set)} images, fewer than one batch of {config.batch_size}"
            )
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=config.lr, total_steps=config.epochs * steps_per_epoch, pct_start=0.1
        )
        return cls(config, model, optimizer, scheduler, steps_per_epoch)

    def save(self, path: str | Path) -> Path:
        """Model, optimiser, scheduler, position, histories and random states (written atomically)."""
        return save_training_state(
            path,
            self.model,
            self.optimizer,
            self.scheduler,
            config=self.config.to_dict(),
            epoch=self.epoch,
            step=self.step,
            history=self.history,
            epochs=self.epochs,
        )

    @classmethod
    def load(cls, path: str | Path, *, train_set: ImageSet | None = None, **changes: Any) -> Run:
        """A run resumed from a checkpoint of :func:`train`; ``changes`` replace config fields (``device``, or
        ``epochs`` to extend it: the learning-rate schedule is then rebuilt over the new length); ``train_set``: the
        training set the run used when it was not the config's."""
        state = read_training_state(path)
        run = cls.start(TrainConfig.from_dict({**state["config"], **changes}), train_set)
        restore_training_state(
            state, run.model, run.optimizer, run.scheduler, step=state["step"], rescheduled="epochs" in changes
        )
        run.epoch, run.step, run.history, run.epochs = state["epoch"], state["step"], state["history"], state["epochs"]
        return run


def load_model(path: str | Path, *, device: str = "cpu") -> tuple[nn.Module, TrainConfig]:
    """The trained model of a checkpoint of :func:`train` and its config."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    state = torch.load(path, map_location="cpu", weights_only=False)
    if not (isinstance(state, dict) and "config" in state and "model" in state):
        raise ValueError(f"{path} is not a checkpoint of python -m integrations.vision train")
    config = TrainConfig.from_dict({**state["config"], "device": device})
    model = build_model(config).to(device)
    model.load_state_dict(state["model"])
    return model.eval(), config


def translate(images: Tensor, shift: int, generator: torch.Generator) -> Tensor:
    """Each image ``(B, C, H, W)`` moved by its own random offset in ``[−shift, shift]²`` pixels (zero padding of
    the normalised image)."""
    if shift == 0:
        return images
    b, _, h, w = images.shape
    offsets = torch.randint(0, 2 * shift + 1, (b, 2), generator=generator)
    padded = F.pad(images, (shift, shift, shift, shift))
    return torch.stack([padded[i, :, dy : dy + h, dx : dx + w] for i, (dy, dx) in enumerate(offsets.tolist())])


def train(
    config_or_run: TrainConfig | Run,
    *,
    out: str | Path | None = None,
    progress: bool = True,
    report: bool | None = None,
    stop_at_epoch: int | None = None,
    train_set: ImageSet | None = None,
    test_set: ImageSet | None = None,
) -> Run:
    """Train (or continue) a run to ``config.epochs`` (or ``stop_at_epoch``), evaluating on the test split after
    every epoch and saving ``out/checkpoint.pt`` then when ``out`` is given. ``progress``: a tqdm bar per step;
    ``report``: print a line per epoch (:func:`describe_epoch`; default: with the bar). ``train_set`` /
    ``test_set`` replace the config's data (e.g. a subset, for a quick check)."""
    c = config_or_run if isinstance(config_or_run, TrainConfig) else config_or_run.config
    train_set = train_set or image_dataset(c.data, split="train", size=c.size)
    test_set = test_set or image_dataset(c.data, split="test", size=c.size)
    run = Run.start(c, train_set) if isinstance(config_or_run, TrainConfig) else config_or_run
    model, dtype = run.model, _dtype(run.model)
    if len(train_set) // c.batch_size != run.steps_per_epoch:
        raise ValueError(
            f"the run was started with {run.steps_per_epoch} steps per epoch but this training set has "
            f"{len(train_set) // c.batch_size}: pass the run's own training set"
        )
    stop = c.epochs if stop_at_epoch is None else min(stop_at_epoch, c.epochs)
    bar = progress_bar(progress, initial=run.step, total=c.epochs * run.steps_per_epoch)
    while run.epoch < stop:
        order = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(c.seed * 1_000_003 + run.epoch))
        started, losses, correct, seen = time.perf_counter(), 0.0, 0, 0
        model.train()
        for k in range(run.steps_per_epoch):
            step_started = time.perf_counter()
            images, labels = train_set.batch(order[k * c.batch_size : (k + 1) * c.batch_size])
            images = translate(images, c.shift, torch.Generator().manual_seed(c.seed * 1_000_003 + run.step))
            images, labels = images.to(c.device, dtype), labels.to(c.device)
            logits, info = predict(model, images)
            loss = F.cross_entropy(logits, labels)
            total = loss if info is None or info.jac_loss is None else loss + c.jac_loss_weight * info.jac_loss
            run.optimizer.zero_grad(set_to_none=True)
            total.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), c.clip)
            run.optimizer.step()
            run.scheduler.step()
            run.step += 1
            losses += float(loss.detach()) * len(labels)
            correct += int((logits.detach().argmax(1) == labels).sum())
            seen += len(labels)
            record = {
                "step": float(run.step),
                "loss": float(loss.detach()),
                "seconds": time.perf_counter() - step_started,
            }
            if info is not None:
                record.update(nfe=float(info.forward.nstep.float().mean()), residual=float(info.forward.rel.mean()))
                if info.jac_loss is not None:
                    record["jac_loss"] = float(info.jac_loss.detach())
            run.history.append(record)
            _postfix(bar, record)
            bar.update(1)
        train_seconds = time.perf_counter() - started
        run.epoch += 1
        metrics, _ = evaluate(model, test_set, batch_size=c.eval_batch_size, device=c.device)
        summary = {
            "epoch": float(run.epoch),
            "train_loss": losses / seen,
            "train_accuracy": correct / seen,
            "seconds": train_seconds,
            **{f"test_{name}": value for name, value in metrics.items()},
        }
        run.epochs.append(summary)
        if out is not None:
            run.save(Path(out) / "checkpoint.pt")
        if progress if report is None else report:
            bar.write(describe_epoch(summary))
    bar.close()
    return run


def describe_epoch(summary: dict[str, float]) -> str:
    """One line per epoch: losses, accuracies, residual statistics."""
    line = (
        f"epoch {int(summary['epoch'])}: train loss {summary['train_loss']:.4f} acc {summary['train_accuracy']:.4f} | "
        f"test loss {summary['test_loss']:.4f} acc {summary['test_accuracy']:.4f}"
    )
    if "test_nfe" in summary:
        line += (
            f" | NFE/example {summary['test_nfe']:.1f}, rel. residual mean {summary['test_residual']:.2e} "
            f"median {summary['test_residual_median']:.2e} max {summary['test_residual_max']:.2e}, "
            f"converged {summary['test_converged']:.1%}"
        )
    return line + f" | {summary['seconds']:.0f} s"


def _postfix(bar: Any, record: dict[str, float]) -> None:
    shown = {"loss": f"{record['loss']:.3f}"}
    if "nfe" in record:
        shown.update(nfe=f"{record['nfe']:.1f}", res=f"{record['residual']:.1e}")
    bar.set_postfix(shown, refresh=False)


def write_history(run: Run, path: str | Path) -> Path:
    """The run's config, per-step records and per-epoch summaries as JSON."""
    return save_history(path, run.config, history=run.history, epochs=run.epochs)


def count_parameters(model: nn.Module) -> int:
    """Parameters of the model (each shared tensor once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


__all__ = [
    "METHODS",
    "Run",
    "TrainConfig",
    "build_model",
    "count_parameters",
    "describe_epoch",
    "evaluate",
    "load_model",
    "predict",
    "train",
    "translate",
    "write_history",
]
