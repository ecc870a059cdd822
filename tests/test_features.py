"""The feature store's reader: splits of one extraction load together, splits of different ones do not."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from featx.core.errors import FeatxError
from featx.features.store import FeatureMeta, load, load_features, write_features


def _write(
    path: Path, *, backbone: str = "synthetic", views: tuple[str, ...] = ("full", "full_flip"), seed: int = 0
) -> Path:
    rng = np.random.default_rng(seed)
    names = ["n0", "n1", "n2"]
    meta = FeatureMeta(
        backbone=backbone,
        weights="none",
        input_size=64,
        views=list(views),
        crop=56,
        mean=[0.5] * 3,
        std=[0.5] * 3,
        precision="fp32",
        dtype="float16",
        dataset="synthetic",
        dataset_fingerprint="synthetic-0",
        classes=names,
        class_names=names,
        featx_version="test",
    )

    def split(n: int, labelled: bool):
        x = rng.standard_normal((n, len(views), 8)).astype(np.float16)
        return x, np.where(labelled, np.arange(n) % 3, -1), [f"{i}.JPEG" for i in range(n)]

    return write_features(path, meta, {"train": split(12, True), "val": split(6, True), "test": split(4, False)})


def test_load_returns_every_split_as_stored(tmp_path):
    path = _write(tmp_path / "f.h5")
    splits = load(path)
    assert list(splits) == ["train", "val", "test"]
    for name, f in splits.items():
        one = load_features(path, name)
        np.testing.assert_array_equal(f.features, one.features)
        np.testing.assert_array_equal(f.labels, one.labels)
    assert (splits["test"].labels == -1).all() and splits["val"].labels.tolist() == [0, 1, 2, 0, 1, 2]


def test_load_selects_splits_and_views(tmp_path):
    path = _write(tmp_path / "f.h5")
    splits = load(path, ["val"], views="full")
    assert list(splits) == ["val"]
    np.testing.assert_array_equal(splits["val"].features, load_features(path, "val").features[:, :1])


def test_splits_from_two_files_of_one_extraction_pair(tmp_path):
    a, b = _write(tmp_path / "a.h5", seed=0), _write(tmp_path / "b.h5", seed=1)
    splits = load({"train": a, "val": b})
    np.testing.assert_array_equal(splits["val"].features, load_features(b, "val").features)
    # the same model and settings with fewer stored views is still the same extraction
    c = _write(tmp_path / "c.h5", views=("full",))
    assert load({"train": a, "val": c}, views="full")["val"].meta.views == ["full"]


def test_splits_of_different_extractions_are_refused(tmp_path):
    a, b = _write(tmp_path / "a.h5"), _write(tmp_path / "b.h5", backbone="another")
    with pytest.raises(FeatxError, match=r"b\.h5: split 'val' comes from another extraction .*differs in backbone"):
        load({"train": a, "val": b})


def test_a_split_asked_for_but_not_given_is_named(tmp_path):
    with pytest.raises(FeatxError, match=r"splits \['test'\]: not among the files given"):
        load({"train": _write(tmp_path / "a.h5")}, ["train", "test"])
