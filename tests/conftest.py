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
    from featx.data.cache import prepare_cache

    return prepare_cache(shared_zip, cache=tmp_path_factory.mktemp("real") / "tiny-imagenet-200-64.h5", progress=False)


@pytest.fixture(scope="session")
def synth_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The cache of a miniature Tiny ImageNet: 4 classes, 12 train and 4 val images per class, 4 test."""
    from featx.data.cache import prepare_cache

    root = tmp_path_factory.mktemp("synth")
    source = write_tiny_imagenet(root, classes=4, train_per_class=12, val_per_class=4, test=4)
    return prepare_cache(source, cache=root / "synth-64.h5", progress=False)


@pytest.fixture(scope="session")
def mobilenet_features_20(real_cache: Path, shared_weights: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real transfer values: MobileNetV2 with the shared ImageNet weights on the first 20 classes of the real
    zip (50 train images per class, all 1,000 of their val images), views `flip`. About a minute on 2
    cores, once per session."""
    from featx import extract_features

    return extract_features(
        data=real_cache,
        backbone="mobilenet_v2",
        weights=shared_weights / "mobilenet_v2_imagenet_tflite.pth",
        views="flip",
        classes=20,
        per_class=50,
        splits=["train", "val"],
        precision="fp32",
        out=tmp_path_factory.mktemp("mnv2") / "mnv2-flip.h5",
        progress=False,
    )
