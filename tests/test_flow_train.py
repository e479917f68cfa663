"""Training and evaluating DEQ-Flow: a short run lowers the validation EPE, resumed runs continue bit-identically,
the data order is a function of the step, evaluation pads real-size images, and the train / eval / demo commands
write what they promise."""

from __future__ import annotations

import json

import pytest
import torch

optical_flow = pytest.importorskip("torchvision.models.optical_flow")
pytest.importorskip("tqdm")

from integrations.flow.commands import main  # noqa: E402
from integrations.flow.data import flow_dataset  # noqa: E402
from integrations.flow.train import Run, StepBatches, TrainConfig, evaluate, train  # noqa: E402

SMALL = {"size": (128, 160), "batch_size": 2, "val_pairs": 2, "implicit": {"max_iter": 3, "correction": 2}}


def _same_tensors(a: dict, b: dict) -> bool:
    return list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_a_short_run_lowers_the_validation_epe():
    config = TrainConfig(
        steps=40, val_every=40, val_pairs=8, size=(128, 160), batch_size=2, implicit={"max_iter": 4, "correction": 2}
    )
    run = Run.start(config)
    val_set = flow_dataset("synthetic", split="val", size=config.size)
    before = evaluate(run.model, val_set, pairs=8, batch_size=4)
    run = train(run, progress=False)
    after = run.validations[-1]
    assert after["epe"] < 0.8 * before["epe"]
    assert after["nfe"] == 7  # eval budget: 1.5 × 4 iterations, + 1 measuring call
    losses = [r["loss"] for r in run.history]
    assert sum(losses[-10:]) < sum(losses[:10])


def test_resumed_runs_continue_bit_identically(tmp_path):
    config = TrainConfig(steps=4, val_every=2, **SMALL)
    straight = train(config, progress=False)
    first = train(config, out=tmp_path, progress=False, stop_at=2)
    assert first.step == 2 and (tmp_path / "checkpoint.pt").exists()
    resumed = train(Run.load(tmp_path / "checkpoint.pt"), progress=False)
    assert resumed.step == 4
    assert _same_tensors(straight.model.state_dict(), resumed.model.state_dict())
    assert [r["loss"] for r in straight.history] == [r["loss"] for r in resumed.history]
    assert straight.validations == resumed.validations
    moments = [s["exp_avg"] for s in straight.optimizer.state_dict()["state"].values()]
    again = [s["exp_avg"] for s in resumed.optimizer.state_dict()["state"].values()]
    assert all(torch.equal(a, b) for a, b in zip(moments, again))
    assert straight.scheduler.get_last_lr() == resumed.scheduler.get_last_lr()


def test_checkpoints_hold_raft_state_dicts():
    run = Run.start(TrainConfig(**SMALL))
    raft = optical_flow.raft_small()
    raft.load_state_dict(run.model.state_dict(), strict=True)
    baseline = Run.start(TrainConfig(method="raft", size=(128, 160)))
    assert list(baseline.model.state_dict()) == list(run.model.state_dict())
    with pytest.raises(ValueError, match="takes no DEQ options"):
        TrainConfig(method="raft", implicit={"max_iter": 3})
    with pytest.raises(ValueError, match="unknown augmentation"):
        TrainConfig(augment="flips")


def test_step_batches_depend_only_on_the_step():
    whole = list(StepBatches(10, 3, seed=1, start=0, stop=8))
    assert list(StepBatches(10, 3, seed=1, start=5, stop=8)) == whole[5:]
    positions = [i for batch in whole for i in batch]
    assert sorted(positions[:10]) == list(range(10)) and sorted(positions[10:20]) == list(range(10))
    assert positions[:10] != positions[10:20]  # a new permutation each epoch
    assert list(StepBatches(10, 3, seed=2, start=0, stop=8)) != whole
    with pytest.raises(ValueError, match="fewer than one batch"):
        StepBatches(2, 3, seed=0, start=0, stop=1)


def test_evaluation_pads_pairs_whose_size_is_not_a_multiple_of_eight():
    """Real benchmark frames (Sintel 436×1024, KITTI 375×1242) are padded for RAFT and the flow cropped back."""
    g = torch.Generator().manual_seed(0)
    image = torch.rand(3, 130, 150, generator=g) * 2 - 1
    pairs = [(image, image.roll(2, 2), torch.zeros(2, 130, 150), torch.ones(130, 150, dtype=torch.bool))]
    model = Run.start(TrainConfig(**SMALL)).model
    result = evaluate(model, pairs, batch_size=1)
    assert set(result) >= {"epe", "1px", "3px", "5px", "kitti_epe", "f1_all", "nfe", "residual"}
    assert result["epe"] == pytest.approx(result["kitti_epe"])  # every pixel valid


def test_train_eval_and_baseline_commands(tmp_path, capsys):
    common = ["--size", "128", "160", "--batch-size", "2", "--val-pairs", "2", "--no-progress"]
    deq = tmp_path / "deq"
    main(["train", "--steps", "2", "--val-every", "1", "--max-iter", "3", "--out", str(deq), *common])
    history = json.loads((deq / "history.json").read_text())
    assert len(history["history"]) == 2 and len(history["validations"]) == 2
    assert all((deq / name).exists() for name in ("checkpoint.pt", "training.png", "flow.png", "residual.png"))

    rows = main(["eval", str(deq / "checkpoint.pt"), "--pairs", "2", "--budgets", "1", "2", "--batch-size", "2"])
    assert [r["budget"] for r in rows] == [3, 6] and [r["nfe"] for r in rows] == [4, 7]
    assert (deq / "flow_eval.png").exists()
    printed = capsys.readouterr().out
    assert "| 2× | 6 |" in printed

    # resume and extend
    main(["train", "--resume", str(deq / "checkpoint.pt"), "--steps", "3", "--out", str(deq), "--no-progress"])
    assert len(json.loads((deq / "history.json").read_text())["history"]) == 3

    raft = tmp_path / "raft"
    main(["train", "--baseline", "raft", "--updates", "3", "--steps", "1", "--out", str(raft), *common])
    rows = main(["eval", str(raft / "checkpoint.pt"), "--pairs", "2", "--budgets", "1", "2", "--batch-size", "2"])
    assert [r["budget"] for r in rows] == [3, 6] and "nfe" not in rows[0]


def test_demo_command_reports_before_and_after(tmp_path, capsys):
    out = tmp_path / "demo"
    main(
        [
            "demo",
            "--steps",
            "2",
            "--val-pairs",
            "2",
            "--batch-size",
            "2",
            "--max-iter",
            "6",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    printed = capsys.readouterr().out
    assert "before training" in printed and "after 2 steps" in printed and str(out.resolve()) in printed
    assert all((out / name).exists() for name in ("flow.png", "residual.png", "training.png", "checkpoint.pt"))
