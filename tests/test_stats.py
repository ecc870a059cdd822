"""Numbers a reviewer trusts: bootstrap intervals cover, McNemar's test, the held-out selection split (stratified,
seeded, disjoint from training, blind to val labels), and temperature scaling on real features."""

from __future__ import annotations

import shutil

import h5py
import numpy as np
import pytest

from featx.core.errors import FeatxError
from featx.core.runs import load_checkpoint, read_run
from featx.core.stats import (
    apply_temperature,
    bootstrap_interval,
    expected_calibration_error,
    fit_temperature,
    holdout_rows,
    paired_comparison,
    parse_select,
)
from featx.probe.run import HeadConfig, run_probe


def test_the_interval_covers_a_known_accuracy_about_95_percent_of_the_time():
    rng = np.random.default_rng(1)
    covered = 0
    for draw in range(100):
        right = rng.random(1000) < 0.7  # a predictor right with probability 0.7 on each image
        lo, hi = bootstrap_interval(right, seed=draw)
        assert lo < right.mean() < hi and hi - lo < 0.07
        covered += lo <= 0.7 <= hi
    assert covered >= 90
    assert bootstrap_interval(np.ones(50)) == (1.0, 1.0)


def test_paired_comparison_difference_interval_and_mcnemar():
    a = np.array([1] * 10 + [0] * 0 + [1] * 40 + [0] * 50, dtype=bool)  # a alone right on the first 10
    b = np.array([0] * 10 + [1] * 40 + [0] * 50, dtype=bool)
    c = paired_comparison(a, b)
    assert (c.a_only, c.b_only) == (10, 0) and c.difference == pytest.approx(0.1)
    assert c.p_value == pytest.approx(2 * 0.5**10)  # exact: 10 of 10 discordant images go a's way
    assert c.interval[0] > 0 and c.interval[1] <= 0.2
    assert paired_comparison(a, a).p_value == 1.0


def test_select_options():
    assert parse_select("val") is None and parse_select("holdout:0.25") == 0.25
    for bad in ("holdout", "holdout:0", "holdout:1.5", "train", "holdout:x"):
        with pytest.raises(FeatxError, match="--select"):
            parse_select(bad)


def test_the_holdout_is_stratified_seeded_and_leaves_unlabelled_rows_out():
    labels = np.repeat(np.arange(20), 50)
    labels[::97] = -1
    held = holdout_rows(labels, 0.1, 0)
    assert (held == holdout_rows(labels, 0.1, 0)).all() and (held != holdout_rows(labels, 0.1, 1)).any()
    assert not held[labels < 0].any() and held.sum() == round(0.1 * (labels >= 0).sum())
    per_class = np.bincount(labels[held], minlength=20)
    assert per_class.min() >= 4 and per_class.max() <= 6
    with pytest.raises(FeatxError, match="--select holdout:0.01"):
        holdout_rows(labels, 0.01, 0)  # 9 rows cannot hold one of each of 20 classes


def test_temperature_scaling_recovers_a_known_temperature():
    rng = np.random.default_rng(0)
    logits = 3 * rng.standard_normal((4000, 10))
    labels = np.array([rng.choice(10, p=p) for p in apply_temperature(np.exp(logits), 1.0)])
    overconfident = apply_temperature(np.exp(logits), 0.5)  # the logits doubled
    assert fit_temperature(overconfident, labels) == pytest.approx(2.0, rel=0.1)
    assert (
        expected_calibration_error(apply_temperature(overconfident, 2.0), labels)
        < expected_calibration_error(overconfident, labels) / 3
    )


@pytest.mark.slow
def test_selection_is_blind_to_val_labels_and_temperature_lowers_ece(mobilenet_features_20, tmp_path):
    shuffled = tmp_path / "shuffled.h5"
    shutil.copy(mobilenet_features_20, shuffled)
    with h5py.File(shuffled, "r+") as f:
        f["val/labels"][:] = np.random.default_rng(0).permutation(f["val/labels"][:])
    runs = {}
    for name, path in (("real", mobilenet_features_20), ("shuffled", shuffled)):
        runs[name] = run_probe(
            features=path,
            out=tmp_path / name,
            heads=[HeadConfig(lr=3e-4), HeadConfig(lr=3e-3)],
            epochs=4,
            keep=2,
            save="all",
            device="cpu",
            select="holdout:0.2",
        )
    real, mixed = read_run(tmp_path / "real"), read_run(tmp_path / "shuffled")
    assert real.checkpoints == mixed.checkpoints  # same heads, epochs and selection scores
    assert real.best["head"] == mixed.best["head"] and real.best["select_top1"] == mixed.best["select_top1"]
    assert real.best["val_top1"] > 0.6 and mixed.best["val_top1"] < 0.15  # val scored once, after selection
    # the heads never saw the held-out rows: the selection split scores below the rows they trained on
    assert real.best["select_top1"] < max(r["train_top1"] for h in runs["real"].history for r in h)

    v = runs["real"].val
    print(f"val ECE {v['val_ece']:.4f} -> {v['val_ece_calibrated']:.4f} at T={v['temperature']:.3f}")
    assert v["val_ece_calibrated"] < v["val_ece"]
    ckpt = load_checkpoint(tmp_path / "real" / real.best["checkpoint"])
    assert ckpt["calibration"] == {"temperature": v["temperature"], "fitted_on": "holdout:0.2"}
