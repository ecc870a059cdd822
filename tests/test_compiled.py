"""--compile auto|on|off: what auto decides, compiled (frozen) against eager features on the shared weights, the
fallback when compiling fails for real, and that the compile mode is not part of a feature file's identity."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from featx import extract_features
from featx.core import progress
from featx.core.compiled import (
    BREAK_EVEN_GFLOP,
    CompileWarning,
    Guarded,
    choose_compile,
    frozen,
    gflop_per_view,
    ran_compiled,
)
from featx.core.errors import FeatxError
from featx.features.store import load_features, read_meta
from featx.finetune.run import FinetuneConfig
from featx.nets.backbones import create_backbone

REPO = Path(__file__).resolve().parents[1]


def test_auto_compiles_long_jobs_only_and_on_off_ignore_the_job():
    # MobileNetV2 at 224: 0.3 G multiply-adds per image, counted as 2 FLOP each
    cost = gflop_per_view(create_backbone("mobilenet_v2", weights="none").model.eval(), 224, torch.device("cpu"))
    assert cost == pytest.approx(0.6, rel=0.05)
    tiny = choose_compile("auto", views=48, gflop_per_view=cost)  # the synthetic dataset, one view
    ten_view_tiny_imagenet = choose_compile("auto", views=120_000 * 10, gflop_per_view=cost)
    assert not tiny.compiled and "eager" in tiny.why and "48 views" in tiny.why
    assert ten_view_tiny_imagenet.compiled and "compiled" in ten_view_tiny_imagenet.why
    assert choose_compile("auto", views=1, gflop_per_view=BREAK_EVEN_GFLOP).compiled
    assert not choose_compile("auto", views=1, gflop_per_view=BREAK_EVEN_GFLOP * 0.99).compiled
    assert choose_compile("on", views=1, gflop_per_view=0.0).compiled
    assert not choose_compile("off", views=10**9, gflop_per_view=100.0).compiled
    with pytest.raises(FeatxError, match="--compile yes: choose one of auto, on, off"):
        choose_compile("yes", views=1, gflop_per_view=1.0)


def test_a_short_auto_extraction_runs_eager_without_a_word(synth_cache, tmp_path, capsys):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = extract_features(
            data=synth_cache,
            backbone="resnet18",
            weights="none",
            size=32,
            views="full",
            splits=["val"],
            out=tmp_path / "f.h5",
            progress=False,
        )
    assert not [w for w in caught if issubclass(w.category, CompileWarning)]  # a normal choice is no warning
    assert "--compile" not in capsys.readouterr().err  # 16 views: nothing to weigh
    assert read_meta(out).compile == "off"


def _slow_compiler(model, rows):
    """A stand-in for torch.compile whose model runs slower than eager."""

    def run(x):
        time.sleep(0.05)
        return model(x)

    return Guarded(model, run, rows)


def _fast_compiler(model, rows):
    """A stand-in whose model runs faster than eager: it skips the work, returning the first output's shape."""
    out = model(torch.zeros(rows, 3, 16, 16))
    return Guarded(model, lambda x: out, rows)


def test_auto_keeps_eager_where_compiling_measured_slower(capsys):
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()).eval()
    example = torch.zeros(4, 3, 16, 16)
    slow = frozen(model, "auto", example=example, views=10**9, compiler=_slow_compiler)
    assert slow is model
    line = capsys.readouterr().err.strip()
    assert line.startswith("featx: --compile auto: eager: 1,000,000,000 views; compiled ran at 0.")
    fast = frozen(model, "auto", example=example, views=10**9, compiler=_fast_compiler)
    assert isinstance(fast, Guarded) and ran_compiled(fast) == "on"
    assert "featx: --compile auto: compiled: 1,000,000,000 views; compiled ran at " in capsys.readouterr().err
    progress.quiet = True  # --quiet silences the line
    try:
        assert frozen(model, "auto", example=example, views=10**9, compiler=_slow_compiler) is model
    finally:
        progress.quiet = False
    assert capsys.readouterr().err == ""
    # a job shorter than compiling takes is not tried compiled at all
    assert frozen(model, "auto", example=example, views=10, compiler=_slow_compiler) is model
    assert capsys.readouterr().err == ""


@pytest.mark.slow
def test_compiled_frozen_features_equal_eager_and_switching_the_mode_reruns_nothing(
    real_cache, shared_weights, tmp_path
):
    kw = dict(
        data=real_cache,
        backbone="mobilenet_v2",
        weights=shared_weights / "mobilenet_v2_imagenet_tflite.pth",
        size=64,
        views="full",
        classes=2,
        per_class=8,
        splits=["train"],
        precision="fp32",
        dtype="float32",
        batch_size=6,
        progress=False,
    )  # 16 images in batches of 6: the last one is padded
    eager = extract_features(**kw, compile="off", out=tmp_path / "eager.h5")
    compiled = extract_features(**kw, compile="on", out=tmp_path / "compiled.h5")
    want, got = load_features(eager, "train").features, load_features(compiled, "train").features
    assert np.abs(want).max() > 0.1
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3 * np.abs(want).max())  # test_extract's tolerance
    assert (read_meta(eager).compile, read_meta(compiled).compile) == ("off", "on")
    assert read_meta(eager).identity() == read_meta(compiled).identity()
    before = compiled.stat().st_mtime_ns
    assert extract_features(**kw, compile="off", out=compiled) == compiled  # up to date: nothing runs
    assert compiled.stat().st_mtime_ns == before


@pytest.mark.slow
def test_a_failing_compiler_falls_back_to_eager_with_one_line(synth_cache, tmp_path):
    # a real failure: Inductor's CPU backend finds no C++ compiler (an empty cache, so nothing compiled earlier helps)
    code = (
        "from featx import extract_features\n"
        f"extract_features(data={str(synth_cache)!r}, backbone='resnet18', weights='none', size=32, views='full',"
        f" splits=['val'], precision='fp32', dtype='float32', compile='on', out={str(tmp_path / 'f.h5')!r},"
        " progress=False)\n"
    )
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "CXX": str(tmp_path / "no-such-compiler"),
        "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor"),
    }
    r = subprocess.run(
        [sys.executable, "-W", "always::UserWarning", "-c", code], env=env, capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    lines = [line for line in r.stderr.splitlines() if "CompileWarning" in line]
    assert len(lines) == 1 and "compiling failed" in lines[0] and "running eager" in lines[0], r.stderr
    assert read_meta(tmp_path / "f.h5").compile == "off"
    eager = extract_features(
        data=synth_cache,
        backbone="resnet18",
        weights="none",
        size=32,
        views="full",
        splits=["val"],
        precision="fp32",
        dtype="float32",
        compile="off",
        out=tmp_path / "eager.h5",
        progress=False,
    )
    np.testing.assert_array_equal(
        load_features(tmp_path / "f.h5", "val").features, load_features(eager, "val").features
    )


def test_finetune_runs_recorded_with_a_boolean_compile_still_load():
    for old, new in ((True, "on"), (False, "off")):
        assert FinetuneConfig(backbone="resnet18", compile=old).compile == new
