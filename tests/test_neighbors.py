"""k-NN and nearest-class-mean probes on real MobileNetV2 features: against sklearn and a direct numpy computation,
written as runs that predict scores unchanged."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.neighbors import KNeighborsClassifier

from featx.core.runs import load_checkpoint, read_run
from featx.core.stats import apply_temperature, holdout_rows
from featx.evaluate.scoring import predict
from featx.features.store import load_features
from featx.probe.run import HeadConfig, run_probe


def normalized(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.mark.slow
def test_knn_is_within_a_few_points_of_sklearn_and_predict_scores_its_run(mobilenet_features_20, tmp_path):
    run = tmp_path / "knn"
    result = run_probe(
        features=mobilenet_features_20,
        out=run,
        heads=[HeadConfig()],
        head="knn",
        k=[10, 20],
        eval_views="full",
        select="val",
        save="all",
        device="cpu",
    )
    train = load_features(mobilenet_features_20, "train", views="full")
    val = load_features(mobilenet_features_20, "val", views="full")
    ours = {int(name.removeprefix("k=")): hist[0]["val_top1"] for name, hist in zip(result.names, result.history)}
    for k, top1 in ours.items():
        sk = KNeighborsClassifier(n_neighbors=k, metric="cosine").fit(train.features[:, 0], train.labels)
        theirs = sk.score(val.features[:, 0], val.labels)
        print(f"k={k}: featx {top1:.4f}, sklearn {theirs:.4f}")
        assert abs(top1 - theirs) < 0.03
    assert top1 > 0.5  # 20 classes: far above chance

    record = read_run(run)
    assert record.config["select"] == "val" and record.config["k"] == [10, 20]
    assert {c.key for c in record.checkpoints} == {0, 1}
    ckpt = load_checkpoint(run / record.checkpoints[0].file)
    assert ckpt["format"] == "featx-knn-1" and ckpt["state"]["bank"].shape == (1000, 1280)
    # selected on val, so its one val score is the best k's
    assert record.best["val_top1"] == pytest.approx(max(ours.values()))
    p = predict(runs=[run], split="val", eval_views="full", device="cpu")
    assert p.top_k(1) == pytest.approx(record.best["val_top1"]) and p.optimistic
    both = predict(runs=[run], split="val", eval_views="full", ensemble="all", device="cpu")
    assert len(both.members) == 2 and abs(both.top_k(1) - p.top_k(1)) < 0.03


@pytest.mark.slow
def test_ncm_equals_a_direct_computation_without_the_held_out_rows(mobilenet_features_20, tmp_path):
    run = tmp_path / "ncm"
    run_probe(
        features=mobilenet_features_20, out=run, heads=[HeadConfig()], head="ncm", select="holdout:0.25", device="cpu"
    )  # 5 a class: the smallest holdout featx selects on
    train = load_features(mobilenet_features_20, "train", views="full")
    val = load_features(mobilenet_features_20, "val", views="all")
    fit = ~holdout_rows(train.labels, 0.25, 0)
    x = normalized(train.features[fit, 0].astype(np.float64))
    means = normalized(np.stack([x[train.labels[fit] == c].mean(0) for c in range(20)]))
    sim = normalized(val.features.astype(np.float64)) @ means.T  # (N, V, C)
    e = np.exp(sim / 0.07 - (sim / 0.07).max(-1, keepdims=True))
    expected = (e / e.sum(-1, keepdims=True)).mean(1)

    record = read_run(run)
    ckpt = load_checkpoint(run / record.checkpoints[0].file)
    assert ckpt["format"] == "featx-ncm-1" and record.config["select"] == "holdout:0.25"
    p = predict(runs=[run], split="val", device="cpu")
    np.testing.assert_allclose(p.probs, apply_temperature(expected, ckpt["calibration"]["temperature"]), atol=2e-4)
    assert p.top_k(1) == pytest.approx((expected.argmax(1) == val.labels).mean())
    assert p.top_k(1) == pytest.approx(record.best["val_top1"]) and not p.optimistic
