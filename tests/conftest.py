"""Shared fixtures. Miniature datasets come from synth.py (`from synth import write_tiny_imagenet`); the real
data and weights live in ../shared next to the repository and their tests are skipped where it is absent."""

from __future__ import annotations

from pathlib import Path

import pytest

from synth import write_tiny_imagenet

SHARED = Path(__file__).resolve().parents[2] / "shared"


@pytest.fixture(scope="session")
def shared_zip() -> Path:
    """The real Tiny ImageNet zip trimmed to 100 train images per class (200 classes, 10k val, 500 test)."""
    path = SHARED / "data" / "tiny-imagenet-200-train100.zip"
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    return path


@pytest.fixture(scope="session")
def shared_weights() -> Path:
    path = SHARED / "weights"
    if not path.is_dir():
        pytest.skip(f"{path} is absent")
    return path


@pytest.fixture(scope="session")
def real_cache(shared_zip: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The decoded cache of shared_zip, prepared once per session (a few seconds); use
    read_split(real_cache, split, classes=K) for a class subset."""
    from featx.data import prepare_cache

    return prepare_cache(shared_zip, cache=tmp_path_factory.mktemp("real") / "tiny-imagenet-200-64.h5",
                         progress=False)


@pytest.fixture(scope="session")
def synth_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The cache of a miniature Tiny ImageNet: 4 classes, 12 train and 4 val images per class, 4 test."""
    from featx.data import prepare_cache

    root = tmp_path_factory.mktemp("synth")
    source = write_tiny_imagenet(root, classes=4, train_per_class=12, val_per_class=4, test=4)
    return prepare_cache(source, cache=root / "synth-64.h5", progress=False)
