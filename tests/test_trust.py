"""What a new user trips on, each case run from the real CLI on small real files: the data a command reads, the
selection it claims, the smallest datasets, the output contract in every command, checks before expensive work,
and the messages."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from synth import write_image_folder, write_tiny_imagenet
from test_faults import featx_cli, one_line
from torchvision.models import resnet18

from featx.data.cache import prepare_cache

SMALL = ("--backbone", "resnet18", "--weights", "none", "--size", "32", "--views", "full", "--precision", "fp32")


@pytest.fixture
def two_caches(tmp_path, monkeypatch) -> Path:
    """A working folder whose data/cache holds two prepared datasets of the same image size, as after
    `featx data prepare` on each: a 3-class ImageFolder and a 4-class Tiny ImageNet."""
    monkeypatch.chdir(tmp_path)
    folder = write_image_folder(tmp_path / "src", classes=3, train_per_class=5, name="imgf")
    tiny = write_tiny_imagenet(tmp_path / "src", classes=4, train_per_class=6)
    for source in (folder, tiny):
        prepare_cache(source, progress=False)
    assert sorted(p.name for p in Path("data/cache").iterdir()) == ["imgf-64.h5", "tiny-imagenet-200-64.h5"]
    return tmp_path


def test_extract_without_data_refuses_to_guess_between_datasets(two_caches, capsys, monkeypatch):
    code, _, err = featx_cli(capsys, monkeypatch, "extract", *SMALL, "--out", "f.h5")
    one_line(code, err, "no --data given", "imgf-64.h5 (imgf)", "tiny-imagenet-200-64.h5 (tiny-imagenet-200)")
    assert "pass --data" in err and not Path("f.h5").exists()


def test_extract_names_the_data_it_reads_first(two_caches, capsys, monkeypatch):
    Path("data/cache/imgf-64.h5").unlink()  # one dataset left: it is the one used, and the first line says so
    code, out, err = featx_cli(capsys, monkeypatch, "extract", *SMALL, "--out", "f.h5")
    assert code == 0, err
    first = err.splitlines()[0]
    assert first.startswith("featx: data: data/cache/tiny-imagenet-200-64.h5 (tiny-imagenet-200, 4 classes;"), err
    assert "24 train" in first and "8 val" in first
    # --quiet silences status lines (the data read, up to date) along with progress
    code, out, err = featx_cli(capsys, monkeypatch, "extract", *SMALL, "--out", "f.h5", "--quiet")
    assert code == 0 and err == "" and out == "features: f.h5\n", err


@pytest.mark.parametrize("wrong", ["missing", "other model"])
def test_extract_checks_weights_before_decoding(wrong, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    source = write_tiny_imagenet(tmp_path / "src", classes=3, train_per_class=6)
    weights = tmp_path / "w.pth"
    if wrong == "other model":
        torch.save(resnet18(num_classes=3).state_dict(), weights)
    args = ("--backbone", "mobilenet_v2", "--weights", weights, "--size", "32", "--out", "f.h5")
    code, _, err = featx_cli(capsys, monkeypatch, "extract", "--data", source, *args)
    one_line(code, err, "no such file" if wrong == "missing" else "does not fit this backbone", str(weights))
    assert not Path("data").exists() and not Path("f.h5").exists()  # nothing decoded, nothing written


def test_unknown_backbone_offers_the_nearest_name(tmp_path, capsys, monkeypatch):
    code, _, err = featx_cli(
        capsys, monkeypatch, "extract", "--data", tmp_path, "--backbone", "mobilenetv2", "--out", "f.h5"
    )
    one_line(code, err, "--backbone 'mobilenetv2': unknown; did you mean `mobilenet_v2`?")


def test_missing_data_says_where_it_looked_and_where_to_get_it(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = featx_cli(
        capsys, monkeypatch, "extract", "--data", "tiny-imagenet-200.zip", *SMALL[:4], "--out", "f.h5"
    )
    one_line(code, err, f"looked for {tmp_path}/tiny-imagenet-200.zip", "cs231n.stanford.edu", "leave --data out")
