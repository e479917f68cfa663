"""Optical-flow data: a synthetic layered-motion set with exact ground truth, readers for the real benchmarks through
torchvision, RAFT's training augmentation (Teed and Deng, "RAFT: Recurrent All-Pairs Field Transforms for Optical
Flow", ECCV 2020, §4) and padding for full-resolution evaluation.

Every data set here returns the same item ``(image1, image2, flow, valid)``:

* ``image1``, ``image2``: float32 ``(3, H, W)`` in [−1, 1], RAFT's input range;
* ``flow``: float32 ``(2, H, W)`` from frame 1 to frame 2 in pixels, channel 0 along x (columns), channel 1 along y
  (rows);
* ``valid``: bool ``(H, W)``, where the flow is known: KITTI's sparse mask, the synthetic set's visibility, elsewhere
  every component below 1000 px (RAFT's convention for sets without a mask).

The synthetic set is the layered model of Wang and Adelson ("Representing Moving Images with Layers", IEEE TIP 1994)
with FlyingChairs-like affine motion (Dosovitskiy et al., "FlowNet: Learning Optical Flow with Convolutional
Networks", ICCV 2015): textured ellipses over a textured background, each layer under its own affine map, so the flow,
frame 2 and the occlusions all follow exactly from the layer parameters — no download, no rendering error.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

# (image1, image2, flow, valid); flow and valid are None only for test splits without ground truth
FlowItem = tuple[Tensor, Tensor, Tensor | None, Tensor | None]

SEED_STRIDE = 1_000_003  # item i of seed s draws from seed s·SEED_STRIDE + i: seeds never share an item
OCTAVES = (2, 4, 8, 16, 32)  # value-noise cell sizes in pixels
# affine motion ranges: rotation (degrees), scale deviation, translation (fraction of min(H, W), per axis)
BACKGROUND_MOTION = (3.0, 0.03, 0.03)
FOREGROUND_MOTION = (10.0, 0.10, 0.08)
SPLITS = ("train", "val", "test")
MAX_FLOW_COMPONENT = 1000.0  # RAFT's validity threshold for sets without a mask


# --------------------------------------------------------------------------------------------------------------------
# Synthetic layered motion


class SyntheticFlow(Dataset):
    """Layered affine motion with exact flow, occlusion-aware validity and no download.

    A background plane and K ~ U{2, 3, 4} ellipses (later ones on top), each with a value-noise texture (octaves of
    2–32 px cells) and an affine motion ``p₂ = A p₁ + b`` about its centre, ``A = s·R(θ)``: background θ ∈ ±3°,
    s ∈ 1 ± 0.03, translation ∈ ±0.03·min(H, W); ellipses θ ∈ ±10°, s ∈ 1 ± 0.10, translation ∈ ±0.08·min(H, W).
    Frame 1 shows the topmost layer at each pixel, the flow is that layer's ``A p + b − p`` (exact), frame 2 is
    rendered through the exact inverse maps (topmost layer wins), and ``valid`` marks pixels that stay inside the
    image and are not covered in frame 2 by a layer above their own.

    Item ``i`` is a deterministic function of ``(seed, i)`` (generator seed ``seed·1_000_003 + i``): identical across
    instances, processes and data-loader workers, and no two seeds share an item (``length ≤ 1_000_003``).

    Args:
        length: number of pairs.
        size: ``(H, W)``, multiples of 8 and at least 128 (RAFT works at 1/8 resolution and its 4-level correlation
            pyramid halves that three more times).
        seed: non-negative seed of the set.
    """

    def __init__(self, length: int, *, size: tuple[int, int] = (256, 320), seed: int = 0) -> None:
        height, width = size
        if height % 8 or width % 8 or min(height, width) < 128:
            raise ValueError(
                f"SyntheticFlow: size={tuple(size)} must be multiples of 8 of at least 128 per side (RAFT predicts at "
                "1/8 resolution and its 4-level correlation pyramid needs 16 features per side)"
            )
        if not 0 <= length <= SEED_STRIDE:
            raise ValueError(f"SyntheticFlow: length={length} must be in [0, {SEED_STRIDE}]")
        if seed < 0:
            raise ValueError(f"SyntheticFlow: seed={seed} must be non-negative")
        self.length, self.size, self.seed = int(length), (int(height), int(width)), int(seed)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        if not -self.length <= index < self.length:
            raise IndexError(f"SyntheticFlow: index {index} out of range for {self.length} pairs")
        index %= self.length
        return layered_sample(torch.Generator().manual_seed(self.seed * SEED_STRIDE + index), self.size)

    def __repr__(self) -> str:
        return f"SyntheticFlow(length={self.length}, size={self.size}, seed={self.seed})"


def _affine(generator: torch.Generator, ranges: tuple[float, float, float], extent: int) -> tuple[Tensor, Tensor]:
    """``A = s·R(θ)`` and the translation t, drawn uniformly in ``ranges`` (θ in degrees, s − 1, t / extent)."""
    rotation, scale, shift = ranges
    u = 2 * torch.rand(4, generator=generator, dtype=torch.float64) - 1
    theta, s = math.radians(rotation) * u[0], 1 + scale * u[1]
    cos, sin = torch.cos(theta), torch.sin(theta)
    return s * torch.stack([torch.stack([cos, -sin]), torch.stack([sin, cos])]), shift * extent * u[2:]


def _noise(generator: torch.Generator, height: int, width: int) -> tuple[list[Tensor], Tensor]:
    """The random grids of one value-noise texture, one ``(3, ⌊H/s⌋ + 2, ⌊W/s⌋ + 2)`` per octave s, and its tint."""
    grids = [torch.rand(3, height // s + 2, width // s + 2, generator=generator) for s in OCTAVES]
    return grids, torch.rand(3, generator=generator)


def _cubic_matrix(length: int, cell: int, size: int) -> Tensor:
    """``(length, size)``: the first ``length`` samples of a signal of ``size`` samples upsampled ×``cell`` by cubic
    convolution (Keys, "Cubic Convolution Interpolation for Digital Image Processing", IEEE TASSP 1981; a = −0.75,
    sample centres at half-integers, borders clamped: ``F.interpolate(mode="bicubic")`` as a matrix)."""
    position = (torch.arange(length, dtype=torch.float64) + 0.5) / cell - 0.5
    first = torch.floor(position)
    t = (position - first).float()
    a = -0.75

    def near(d: Tensor) -> Tensor:  # |d| ≤ 1
        return ((a + 2) * d - (a + 3)) * d * d + 1

    def far(d: Tensor) -> Tensor:  # 1 < |d| < 2
        return ((a * d - 5 * a) * d + 8 * a) * d - 4 * a

    weights = torch.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], dim=-1)
    taps = (first.long()[:, None] + torch.arange(-1, 3)).clamp(0, size - 1)
    return torch.zeros(length, size).scatter_add_(1, taps, weights)


def _textures(noise: list[tuple[list[Tensor], Tensor]], height: int, width: int) -> Tensor:
    """``(L, 3, H, W)`` textures in [0, 1]: equal-weight octaves (bicubic ×s, cropped), standardised per channel,
    squashed by ``sigmoid(1.5·t)`` and mixed 70/30 with the layer's tint. The separable upsampling runs as two
    matrix products, several times faster than ``F.interpolate`` on the CPU."""
    total = torch.zeros(len(noise), 3, height, width)
    for octave, cell in enumerate(OCTAVES):
        grids = torch.stack([grids[octave] for grids, _ in noise])
        rows, columns = _cubic_matrix(height, cell, grids.shape[-2]), _cubic_matrix(width, cell, grids.shape[-1])
        total += rows @ grids @ columns.T
    std, mean = torch.std_mean(total, (-2, -1), keepdim=True)
    tint = torch.stack([tint for _, tint in noise])[..., None, None]
    return 0.7 * torch.sigmoid(1.5 * (total - mean) / std) + 0.3 * tint


def _inside(points: Tensor, centres: Tensor, axes: Tensor, angles: Tensor) -> Tensor:
    """``(L, H, W)``: whether ``points[l]`` (``(L, H, W, 2)``, x first) lies in ellipse l (infinite axes: the plane)."""
    d = points - centres[:, None, None]
    cos, sin = torch.cos(angles)[:, None, None], torch.sin(angles)[:, None, None]
    u = (cos * d[..., 0] + sin * d[..., 1]) / axes[:, 0, None, None]
    v = (cos * d[..., 1] - sin * d[..., 0]) / axes[:, 1, None, None]
    return u * u + v * v <= 1


def _topmost(inside: Tensor) -> Tensor:
    """``(H, W)`` index of the last layer whose mask is set (layer 0, the background, always is)."""
    order = torch.arange(inside.shape[0], device=inside.device)[:, None, None]
    return torch.where(inside, order, 0).amax(0)


def _apply(matrices: Tensor, points: Tensor) -> Tensor:
    """``M_l p`` for ``(L, 2, 2)`` matrices and ``(…, 2)`` points (broadcast over layers first)."""
    return torch.einsum("lij,l...j->l...i", matrices, points.expand(matrices.shape[0], *points.shape[-3:]))


def layered_sample(generator: torch.Generator, size: tuple[int, int]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One :class:`SyntheticFlow` item drawn from ``generator`` (draw order: background motion and texture, K, then per
    ellipse its centre, semi-axes, orientation, motion and texture)."""
    height, width = size
    margin = max(height, width) // 4  # textures extend past the image so moved layers stay covered
    canvas = (height + 2 * margin, width + 2 * margin)
    extent = min(height, width)
    f64 = torch.float64

    image_centre = torch.tensor([(width - 1) / 2, (height - 1) / 2], dtype=f64)
    matrix, shift = _affine(generator, BACKGROUND_MOTION, extent)
    matrices, offsets = [matrix], [image_centre + shift - matrix @ image_centre]
    noise = [_noise(generator, *canvas)]
    centres, axes, angles = [image_centre], [torch.full((2,), math.inf, dtype=f64)], [torch.zeros((), dtype=f64)]
    for _ in range(int(torch.randint(2, 5, (), generator=generator))):
        centre = torch.rand(2, generator=generator, dtype=f64) * torch.tensor([width - 1, height - 1], dtype=f64)
        centres.append(centre)
        axes.append((0.10 + 0.20 * torch.rand(2, generator=generator, dtype=f64)) * extent)
        angles.append(math.pi * torch.rand((), generator=generator, dtype=f64))
        matrix, shift = _affine(generator, FOREGROUND_MOTION, extent)
        matrices.append(matrix)
        offsets.append(centre + shift - matrix @ centre)
        noise.append(_noise(generator, *canvas))
    ellipses = torch.stack(centres), torch.stack(axes), torch.stack(angles)
    matrix, offset, inverse = torch.stack(matrices), torch.stack(offsets), torch.linalg.inv(torch.stack(matrices))
    textures = _textures(noise, *canvas)

    rows, columns = torch.meshgrid(torch.arange(height, dtype=f64), torch.arange(width, dtype=f64), indexing="ij")
    pixels = torch.stack([columns, rows], dim=-1)[None]  # (1, H, W, 2), x first

    def behind(points: Tensor) -> Tensor:  # (L, H, W, 2) frame-2 points of every layer mapped back to frame 1
        return _apply(inverse, points - offset[:, None, None])

    # frame 1 and the flow: the topmost layer at each pixel centre, sampled on the texture grid itself
    layer1 = _topmost(_inside(pixels.expand(len(matrix), -1, -1, -1), *ellipses))
    moved = _apply(matrix, pixels) + offset[:, None, None]
    target = moved.gather(0, layer1[None, ..., None].expand(1, -1, -1, 2))[0]
    flow = target - pixels[0]
    crops = textures[:, :, margin : margin + height, margin : margin + width]
    image1 = crops.gather(0, layer1[None, None].expand(1, 3, -1, -1))[0]

    # frame 2: every layer's inverse map, the topmost layer whose preimage lies inside it wins
    sources = behind(pixels)
    layer2 = _topmost(_inside(sources, *ellipses))
    scale = torch.tensor([2 / (canvas[1] - 1), 2 / (canvas[0] - 1)], dtype=f64)
    grid = ((sources + margin) * scale - 1).float()
    rendered = F.grid_sample(textures, grid, mode="bilinear", padding_mode="border", align_corners=True)
    image2 = rendered.gather(0, layer2[None, None].expand(1, 3, -1, -1))[0]

    # valid: the target is in the image and no layer above the pixel's own covers it in frame 2
    in_image = (target[..., 0] >= 0) & (target[..., 0] <= width - 1) & (target[..., 1] >= 0)
    in_image &= target[..., 1] <= height - 1
    above = torch.arange(len(matrix))[:, None, None] > layer1
    occluded = (_inside(behind(target[None]), *ellipses) & above).any(0)

    return 2 * image1 - 1, 2 * image2 - 1, flow.permute(2, 0, 1).float().contiguous(), in_image & ~occluded


# --------------------------------------------------------------------------------------------------------------------
# Real data sets through torchvision


class FlowReader(Dataset):
    """A torchvision optical-flow data set (``FlyingChairs``, ``FlyingThings3D``, ``Sintel``, ``KittiFlow``, ``HD1K``)
    with its items in this module's convention: images ``(3, H, W)`` float32 in [−1, 1], flow ``(2, H, W)`` float32,
    valid ``(H, W)`` bool — the set's own mask where it has one (KITTI, HD1K: sparse), else every flow component
    below 1000 px as RAFT does. Splits without ground truth (Sintel, KITTI ``test``) give ``flow = valid = None``."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> FlowItem:
        image1, image2, flow, *mask = self.dataset[index]
        valid = mask[0] if mask else None
        if flow is not None:
            flow = torch.as_tensor(flow, dtype=torch.float32)
            valid = (flow.abs() < MAX_FLOW_COMPONENT).all(0) if valid is None else torch.as_tensor(valid).bool()
        return _image(image1), _image(image2), flow, valid

    def __repr__(self) -> str:
        return f"FlowReader({type(self.dataset).__name__}, {len(self)} pairs)"


def _image(image: Any) -> Tensor:
    """A PIL image or uint8 tensor as float32 ``(3, H, W)`` in [−1, 1]."""
    if not isinstance(image, Tensor):
        from torchvision.transforms.functional import pil_to_tensor

        image = pil_to_tensor(image.convert("RGB"))
    if image.shape[0] == 1:
        image = image.expand(3, -1, -1)
    return image[:3].float() / 127.5 - 1


def _root(path: str, folder: str) -> Path:
    """The directory holding ``folder`` (torchvision's root): ``path`` itself or, if it is that folder, its parent."""
    root = Path(path).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"flow_dataset: no such directory: {root}")
    if not (root / folder).is_dir() and root.name == folder:
        return root.parent
    return root


def _chairs(root: Path, split: str, _: str) -> Any:
    from torchvision.datasets import FlyingChairs

    return FlyingChairs(root, split=split)


def _things(root: Path, split: str, passes: str) -> Any:
    from torchvision.datasets import FlyingThings3D

    return FlyingThings3D(root, split=split, pass_name=passes, camera="left")


def _sintel(root: Path, split: str, passes: str) -> Any:
    from torchvision.datasets import Sintel

    return Sintel(root, split=split, pass_name=passes)


def _kitti(root: Path, split: str, _: str) -> Any:
    from torchvision.datasets import KittiFlow

    return KittiFlow(root, split=split)


# name → (torchvision's folder, reader, passes, {our split: torchvision's split}, sparse flow).
# Sintel and KITTI are validated on their training sets (their test sets have no public ground truth), as RAFT and
# DEQ-Flow report them; FlyingThings3D's TEST part has ground truth and is its validation set.
READERS: dict[str, tuple[str, Callable[[Path, str, str], Any], str, dict[str, str], bool]] = {
    "chairs": ("FlyingChairs", _chairs, "", {"train": "train", "val": "val"}, False),
    "things": ("FlyingThings3D", _things, "both", {"train": "train", "val": "test"}, False),
    "things-clean": ("FlyingThings3D", _things, "clean", {"train": "train", "val": "test"}, False),
    "things-final": ("FlyingThings3D", _things, "final", {"train": "train", "val": "test"}, False),
    "sintel": ("Sintel", _sintel, "both", {"train": "train", "val": "train", "test": "test"}, False),
    "sintel-clean": ("Sintel", _sintel, "clean", {"train": "train", "val": "train", "test": "test"}, False),
    "sintel-final": ("Sintel", _sintel, "final", {"train": "train", "val": "train", "test": "test"}, False),
    "kitti": ("KittiFlow", _kitti, "", {"train": "train", "val": "train", "test": "test"}, True),
}
DATASETS = ("synthetic", *READERS)
SYNTHETIC_LENGTHS = {"train": 100_000, "val": 256, "test": 256}
SYNTHETIC_SPLIT_OFFSETS = {"train": 0, "val": 1, "test": 2}


class _Resized(Dataset):
    """The first ``length`` items of a data set, cycling through it when ``length`` exceeds its size (RAFT repeats
    small sets such as Sintel and KITTI in its training mixtures)."""

    def __init__(self, dataset: Any, length: int) -> None:
        if len(dataset) == 0 and length > 0:
            raise ValueError(f"cannot draw {length} items from an empty data set")
        self.dataset, self.length = dataset, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> FlowItem:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} items")
        return self.dataset[index % len(self.dataset)]


def flow_dataset(
    spec: str,
    *,
    split: str,
    augment: FlowAugmentation | None = None,
    length: int | None = None,
    size: tuple[int, int] = (256, 320),
    seed: int = 0,
) -> Dataset:
    """The data set named by ``spec``, in this module's item convention.

    Specs: ``"synthetic"`` / ``"synthetic:SEED"`` (:class:`SyntheticFlow` of ``size``); ``"chairs:PATH"``,
    ``"things:PATH"`` (clean and final passes; ``things-clean``, ``things-final``), ``"sintel:PATH"`` (clean and final
    passes, for training; evaluate ``sintel-clean`` and ``sintel-final`` separately), ``"kitti:PATH"`` (KITTI 2015).
    PATH is the folder torchvision expects (``FlyingChairs``, ``FlyingThings3D``, ``Sintel``, ``KittiFlow``) or the
    directory holding it.

    Splits: ``"train"``, ``"val"``, ``"test"``. Synthetic: the splits use seeds SEED, SEED + 1 and SEED + 2, so a run
    trained on ``synthetic:S`` never sees its own validation pairs (but ``synthetic:1`` trains on ``synthetic:0``'s
    validation pairs). Chairs: its official train/val lists. Things: TRAIN / TEST. Sintel, KITTI: ``"val"`` is the
    training set (the test sets' ground truth is withheld; RAFT and DEQ-Flow report the training sets of data they
    did not train on) and ``"test"`` gives items with ``flow = valid = None``.

    Args:
        augment: applied to every item, with a generator seeded by ``(seed, epoch, index)`` (:class:`AugmentedFlow`).
        length: number of items: synthetic default 100 000 (train) / 256 (val, test); for real sets, the first
            ``length`` pairs, cycling when it exceeds the set (default: the whole set).
        size: ``(H, W)`` of synthetic pairs.
        seed: seed of the augmentation draws.
    """
    name, _, argument = spec.partition(":")
    if name not in DATASETS:
        raise ValueError(f"flow_dataset: unknown data set {name!r} in {spec!r}; valid: {', '.join(DATASETS)}")
    if split not in SPLITS:
        raise ValueError(f"flow_dataset: unknown split {split!r}; valid: {', '.join(SPLITS)}")
    if length is not None and length < 0:
        raise ValueError(f"flow_dataset: length={length} must be non-negative")
    dataset: Any
    if name == "synthetic":
        if argument and not argument.isdigit():
            raise ValueError(f"flow_dataset: {spec!r}: the synthetic seed must be a non-negative integer")
        base = int(argument) if argument else 0
        count = SYNTHETIC_LENGTHS[split] if length is None else length
        dataset = SyntheticFlow(count, size=size, seed=base + SYNTHETIC_SPLIT_OFFSETS[split])
    else:
        folder, reader, passes, splits, sparse = READERS[name]
        if not argument:
            raise ValueError(f"flow_dataset: {spec!r} needs a path: '{name}:/path/to/{folder}'")
        if split not in splits:
            raise ValueError(f"flow_dataset: {name} has no {split!r} split; valid: {', '.join(splits)}")
        if split == "test" and augment is not None:
            raise ValueError(f"flow_dataset: {name}'s test split has no ground truth to augment")
        if augment is not None and augment.sparse != sparse:
            kind = "sparse" if sparse else "dense"
            raise ValueError(f"flow_dataset: {name} has {kind} flow: use FlowAugmentation(sparse={sparse})")
        dataset = FlowReader(reader(_root(argument, folder), splits[split], passes))
        if length is not None:
            dataset = _Resized(dataset, length)
    return dataset if augment is None else AugmentedFlow(dataset, augment, seed=seed)


# --------------------------------------------------------------------------------------------------------------------
# Augmentation


# RAFT's per-stage training settings: crop (DEQ-Flow's schedule) and log2 scale range; KITTI's flow is sparse, it is
# neither stretched nor flipped and its colour jitter is milder.
AUGMENTATION_PRESETS: dict[str, dict[str, Any]] = {
    "chairs": {"crop_size": (368, 496), "min_scale": -0.1, "max_scale": 1.0},
    "things": {"crop_size": (400, 720), "min_scale": -0.4, "max_scale": 0.8},
    "sintel": {"crop_size": (368, 768), "min_scale": -0.2, "max_scale": 0.6},
    "kitti": {
        "crop_size": (288, 960),
        "min_scale": -0.2,
        "max_scale": 0.4,
        "stretch_prob": 0.0,
        "hflip_prob": 0.0,
        "vflip_prob": 0.0,
        "brightness": 0.3,
        "contrast": 0.3,
        "saturation": 0.3,
        "hue": 0.3 / math.pi,
        "sparse": True,
    },
}


class FlowAugmentation:
    """RAFT's training augmentation on one item ``(image1, image2, flow, valid)``, in RAFT's order:

    1. photometric: colour jitter (brightness, contrast, saturation factors ``1 ± strength``, hue shift ``± hue``, in a
       random order), the same for both frames, or drawn separately with probability ``asymmetric_prob``;
    2. eraser: with probability ``eraser_prob``, one or two rectangles of 50–100 px in frame 2 filled with its mean
       colour (synthetic occlusions; the flow target is unchanged);
    3. spatial: with probability ``spatial_prob`` a resize by ``2^U[min_scale, max_scale]``, each axis stretched by a
       further ``2^U[−max_stretch, max_stretch]`` with probability ``stretch_prob``, never smaller than the crop plus
       8 px (without the resize, images smaller than the crop are enlarged to it); then horizontal / vertical
       flips (the flow's x / y component changes sign);
    4. a random crop of ``crop_size``; ``valid`` is cropped as it is, so flow that leaves the crop stays supervised
       (as in RAFT).

    Dense flow is resized with the images (bilinear, pixel centres at half-integers) and multiplied by the scale
    factors — exact for the pixel displacement; a pixel stays valid only where all its interpolated neighbours were.
    Sparse flow (``sparse=True``, KITTI) is moved point by point: every valid point goes to the nearest pixel of the
    resized grid with its flow scaled, the other pixels become invalid (a pixel hit twice keeps the later point).

    Set a strength or probability to 0 to switch that part off. Every draw comes from the generator given to
    :meth:`__call__`, so an item and a seed determine the result.
    """

    def __init__(
        self,
        crop_size: tuple[int, int],
        *,
        min_scale: float = -0.2,
        max_scale: float = 0.5,
        spatial_prob: float = 0.8,
        stretch_prob: float = 0.8,
        max_stretch: float = 0.2,
        hflip_prob: float = 0.5,
        vflip_prob: float = 0.1,
        brightness: float = 0.4,
        contrast: float = 0.4,
        saturation: float = 0.4,
        hue: float = 0.5 / math.pi,
        asymmetric_prob: float = 0.2,
        eraser_prob: float = 0.5,
        sparse: bool = False,
    ) -> None:
        if len(crop_size) != 2 or min(crop_size) < 1:
            raise ValueError(f"FlowAugmentation: crop_size={crop_size} must be (height, width) of positive sizes")
        if min_scale > max_scale:
            raise ValueError(f"FlowAugmentation: min_scale={min_scale} exceeds max_scale={max_scale}")
        if not 0 <= hue <= 0.5:
            raise ValueError(f"FlowAugmentation: hue={hue} must be in [0, 0.5]")
        self.crop_size = (int(crop_size[0]), int(crop_size[1]))
        self.min_scale, self.max_scale, self.spatial_prob = min_scale, max_scale, spatial_prob
        self.stretch_prob, self.max_stretch = stretch_prob, max_stretch
        self.hflip_prob, self.vflip_prob = hflip_prob, vflip_prob
        self.jitter = (brightness, contrast, saturation, hue)
        self.asymmetric_prob, self.eraser_prob, self.sparse = asymmetric_prob, eraser_prob, sparse

    @classmethod
    def preset(cls, stage: str, **overrides: Any) -> FlowAugmentation:
        """RAFT's augmentation for a training stage (``"chairs"``, ``"things"``, ``"sintel"``, ``"kitti"``), with
        any argument overridden."""
        if stage not in AUGMENTATION_PRESETS:
            raise ValueError(f"FlowAugmentation: unknown preset {stage!r}; valid: {', '.join(AUGMENTATION_PRESETS)}")
        return cls(**{**AUGMENTATION_PRESETS[stage], **overrides})

    def __call__(self, item: FlowItem, generator: torch.Generator | int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The augmented item (crop-sized), drawn from ``generator`` (a seed makes a fresh one)."""
        if not isinstance(generator, torch.Generator):
            generator = torch.Generator().manual_seed(generator)
        image1, image2, flow, valid = item
        if flow is None:
            raise ValueError("FlowAugmentation: the item has no ground-truth flow (a test split?)")
        if valid is None:
            valid = (flow.abs() < MAX_FLOW_COMPONENT).all(0)
        image1, image2 = self._photometric(image1, image2, generator)
        image2 = self._erase(image2, generator)
        image1, image2, flow, valid = self._spatial(image1, image2, flow, valid, generator)
        return self._crop(image1, image2, flow, valid, generator)

    def _photometric(self, image1: Tensor, image2: Tensor, g: torch.Generator) -> tuple[Tensor, Tensor]:
        if not any(self.jitter):
            return image1, image2
        image1, image2 = image1.add(1).div(2), image2.add(1).div(2)  # [0, 1] for torchvision's colour ops
        if _uniform(g) < self.asymmetric_prob:
            image1, image2 = self._jitter(image1, g), self._jitter(image2, g)
        else:  # side by side, so that contrast uses one mean for both frames
            image1, image2 = self._jitter(torch.cat([image1, image2], dim=-1), g).chunk(2, dim=-1)
        return image1.mul(2).sub(1), image2.mul(2).sub(1)

    def _jitter(self, images: Tensor, g: torch.Generator) -> Tensor:
        from torchvision.transforms.v2 import functional as TF

        operations = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
        for op in torch.randperm(4, generator=g).tolist():
            strength = self.jitter[op]
            factor = _uniform(g, -strength, strength)
            if strength > 0:
                images = operations[op](images, factor if op == 3 else 1 + factor)
        return images.clamp(0, 1)

    def _erase(self, image2: Tensor, g: torch.Generator) -> Tensor:
        if _uniform(g) >= self.eraser_prob:
            return image2
        image2 = image2.clone()
        height, width = image2.shape[-2:]
        mean = image2.mean((-2, -1), keepdim=True)
        for _ in range(_randint(g, 1, 3)):
            x0, y0 = _randint(g, 0, width), _randint(g, 0, height)
            dx, dy = _randint(g, 50, 100), _randint(g, 50, 100)
            image2[:, y0 : y0 + dy, x0 : x0 + dx] = mean
        return image2

    def _spatial(
        self, image1: Tensor, image2: Tensor, flow: Tensor, valid: Tensor, g: torch.Generator
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        height, width = image1.shape[-2:]
        crop_h, crop_w = self.crop_size
        scale_x = scale_y = 2 ** _uniform(g, self.min_scale, self.max_scale)
        if _uniform(g) < self.stretch_prob:
            scale_x *= 2 ** _uniform(g, -self.max_stretch, self.max_stretch)
            scale_y *= 2 ** _uniform(g, -self.max_stretch, self.max_stretch)
        if _uniform(g) < self.spatial_prob:  # never below the crop plus 8 px of play
            floor = max((crop_h + 8) / height, (crop_w + 8) / width)
            scale_x, scale_y = max(scale_x, floor), max(scale_y, floor)
        else:  # keep the size unless the image is smaller than the crop
            scale_x = scale_y = max(1.0, crop_h / height, crop_w / width)
        new_h, new_w = max(crop_h, round(height * scale_y)), max(crop_w, round(width * scale_x))
        if (new_h, new_w) != (height, width):
            pair = F.interpolate(torch.stack([image1, image2]), size=(new_h, new_w), mode="bilinear")
            image1, image2 = pair[0], pair[1]
            resize = _resize_sparse if self.sparse else _resize_dense
            flow, valid = resize(flow, valid, (new_h, new_w))

        if _uniform(g) < self.hflip_prob:
            image1, image2, flow, valid = (t.flip(-1) for t in (image1, image2, flow, valid))
            flow = flow * flow.new_tensor([-1.0, 1.0])[:, None, None]
        if _uniform(g) < self.vflip_prob:
            image1, image2, flow, valid = (t.flip(-2) for t in (image1, image2, flow, valid))
            flow = flow * flow.new_tensor([1.0, -1.0])[:, None, None]
        return image1, image2, flow, valid

    def _crop(
        self, image1: Tensor, image2: Tensor, flow: Tensor, valid: Tensor, g: torch.Generator
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        (crop_h, crop_w), (height, width) = self.crop_size, image1.shape[-2:]
        y0, x0 = _randint(g, 0, height - crop_h + 1), _randint(g, 0, width - crop_w + 1)
        window = (..., slice(y0, y0 + crop_h), slice(x0, x0 + crop_w))
        return tuple(t[window].contiguous() for t in (image1, image2, flow, valid))  # type: ignore[return-value]

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"FlowAugmentation({fields})"


def _uniform(g: torch.Generator, low: float = 0.0, high: float = 1.0) -> float:
    return low + (high - low) * float(torch.rand((), generator=g, dtype=torch.float64))


def _randint(g: torch.Generator, low: int, high: int) -> int:
    """An integer in ``[low, high)``."""
    return int(torch.randint(low, high, (), generator=g))


def _resize_dense(flow: Tensor, valid: Tensor, size: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """Dense flow resized bilinearly and scaled by the size ratios; valid where every interpolated pixel was."""
    (height, width), (new_h, new_w) = flow.shape[-2:], size
    factors = flow.new_tensor([new_w / width, new_h / height])[:, None, None]
    flow = F.interpolate(flow[None], size=size, mode="bilinear")[0] * factors
    invalid = F.interpolate((~valid).float()[None, None], size=size, mode="bilinear")[0, 0]
    return flow, invalid == 0


def _resize_sparse(flow: Tensor, valid: Tensor, size: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """Sparse flow resampled at its valid points: each moves to the nearest pixel centre of the resized grid (centres
    at half-integers, as the images) with its flow scaled; where several land on one pixel the last in raster order
    stays."""
    (height, width), (new_h, new_w) = flow.shape[-2:], size
    fx, fy = new_w / width, new_h / height
    rows, columns = valid.nonzero(as_tuple=True)
    x = torch.round((columns + 0.5) * fx - 0.5).long()
    y = torch.round((rows + 0.5) * fy - 0.5).long()
    inside = (x >= 0) & (x < new_w) & (y >= 0) & (y < new_h)
    values = flow[:, rows, columns][:, inside] * flow.new_tensor([fx, fy])[:, None]
    target = (y * new_w + x)[inside]
    winner = torch.full((new_h * new_w,), -1, dtype=torch.long, device=flow.device)
    winner.scatter_reduce_(0, target, torch.arange(len(target), device=flow.device), reduce="amax")
    new_valid = winner >= 0
    new_flow = flow.new_zeros(2, new_h * new_w)
    new_flow[:, new_valid] = values[:, winner[new_valid]]
    return new_flow.view(2, new_h, new_w), new_valid.view(new_h, new_w)


class AugmentedFlow(Dataset):
    """A flow data set with :class:`FlowAugmentation` applied to each item, drawn from a generator seeded by
    ``(seed, epoch, index)``: reproducible, independent of the data-loader workers, and different from epoch to epoch
    when the training loop calls :meth:`set_epoch` (as with ``DistributedSampler``; with ``persistent_workers`` the
    workers keep the epoch they started with)."""

    def __init__(self, dataset: Any, augment: FlowAugmentation, *, seed: int = 0) -> None:
        self.dataset, self.augment, self.seed, self.epoch = dataset, augment, int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        """Draw the augmentations of epoch ``epoch``."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        key = ((self.seed * SEED_STRIDE + self.epoch) * SEED_STRIDE + index) % 2**63
        return self.augment(self.dataset[index], torch.Generator().manual_seed(key))


# --------------------------------------------------------------------------------------------------------------------
# Padding for full-resolution evaluation


def pad_to_multiple(
    image1: Tensor, image2: Tensor, multiple: int = 8, mode: str = "replicate", *, min_size: int = 128
) -> tuple[Tensor, Tensor, Callable[[Tensor], Tensor]]:
    """Pad an image pair ``(B, 3, H, W)`` to sides that are multiples of ``multiple`` and at least ``min_size``
    (RAFT predicts at 1/8 resolution; its 4-level pyramid needs 128 px), evenly on both sides as RAFT evaluates
    Sintel; ``mode`` as in ``torch.nn.functional.pad``. Returns the padded pair and ``unpad``, which crops a
    ``(B, C, H', W')`` prediction on the padded grid back to ``(B, C, H, W)``."""
    if image1.shape != image2.shape or image1.dim() != 4:
        raise ValueError(
            f"pad_to_multiple: needs two (B, 3, H, W) images, got {tuple(image1.shape)} and {tuple(image2.shape)}"
        )
    if multiple < 1:
        raise ValueError(f"pad_to_multiple: multiple={multiple} must be positive")
    height, width = image1.shape[-2:]
    padded_h = max(-(-height // multiple), -(-min_size // multiple)) * multiple
    padded_w = max(-(-width // multiple), -(-min_size // multiple)) * multiple
    top, left = (padded_h - height) // 2, (padded_w - width) // 2
    pad = (left, padded_w - width - left, top, padded_h - height - top)

    def unpad(flow: Tensor) -> Tensor:
        if tuple(flow.shape[-2:]) != (padded_h, padded_w):
            raise ValueError(f"unpad: expected a {padded_h}×{padded_w} prediction, got {tuple(flow.shape[-2:])}")
        return flow[..., top : top + height, left : left + width]

    if not any(pad):
        return image1, image2, unpad
    return F.pad(image1, pad, mode=mode), F.pad(image2, pad, mode=mode), unpad
