"""featx.LinearProbe and LinearProbeCV: scikit-learn's estimator checks, a Pipeline under cross_val_score,
views, torch input, and LinearProbeCV choosing what `featx probe` chooses on real MobileNetV2 features."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.datasets import make_blobs
from sklearn.model_selection import cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.estimator_checks import parametrize_with_checks

from featx.features.store import load_features
from featx.probe.estimator import DEFAULT_SWEEP, LinearProbe, LinearProbeCV
from featx.probe.run import grid, run_probe

# Every check that applies passes. Two are skipped by scikit-learn itself here, not by featx:
# check_array_api_input (needs SCIPY_ARRAY_API=1 and an array-API namespace) and
# check_classifier_data_not_an_array's pandas half (pandas is not a featx dependency).
EXPECTED_FAILED: dict[str, str] = {}


@parametrize_with_checks(
    [LinearProbe(device="cpu"), LinearProbeCV(device="cpu")], expected_failed_checks=lambda estimator: EXPECTED_FAILED
)
def test_sklearn_checks(estimator, check):
    check(estimator)


def blobs(n: int = 300, views: int = 0, seed: int = 0):
    x, y = make_blobs(n_samples=n, centers=4, n_features=8, cluster_std=1.0, random_state=seed)
    if views:
        rng = np.random.default_rng(seed)
        x = x[:, None, :] + 0.5 * rng.standard_normal((n, views, 8))
    return x.astype(np.float32), np.array(["cat", "dog", "emu", "gnu"])[y]


def test_pipeline_cross_val_score():
    x, y = blobs()
    scores = cross_val_score(make_pipeline(StandardScaler(), LinearProbeCV(device="cpu", epochs=5)), x, y, cv=3)
    assert scores.shape == (3,)
    assert scores.min() > 0.9  # four well-separated blobs
    again = cross_val_score(make_pipeline(StandardScaler(), LinearProbeCV(device="cpu", epochs=5)), x, y, cv=3)
    np.testing.assert_array_equal(scores, again)  # seeded: the same minibatches and holdout every time


def test_labels_torch_input_and_cv_attributes():
    x, y = blobs()
    clf = LinearProbeCV(device="cpu").fit(x, y)
    assert list(clf.classes_) == ["cat", "dog", "emu", "gnu"]
    assert set(clf.predict(x)) <= set(clf.classes_)
    assert len(clf.configs_) == len(DEFAULT_SWEEP["lr"]) * len(DEFAULT_SWEEP["weight_decay"]) == len(clf.scores_)
    assert clf.best_score_ == pytest.approx(np.nanmax(clf.scores_))
    assert {"lr", "weight_decay"} <= set(clf.best_params_)
    as_torch = LinearProbeCV(device="cpu").fit(torch.from_numpy(x), y)
    np.testing.assert_array_equal(as_torch.predict_proba(torch.from_numpy(x)), clf.predict_proba(x))
    proba = clf.predict_proba(x)
    np.testing.assert_allclose(proba.sum(1), 1.0, atol=1e-6)
    assert clf.score(x, y) == pytest.approx((clf.predict(x) == y).mean())


def test_views_train_as_augmentation_and_average_at_predict():
    x, y = blobs(views=3)
    clf = LinearProbe(device="cpu", lr=3e-3).fit(x, y)
    assert clf.n_features_in_ == 8
    per_view = np.stack([clf.predict_proba(x[:, v]) for v in range(3)])
    np.testing.assert_allclose(clf.predict_proba(x), per_view.mean(0), atol=1e-6)  # float32 softmax, averaged
    assert clf.score(x, y) > 0.9
    with pytest.raises(ValueError, match="expecting 8 features"):
        clf.predict(x[:, :, :5])


def test_given_validation_arrays_choose():
    x, y = blobs()
    xv, yv = blobs(n=100, seed=1)
    clf = LinearProbeCV(device="cpu", lr=(1e-5, 3e-3), weight_decay=(0.0,)).fit(x, y, X_val=xv, y_val=yv)
    assert clf.scores_[1] >= clf.scores_[0] and clf.best_score_ == max(clf.scores_)  # 1e-5 barely moves in 10 epochs
    with pytest.raises(ValueError, match="both X_val and y_val"):
        LinearProbeCV(device="cpu").fit(x, y, X_val=xv)


@pytest.mark.slow
def test_matches_featx_probe_on_real_features(mobilenet_features_20, tmp_path):
    """Same file, same grid, same holdout: the same chosen setting and val top-1 within half a point."""
    run = run_probe(
        features=mobilenet_features_20,
        out=tmp_path / "run",
        heads=grid(**DEFAULT_SWEEP),
        device="cpu",
        select="holdout:0.1",
    )
    train, val = (load_features(mobilenet_features_20, s) for s in ("train", "val"))
    clf = LinearProbeCV(device="cpu").fit(train.features, train.labels)
    chosen = run.configs[run.best]
    assert (clf.best_params_["lr"], clf.best_params_["weight_decay"]) == (chosen.lr, chosen.weight_decay)
    assert clf.best_epoch_ == run.best_epoch
    assert abs(clf.score(val.features, val.labels) - run.val["val_top1"]) <= 0.005
