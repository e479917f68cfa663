"""Optical-flow data, augmentation and metrics: the synthetic set's ground truth is exact, the torchvision readers give
items in one convention, RAFT's augmentation keeps the ground truth consistent, and the metrics and the sequence loss
match hand computations."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from integrations.flow.data import (
    AugmentedFlow,
    FlowAugmentation,
    SyntheticFlow,
    _cubic_matrix,
    _resize_sparse,
    flow_dataset,
    pad_to_multiple,
)
from integrations.flow.metrics import FlowMetrics, endpoint_error, sequence_loss

SIZE = (128, 160)


def photometric_errors(image1, image2, flow, valid) -> tuple[float, float]:
    """Mean |frame 1 − frame 2 warped to frame 1| over channels and the valid pixels whose target lies in the image
    (after a crop, flow may leave the frame), images in [0, 1], with the given flow and with zero flow."""
    height, width = flow.shape[-2:]
    rows, columns = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    x, y = columns + flow[0], rows + flow[1]
    valid = valid & (x >= 0) & (x <= width - 1) & (y >= 0) & (y <= height - 1)
    grid = torch.stack([2 * x / (width - 1) - 1, 2 * y / (height - 1) - 1], dim=-1)[None].float()
    first, second = (image1 + 1) / 2, (image2 + 1) / 2
    warped = F.grid_sample(second[None], grid, mode="bilinear", align_corners=True)[0]
    with_flow = (warped - first).abs().mean(0)[valid].mean()
    without = (second - first).abs().mean(0)[valid].mean()
    return float(with_flow), float(without)


# --------------------------------------------------------------------------------------------------------------------
# Synthetic data


@pytest.fixture(scope="module")
def synthetic():
    return SyntheticFlow(6, size=SIZE, seed=0)


def test_synthetic_items_are_deterministic_in_seed_and_index(synthetic):
    again = SyntheticFlow(6, size=SIZE, seed=0)
    for a, b in zip(synthetic[2], again[2]):
        assert torch.equal(a, b)
    assert not torch.equal(synthetic[2][0], synthetic[3][0])
    assert not torch.equal(synthetic[2][0], SyntheticFlow(6, size=SIZE, seed=1)[2][0])
    assert torch.equal(synthetic[-1][2], synthetic[5][2])


def test_synthetic_items_have_the_documented_shapes_dtypes_and_ranges(synthetic):
    assert len(synthetic) == 6
    image1, image2, flow, valid = synthetic[0]
    assert image1.shape == image2.shape == (3, *SIZE) and image1.dtype == image2.dtype == torch.float32
    assert flow.shape == (2, *SIZE) and flow.dtype == torch.float32
    assert valid.shape == SIZE and valid.dtype == torch.bool
    for image in (image1, image2):
        assert -1 <= image.min() < image.max() <= 1
    assert 0 < flow.abs().max() < 0.5 * min(SIZE)


def test_synthetic_ground_truth_is_exact(synthetic):
    for index in range(4):
        image1, image2, flow, valid = synthetic[index]
        with_flow, without = photometric_errors(image1, image2, flow, valid)
        assert with_flow < 0.03 and with_flow < 0.3 * without, (index, with_flow, without)
        assert valid.float().mean() > 0.7


@pytest.mark.parametrize("cell", [2, 8, 32])
def test_texture_upsampling_matrices_are_torch_bicubic(cell):
    grid = torch.rand(2, 3, 7, 9)
    height, width = 7 * cell - 3, 9 * cell - 1  # cropped, as the textures are
    mine = _cubic_matrix(height, cell, 7) @ grid @ _cubic_matrix(width, cell, 9).T
    reference = F.interpolate(grid, scale_factor=cell, mode="bicubic", align_corners=False)[..., :height, :width]
    torch.testing.assert_close(mine, reference, rtol=0, atol=1e-5)


def test_synthetic_rejects_bad_arguments(synthetic):
    with pytest.raises(ValueError, match="multiples of 8"):
        SyntheticFlow(1, size=(130, 160))
    with pytest.raises(ValueError, match="at least 128"):
        SyntheticFlow(1, size=(64, 160))
    with pytest.raises(ValueError, match="length"):
        SyntheticFlow(-1)
    with pytest.raises(IndexError):
        synthetic[6]


def test_flow_dataset_synthetic_splits_use_different_seeds():
    train = flow_dataset("synthetic:3", split="train", length=2, size=SIZE)
    val = flow_dataset("synthetic:3", split="val", length=2, size=SIZE)
    assert len(train) == len(val) == 2
    assert torch.equal(train[0][0], SyntheticFlow(2, size=SIZE, seed=3)[0][0])
    assert torch.equal(val[0][0], SyntheticFlow(2, size=SIZE, seed=4)[0][0])
    assert not torch.equal(train[0][0], val[0][0])


def test_flow_dataset_rejects_unknown_names_and_missing_paths(tmp_path):
    with pytest.raises(ValueError, match="valid: synthetic, chairs"):
        flow_dataset("middlebury:/data", split="train")
    with pytest.raises(ValueError, match="split"):
        flow_dataset("synthetic", split="training")
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        flow_dataset(f"sintel:{missing}", split="val")


# --------------------------------------------------------------------------------------------------------------------
# Readers: tiny data sets in the layout torchvision's classes expect


def write_flo(path: Path, flow: np.ndarray) -> None:
    """Middlebury .flo: magic, width, height (int32), then (H, W, 2) float32, all little-endian."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _, height, width = flow.shape
    header = b"PIEH" + struct.pack("<ii", width, height)
    path.write_bytes(header + flow.transpose(1, 2, 0).astype("<f4").tobytes())


def write_pfm(path: Path, flow: np.ndarray) -> None:
    """Colour PFM (u, v, 0), little-endian (negative scale), rows stored bottom to top."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _, height, width = flow.shape
    data = np.concatenate([flow, np.zeros_like(flow[:1])]).transpose(1, 2, 0)[::-1]
    path.write_bytes(f"PF\n{width} {height}\n-1.0\n".encode() + np.ascontiguousarray(data).astype("<f4").tobytes())


def write_png16(path: Path, array: np.ndarray) -> None:
    """A 16-bit RGB PNG of (H, W, 3) values (PIL does not write 16-bit colour)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    height, width, _ = array.shape

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    raw = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in array)
    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    )


def write_image(path: Path, rng: np.random.Generator, shape=(12, 16)) -> np.ndarray:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return pixels


def as_item_image(pixels: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(pixels).permute(2, 0, 1).float() / 127.5 - 1


def check_item(item, image1, image2, flow, valid) -> None:
    assert len(item) == 4
    assert item[0].dtype == item[1].dtype == item[2].dtype == torch.float32 and item[3].dtype == torch.bool
    torch.testing.assert_close(item[0], as_item_image(image1), rtol=0, atol=1e-6)
    torch.testing.assert_close(item[1], as_item_image(image2), rtol=0, atol=1e-6)
    torch.testing.assert_close(item[2], torch.from_numpy(flow), rtol=0, atol=0)
    assert torch.equal(item[3], torch.from_numpy(valid))


def test_sintel_reader_gives_frames_flow_and_the_large_flow_mask(tmp_path):
    rng = np.random.default_rng(0)
    frames = {
        p: [write_image(tmp_path / f"Sintel/training/{p}/alley/frame_{i:04d}.png", rng) for i in (1, 2, 3)]
        for p in ("clean", "final")
    }
    flows = [rng.normal(0, 3, (2, 12, 16)).astype(np.float32) for _ in range(2)]
    flows[1][0, 4, 5] = 1e4  # RAFT drops flow components beyond 1000 px
    for i, flow in enumerate(flows, 1):
        write_flo(tmp_path / f"Sintel/training/flow/alley/frame_{i:04d}.flo", flow)
    write_image(tmp_path / "Sintel/test/clean/market/frame_0001.png", rng)
    write_image(tmp_path / "Sintel/test/clean/market/frame_0002.png", rng)

    final = flow_dataset(f"sintel-final:{tmp_path}", split="val")
    assert len(final) == 2
    valid = np.ones((12, 16), dtype=bool)
    check_item(final[0], frames["final"][0], frames["final"][1], flows[0], valid)
    valid[4, 5] = False
    check_item(final[1], frames["final"][1], frames["final"][2], flows[1], valid)
    clean = flow_dataset(f"sintel-clean:{tmp_path / 'Sintel'}", split="train")  # the folder itself works too
    check_item(clean[1], frames["clean"][1], frames["clean"][2], flows[1], valid)
    assert len(flow_dataset(f"sintel:{tmp_path}", split="train")) == 4  # both passes
    test = flow_dataset(f"sintel-clean:{tmp_path}", split="test")
    image1, _, flow, mask = test[0]
    assert image1.shape == (3, 12, 16) and flow is None and mask is None


@pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")  # torchvision's own PNG decoder
def test_kitti_reader_decodes_16_bit_flow_and_its_sparse_mask(tmp_path):
    rng = np.random.default_rng(1)
    root = tmp_path / "KittiFlow/training"
    image1 = write_image(root / "image_2/000000_10.png", rng)
    image2 = write_image(root / "image_2/000000_11.png", rng)
    flow = (rng.integers(-64 * 200, 64 * 200, (2, 12, 16)) / 64).astype(np.float32)  # exact in KITTI's encoding
    valid = rng.random((12, 16)) < 0.4
    encoded = np.concatenate([flow * 64 + 2**15, valid[None]]).transpose(1, 2, 0).astype(np.uint16)
    write_png16(root / "flow_occ/000000_10.png", encoded)

    kitti = flow_dataset(f"kitti:{tmp_path}", split="val")
    assert len(kitti) == 1
    check_item(kitti[0], image1, image2, flow, valid)
    with pytest.raises(ValueError, match="sparse"):
        flow_dataset(f"kitti:{tmp_path}", split="train", augment=FlowAugmentation((8, 8)))


def test_chairs_reader_follows_the_train_val_list(tmp_path):
    rng = np.random.default_rng(2)
    root = tmp_path / "FlyingChairs"
    pairs, flows = [], []
    for i in (1, 2, 3):
        pairs.append([write_image(root / f"data/{i:05d}_img{k}.ppm", rng) for k in (1, 2)])
        flows.append(rng.normal(0, 5, (2, 12, 16)).astype(np.float32))
        write_flo(root / f"data/{i:05d}_flow.flo", flows[-1])
    (root / "FlyingChairs_train_val.txt").write_text("1\n2\n1\n")

    train, val = flow_dataset(f"chairs:{tmp_path}", split="train"), flow_dataset(f"chairs:{root}", split="val")
    assert (len(train), len(val)) == (2, 1)
    valid = np.ones((12, 16), dtype=bool)
    check_item(train[1], *pairs[2], flows[2], valid)
    check_item(val[0], *pairs[1], flows[1], valid)
    assert len(flow_dataset(f"chairs:{tmp_path}", split="train", length=5)) == 5  # cycles through the set
    with pytest.raises(ValueError, match="no 'test' split"):
        flow_dataset(f"chairs:{tmp_path}", split="test")


def test_things_reader_reads_pfm_flow_in_both_directions(tmp_path):
    rng = np.random.default_rng(3)
    root = tmp_path / "FlyingThings3D"
    frames = [write_image(root / f"frames_cleanpass/TRAIN/A/0000/left/{i:04d}.png", rng) for i in (6, 7, 8)]
    future = [rng.normal(0, 5, (2, 12, 16)).astype(np.float32) for _ in range(3)]
    past = [rng.normal(0, 5, (2, 12, 16)).astype(np.float32) for _ in range(3)]
    for i, (f, p) in enumerate(zip(future, past)):
        flow_dir = root / "optical_flow/TRAIN/A/0000"
        write_pfm(flow_dir / f"into_future/left/OpticalFlowIntoFuture_{6 + i:04d}_L.pfm", f)
        write_pfm(flow_dir / f"into_past/left/OpticalFlowIntoPast_{6 + i:04d}_L.pfm", p)

    things = flow_dataset(f"things-clean:{tmp_path}", split="train")
    assert len(things) == 4
    valid = np.ones((12, 16), dtype=bool)
    check_item(things[0], frames[0], frames[1], future[0], valid)
    check_item(things[2], frames[1], frames[0], past[1], valid)


# --------------------------------------------------------------------------------------------------------------------
# Augmentation

STILL = {"spatial_prob": 0.0, "hflip_prob": 0.0, "vflip_prob": 0.0, "eraser_prob": 0.0}
NO_COLOUR = {"brightness": 0.0, "contrast": 0.0, "saturation": 0.0, "hue": 0.0}


def test_augmentation_crops_and_is_reproducible(synthetic):
    augment = FlowAugmentation((96, 128), min_scale=-0.1, max_scale=0.5, vflip_prob=0.5, eraser_prob=1.0)
    first = augment(synthetic[0], 7)
    image1, image2, flow, valid = first
    assert image1.shape == image2.shape == (3, 96, 128) and flow.shape == (2, 96, 128) and valid.shape == (96, 128)
    assert image1.dtype == flow.dtype == torch.float32 and valid.dtype == torch.bool
    assert image1.min() >= -1 and image2.max() <= 1
    for a, b in zip(first, augment(synthetic[0], torch.Generator().manual_seed(7))):
        assert torch.equal(a, b)
    assert not torch.equal(image1, augment(synthetic[0], 8)[0])

    wrapped = AugmentedFlow(synthetic, augment, seed=1)
    assert torch.equal(wrapped[3][0], AugmentedFlow(synthetic, augment, seed=1)[3][0])
    before = wrapped[3][0]
    wrapped.set_epoch(1)
    assert not torch.equal(before, wrapped[3][0])


@pytest.mark.parametrize(("flip", "dim", "sign"), [("hflip_prob", -1, (-1.0, 1.0)), ("vflip_prob", -2, (1.0, -1.0))])
def test_a_flip_mirrors_images_and_negates_one_flow_component(synthetic, flip, dim, sign):
    item = synthetic[1]
    out = FlowAugmentation(SIZE, **{**STILL, **NO_COLOUR, flip: 1.0})(item, 0)
    assert torch.equal(out[0], item[0].flip(dim)) and torch.equal(out[1], item[1].flip(dim))
    assert torch.equal(out[2], item[2].flip(dim) * torch.tensor(sign)[:, None, None])
    assert torch.equal(out[3], item[3].flip(dim))


def test_with_everything_off_the_item_is_unchanged_and_symmetric_jitter_keeps_the_pair_consistent(synthetic):
    item = synthetic[2]
    for a, b in zip(FlowAugmentation(SIZE, **STILL, **NO_COLOUR)(item, 0), item):
        assert torch.equal(a, b)
    jittered = FlowAugmentation(SIZE, **STILL, asymmetric_prob=0.0)(item, 0)
    assert not torch.equal(jittered[0], item[0])
    with_flow, without = photometric_errors(*jittered)
    assert with_flow < 0.03 and with_flow < 0.3 * without


def test_resizing_keeps_dense_ground_truth_consistent(synthetic):
    augment = FlowAugmentation(
        (112, 144), min_scale=-0.1, max_scale=0.6, spatial_prob=1.0, stretch_prob=1.0, vflip_prob=0.5,
        eraser_prob=0.0, asymmetric_prob=0.0,
    )  # fmt: skip
    for seed in range(3):
        image1, image2, flow, valid = augment(synthetic[seed], seed)
        with_flow, without = photometric_errors(image1, image2, flow, valid)
        assert with_flow < 0.03 and with_flow < 0.3 * without, (seed, with_flow, without)
        assert valid.float().mean() > 0.6


def test_sparse_resize_moves_valid_points_with_scaled_flow():
    generator = torch.Generator().manual_seed(0)
    image = torch.rand(3, 20, 30, generator=generator) * 2 - 1
    flow = torch.randn(2, 20, 30, generator=generator) * 5
    valid = torch.rand(20, 30, generator=generator) < 0.2
    rows, columns = valid.nonzero(as_tuple=True)

    up_flow, up_valid = _resize_sparse(flow, valid, (40, 60))
    assert up_valid.sum() == valid.sum() and up_valid[2 * rows, 2 * columns].all()  # centre c → round(2c + 0.5) = 2c
    torch.testing.assert_close(up_flow[:, 2 * rows, 2 * columns], 2 * flow[:, rows, columns])
    assert (up_flow[:, ~up_valid] == 0).all()

    def scaled_points(factor: float) -> set[tuple[float, ...]]:
        return {tuple(v) for v in (factor * flow[:, rows, columns]).T.tolist()}

    down_flow, down_valid = _resize_sparse(flow, valid, (10, 15))
    assert 0 < down_valid.sum() <= valid.sum()
    assert {tuple(v) for v in down_flow[:, down_valid].T.tolist()} <= scaled_points(0.5)

    # through the augmentation: ×2, then a crop; every valid output is a valid input point's flow, doubled
    sparse = {**STILL, **NO_COLOUR, "spatial_prob": 1.0, "stretch_prob": 0.0, "sparse": True}
    out = FlowAugmentation((32, 52), min_scale=1.0, max_scale=1.0, **sparse)((image, image, flow, valid), 0)
    assert out[3].any() and {tuple(v) for v in out[2][:, out[3]].T.tolist()} <= scaled_points(2.0)
    assert (out[2][:, ~out[3]] == 0).all()


# --------------------------------------------------------------------------------------------------------------------
# Metrics and loss


def hand_batch():
    """Two 1×4 images: errors 0.5, 4, 2, 6 and 1, 3, 0, 10 px; the 4-px error is 4 % of its 100-px flow."""
    gt = torch.tensor([[[0, 100, 0, 3], [0, 0, 0, 4]], [[10, 0, 0, 0], [0, 0, 0, 0]]], dtype=torch.float32)
    error = torch.tensor([[[0.5, 4, 0, 6], [0, 0, 2, 0]], [[1, 3, 0, 0], [0, 0, 0, 10]]])
    valid = torch.tensor([[True, True, False, True], [True, True, True, False]])
    return (gt + error)[:, :, None], gt[:, :, None], valid[:, None]


def test_flow_metrics_match_a_hand_computation():
    pred, gt, valid = hand_batch()
    assert torch.equal(endpoint_error(pred, gt), torch.tensor([[[0.5, 4, 2, 6]], [[1, 3, 0, 10]]]))
    metrics = FlowMetrics()
    metrics.update(pred, gt, valid)
    expected = {
        "epe": 26.5 / 8,
        "1px": 100 * 2 / 8,  # 0.5, 0
        "3px": 100 * 4 / 8,  # 0.5, 2, 1, 0
        "5px": 100 * 6 / 8,
        "kitti_epe": ((0.5 + 4 + 6) / 3 + (1 + 3 + 0) / 3) / 2,
        "f1_all": 100 * 1 / 6,  # only the 6-px error on a 5-px flow; 4 px on 100 px is under 5 %, 3 px is not > 3
    }
    assert metrics.compute() == pytest.approx(expected)

    unmasked = FlowMetrics()
    unmasked.update(pred, gt)
    assert unmasked.compute() == pytest.approx({k: expected[k] for k in ("epe", "1px", "3px", "5px")})


def test_flow_metrics_accumulate_over_batches():
    generator = torch.Generator().manual_seed(0)
    pred, gt = torch.randn(2, 5, 2, 6, 7, generator=generator) * 4
    valid = torch.rand(5, 6, 7, generator=generator) < 0.7
    valid[4] = False  # an image without valid pixels is skipped by the KITTI EPE
    whole, parts = FlowMetrics(), FlowMetrics()
    whole.update(pred, gt, valid)
    parts.update(pred[:2], gt[:2], valid[:2])
    parts.update(pred[2:], gt[2:], valid[2:])
    assert parts.compute() == pytest.approx(whole.compute())
    epe = endpoint_error(pred, gt)
    assert whole.compute()["kitti_epe"] == pytest.approx(
        float(torch.stack([epe[i][valid[i]].mean() for i in range(4)]).mean())
    )
    with pytest.raises(ValueError, match="every batch"):
        parts.update(pred, gt)
    parts.reset()
    with pytest.raises(RuntimeError):
        parts.compute()


def test_sequence_loss_matches_a_hand_computation():
    generator = torch.Generator().manual_seed(1)
    gt = torch.randn(2, 2, 5, 6, generator=generator) * 3
    gt[0, :, 1, 1] = torch.tensor([300.0, 300.0])  # ‖gt‖ ≈ 424 > 400: excluded
    valid = torch.rand(2, 5, 6, generator=generator) < 0.8
    flows = [torch.randn(2, 2, 5, 6, generator=generator) for _ in range(3)]
    mask = valid & (gt.norm(dim=1) < 400)
    assert not mask[0, 1, 1]
    expected = 0.0
    for i, flow in enumerate(flows):
        expected += 0.7 ** (2 - i) * float((mask[:, None] * (flow - gt).abs()).sum()) / gt.numel()
    assert float(sequence_loss(flows, gt, valid, gamma=0.7)) == pytest.approx(expected)
    assert float(sequence_loss(flows[-1:], gt, None)) == pytest.approx(
        float(((gt.norm(dim=1) < 400)[:, None] * (flows[-1] - gt).abs()).mean())
    )


# --------------------------------------------------------------------------------------------------------------------
# Padding


def test_pad_to_multiple_pads_to_eight_and_128_and_unpads():
    image1, image2 = torch.rand(2, 2, 3, 100, 150)
    padded1, padded2, unpad = pad_to_multiple(image1, image2)
    assert padded1.shape == padded2.shape == (2, 3, 128, 152)
    assert torch.equal(unpad(padded1), image1) and torch.equal(unpad(padded2), image2)
    assert torch.equal(padded1[..., 0, 0], image1[..., 0, 0])  # replicated corner
    assert unpad(torch.zeros(2, 2, 128, 152)).shape == (2, 2, 100, 150)
    with pytest.raises(ValueError, match="128×152"):
        unpad(torch.zeros(2, 2, 128, 160))

    wide = torch.rand(1, 3, 436, 1024)  # Sintel
    assert pad_to_multiple(wide, wide)[0].shape == (1, 3, 440, 1024)
    small = torch.rand(1, 3, 128, 160)
    same, _, unpad = pad_to_multiple(small, small)
    assert torch.equal(same, small) and torch.equal(unpad(same), small)
