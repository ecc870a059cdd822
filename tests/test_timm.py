"""`timm:<name>` backbones end to end: the CLI extracts and probes through them, featx's features are timm's own
pre-logits features, `--weights none` is seeded, local weight files load without unpickling code, offline
default weights fail in one line, and pipelines/best.toml runs on a small stand-in of its backbone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from synth import write_tiny_imagenet

from featx.core.errors import FeatxError
from featx.data.cache import read_split
from featx.features.store import load_features, read_meta
from featx.nets.backbones import create_backbone
from featx.nets.views import render_views

timm = pytest.importorskip("timm")

BEST = Path(__file__).resolve().parents[1] / "pipelines" / "best.toml"
# Small members of each family: a CNN (pooled, fc), a ViT (class token), ConvNeXt-V2 (pool + head norm) and
# EVA-02 (rotary embeddings, the family of best.toml), each at a size other than its native one.
FAMILIES = [
    ("resnet18", 64),
    ("vit_tiny_patch16_224", 64),
    ("convnextv2_atto", 64),
    ("eva02_tiny_patch14_224.mim_in22k", 56),
]


def featx_cli(*args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "featx", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def timm_features(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What timm itself calls the pre-logits features."""
    with torch.inference_mode():
        return model.eval().forward_head(model.forward_features(x), pre_logits=True)


def timm_model(name: str, size: int, seed: int = 0, **kwargs) -> torch.nn.Module:
    """timm's model as a user of timm would create it, seeded and resized."""
    torch.manual_seed(seed)
    model = timm.create_model(name, num_classes=kwargs.pop("num_classes", 0), **kwargs)
    if hasattr(model, "set_input_size"):
        model.set_input_size(img_size=size)
    return model


@pytest.mark.slow
@pytest.mark.numerics
@pytest.mark.parametrize("name, size", [FAMILIES[0], FAMILIES[1]], ids=["cnn", "vit"])
def test_extract_and_probe_through_the_cli(name, size, synth_cache, tmp_path):
    out = tmp_path / "f.h5"
    run = featx_cli(
        "extract",
        "--data",
        str(synth_cache),
        "--backbone",
        f"timm:{name}",
        "--weights",
        "none",
        "--size",
        str(size),
        "--views",
        "flip",
        "--dtype",
        "float32",
        "--device",
        "cpu",
        "--precision",
        "fp32",
        "--out",
        str(out),
    )  # compared with timm's fp32 forward below
    assert run.returncode == 0, run.stderr
    meta = read_meta(out)
    cfg = timm.models.get_pretrained_cfg(name)
    assert meta.backbone == f"timm:{name}" and meta.weights == "none" and meta.input_size == size
    assert tuple(meta.mean) == cfg.mean and tuple(meta.std) == cfg.std  # timm's data config, not ImageNet's default

    # The stored features are timm's own forward on the batch featx preprocessed.
    val = read_split(synth_cache, "val")
    x = render_views(
        torch.from_numpy(val.read_images()), views=meta.views, crop=meta.crop, size=size, mean=meta.mean, std=meta.std
    )
    want = timm_features(timm_model(name, size), x).reshape(len(val), 2, -1).numpy()
    got = load_features(out, "val").features
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3 * np.abs(want).max())

    run = featx_cli(
        "probe",
        "--features",
        str(out),
        "--out",
        str(tmp_path / "probe"),
        "--lr",
        "1e-3,3e-3",
        "--epochs",
        "5",
        "--batch-size",
        "16",
        "--normalize",
        "standard",
        "--device",
        "cpu",
    )
    assert run.returncode == 0, run.stderr
    metrics = json.loads((tmp_path / "probe" / "metrics.json").read_text())
    # 4 colour-coded classes: even random-init features separate them well above chance (25%)
    assert metrics["best"]["val_top1"] >= 0.75
    assert json.loads((tmp_path / "probe" / "run.json").read_text())["features"]["backbone"] == f"timm:{name}"


@pytest.mark.parametrize("name, size", FAMILIES, ids=[n for n, _ in FAMILIES])
def test_features_are_timms_pre_logits_features(name, size):
    bb = create_backbone(f"timm:{name}", weights="none", size=size)
    x = torch.randn(3, 3, size, size)
    want = timm_features(timm_model(name, size), x)
    with torch.inference_mode():
        got = bb.model.eval()(x)
    assert got.shape == (3, bb.feature_dim) and bb.input_size == size
    torch.testing.assert_close(got, want)
    data = timm.data.resolve_model_data_config(timm_model(name, size))
    assert (bb.mean, bb.std) == (tuple(data["mean"]), tuple(data["std"]))


def test_default_input_size_comes_from_the_pretrained_config():
    bb = create_backbone("timm:eva02_tiny_patch14_336.mim_in22k_ft_in1k", weights="none")
    assert bb.input_size == 336 and bb.mean == (0.48145466, 0.4578275, 0.40821073) and bb.feature_dim == 192


def test_weights_none_is_seeded():
    """Ranks and resumes create the backbone independently: the same seed must give the same weights."""
    a, b, c = (create_backbone("timm:vit_tiny_patch16_224", weights="none", size=32, seed=s) for s in (0, 0, 1))
    sa, sb, sc = (m.model.state_dict() for m in (a, b, c))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["model.blocks.0.attn.qkv.weight"], sc["model.blocks.0.attn.qkv.weight"])
    assert (a.weights_id, c.weights_id) == ("none", "none:seed1")
    torch.randn(1)  # the global generator is not consumed by creation
    state = torch.random.get_rng_state()
    create_backbone("timm:resnet18", weights="none")
    assert torch.equal(state, torch.random.get_rng_state())


@pytest.mark.parametrize("suffix, classes", [(".safetensors", 1000), (".pth", 200)])
def test_a_local_weights_file_gives_that_models_features(suffix, classes, tmp_path):
    """A timm checkpoint (as in a Hugging Face cache) or a fine-tuned state_dict with a head of any size."""
    from safetensors.torch import save_file

    ref = timm_model("resnet18", 64, seed=7, num_classes=classes)
    path = tmp_path / f"resnet18{suffix}"
    state = ref.state_dict()
    save_file(state, path) if suffix == ".safetensors" else torch.save({"state_dict": state}, path)
    bb = create_backbone("timm:resnet18", weights=path, size=64)
    assert bb.weights_id.startswith("sha256:") and bb.feature_dim == 512
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        torch.testing.assert_close(bb.model.eval()(x), timm_features(ref, x))


def test_a_sidecar_json_overrides_the_normalisation(tmp_path):
    path = tmp_path / "w.pth"
    torch.save(timm_model("resnet18", 64).state_dict(), path)
    path.with_suffix(".json").write_text(json.dumps({"mean": [0.5] * 3, "std": [0.5] * 3, "input_size": 96}))
    bb = create_backbone("timm:resnet18", weights=path)
    assert (bb.mean, bb.std, bb.input_size) == ((0.5,) * 3, (0.5,) * 3, 96)


def test_weights_of_another_model_or_with_code_are_refused(tmp_path):
    other = tmp_path / "vit.pth"
    torch.save(timm_model("vit_tiny_patch16_224", 224).state_dict(), other)
    with pytest.raises(FeatxError, match=r"does not fit timm:resnet18 \(.*\); pick the matching --backbone") as e:
        create_backbone("timm:resnet18", weights=other)
    assert "\n" not in e.value.message

    class Evil:
        def __reduce__(self):
            return (print, ("ran code",))

    evil = tmp_path / "evil.pth"
    torch.save({"conv1.weight": Evil()}, evil)
    with pytest.raises(FeatxError, match="not a loadable state_dict"):
        create_backbone("timm:resnet18", weights=evil)


def test_unknown_name_and_missing_pretrained_weights():
    with pytest.raises(FeatxError, match="timm knows no such model"):
        create_backbone("timm:resnet9000", weights="none")
    no_weights = next(n for n in timm.list_models("coatnet*") if not timm.models.get_pretrained_cfg(n).has_weights)
    with pytest.raises(FeatxError, match="timm has no pretrained weights for it"):
        create_backbone(f"timm:{no_weights}", weights="default")


def test_default_weights_offline_name_the_file_to_download(synth_cache, tmp_path):
    run = featx_cli(
        "extract",
        "--data",
        str(synth_cache),
        "--backbone",
        "timm:resnet18",
        "--weights",
        "default",
        "--out",
        str(tmp_path / "f.h5"),
        env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "TORCH_HOME": str(tmp_path)},
        timeout=120,
    )
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert run.stderr.strip() == (
        "featx: error: --backbone timm:resnet18: cannot download its weights (LocalEntryNotFoundError); download "
        "https://huggingface.co/timm/resnet18.a1_in1k/resolve/main/model.safetensors and pass that file with "
        "--weights PATH"
    )


@pytest.mark.slow
def test_best_recipe_runs_with_a_small_stand_in(tmp_path):
    """pipelines/best.toml on 4 synthetic classes; EVA-02 Large at 448 is far too big for a CPU test, so its
    smallest sibling (same family: rotary ViT, patch 14) stands in, randomly initialised, at 56 pixels."""
    source = write_tiny_imagenet(tmp_path, classes=4, train_per_class=6, val_per_class=3, test=4)
    sets = [
        f"prepare.data={source}",
        "extract.backbone=timm:eva02_tiny_patch14_224.mim_in22k",
        "extract.weights=none",
        "extract.size=56",
        "probe.epochs=2",
        "probe.lr=[1e-3, 3e-3]",
        "probe.select=holdout:0.25",
    ]  # 24 training images: 10% would hold out fewer than the 4 classes
    run = subprocess.run(
        [sys.executable, "-m", "featx", "run", str(BEST), *(f"--set={s}" for s in sets)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr
    assert read_meta(tmp_path / "features/eva02_large-448-ten.h5").views[-1] == "bottom_right_flip"
    probe = json.loads((tmp_path / "runs/best/probe/metrics.json").read_text())
    assert len(probe["heads"]) == 2 * 3  # 2 learning rates x the recipe's 3 weight decays
    assert (tmp_path / "runs/best/predict-test/submission.txt").is_file()
    assert (tmp_path / "runs/best/report/report.html").is_file()
