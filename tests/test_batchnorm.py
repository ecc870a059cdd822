"""featx finetune --bn: frozen, train and sync BatchNorm; auto's choice on real folded weights; the warning
when a run never leaves chance; the mode kept by resume, predict and staged unfreezing."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest
import torch
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from featx.core import runs
from featx.core.errors import FeatxError, FeatxWarning
from featx.evaluate.scoring import predict
from featx.finetune.run import FinetuneConfig, finetune
from featx.nets.models import ModelSpec, build_model, load_model

# the CLI of the interpreter running the tests, not whatever `featx` PATH finds (issue 12)
FEATX = [sys.executable, "-m", "featx"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
MNV2 = "mobilenet_v2_imagenet_tflite.pth"


def norm_keys(model: nn.Module) -> set[str]:
    """State-dict keys that belong to BatchNorm (plain or frozen) modules."""
    return {
        f"{name}.{k}"
        for name, m in model.named_modules()
        if isinstance(m, (nn.modules.batchnorm._BatchNorm, FrozenBatchNorm2d))
        for k in m.state_dict()
        if k != "num_batches_tracked"
    }


@pytest.mark.slow
@pytest.mark.numerics
def test_auto_freezes_folded_weights_and_learns_train_mode_stays_at_chance(
    real_cache, shared_weights, tmp_path, capsys, recwarn
):
    # The case: the shared MobileNetV2 has BatchNorm folded into its convolutions (identity statistics).
    kw = dict(
        data=real_cache,
        backbone="mobilenet_v2",
        weights=str(shared_weights / MNV2),
        classes=20,
        per_class=50,
        size=128,
        epochs=2,
        batch_size=32,
        lr=3e-4,
    )
    auto = finetune(FinetuneConfig(**kw), out=tmp_path / "auto", progress=False)
    err = capsys.readouterr().err
    assert "--bn auto: frozen" in err and not [w for w in recwarn if w.category is FeatxWarning]
    assert auto.best_val_top1 >= 0.70, auto.epochs
    assert runs.read_run(tmp_path / "auto").model["bn"] == "frozen"

    train = finetune(FinetuneConfig(bn="train", **kw), out=tmp_path / "train", progress=False)
    assert train.best_val_top1 < 0.10, train.epochs  # chance: 5%
    warnings = [str(w.message) for w in recwarn if w.category is FeatxWarning]
    assert len(warnings) == 1 and "not learning" in warnings[0] and "--bn frozen" in warnings[0], warnings


def test_frozen_mode_keeps_statistics_and_affine_trains_the_rest(synth_cache, shared_weights, tmp_path, capsys):
    weights = str(shared_weights / MNV2)
    out = tmp_path / "frozen"
    config = FinetuneConfig(
        data=synth_cache,
        backbone="mobilenet_v2",
        weights=weights,
        size=32,
        epochs=1,
        batch_size=16,
        lr=1e-3,
        bn="frozen",
    )
    result = finetune(config, out=out, progress=False)
    assert "--bn auto" not in capsys.readouterr().err  # only auto says what it picked
    spec = ModelSpec("mobilenet_v2", 32, 4, "linear", [0.5] * 3, [0.5] * 3, 56)
    before = build_model(spec, weights=weights).state_dict()
    ckpt = runs.load_checkpoint(out / result.snapshots[0].file)
    model, loaded = load_model(ckpt)
    assert loaded.bn == "frozen" and ckpt["config"]["bn"] == "frozen"
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert sum(isinstance(m, FrozenBatchNorm2d) for m in model.modules()) == 52
    after = ckpt["state"]
    norms = norm_keys(model)
    assert len(norms) == 52 * 4
    for k in norms:
        assert torch.equal(before[k], after[k]), k
    # the folded biases are real values, not the identity's zeros: the test would catch them being trained
    assert any(before[k].abs().sum() > 0 for k in norms if k.endswith(".bias"))
    convs = [k for k in after if k not in norms and k.startswith("body.")]
    assert convs and all(not torch.equal(before[k], after[k]) for k in convs)
    # predict and report rebuild the frozen model: predict scores exactly what the epoch's evaluation scored
    assert predict(runs=[out], split="val", eval_views="full", device="cpu").top_k(1) == pytest.approx(
        ckpt["val_top1"], abs=1e-9
    )

    # a re-run keeps the mode (the finished run is up to date) and refuses to change it
    again = finetune(config, out=out, progress=False)
    assert again.epochs == result.epochs
    with pytest.raises(FeatxError, match=r"other settings \(bn frozen → train\); pass --force"):
        finetune(dataclasses.replace(config, bn="train"), out=out, progress=False)


@pytest.mark.parametrize("bn", ["train", "frozen"])
def test_a_frozen_body_keeps_its_statistics_whatever_the_mode(synth_cache, tmp_path, bn):
    # random weights: BatchNorm statistics start at 0 and 1 and would move in the first training step
    out = tmp_path / bn
    finetune(
        FinetuneConfig(
            data=synth_cache,
            backbone="resnet18",
            weights="none",
            size=32,
            epochs=1,
            batch_size=16,
            freeze_epochs=1,
            bn=bn,
        ),
        out=out,
        progress=False,
    )
    spec = ModelSpec("resnet18", 32, 4, "linear", [0.485, 0.456, 0.406], [0.229, 0.224, 0.225], 56, bn=bn)
    before = build_model(spec).state_dict()
    after = runs.load_checkpoint(out / "checkpoints" / "last.pt")["state"]
    body = [k for k in after if k.startswith("body.")]
    assert any("running_var" in k for k in body)
    for k in body:
        assert torch.equal(before[k], after[k]), k
    assert not torch.equal(before["head.1.weight"], after["head.1.weight"])


def test_auto_trains_batchnorm_of_fresh_and_statistics_carrying_weights():
    from featx.nets.models import pick_batchnorm

    model = build_model(ModelSpec("resnet18", 32, 3, "linear", [0.5] * 3, [0.5] * 3, 32))
    # fresh weights hold identity statistics too, but only pretrained ones are folded
    assert pick_batchnorm("auto", model, pretrained=False) == "train"
    assert pick_batchnorm("auto", model, pretrained=True) == "frozen"
    model.train()(torch.randn(4, 3, 32, 32))  # statistics move off identity
    assert pick_batchnorm("auto", model, pretrained=True) == "train"
    # a model spec written before --bn existed trained its BatchNorm
    old = {k: v for k, v in vars(ModelSpec("resnet18", 32, 3, "linear", [0.5] * 3, [0.5] * 3, 32)).items() if k != "bn"}
    assert ModelSpec(**old).bn == "train"


def test_sync_on_cpu_is_refused_with_one_line(synth_cache, tmp_path):
    # torch's SyncBatchNorm raises for CPU tensors once a process group exists (gloo included)
    r = subprocess.run(
        [
            *FEATX,
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
            "--bn",
            "sync",
            "--device",
            "cpu",
            "--out",
            str(tmp_path / "sync"),
        ],
        env=ENV,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "--bn sync" in r.stderr, r.stderr
    assert not (tmp_path / "sync").exists()


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_sync_two_gpus_match_one_process(synth_cache, tmp_path):
    # Synchronised statistics over 2 x 4 images are the statistics of one batch of 8: the runs match.
    common = [
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
        "--aug",
        "none",
        "--optimizer",
        "sgd",
        "--lr",
        "0.05",
        "--precision",
        "fp32",
        "--no-channels-last",
        "--device",
        "cuda",
    ]
    subprocess.run(
        [*FEATX, *common, "--bn", "train", "--out", str(tmp_path / "one")], env=ENV, check=True, capture_output=True
    )
    two = subprocess.run(
        [
            *TORCHRUN,
            "--nproc-per-node",
            "2",
            "--no-python",
            *FEATX,
            *common,
            "--bn",
            "sync",
            "--out",
            str(tmp_path / "two"),
        ],
        env=ENV,
        capture_output=True,
        text=True,
    )
    assert two.returncode == 0, two.stderr[-2000:]
    one = runs.load_checkpoint(tmp_path / "one" / "checkpoints" / "last.pt")
    two = runs.load_checkpoint(tmp_path / "two" / "checkpoints" / "last.pt")
    for key in ("train_loss", "val_loss", "val_top1"):
        assert one["metrics"][0][key] == pytest.approx(two["metrics"][0][key], abs=1e-3)
    for k, v in one["state"].items():
        assert torch.allclose(v.float(), two["state"][k].float(), atol=1e-4), k


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_sync_trains_on_cuda_and_loads_anywhere(synth_cache, tmp_path):
    out = tmp_path / "sync"
    r = subprocess.run(
        [
            *TORCHRUN,
            "--nproc-per-node",
            "1",
            "--no-python",
            *FEATX,
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
            "2",
            "--batch-size",
            "8",
            "--bn",
            "sync",
            "--device",
            "cuda",
            "--out",
            str(out),
        ],
        env=ENV,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    ckpt = runs.load_checkpoint(out / runs.read_run(out).checkpoints[0].file)
    model, spec = load_model(ckpt)
    assert spec.bn == "sync" and any(isinstance(m, nn.SyncBatchNorm) for m in model.modules())
    # in eval mode SyncBatchNorm uses its running statistics: CPU inference works
    assert predict(runs=[out], split="val", eval_views="full", device="cpu").top_k(1) == pytest.approx(
        ckpt["val_top1"], abs=1e-6
    )
