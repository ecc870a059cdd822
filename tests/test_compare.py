"""featx compare: several backbones, one leaderboard, on a miniature dataset with the shared MobileNetV2 weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from featx.core.errors import FeatxError
from featx.core.runs import read_run
from featx.core.stats import paired_comparison
from featx.evaluate.scoring import predict
from featx.features.store import load_features
from featx.front.compare import compare, format_leaderboard
from featx.probe.estimator import DEFAULT_SWEEP


def test_compare_three_backbones(synth_cache, shared_weights, tmp_path):
    mnv2 = str(shared_weights / "mobilenet_v2_imagenet_tflite.pth")
    args = dict(
        data=synth_cache,
        backbones=["mobilenet_v2", "resnet18", "vgg_tiny"],
        weights=[mnv2, "none", "none"],
        out=tmp_path / "cmp",
        size=64,
        views="full",
        device="cpu",
        precision="fp32",
        progress=False,
    )
    board = compare(**args)
    assert [e.backbone for e in board] == sorted(
        (e.backbone for e in board), key=lambda b: -next(e.top1 for e in board if e.backbone == b)
    )
    by = {e.backbone: e for e in board}
    assert {b: e.feature_dim for b, e in by.items()} == {"mobilenet_v2": 1280, "resnet18": 512, "vgg_tiny": 512}
    assert by["resnet18"].parameters == 11_176_512  # torchvision's resnet18 without its fc layer
    for e in board:
        run = read_run(e.run)
        assert len(run.config["heads"]) == len(DEFAULT_SWEEP["lr"]) * len(DEFAULT_SWEEP["weight_decay"])
        assert run.config["select"] == "holdout:0.1"
        pred = predict(runs=[e.run], split="val", device="cpu")
        assert e.top1 == pytest.approx(pred.top_k(1)) and e.top5 == pytest.approx(pred.top_k(5))
        assert e.top1_interval[0] <= e.top1 <= e.top1_interval[1]
        assert e.feature_bytes == Path(e.features).stat().st_size
        assert e.images_per_second > 0
        assert load_features(e.features, "val").features.shape == (16, 1, e.feature_dim)  # 4 classes x 4 val images
    assert board[0].vs_best is None
    best = predict(runs=[board[0].run], split="val", device="cpu")
    for e in board[1:]:
        c = paired_comparison(predict(runs=[e.run], split="val", device="cpu").correct(1), best.correct(1))
        assert e.vs_best["difference"] == pytest.approx(c.difference) == pytest.approx(e.top1 - board[0].top1)
        assert e.vs_best["p_value"] == pytest.approx(c.p_value)

    out = tmp_path / "cmp"
    results = json.loads((out / "results.json").read_text())
    assert [r["backbone"] for r in results["leaderboard"]] == [e.backbone for e in board]
    assert results["settings"]["grid"] == {k: list(v) for k, v in DEFAULT_SWEEP.items()}
    assert (out / "leaderboard.txt").read_text() == format_leaderboard(board) + "\n"
    page = (out / "report" / "report.html").read_text()
    assert "Leaderboard" in page and all(e.run in page for e in board)

    files = {e.features: Path(e.features).stat().st_mtime_ns for e in board}
    again = compare(**args)  # same settings: the feature files are reused, not rewritten
    assert {e.features: Path(e.features).stat().st_mtime_ns for e in again} == files
    assert [e.top1 for e in again] == [e.top1 for e in board]  # seeded probe


def test_compare_refuses_mismatched_weights(synth_cache, tmp_path):
    with pytest.raises(FeatxError, match="one per --backbone"):
        compare(data=synth_cache, backbones=["resnet18", "vgg_tiny"], weights=["none"], out=tmp_path / "c")
    with pytest.raises(FeatxError, match="twice"):
        compare(data=synth_cache, backbones=["vgg_tiny", "vgg_tiny"], weights=["none", "none"], out=tmp_path / "c")
