"""--precision int8 (featx.features.int8): the shared MobileNetV2 quantized on real images stays close to fp32, its
calibration is part of the file, predictions rebuild the same model, and where it cannot run it says so in one line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from featx import extract_features
from featx.core.configs import ExtractConfig, FinetuneConfig, OptionError, in_use, validate
from featx.core.errors import FeatxError
from featx.features.extract import compute_features, int8_model_of
from featx.features.int8 import check_int8
from featx.features.store import FeatureMeta, load_features, read_meta
from featx.front.cli import cli
from featx.front.info import info
from featx.front.recipes import run_recipe
from featx.nets.backbones import create_backbone

pytest.importorskip("torchao")

CALIBRATION = 64
PIPELINES = Path(__file__).resolve().parents[1] / "pipelines"


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float32), b.astype(np.float32)
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


@pytest.fixture(scope="module")
def int8_and_fp32(real_cache, shared_weights, tmp_path_factory):
    """The same 100 real train images (2 classes x 50) through the shared MobileNetV2, int8 and fp32."""
    out = tmp_path_factory.mktemp("int8")
    common = dict(
        data=real_cache,
        backbone="mobilenet_v2",
        weights=shared_weights / "mobilenet_v2_imagenet_tflite.pth",
        views="full",
        classes=2,
        per_class=50,
        splits=["train"],
        progress=False,
    )
    int8 = extract_features(**common, precision="int8", calibration=CALIBRATION, out=out / "int8.h5")
    fp32 = extract_features(**common, precision="fp32", compile="off", out=out / "fp32.h5")
    return int8, fp32


@pytest.mark.slow
@pytest.mark.numerics
def test_int8_features_keep_a_mean_cosine_of_095_to_fp32(int8_and_fp32):
    int8, fp32 = int8_and_fp32
    cos = _cosine(load_features(int8, "train").features[:, 0], load_features(fp32, "train").features[:, 0])
    assert cos.mean() >= 0.95, cos
    meta = read_meta(int8)
    assert meta.precision == "int8" and meta.calibration == CALIBRATION and meta.compile == "on"
    assert 0.95 <= meta.int8_cosine <= 1.0  # what the file records of its own check
    assert info(int8)["made_by"]["int8_cosine"] == round(meta.int8_cosine, 4)  # and `featx info` shows
    with h5py.File(int8, "r") as f:
        assert f["calibration"].shape == (CALIBRATION, 64, 64, 3) and f["calibration"].dtype == np.uint8
    # precision and calibration are the new file's identity; the fp32 file's has neither
    assert meta.identity() != read_meta(fp32).identity()
    assert meta.identity() != FeatureMeta(**{**json.loads(meta.to_json()), "calibration": 32}).identity()


@pytest.mark.slow
@pytest.mark.numerics
def test_predictions_rebuild_the_quantized_model_from_the_file(int8_and_fp32, real_cache, shared_weights):
    int8, _ = int8_and_fp32
    meta = read_meta(int8)
    bb = create_backbone(
        "mobilenet_v2", weights=str(shared_weights / "mobilenet_v2_imagenet_tflite.pth"), size=meta.input_size
    )
    stored = load_features(int8, "train")
    from featx.data.cache import read_split

    images = read_split(real_cache, "train", classes=2, per_class=50).read_images()
    again = compute_features(
        bb,
        int8_model_of(int8, bb, rows=8),  # another batch size than extraction's
        images,
        views=["full"],
        crop=meta.crop,
        device=torch.device("cpu"),
        autocast=None,
        out_dtype=np.dtype(np.float32),
    )
    assert _cosine(again[:, 0], stored.features[:, 0]).min() > 0.999


def test_old_feature_files_keep_their_identity():
    """A file written before int8 existed (no calibration fields) hashes as before."""
    old = dict(
        backbone="resnet18",
        weights="none",
        input_size=32,
        views=["full"],
        crop=56,
        mean=[0.5] * 3,
        std=[0.5] * 3,
        precision="fp32",
        dtype="float16",
        dataset="d",
        dataset_fingerprint="f",
        classes=["a"],
        class_names=["a"],
        featx_version="0.2.0",
    )
    meta = FeatureMeta(**old)
    assert meta.identity() == FeatureMeta(**{**old, "calibration": 0, "int8_cosine": None}).identity()
    assert "calibration" not in meta.settings() and "int8_cosine" not in meta.settings()


def test_int8_is_refused_where_it_cannot_run():
    with pytest.raises(FeatxError, match="--precision int8 runs on CPU only"):
        check_int8(torch.device("cuda"))
    with pytest.raises(OptionError, match=r"choose one of auto, fp32, bf16, fp16 \(int8 is for a frozen backbone"):
        validate(FinetuneConfig(data="d", backbone="resnet18", precision="int8"))
    validate(ExtractConfig(backbone="resnet18", precision="int8"))


def test_finetune_int8_is_one_line_exit_2(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "featx", "finetune", "--precision", "int8", "--out", str(tmp_path / "r")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2 and "--precision" in result.stderr and "int8" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_a_backbone_torchao_cannot_quantize_is_one_line(synth_cache, tmp_path):
    # torchvision's ResNets reuse one ReLU module within a block, which torchao's X86 quantizer refuses
    with pytest.raises(
        FeatxError, match=r"^--precision int8: torchao cannot quantize resnet18 \(ValueError: .*fp32 or bf16"
    ):
        extract_features(
            data=synth_cache,
            backbone="resnet18",
            weights="none",
            size=32,
            views="full",
            precision="int8",
            calibration=4,
            out=tmp_path / "f.h5",
            progress=False,
        )


def test_recipe_hashes_leave_calibration_out_unless_int8(tmp_path, monkeypatch):
    """--calibration, new in 0.3, does nothing without int8: existing recipe outputs keep their stage hash."""
    assert "calibration" not in in_use(ExtractConfig(backbone="mobilenet_v2"))
    assert in_use(ExtractConfig(backbone="mobilenet_v2", precision="int8"))["calibration"] == 128
    monkeypatch.chdir(tmp_path)
    stages = {s.name: s for s in run_recipe(recipe=PIPELINES / "quickstart.toml", commands=cli, dry_run=True)}
    assert "calibration" not in stages["extract"].params and stages["extract"].params["precision"] == "auto"
    stages = {s.name: s for s in run_recipe(recipe=PIPELINES / "cpu.toml", commands=cli, dry_run=True)}
    assert stages["extract"].params["calibration"] == 128
