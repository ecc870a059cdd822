"""The finetune options the reports need (issue 13): --activation, the LSTM head's group and stages,
--unfreeze-on-plateau, --snapshot-every, --normalize mean-image, the centre-crop evaluation of crop-trained
models, and stochastic depth's drop rate."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import StochasticDepth

from featx.core import runs
from featx.core.errors import FeatxError
from featx.data.cache import read_split
from featx.evaluate.scoring import predict
from featx.finetune.run import FinetuneConfig, check_config, eval_views, finetune, trains_head_alone
from featx.nets.models import MODEL_FORMAT, ModelSpec, SubtractImage, build_model, load_model

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def spec(backbone: str = "resnet18", size: int = 32, head: str = "linear", **kw) -> ModelSpec:
    return ModelSpec(backbone, size, 3, head, [0.5] * 3, [0.5] * 3, crop=size, **kw)


def checkpoint(model: nn.Module, s: ModelSpec) -> dict:
    """What finetune saves, through the same torch.save/load round trip."""
    return {"format": MODEL_FORMAT, "state": model.state_dict(), "model": dataclasses.asdict(s)}


# --- --activation --------------------------------------------------------------------------------------------


def test_elu_replaces_every_relu_of_a_resnet_and_is_rebuilt_from_the_checkpoint(tmp_path):
    torch.manual_seed(0)
    elu = build_model(spec(activation="elu")).eval()
    kinds = [type(m) for m in elu.modules()]
    assert nn.ReLU not in kinds and kinds.count(nn.ELU) == 9  # the stem's and one per BasicBlock (used twice)
    relu = build_model(spec()).eval()
    x = torch.randn(2, 3, 32, 32)
    relu.load_state_dict(elu.state_dict())  # same weights: only the activation differs
    assert not torch.allclose(elu(x), relu(x))
    torch.save(checkpoint(elu, spec(activation="elu")), tmp_path / "m.pt")
    rebuilt, rebuilt_spec = load_model(runs.load_checkpoint(tmp_path / "m.pt"))
    assert rebuilt_spec.activation == "elu" and torch.equal(rebuilt(x), elu(x))
    with pytest.raises(FeatxError, match="--activation elu: only for the ResNets"):
        build_model(spec("vgg_tiny", 64, activation="elu"))


# --- the LSTM head: group and stages ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "group, stages, hidden",
    [
        (64, ["layer3", "layer4"], [16] * 4 + [4] * 8),  # at 64 px: layer3 256 x 4x4, layer4 512 x 2x2
        (128, ["layer3", "layer4"], [16] * 2 + [4] * 4),  # Inan's "128 instead of 64"
        (64, ["layer2", "layer3"], [64] * 2 + [16] * 4),
    ],
)  # "LSTM's to the earlier layers": layer2 128 x 8x8
def test_lstm_group_and_stages(group, stages, hidden):
    torch.manual_seed(0)
    model = build_model(spec(size=64, head="lstm", lstm_group=group, lstm_stages=stages))
    assert [lstm.hidden_size for lstm in model.head.lstms] == hidden
    assert {lstm.input_size for lstm in model.head.lstms} == set(hidden)
    assert model.head.fc.in_features == sum(hidden)
    x = torch.randn(2, 3, 64, 64)
    maps = list(model.body(x).values())
    assert [m.shape[1] for m in maps] == [{"layer2": 128, "layer3": 256, "layer4": 512}[s] for s in stages]
    # each LSTM reads `group` steps: the first LSTM's last hidden state is the one of the first `group` channels
    first = model.head.lstms[0](maps[0].flatten(2)[:, :group])[1][0][-1]
    assert first.shape == (2, hidden[0])
    assert model(x).shape == (2, 3)


def test_lstm_head_has_no_dropout_at_zero_and_refuses_bad_groups_and_stages():
    assert not [m for m in build_model(spec(size=64, head="lstm")).modules() if isinstance(m, nn.Dropout)]
    drops = [m for m in build_model(spec(size=64, head="lstm", dropout=0.3)).modules() if isinstance(m, nn.Dropout)]
    assert [d.p for d in drops] == [0.3]
    with pytest.raises(FeatxError, match="--lstm-group 96: layer3 has 256 channels"):
        build_model(spec(size=64, head="lstm", lstm_group=96))
    with pytest.raises(FeatxError, match="--lstm-stages layer5"):
        build_model(spec(size=64, head="lstm", lstm_stages=["layer5"]))
    with pytest.raises(FeatxError, match="--lstm-group"):
        check_config(FinetuneConfig(backbone="resnet18", lstm_group=128))


# --- stochastic depth ------------------------------------------------------------------------------------------


def test_drop_path_drops_a_blocks_residual_branch_at_the_rate_asked_in_training_only():
    torch.manual_seed(0)
    model = build_model(spec(drop_path=0.4))
    blocks = [model.body.layer2[0], model.body.layer4[1]]  # the 3rd of 8 blocks (rate 0.4 * 3/8) and the last
    x = {id(blocks[0]): torch.randn(50, 64, 8, 8), id(blocks[1]): torch.randn(50, 512, 1, 1)}
    for block, rate in zip(blocks, (0.4 * 3 / 8, 0.4)):
        sd = next(m for m in block.modules() if isinstance(m, StochasticDepth))
        assert sd.p == pytest.approx(rate)
        dropped, seen = [], []

        def count(module, args, out, dropped=dropped, seen=seen):  # bound now: the lists of this block
            dropped.append(int((out.flatten(1).abs().sum(1) == 0).sum()))
            seen.append(int((args[0].flatten(1).abs().sum(1) > 0).sum()))

        hook = sd.register_forward_hook(count)
        block.train()
        with torch.no_grad():
            for _ in range(40):  # 2,000 branch draws
                block(x[id(block)])
        n = sum(seen)
        assert n == 2000 and abs(sum(dropped) / n - rate) < 4 * (rate * (1 - rate) / n) ** 0.5
        dropped.clear()
        block.eval()
        with torch.no_grad():
            for _ in range(10):
                block(x[id(block)])
        hook.remove()
        assert sum(dropped) == 0


# --- --unfreeze-on-plateau -------------------------------------------------------------------------------------


def _rows(*tops: float, unfrozen_from: int = 99) -> list[dict]:
    return [{"val_top1": t, "frozen": i + 1 < unfrozen_from} for i, t in enumerate(tops)]


def test_the_plateau_switch_is_a_function_of_the_recorded_epochs():
    plateau = FinetuneConfig(backbone="resnet18", freeze_epochs=2, unfreeze_on_plateau=2, epochs=20)
    assert trains_head_alone(plateau, []) and trains_head_alone(plateau, _rows(0.5))  # --freeze-epochs 2 first
    assert trains_head_alone(plateau, _rows(0.5, 0.6, 0.6))  # best 1 epoch ago
    assert not trains_head_alone(plateau, _rows(0.5, 0.6, 0.6, 0.55))  # no better than 0.6 for 2 epochs
    assert not trains_head_alone(plateau, _rows(0.5, 0.6, 0.6, 0.55, 0.9, unfrozen_from=5))  # stays unfrozen
    fixed = FinetuneConfig(backbone="resnet18", freeze_epochs=2, epochs=20)
    assert [trains_head_alone(fixed, _rows(*[0.5] * n)) for n in range(4)] == [True, True, False, False]
    assert not trains_head_alone(FinetuneConfig(backbone="resnet18"), [])


@pytest.mark.numerics
def test_backbone_is_unchanged_until_the_plateau_and_changes_after(synth_cache, tmp_path):
    out = tmp_path / "plateau"
    config = FinetuneConfig(
        data=synth_cache,
        backbone="resnet18",
        weights="none",
        size=32,
        epochs=4,
        batch_size=16,
        aug=[],
        freeze_epochs=1,
        unfreeze_on_plateau=1,
        keep=4,
        device="cpu",
    )
    result = finetune(config, out=out, progress=False)
    frozen = [r["frozen"] for r in result.epochs]
    switch = frozen.index(False) + 1  # the first epoch the body trained
    assert frozen == [True] * (switch - 1) + [False] * (5 - switch) and 3 <= switch <= 4
    assert json.loads((out / "metrics.json").read_text())["heads"][0]["unfrozen_epoch"] == switch
    tops = [r["val_top1"] for r in result.epochs[: switch - 1]]
    assert tops.index(max(tops)) == len(tops) - 2  # the switch came after one epoch without improvement
    initial = build_model(load_model(runs.load_checkpoint(out / result.snapshots[0].file))[1]).state_dict()
    heads = []
    for epoch in range(1, 5):
        state = runs.load_checkpoint(out / runs.CHECKPOINTS / f"epoch{epoch:03d}.pt")["state"]
        body = [k for k in state if k.startswith("body.") and state[k].is_floating_point()]
        same = all(torch.equal(state[k], initial[k]) for k in body)
        assert same == (epoch < switch), epoch
        heads.append(state["head.1.weight"])
    assert not torch.equal(heads[0], heads[1])  # the head trained while the body was frozen


# --- --snapshot-every, --normalize mean-image and the centre-crop evaluation -----------------------------------


@pytest.mark.numerics
def test_snapshots_every_steps_mean_image_and_centre_crop_evaluation(synth_cache, tmp_path):
    out = tmp_path / "run"
    config = FinetuneConfig(
        data=synth_cache,
        backbone="resnet18",
        weights="none",
        size=48,
        epochs=2,
        batch_size=16,
        aug=["crop", "rotate:45"],
        crop=56,
        normalize="mean-image",
        snapshot_every=2,
        keep=20,
        device="cpu",
    )
    result = finetune(config, out=out, progress=False)
    # 48 images / 16 = 3 steps an epoch: evaluated after steps 2 and 4, and at each epoch's end (3, 6)
    assert sorted(s.step for s in result.snapshots) == [2, 3, 4, 6]
    assert sorted((s.epoch, s.step) for s in runs.read_run(out).checkpoints) == [(1, 2), (1, 3), (2, 4), (2, 6)]
    assert {p.name for p in (out / runs.CHECKPOINTS).glob("step*.pt")} == {f"step{s:07d}.pt" for s in (2, 3, 4, 6)}

    best = result.snapshots[0]
    model, model_spec = load_model(runs.load_checkpoint(out / best.file))
    assert model_spec.views == ["center"] and model_spec.normalize == "mean-image"
    assert model_spec.mean == [0.0] * 3 and model_spec.std == [1.0] * 3
    train = read_split(synth_cache, "train").read_images().astype(np.float64) / 255
    mean = torch.from_numpy(train.mean(0)).float().permute(2, 0, 1)[None]  # the mean training image, 64x64
    expected = F.interpolate(mean, size=(48, 48), mode="bilinear", align_corners=False, antialias=True)[0]
    image = next(m for m in model.modules() if isinstance(m, SubtractImage)).image
    assert torch.allclose(image, expected, atol=1e-5)

    # predict scores the view training was evaluated on: the centre 56-px window, upsampled, mean image subtracted
    p = predict(runs=[out], split="val", eval_views="full", ensemble="best")
    assert p.top_k(1) == pytest.approx(best.val_top1)
    val = torch.from_numpy(read_split(synth_cache, "val").read_images()).permute(0, 3, 1, 2).float() / 255
    window = F.interpolate(val[:, :, 4:60, 4:60], size=(48, 48), mode="bilinear", align_corners=False, antialias=True)
    with torch.no_grad():
        probs = model(window).softmax(-1).numpy()
    assert np.allclose(probs, p.probs, atol=1e-4)


def test_without_crop_augmentation_evaluation_sees_the_whole_image():
    assert eval_views(FinetuneConfig(backbone="resnet18", aug=["flip", "shift:0.1"])) == ["full"]
    assert eval_views(FinetuneConfig(backbone="resnet18", aug=["crop"], overfit=10)) == ["full"]  # no augmentation
    assert eval_views(FinetuneConfig(backbone="resnet18", aug=["flip", "crop"])) == ["center"]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--aug", "rotate:400"], "--aug rotate:400: the rotate magnitude (degrees) must be between 0 and 180"),
        (["--aug", "crop:40"], "--aug crop:40: crop takes no magnitude"),
        (["--lstm-group", "128"], "--lstm-group/--lstm-stages: options of the LSTM head; add --head lstm"),
        (["--backbone", "vgg_tiny", "--activation", "elu"], "--activation elu: only for the ResNets"),
    ],
)
def test_user_errors_are_one_line(synth_cache, tmp_path, extra, message):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "featx",
            "finetune",
            "--data",
            str(synth_cache),
            "--backbone",
            "resnet18",
            "--weights",
            "none",
            "--size",
            "32",
            "--epochs",
            "1",
            "--batch-size",
            "8",
            "--device",
            "cpu",
            "--out",
            str(tmp_path / "x"),
            *extra,
        ],
        env=ENV,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
