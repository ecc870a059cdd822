"""Atomic outputs: a file appears under its name only once completely written."""

from __future__ import annotations

import numpy as np
import pytest

from featx.core.atomic import replacing


def test_a_finished_write_lands_under_its_name_and_leaves_nothing_else(tmp_path):
    x = np.arange(12, dtype=np.float16).reshape(3, 4)
    with replacing(tmp_path / "shard.npy") as tmp:
        np.save(tmp, x)  # keeps tmp's name: it already ends in .npy
        assert not (tmp_path / "shard.npy").exists()
    np.testing.assert_array_equal(np.load(tmp_path / "shard.npy"), x)
    assert [p.name for p in tmp_path.iterdir()] == ["shard.npy"]


def test_an_interrupted_write_leaves_the_old_file_and_no_partial_one(tmp_path):
    path = tmp_path / "run.json"
    path.write_text("old")
    with pytest.raises(KeyboardInterrupt), replacing(path) as tmp:
        tmp.write_text("half")
        raise KeyboardInterrupt
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["run.json"]
