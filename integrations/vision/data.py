"""Image classification data, held in memory: scikit-learn's 8×8 handwritten digits (ships with the package; a
fixed held-out split) and CIFAR-10 from a folder on disk (``torchvision.datasets.CIFAR10``, never downloaded).

Data-set specs: ``"digits"`` or ``"cifar10:PATH"`` (``PATH``: the folder holding ``cifar-10-batches-py``).
Images come out as ``(B, 3, size, size)`` floats, normalised per channel with the training split's statistics;
digits are upsampled (bilinear) from 8×8 because HRNet's stage 4 divides its input by 32.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

DATASETS = ("digits", "cifar10")
SPLITS = ("train", "test")
DIGITS_TEST = 360  # held-out digits (20 % of 1797), fixed by DIGITS_SPLIT_SEED
DIGITS_SPLIT_SEED = 0
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


class ImageSet(Dataset[tuple[Tensor, Tensor]]):
    """Images and labels in memory. Item ``i``: ``(image (3, size, size) float32, label ())``; :meth:`batch` takes
    many at once.

    Args:
        images: ``(N, C, H, W)``, uint8 (0–255) or float (already in [0, 1]); C = 1 is repeated to 3 channels.
        labels: ``(N,)`` class indices.
        mean, std: per-channel normalisation (3 values each), applied after scaling to [0, 1].
        size: output side (images are resized bilinearly when it differs from theirs).
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        *,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        size: int,
        num_classes: int,
    ) -> None:
        if images.dim() != 4 or images.shape[0] != labels.shape[0]:
            raise ValueError(
                f"ImageSet: images (N, C, H, W) and labels (N,) expected, got {tuple(images.shape)} and "
                f"{tuple(labels.shape)}"
            )
        self.images, self.labels = images, labels.long()
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.size, self.num_classes = size, num_classes

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        images, labels = self.batch(torch.tensor([index]))
        return images[0], labels[0]

    def subset(self, index: Tensor) -> ImageSet:
        """The examples ``index`` ``(M,)`` as a set with the same normalisation and size."""
        mean, std = tuple(self.mean.flatten().tolist()), tuple(self.std.flatten().tolist())
        return ImageSet(
            self.images[index], self.labels[index], mean=mean, std=std, size=self.size, num_classes=self.num_classes
        )

    def batch(self, index: Tensor) -> tuple[Tensor, Tensor]:
        """Images ``(B, 3, size, size)`` float32 and labels ``(B,)`` of the examples ``index`` ``(B,)``."""
        images = self.images[index]
        images = images.float() / 255 if images.dtype == torch.uint8 else images.float()
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        if images.shape[-1] != self.size or images.shape[-2] != self.size:
            images = F.interpolate(images, size=(self.size, self.size), mode="bilinear", align_corners=False)
        return (images - self.mean) / self.std, self.labels[index]


def parse_spec(spec: str) -> tuple[str, Path | None]:
    """``"digits"`` → ``("digits", None)``; ``"cifar10:PATH"`` → ``("cifar10", Path(PATH))``."""
    name, separator, path = spec.partition(":")
    if name not in DATASETS:
        raise ValueError(f"unknown data set {spec!r}: use 'digits' or 'cifar10:PATH'")
    if name == "digits":
        if separator:
            raise ValueError(f"data set {spec!r}: digits ship with scikit-learn and take no path; use 'digits'")
        return name, None
    if not path:
        raise ValueError(f"data set {spec!r}: CIFAR-10 needs the folder holding it, e.g. 'cifar10:/data/cifar'")
    return name, Path(path).expanduser()


def image_dataset(spec: str, *, split: str, size: int = 32) -> ImageSet:
    """The ``split`` (``"train"`` or ``"test"``) of the data set ``spec`` at side ``size``.

    Digits: 1797 images of 8×8 (values 0–16) from ``sklearn.datasets.load_digits``, 360 held out for testing by a
    fixed permutation (seed 0), the rest for training; normalised with the training images' mean and std.
    CIFAR-10: ``torchvision.datasets.CIFAR10(PATH, train=..., download=False)``, its standard 50 000 / 10 000 split.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
    if not (isinstance(size, int) and size >= 8):
        raise ValueError(f"image size must be an integer ≥ 8, got {size!r}")
    name, path = parse_spec(spec)
    if name == "digits":
        return _digits(split, size)
    assert path is not None
    return _cifar10(path, split, size)


def _digits(split: str, size: int) -> ImageSet:
    from sklearn.datasets import load_digits  # type: ignore[import-untyped]

    digits = load_digits()
    images = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16  # (1797, 1, 8, 8) in [0, 1]
    labels = torch.as_tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(DIGITS_SPLIT_SEED))
    test, train = order[:DIGITS_TEST], order[DIGITS_TEST:]
    chosen = train if split == "train" else test
    # Statistics of the upsampled training images (what the model sees), one value for the three equal channels.
    upsampled = F.interpolate(images[train], size=(size, size), mode="bilinear", align_corners=False)
    mean, std = float(upsampled.mean()), float(upsampled.std())
    return ImageSet(images[chosen], labels[chosen], mean=(mean,) * 3, std=(std,) * 3, size=size, num_classes=10)


def _cifar10(path: Path, split: str, size: int) -> ImageSet:
    from torchvision.datasets import CIFAR10

    if not path.is_dir():
        raise FileNotFoundError(
            f"CIFAR-10: {path} is not a folder (nothing is downloaded; give the folder that holds cifar-10-batches-py)"
        )
    try:
        data = CIFAR10(str(path), train=split == "train", download=False)
    except RuntimeError as error:  # torchvision: "Dataset not found or corrupted."
        raise FileNotFoundError(f"CIFAR-10: no intact cifar-10-batches-py under {path} ({error})") from None
    images = torch.as_tensor(data.data).permute(0, 3, 1, 2).contiguous()  # (N, 3, 32, 32) uint8
    labels = torch.as_tensor(data.targets, dtype=torch.long)
    return ImageSet(images, labels, mean=CIFAR_MEAN, std=CIFAR_STD, size=size, num_classes=10)
