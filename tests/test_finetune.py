"""featx finetune: every backbone trains, overfit sanity, exact resume after kill -9, torchrun DDP, heads."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tiers import TRAINED_FAST, backbone_names

from featx.core import runs
from featx.core.device import precision_name, resolve_precision
from featx.core.errors import FeatxError, FeatxWarning
from featx.finetune.run import FinetuneConfig, finetune
from featx.nets.heads import StackedHeads
from featx.nets.lstm_head import LSTMHead
from featx.nets.models import ModelSpec, build_model, load_model
from featx.probe.checkpoints import init_from_probe

FEATX = [sys.executable, "-m", "featx"]  # not through PATH: an unactivated virtualenv has no `featx` there
# One thread per process: bitwise-reproducible CPU kernels, and two torchrun workers fit two cores.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def spec(backbone: str, size: int = 32, head: str = "linear", **kw) -> ModelSpec:
    return ModelSpec(backbone, size, 3, head, [0.5] * 3, [0.5] * 3, crop=size, **kw)


def loss_after_steps(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int) -> list[float]:
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    losses = []
    model.train()
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("name", backbone_names(TRAINED_FAST))
def test_every_backbone_trains(name):
    # inception_v3's stem needs >= 75 px; EfficientNet's 1x1 last maps at 32 px make batch-4 BatchNorm too noisy;
    # bastidas_vgg flattens a 64x64 input's map
    size = 75 if name == "inception_v3" else 64 if name.startswith(("efficientnet", "bastidas_vgg")) else 32
    torch.manual_seed(0)
    model = build_model(spec(name, size)).double().train()
    x, y = torch.randn(4, 3, size, size, dtype=torch.float64), torch.tensor([0, 1, 2, 0])

    def loss() -> torch.Tensor:
        torch.manual_seed(1)  # the same stochastic-depth draws before and after the step
        return torch.nn.functional.cross_entropy(model(x), y)

    before = loss()
    before.backward()
    grads = [p for p in model.parameters() if p.grad is not None]
    squared = sum(float(p.grad.pow(2).sum()) for p in grads)
    with torch.no_grad():
        for p in grads:
            p -= 1e-6 / squared * p.grad
        after = loss()
    # A gradient step sized to lower the loss by 1e-6 to first order does so: the gradients are right in every
    # layer. A few float32 Adam steps (before) rose or fell with the CPU's kernels: random-init deep nets with
    # batch-4 BatchNorm are so ill-conditioned that float32 rounding decided the direction (issue 22).
    assert float(before - after) == pytest.approx(1e-6, rel=0.1)


@pytest.mark.parametrize("name, maps", [("resnet18", [(256, 16), (512, 4)]), ("resnet50", [(1024, 16), (2048, 4)])])
def test_lstm_head_shapes_and_step(name, maps):
    torch.manual_seed(0)
    model = build_model(spec(name, 64, head="lstm"))
    x, y = torch.randn(2, 3, 64, 64), torch.tensor([0, 2])
    shapes = [(m.shape[1], m.shape[2] * m.shape[3]) for m in model.body(x).values()]
    assert shapes == maps  # layer3 and layer4 at 64 px: 4x4 and 2x2
    n_groups = [c // 64 for c, _ in maps]
    assert len(model.head.lstms) == sum(n_groups)
    assert model.head.fc.in_features == sum(g * hw for g, (_, hw) in zip(n_groups, maps))
    assert model(x).shape == (2, 3)
    before = model.head.lstms[0].weight_ih_l0.clone()
    losses = loss_after_steps(model, x, y, 1)
    assert torch.isfinite(torch.tensor(losses)).all()
    assert not torch.equal(before, model.head.lstms[0].weight_ih_l0)


def test_lstm_head_reads_channel_groups_as_sequences():
    head = LSTMHead([(128, 4)], num_classes=5)
    maps = torch.randn(3, 128, 2, 2)
    # the second group's LSTM sees channels 64..127 as 64 steps of 4 inputs
    seq = maps.flatten(2)[:, 64:]
    assert head.lstms[1](seq)[1][0].shape == (1, 3, 4)
    assert head([maps]).shape == (3, 5)


def test_drop_path_resnet_and_native():
    from torchvision.ops import StochasticDepth

    model = build_model(spec("resnet18", drop_path=0.2))
    rates = [m.p for m in model.modules() if isinstance(m, StochasticDepth)]
    assert len(rates) == 8 and rates == sorted(rates) and rates[-1] == pytest.approx(0.2)
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    assert torch.equal(model(x), model(x))
    convnext = build_model(spec("convnext_tiny", drop_path=0.3))
    assert max(m.p for m in convnext.modules() if isinstance(m, StochasticDepth)) == pytest.approx(0.3)
    with pytest.raises(FeatxError, match="--drop-path"):
        build_model(spec("vit_b_16", drop_path=0.1))


@pytest.mark.parametrize("init, std", [("gaussian:0.1", 0.1), ("xavier", (2 / (576 + 1152)) ** 0.5)])
def test_init(init, std):
    model = build_model(dataclasses.replace(spec("resnet18"), num_classes=200), init=init)
    w = model.body.layer2[0].conv1.weight.detach()  # (128, 64, 3, 3): fan_in 576, fan_out 1152
    assert float(w.std()) == pytest.approx(std, rel=0.05)
    # the new 200-way classifier too (it used to keep PyTorch's default, std ~0.0255, issue 23): (200, 512)
    head = model.head[1].weight.detach()
    head_std = 0.1 if init.startswith("gaussian") else (2 / (512 + 200)) ** 0.5
    assert head.shape == (200, 512) and float(head.std()) == pytest.approx(head_std, rel=0.05)
    assert not model.head[1].bias.any()
    with pytest.raises(FeatxError, match="--init"):
        build_model(spec("resnet18"), init="gaussian:wide")


def test_init_head_folds_a_standardised_probe_head(tmp_path):
    probe = StackedHeads(heads=1, in_dim=512, num_classes=3, normalize="standard")
    torch.nn.init.normal_(probe.weights[0])
    probe.set_standardization(torch.randn(512), torch.rand(512) + 0.5)
    run = runs.start_run(tmp_path / "probe", kind="probe", config={}, features={"backbone": "resnet18"})
    torch.save(
        {
            "format": "featx-head-1",
            "state": probe.head_state(0),
            "config": {"normalize": "standard"},
            "classes": ["a", "b", "c"],
        },
        run / "checkpoints" / "head00.pt",
    )
    runs.update_run(run, checkpoints=[runs.Snapshot("checkpoints/head00.pt", 0, 1, 1.0, 1.0)])
    model = build_model(spec("resnet18"))
    init_from_probe(str(run), backbone="resnet18", classes=["a", "b", "c"], head=model.head)
    f = torch.randn(4, 512)
    assert torch.allclose(model.head.eval()(f), probe(f)[0], atol=1e-4)
    with pytest.raises(FeatxError, match="--init-head"):
        init_from_probe(str(run), backbone="resnet50", classes=["a", "b", "c"], head=model.head)


def test_run_directory_and_checkpoint_rebuilds_model(synth_cache, tmp_path):
    out = tmp_path / "run"
    result = finetune(
        FinetuneConfig(
            data=synth_cache,
            backbone="resnet18",
            weights="none",
            size=32,
            epochs=3,
            batch_size=16,
            aug=["flip", "crop", "color"],
            mixup=0.2,
            freeze_epochs=1,
            keep=2,
        ),
        out=out,
        progress=False,
    )
    metrics = json.loads((out / "metrics.json").read_text())["heads"][0]["epochs"]
    assert [r["epoch"] for r in metrics] == [1, 2, 3]
    for key in ("train_loss", "train_top1", "val_loss", "val_top1", "val_top5"):
        assert all(r[key] >= 0 for r in metrics) and all(r[key] <= 1 for r in metrics if "top" in key)
    assert (out / "metrics.csv").read_text().count("\n") == 4 and (out / "curves.png").stat().st_size > 0
    record = runs.read_run(out)
    listed = record.checkpoints
    # what ran beside what was asked: auto precision is this machine's, and a job this small runs eager
    assert record.config["precision"] == "auto"
    assert record.resolved == {
        "precision": precision_name(resolve_precision("auto", torch.device("cpu"))),
        "compile": "off",
        "unfrozen_epoch": 2,  # the first epoch the body trained, after --freeze-epochs 1
    }
    assert len(listed) == 2 == len(list((out / "checkpoints").glob("epoch*.pt")))
    assert listed == result.snapshots and listed[0].val_top1 >= listed[1].val_top1
    model, model_spec = load_model(runs.load_checkpoint(out / listed[0].file))
    assert model_spec.num_classes == 4 and model(torch.zeros(1, 3, 32, 32)).shape == (1, 4)
    with pytest.raises(FeatxError, match=r"other settings \(batch_size 16 → 128; .*\); pass --force"):
        finetune(
            FinetuneConfig(data=synth_cache, backbone="resnet18", weights="none", size=32, epochs=3),
            out=out,
            progress=False,
        )
    results = json.loads((out / "results.json").read_text())
    best = max(metrics, key=lambda r: (r["val_top1"], r["val_top5"]))
    assert results["top1"] == best["val_top1"] and results["views"] == "center" and results["split"] == "val"
    assert results["top1_interval"][0] <= results["top1"] <= results["top1_interval"][1]


@pytest.mark.slow
@pytest.mark.numerics
def test_overfit_reaches_100_percent_on_real_images(real_cache, tmp_path, recwarn):
    kw = dict(data=real_cache, backbone="resnet18", weights="none", size=32, classes=4, overfit=20, batch_size=10)
    result = finetune(FinetuneConfig(epochs=8, **kw), out=tmp_path / "ok", progress=False)
    assert result.epochs[-1]["train_top1"] == 1.0
    assert not [w for w in recwarn if w.category is FeatxWarning]
    with pytest.warns(FeatxWarning, match="^--overfit 20: reached"):
        finetune(FinetuneConfig(epochs=1, **kw), out=tmp_path / "short", progress=False)


def test_nan_loss_stops_and_names_the_step(synth_cache, tmp_path):
    with pytest.raises(FeatxError, match=r"loss is NaN at epoch 1 step \d+"):
        finetune(
            FinetuneConfig(
                data=synth_cache,
                backbone="resnet18",
                weights="none",
                size=32,
                epochs=2,
                batch_size=8,
                optimizer="sgd",
                lr=1e12,
            ),
            out=tmp_path / "nan",
            progress=False,
        )
    assert not (tmp_path / "nan" / "checkpoints" / "last.pt").exists()


def _args(cache: Path, out: Path, *extra: str) -> list[str]:
    return [
        "finetune",
        "--data",
        str(cache),
        "--backbone",
        "resnet18",
        "--weights",
        "none",
        "--size",
        "64",
        "--epochs",
        "3",
        "--batch-size",
        "8",
        "--aug",
        "flip,crop,shift",
        "--mixup",
        "0.2",
        "--device",
        "cpu",
        "--out",
        str(out),
        *extra,
    ]


@pytest.mark.slow
@pytest.mark.numerics
def test_resume_after_kill_9_matches_uninterrupted_run(synth_cache, tmp_path):
    subprocess.run([*FEATX, *_args(synth_cache, tmp_path / "a")], env=ENV, check=True, capture_output=True)
    proc = subprocess.Popen([*FEATX, *_args(synth_cache, tmp_path / "b")], env=ENV, stderr=subprocess.PIPE)
    metrics = tmp_path / "b" / "metrics.json"
    while not metrics.exists() and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(0.5)  # into epoch 2
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert runs.load_checkpoint(tmp_path / "b" / "checkpoints" / "last.pt")["epoch"] < 3
    again = subprocess.run(
        [*FEATX, *_args(synth_cache, tmp_path / "b")], env=ENV, check=True, capture_output=True, text=True
    )  # the same command resumes: no --resume needed
    assert re.search(r"featx: resuming: [12] of 3 epochs done", again.stderr), again.stderr
    a = runs.load_checkpoint(tmp_path / "a" / "checkpoints" / "last.pt")
    b = runs.load_checkpoint(tmp_path / "b" / "checkpoints" / "last.pt")
    assert a["epoch"] == b["epoch"] == 3 and a["metrics"][-1]["train_loss"] == b["metrics"][-1]["train_loss"]
    for k, v in a["state"].items():
        assert torch.equal(v, b["state"][k]), k


@pytest.mark.slow
def test_torchrun_two_processes_match_one(synth_cache, tmp_path):
    # LayerNorm (ConvNeXt) and SGD: per-process batch statistics and Adam's normalisation would blur the match
    common = [
        "finetune",
        "--data",
        str(synth_cache),
        "--backbone",
        "convnext_tiny",
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
        "--drop-path",
        "0",
        "--optimizer",
        "sgd",
        "--lr",
        "0.05",
        "--device",
        "cpu",
        "--precision",
        "fp32",
        "--compile",
        "off",
    ]
    subprocess.run([*FEATX, *common, "--out", str(tmp_path / "one")], env=ENV, check=True, capture_output=True)
    two = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "2",
            "--no-python",
            *FEATX,
            *common,
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
        assert one["metrics"][0][key] == pytest.approx(two["metrics"][0][key], abs=1e-4)
    for k, v in one["state"].items():
        assert torch.allclose(v, two["state"][k], atol=1e-5), k


def test_user_errors_are_one_line(synth_cache, tmp_path):
    for extra, option in [
        (["--backbone", "vgg_tiny"], "--backbone vgg_tiny"),
        (["--backbone", "resnet18", "--init", "xavier"], "--init xavier"),
        (["--backbone", "resnet18", "--weights", "none", "--aug", "twirl"], "--aug twirl"),
    ]:
        r = subprocess.run(
            [
                *FEATX,
                "finetune",
                "--data",
                str(synth_cache),
                "--out",
                str(tmp_path / "x"),
                "--batch-size",
                "8",
                "--size",
                "32",
                "--epochs",
                "1",
                *extra,
            ],
            env=ENV,
            capture_output=True,
            text=True,
        )
        assert r.returncode == 2 and option in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_mixed_precision(synth_cache, tmp_path):
    for precision in ("bf16", "fp16"):
        result = finetune(
            FinetuneConfig(
                data=synth_cache,
                backbone="resnet18",
                weights="none",
                size=64,
                epochs=2,
                batch_size=16,
                aug=["flip", "crop", "rotate"],
                precision=precision,
                compile=precision == "bf16",
                device="cuda",
            ),
            out=tmp_path / precision,
            progress=False,
        )
        assert result.epochs[-1]["train_loss"] < result.epochs[0]["train_loss"] + 0.5
