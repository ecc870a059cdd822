"""Commands that do no heavy work start without importing torch, scikit-learn or matplotlib (seconds each on a
small CPU): `featx info`, `featx data info` and a `featx data prepare` that is up to date, which says so."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from synth import write_tiny_imagenet

from featx import extract_features

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "sklearn", "matplotlib")

# runs the CLI in a fresh interpreter, then prints which heavy packages it imported
PROBE = (
    "import sys\n"
    "from featx.front.cli import main\n"
    "try:\n"
    "    main()  # reads sys.argv[1:]: the arguments after -c's code\n"
    "except SystemExit as e:\n"
    "    assert not e.code, e.code\n"
    f"print('imported:', sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
)


def _featx(*args: str) -> subprocess.CompletedProcess:
    r = subprocess.run(
        [sys.executable, "-c", PROBE, *args],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert r.returncode == 0, r.stderr
    return r


def test_light_commands_import_no_torch_sklearn_or_matplotlib(tmp_path):
    source = write_tiny_imagenet(tmp_path, classes=2, train_per_class=4, val_per_class=2, test=2)
    cache = tmp_path / "cache.h5"
    first = _featx("data", "prepare", "--data", str(source), "--cache", str(cache))
    assert "up to date" not in first.stderr
    again = _featx("data", "prepare", "--data", str(source), "--cache", str(cache))
    assert f"featx: up to date: {cache} (decoded from {source})" in again.stderr
    assert "imported: []" in again.stdout
    assert "imported: []" in _featx("data", "info", "--cache", str(cache)).stdout
    features = extract_features(
        data=cache, backbone="resnet18", weights="none", size=32, views="full", out=tmp_path / "f.h5", progress=False
    )
    shown = _featx("info", str(features))
    assert "resnet18" in shown.stdout and "imported: []" in shown.stdout


def test_a_changed_source_zip_is_decoded_again(tmp_path):
    source = write_tiny_imagenet(tmp_path, classes=2, train_per_class=4, val_per_class=2, test=2)
    cache = tmp_path / "cache.h5"
    _featx("data", "prepare", "--data", str(source), "--cache", str(cache))
    write_tiny_imagenet(tmp_path, classes=2, train_per_class=5, val_per_class=2, test=2)  # same path, new zip
    again = _featx("data", "prepare", "--data", str(source), "--cache", str(cache))
    assert "up to date" not in again.stderr
    assert "train    10 images" in again.stdout
