"""The vision integration: timm HRNet → multiscale DEQ classifier. Parameters shared with timm's stage, the user's
model untouched, no BatchNorm statistic inside f changing, gradients of a tiny float64 block, a short run lowering
the loss and resuming exactly, the train / eval / analyse commands, and the errors."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import adapters
import implicit
from implicit.testing import assert_gradients

timm = pytest.importorskip("timm")
hrnet = pytest.importorskip("timm.models.hrnet")
resnet = pytest.importorskip("timm.models.resnet")
pytest.importorskip("sklearn")
pytest.importorskip("tqdm")

from integrations.vision import MDEQClassifier, hrnet_classifier, hrnet_to_mdeq  # noqa: E402
from integrations.vision.commands import main  # noqa: E402
from integrations.vision.data import image_dataset, parse_spec  # noqa: E402
from integrations.vision.train import Run, TrainConfig, evaluate, train  # noqa: E402

TINY = {"max_iter": 6, "tol": 1e-3}


@pytest.fixture(scope="module")
def digits():
    train_set = image_dataset("digits", split="train", size=32)
    test_set = image_dataset("digits", split="test", size=32)
    return train_set, test_set


def _net() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("hrnet_w18_small", pretrained=False)


def test_pinned_interface_and_shared_stage_parameters():
    net = _net()
    keys, bn_types = list(net.state_dict()), [type(m) for m in net.stage4.modules()]
    model = hrnet_to_mdeq(
        net, num_classes=10, stage="stage4", solver="anderson", max_iter=18, backward="phantom", jac_loss_probes=1
    )
    images = torch.randn(3, 3, 32, 32)
    logits = model(images)
    assert logits.shape == (3, 10)
    logits, info = model(images, return_info=True)
    assert info.forward.rel.shape == (3,) and info.jac_loss is not None and info.backward_mode == "phantom"
    assert [tuple(t.shape) for t in info.state] == [(3, 16, 8, 8), (3, 32, 4, 4), (3, 64, 2, 2), (3, 128, 1, 1)]
    # every convolution of timm's stage is the model's own tensor (by reference); BatchNorms became GroupNorms
    ours = {id(p) for p in model.deq.parameters()}
    convs = [m for m in net.stage4.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(id(m.weight) in ours for m in convs)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.deq.modules())
    assert model.conv1 is net.conv1 and model.stage3 is net.stage3 and model.transition3 is net.transition3
    # the user's model is not modified and still works
    assert list(net.state_dict()) == keys and [type(m) for m in net.stage4.modules()] == bn_types
    assert net.eval()(torch.randn(1, 3, 64, 64)).shape == (1, 1000)
    # training one trains the other
    with torch.no_grad():
        convs[0].weight.add_(1.0)
    assert torch.equal(dict(model.deq.named_parameters())[_name(model.deq, convs[0].weight)], convs[0].weight)
    # a name works too; the stacked baseline shares everything but its head
    assert hrnet_to_mdeq("hrnet_w18_small", num_classes=4, stage="stage2", **TINY)(images).shape == (3, 4)
    baseline = hrnet_classifier(net, num_classes=10)
    assert baseline.stage4 is net.stage4 and baseline.eval()(images).shape == (3, 10)


def _name(module: nn.Module, tensor: torch.Tensor) -> str:
    return next(n for n, p in module.named_parameters() if p is tensor)


def test_no_batchnorm_statistic_inside_f_changes_during_a_solve():
    net = _net()
    model = hrnet_to_mdeq(net, num_classes=10, max_iter=12, tol=1e-6).train()
    inside = {**{f"deq.{k}": v for k, v in model.deq.state_dict().items()}}
    inside.update({f"timm.stage4.{k}": v for k, v in net.stage4.state_dict().items()})
    before = {k: v.clone() for k, v in inside.items()}
    stem_before = net.bn1.running_mean.clone()
    logits, info = model(torch.randn(4, 3, 32, 32), return_info=True)
    logits.sum().backward()
    assert info.forward.nfe >= 12  # a real solve ran, in training mode
    assert all(torch.equal(before[k], v) for k, v in inside.items())
    assert int(net.stage4[0].branches[0][0].bn1.num_batches_tracked) == 0
    assert not torch.equal(net.bn1.running_mean, stem_before)  # outside f, BatchNorm trains as usual


def test_gradients_of_a_tiny_float64_multiscale_block():
    torch.manual_seed(0)
    channels = [4, 8]
    module = hrnet.HighResolutionModule(2, resnet.BasicBlock, (1, 1), list(channels), tuple(channels), "SUM", True)
    block = adapters.hrnet_stage_block(hrnet.SequentialList(module).double())
    gen = torch.Generator().manual_seed(1)
    x = [
        3 * torch.randn(2, c, 4 // 2**i, 4 // 2**i, dtype=torch.float64, generator=gen) for i, c in enumerate(channels)
    ]
    report = assert_gradients(block, x, backward="implicit", solver="anderson", references=("finite_differences",))
    assert report.passed and len(report.checks) > 10


def test_pretraining_is_unrolled_then_solved():
    model = hrnet_to_mdeq(_net(), num_classes=10, pretrain_steps=2, pretrain_depth=3, **TINY).train()
    images = torch.randn(2, 3, 32, 32)
    infos = [model(images, return_info=True)[1] for _ in range(3)]
    assert infos[0] is None and infos[1] is None and infos[2] is not None and model.steps_seen == 3
    with torch.no_grad():  # no gradient recorded: not a training step, solved
        assert model(images, return_info=True)[1] is not None and model.steps_seen == 3
    fresh = hrnet_to_mdeq(_net(), num_classes=10, pretrain_steps=2, **TINY)
    fresh.load_state_dict(model.state_dict())
    assert fresh.steps_seen == 3 and not fresh.pretraining


def test_a_short_run_lowers_the_loss_and_resumes_exactly(digits, tmp_path):
    train_set, test_set = digits
    small_train, small_test = train_set.subset(torch.arange(96)), test_set.subset(torch.arange(64))
    config = TrainConfig(epochs=4, batch_size=16, lr=5e-3, implicit=dict(TINY), shift=1)
    run = Run.start(config, small_train)
    before, _ = evaluate(run.model, small_train)
    run = train(run, progress=False, train_set=small_train, test_set=small_test)
    after, _ = evaluate(run.model, small_train)
    assert after["loss"] < 0.75 * before["loss"]  # measured 2.36 → 1.67 after 3 epochs
    losses = [r["loss"] for r in run.history]
    assert sum(losses[-6:]) < 0.85 * sum(losses[:6])
    assert len(run.epochs) == 4 and len(run.history) == 24 and run.history[0]["nfe"] <= 7
    # resume: 2 epochs, checkpoint, 2 more == 4 uninterrupted (bitwise, one thread, CPU)
    first = train(config, out=tmp_path, progress=False, stop_at_epoch=2, train_set=small_train, test_set=small_test)
    assert first.epoch == 2
    resumed = Run.load(tmp_path / "checkpoint.pt", train_set=small_train)
    assert resumed.epoch == 2 and resumed.step == 12
    resumed = train(resumed, progress=False, train_set=small_train, test_set=small_test)
    a, b = run.model.state_dict(), resumed.model.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a if k != "_extra_state")
    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in run.history]


def test_commands_train_eval_analyse(tmp_path, capsys):
    out = tmp_path / "run"
    common = ["--size", "32", "--batch-size", "256", "--epochs", "1", "--max-iter", "6", "--no-progress"]
    main(["train", *common, "--out", str(out)])
    for name in ("checkpoint.pt", "history.json", "curves.png", "residuals.png"):
        assert (out / name).stat().st_size > 0
    history = json.loads((out / "history.json").read_text())
    assert len(history["epochs"]) == 1 and 0.0 <= history["epochs"][0]["test_accuracy"] <= 1.0
    assert history["epochs"][0]["test_nfe"] <= 7
    metrics = main(["eval", str(out / "checkpoint.pt"), "--limit", "40", "--max-iter", "3", "--tol", "0"])
    assert metrics["nfe"] == 4.0  # 3 steps + the measuring call, the whole budget (tol 0)
    result = main(
        ["analyse", str(out / "checkpoint.pt"), "--limit", "24", "--aa-max-iter", "10", "--budgets", "1", "2"]
    )
    assert len(result["budget_table"]) == 2 and [r["budget"] for r in result["budget_table"]] == [6.0, 12.0]
    assert -1.0 <= result["aa"] <= 1.0 + 1e-9 and set(result["aa_per_start"]) == {"other", "noise"}
    assert (out / "analysis.json").is_file() and (out / "alignment.png").stat().st_size > 0
    printed = capsys.readouterr().out
    assert "asymptotic alignment on 24 test examples" in printed and "| factor | budget | accuracy |" in printed


def test_errors_name_the_problem(tmp_path):
    net = _net()
    with pytest.raises(ValueError, match="unknown stage 'stage5'"):
        hrnet_to_mdeq(net, num_classes=10, stage="stage5")
    with pytest.raises(ValueError, match="unknown head 'heavy'"):
        hrnet_to_mdeq(net, num_classes=10, head="heavy")
    with pytest.raises(ValueError, match="head='timm' reads the four branches"):
        hrnet_to_mdeq(net, num_classes=10, stage="stage3", head="timm")
    with pytest.raises(ValueError, match="num_classes"):
        hrnet_to_mdeq(net, num_classes=0)
    with pytest.raises(TypeError, match="not a timm HRNet"):
        hrnet_to_mdeq(nn.Linear(2, 2), num_classes=10)
    with pytest.raises(ValueError, match="Unknown model"):
        hrnet_to_mdeq("hrnet_w999", num_classes=10)
    with pytest.raises(TypeError, match="max_itr"):
        hrnet_to_mdeq(net, num_classes=10, max_itr=3)
    with pytest.raises(ValueError, match="multiples of 32"):
        hrnet_to_mdeq(net, num_classes=10, **TINY)(torch.randn(1, 3, 8, 8))
    with pytest.raises(ValueError, match="pretrain_steps of hrnet_to_mdeq must be an integer ≥ 0, got -1"):
        hrnet_to_mdeq(net, num_classes=10, pretrain_steps=-1)
    with pytest.raises(ValueError, match="pretrain_depth of hrnet_to_mdeq must be an integer ≥ 1, got True"):
        hrnet_to_mdeq(net, num_classes=10, pretrain_depth=True)
    with pytest.raises(ValueError, match="TrainConfig: unknown method 'deq'; valid: mdeq, stacked"):
        TrainConfig(method="deq")
    with pytest.raises(ValueError, match="TrainConfig: shift must be ≥ 0, got -1"):
        TrainConfig(shift=-1)
    with pytest.raises(ValueError, match="TrainConfig: epochs must be ≥ 1, got 0"):
        TrainConfig(epochs=0)
    with pytest.raises(ValueError, match="unknown data set"):
        parse_spec("mnist")
    with pytest.raises(ValueError, match="needs the folder"):
        parse_spec("cifar10")
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        image_dataset(f"cifar10:{tmp_path / 'missing'}", split="train")
    with pytest.raises(FileNotFoundError, match="no intact cifar-10-batches-py"):
        image_dataset(f"cifar10:{tmp_path}", split="train")
    with pytest.raises(SystemExit, match="no checkpoint"):
        main(["eval", str(tmp_path / "none.pt")])


def test_timm_head_and_float64():
    net = _net().double()
    model = hrnet_to_mdeq(net, num_classes=3, head="timm", **TINY).eval()
    assert model.head.incre_modules is net.incre_modules and model.head.classifier.out_features == 3
    logits, info = model(torch.randn(2, 3, 32, 32, dtype=torch.float64), return_info=True)
    assert logits.dtype == torch.float64 and logits.shape == (2, 3) and info.forward.z.dtype == torch.float64
    assert isinstance(model, MDEQClassifier) and implicit.ImplicitInfo is type(info)
