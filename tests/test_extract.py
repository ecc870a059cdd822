"""Stage 1 on real files: every backbone, exact views, resume after kill -9, torchrun, real weights."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from click.testing import CliRunner
from tiers import FAMILY_SMALLEST, backbone_names

from featx import extract_features
from featx.core.errors import FeatxError
from featx.data.cache import read_split
from featx.features.store import load_features, read_meta
from featx.front.cli import cli
from featx.nets.backbones import create_backbone, get_spec
from featx.nets.views import AUG_BRIGHTNESS, AUG_CONTRAST, aug_params, aug_pixels, crop_view, view_names

TINY = {"size": 32, "progress": False, "weights": "none"}


def _small_size(name: str) -> int:
    return 75 if name == "inception_v3" else 64 if name == "bastidas_vgg" else 32  # it flattens a 64x64 map


@pytest.mark.parametrize("name", backbone_names(FAMILY_SMALLEST))
def test_every_backbone_extracts_n_v_d(name, synth_cache, tmp_path):
    # float32: randomly initialised deep nets (ResNet-152) produce activations beyond float16's range
    out = extract_features(
        data=synth_cache,
        backbone=name,
        weights="none",
        size=_small_size(name),
        views="flip",
        splits=["val"],
        dtype="float32",
        out=tmp_path / "f.h5",
        progress=False,
    )
    f = load_features(out, "val")
    split = read_split(synth_cache, "val")
    assert f.features.shape == (len(split), 2, get_spec(name).feature_dim)
    assert f.features.dtype == np.float32
    assert np.array_equal(f.labels, split.labels) and f.ids == split.ids
    assert f.meta.views == ["full", "full_flip"] and f.meta.weights == "none" and f.meta.backbone == name
    assert f.features.astype(np.float32).std() > 0


def test_views_equal_features_of_explicit_crops_and_mirrors(synth_cache, tmp_path):
    out = extract_features(
        data=synth_cache,
        backbone="resnet18",
        weights="none",
        size=64,
        views="ten",
        splits=["val"],
        dtype="float32",
        precision="fp32",
        out=tmp_path / "f.h5",
        progress=False,
    )
    got = load_features(out, "val").features
    bb = create_backbone("resnet18", weights="none", size=64)
    model = bb.model.eval()
    images = torch.from_numpy(read_split(synth_cache, "val").read_images()).permute(0, 3, 1, 2)
    boxes = {
        "full": (0, 0, 64),
        "top_left": (0, 0, 56),
        "top_right": (0, 8, 56),
        "bottom_left": (8, 0, 56),
        "bottom_right": (8, 8, 56),
    }
    for k, name in enumerate(view_names("ten")):
        top, left, side = boxes[name.removesuffix("_flip")]
        x = TF.crop(images, top, left, side, side)
        if name.endswith("_flip"):
            x = TF.horizontal_flip(x)
        x = TF.resize(x.float(), [64, 64], antialias=False) / 255.0
        with torch.inference_mode():
            want = model(TF.normalize(x, bb.mean, bb.std)).numpy()
        np.testing.assert_allclose(got[:, k], want, rtol=1e-3, atol=1e-3 * np.abs(want).max())


def test_finished_extraction_is_a_no_op_and_other_settings_are_refused(synth_cache, tmp_path):
    out = tmp_path / "f.h5"
    extract_features(data=synth_cache, backbone="resnet18", views="full", out=out, **TINY)
    assert load_features(out, "train").features.dtype == np.float16  # the default storage type
    stamp = out.stat().st_mtime_ns
    extract_features(data=synth_cache, backbone="resnet18", views="full", out=out, **TINY)
    assert out.stat().st_mtime_ns == stamp
    with pytest.raises(FeatxError, match="other settings"):
        extract_features(data=synth_cache, backbone="resnet18", views="flip", out=out, **TINY)


RESUMABLE = """
import sys
from featx import extract_features
extract_features(data=sys.argv[1], backbone="resnet18", weights="none", size=96, views="ten", aug_views=2,
                 out=sys.argv[2], shard_rows=4, batch_size=2, progress=False)
"""


@pytest.mark.slow
@pytest.mark.numerics
def test_kill_9_then_resume_equals_an_uninterrupted_run(synth_cache, tmp_path):
    out = tmp_path / "killed.h5"
    partial = tmp_path / "killed.h5.partial"
    proc = subprocess.Popen([sys.executable, "-c", RESUMABLE, str(synth_cache), str(out)])
    deadline = time.time() + 300  # a loaded machine took over 120 s for 3 shards (load 18 on 2 cores)
    while len(list(partial.glob("*-*.npy"))) < 3 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists(), "killed before finishing: no file may carry the final name"
    done = len(list(partial.glob("*-*.npy")))
    assert 3 <= done < 17  # 68 rows in shards of 4: killed midway
    with pytest.raises(FeatxError, match="unfinished"):
        load_features(out, "train")

    subprocess.run([sys.executable, "-c", RESUMABLE, str(synth_cache), str(out)], check=True)
    ref = extract_features(
        data=synth_cache,
        backbone="resnet18",
        weights="none",
        size=96,
        views="ten",
        aug_views=2,
        out=tmp_path / "ref.h5",
        shard_rows=4,
        batch_size=2,
        progress=False,
    )
    assert not partial.exists()
    for split in ("train", "val", "test"):
        every = read_meta(out).stored_views(split)  # the augmented views too, in train
        a, b = load_features(out, split, views=every), load_features(ref, split, views=every)
        np.testing.assert_allclose(a.features.astype(np.float32), b.features.astype(np.float32), rtol=1e-2, atol=1e-3)
        assert a.ids == b.ids and np.array_equal(a.labels, b.labels)


def _gray(x: torch.Tensor) -> torch.Tensor:
    return TF.rgb_to_grayscale(x)[0].double()


def test_augmented_view_pixels_are_a_seeded_jitter_of_the_image_or_a_corner():
    rng = np.random.default_rng(0)
    # pixels in [60, 160]: no jitter within the range can clip, so the measured statistics are exact
    images = torch.from_numpy(rng.integers(60, 161, (6, 64, 64, 3), dtype=np.uint8))
    x = images.permute(0, 3, 1, 2).float() / 255
    pixels = aug_pixels(images, first=100, k=4, seed=7, crop=56)
    assert len(pixels) == 24
    bases = set()
    for row, out in enumerate(pixels):
        i, k = divmod(row, 4)
        base, brightness, contrast = aug_params(7, 100 + i, k)
        bases.add(base)
        assert aug_params(7, 100 + i, k) == (base, brightness, contrast)  # a function of (seed, index, k)
        assert abs(brightness - 1) <= AUG_BRIGHTNESS and abs(contrast - 1) <= AUG_CONTRAST
        src = _gray(crop_view(x[i], base, 56))
        got = _gray(out)
        # measured before the backbone: brightness scales the mean, contrast then scales the spread about it
        assert got.mean() / src.mean() == pytest.approx(brightness, rel=1e-4)
        assert got.std() / (brightness * src.std()) == pytest.approx(contrast, rel=1e-4)
        # the one crop it is an affine image of is the one drawn, and no mirror
        for other in ("full", "top_left", "top_right", "bottom_left", "bottom_right"):
            cand = _gray(crop_view(x[i], other, 56))
            for mirrored in (cand, cand.flip(-1)):
                if mirrored.shape == got.shape:
                    r = np.corrcoef(mirrored.flatten(), got.flatten())[0, 1]
                    assert (r > 0.9999) == (other == base and mirrored is cand)
    assert len(bases) >= 3
    again = aug_pixels(images, first=100, k=4, seed=7, crop=56)
    assert all(torch.equal(a, b) for a, b in zip(pixels, again))
    other_seed = aug_pixels(images, first=100, k=4, seed=8, crop=56)
    assert not all(a.shape == b.shape and torch.equal(a, b) for a, b in zip(pixels, other_seed))


def test_augmented_views_are_stored_for_train_only_and_differ_from_every_deterministic_view(synth_cache, tmp_path):
    common = dict(
        data=synth_cache,
        backbone="resnet18",
        weights="none",
        size=32,
        views="ten",
        dtype="float32",
        precision="fp32",
        splits=["train", "val"],
        progress=False,
    )
    a = extract_features(**common, aug_views=3, out=tmp_path / "a.h5", batch_size=4)
    # other shards and batches: the same views, since each is a function of (seed, image index, k) alone
    b = extract_features(**common, aug_views=3, out=tmp_path / "b.h5", batch_size=3, shard_rows=5)
    c = extract_features(**common, aug_views=3, aug_seed=1, out=tmp_path / "c.h5", batch_size=4)
    meta = read_meta(a)
    assert (meta.aug_views, meta.aug_seed, meta.aug_brightness, meta.aug_contrast) == (
        3,
        0,
        AUG_BRIGHTNESS,
        AUG_CONTRAST,
    )
    assert meta.stored_views("train") == view_names("ten") + ["aug0", "aug1", "aug2"]
    names = meta.stored_views("train")
    fa, fb, fc = (load_features(p, "train", views=names).features for p in (a, b, c))
    assert fa.shape[1] == 13 and load_features(a, "val").features.shape[1] == 10
    np.testing.assert_allclose(fa, fb, rtol=1e-4, atol=1e-4 * np.abs(fa).max())
    np.testing.assert_allclose(fa[:, :10], fc[:, :10], rtol=1e-4, atol=1e-4 * np.abs(fa).max())
    scale = np.abs(fa).max()
    assert np.abs(fa[:, 10:] - fc[:, 10:]).max(axis=2).min() > 1e-3 * scale  # the seed changes every draw
    gaps = np.abs(fa[:, 10:, None, :] - fa[:, None, :10, :]).max(axis=3)  # (N, aug, deterministic)
    assert gaps.min() > 1e-3 * scale
    with pytest.raises(FeatxError, match="augmented views are for training only"):
        load_features(a, "val", views="aug0")


def test_mismatched_resume_is_refused(synth_cache, tmp_path):
    out = tmp_path / "f.h5"
    partial = tmp_path / "f.h5.partial"
    partial.mkdir()
    (partial / "meta.json").write_text('{"identity": "something-else", "shard_rows": 1024}')
    with pytest.raises(FeatxError, match="other settings"):
        extract_features(data=synth_cache, backbone="resnet18", views="full", out=out, **TINY)


@pytest.mark.slow
@pytest.mark.numerics
def test_torchrun_two_gloo_ranks_write_the_single_process_file(synth_cache, tmp_path):
    args = [
        "extract",
        "--data",
        str(synth_cache),
        "--backbone",
        "resnet18",
        "--weights",
        "none",
        "--size",
        "32",
        "--views",
        "flip",
        "--device",
        "cpu",
        "--batch-size",
        "4",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "2",
            "--master-port",
            "29533",
            "-m",
            "featx",
            *args,
            "--out",
            str(tmp_path / "ddp.h5"),
        ],
        check=True,
        env=env,
        timeout=300,
    )
    subprocess.run([sys.executable, "-m", "featx", *args, "--out", str(tmp_path / "one.h5")], check=True, env=env)
    # the same file but for the measured rate, which describes the run, not the features
    assert dataclasses.replace(read_meta(tmp_path / "ddp.h5"), images_per_second=0) == dataclasses.replace(
        read_meta(tmp_path / "one.h5"), images_per_second=0
    )
    for split in ("train", "val", "test"):
        a, b = load_features(tmp_path / "ddp.h5", split), load_features(tmp_path / "one.h5", split)
        np.testing.assert_allclose(a.features.astype(np.float32), b.features.astype(np.float32), rtol=1e-2, atol=1e-3)
        assert a.ids == b.ids and np.array_equal(a.labels, b.labels)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--backbone", "resnet9000"], "known: resnet18"),
        (["--backbone", "resnet18", "--crop", "80"], "--crop 80 is larger than the 64x64 images"),
        (["--backbone", "resnet18", "--device", "cuda"], None),
        (["--backbone", "resnet18", "--mean", "0.5,0.5"], "--mean 0.5,0.5: give 3 comma-separated numbers"),
    ],
)
def test_cli_mistakes_are_one_line_exit_2(args, message, synth_cache, tmp_path):
    if "cuda" in args and torch.cuda.is_available():
        pytest.skip("CUDA is present")
    message = message or "CUDA is not available"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "featx",
            "extract",
            "--data",
            str(synth_cache),
            "--weights",
            "none",
            "--size",
            "32",
            "--out",
            str(tmp_path / "f.h5"),
            *args,
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_float16_overflow_asks_for_float32(synth_cache, tmp_path):
    with pytest.raises(FeatxError, match="beyond float16; re-run with --dtype float32"):
        extract_features(
            data=synth_cache, backbone="resnet152", views="full", splits=["val"], out=tmp_path / "f.h5", **TINY
        )


def test_unwritable_output_is_one_line(synth_cache, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    # names the file in the way, not "File exists"
    with pytest.raises(FeatxError, match="--out .*a-file/f.h5: .*a-file is a file, not a folder; choose another --out"):
        extract_features(data=synth_cache, backbone="resnet18", views="full", out=blocker / "f.h5", **TINY)


def test_weights_for_another_backbone_name_the_keys(synth_cache, shared_weights, tmp_path):
    runner = CliRunner()
    result = runner.invoke(
        cli,
        [
            "extract",
            "--data",
            str(synth_cache),
            "--backbone",
            "resnet18",
            "--weights",
            str(shared_weights / "mobilenet_v2_imagenet_tflite.pth"),
            "--out",
            str(tmp_path / "f.h5"),
        ],
    )
    assert result.exit_code == 2 and "missing keys" in result.output


def test_list_backbones_prints_dims_and_sizes():
    result = CliRunner().invoke(cli, ["extract", "--list-backbones"])
    assert result.exit_code == 0
    assert "inception_v3" in result.output and " 2048   299" in result.output and "timm:<name>" in result.output


def _nearest_class_mean_top1(path: Path) -> float:
    train, val = load_features(path, "train", views="full"), load_features(path, "val", views="full")
    x = train.features[:, 0].astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True) + 1e-12
    means = np.stack([x[train.labels == c].mean(0) for c in range(train.labels.max() + 1)])
    means /= np.linalg.norm(means, axis=1, keepdims=True) + 1e-12
    y = val.features[:, 0].astype(np.float32)
    return float(((y @ means.T).argmax(1) == val.labels).mean())


@pytest.mark.slow
@pytest.mark.numerics
def test_real_weights_on_real_images_separate_the_classes(mobilenet_features_20, real_cache, tmp_path):
    """Wrong normalisation, resizing or crops would pass every shape test and fail this one."""
    assert _nearest_class_mean_top1(mobilenet_features_20) >= 0.70
    meta = read_meta(mobilenet_features_20)
    assert meta.weights.startswith("sha256:9a339a76") and meta.mean == [0.5, 0.5, 0.5] and len(meta.classes) == 20

    # the input size hardly matters to random weights, and 112 costs a quarter of 224
    random_init = extract_features(
        data=real_cache,
        backbone="mobilenet_v2",
        weights="none",
        views="full",
        size=112,
        classes=20,
        per_class=20,
        splits=["train", "val"],
        out=tmp_path / "none.h5",
        progress=False,
    )
    assert _nearest_class_mean_top1(random_init) <= 0.25


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_extraction_matches_cpu(synth_cache, tmp_path):
    kw = dict(data=synth_cache, backbone="resnet18", weights="none", size=64, views="ten", progress=False)
    gpu = extract_features(**kw, device="cuda", out=tmp_path / "gpu.h5")
    cpu = extract_features(**kw, device="cpu", precision="fp32", out=tmp_path / "cpu.h5")
    a, b = load_features(gpu, "val").features.astype(np.float32), load_features(cpu, "val").features.astype(np.float32)
    cos = (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
    assert cos.min() > 0.99
