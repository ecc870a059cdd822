"""What a new user trips on, each case run from the real CLI on small real files: the data a command reads, the
selection it claims, the smallest datasets, the output contract in every command, checks before expensive work,
and the messages."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from synth import write_image_folder, write_tiny_imagenet
from test_faults import featx_cli, one_line
from test_outputs import ENV, FEATX
from test_probe import write_synthetic
from torchvision.models import resnet18

from featx.core.configs import DEFAULT_SWEEP
from featx.core.errors import FeatxError, FeatxWarning
from featx.data.cache import prepare_cache
from featx.evaluate.report import _tsne_classes
from featx.features.store import load_features, read_meta
from featx.front.compare import compare
from featx.probe.estimator import LinearProbeCV
from featx.probe.run import run_probe
from featx.probe.sweep import HeadConfig, grid, train

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


# --- selection: one truth, and the smallest datasets -----------------------------------------------------


def _features(tmp_path: Path, *, classes: int, n_train: int, n_val: int) -> Path:
    """A real feature file of class blobs (test_probe's), `n_val` 0: without a val split."""
    path = write_synthetic(tmp_path / "f.h5", classes=classes, n_train=n_train, n_val=max(n_val, 1), noise=0.5)
    if not n_val:
        with h5py.File(path, "r+") as f:
            del f["val"]
    return path


def _probe(capsys, monkeypatch, features: Path, out: Path, *args) -> tuple[str, str, dict]:
    code, stdout, stderr = featx_cli(
        capsys, monkeypatch, "probe", "--features", features, "--out", out, "--epochs", "3", "--device", "cpu", *args
    )
    assert code == 0, stderr
    return stdout, stderr, json.loads((out / "results.json").read_text())


@pytest.mark.parametrize("per_class", [20, 5])  # 20: 10% is 2 a class; 5: no stratified 10% exists at all
def test_a_small_holdout_falls_back_to_val_and_every_record_says_so(per_class, tmp_path, capsys, monkeypatch):
    classes = 5 if per_class == 20 else 3
    features = _features(tmp_path, classes=classes, n_train=classes * per_class, n_val=classes * 4)
    stdout, stderr, results = _probe(capsys, monkeypatch, features, tmp_path / "p")
    assert stderr.count("too few to choose on; selecting on val instead") == 1, stderr
    assert "selected on val (optimistic)" in stdout and ": val top-1" in stdout and "holdout:" not in stdout
    assert results["selection"]["select"] == "val" and results["selection"]["protocol"] == "val (optimistic)"
    assert json.loads((tmp_path / "p" / "run.json").read_text())["best"]["select"] == "val"


def test_without_val_the_holdout_of_train_chooses_and_is_the_score(tmp_path, capsys, monkeypatch):
    features = _features(tmp_path, classes=3, n_train=3 * 60, n_val=0)
    stdout, stderr, results = _probe(capsys, monkeypatch, features, tmp_path / "p")
    assert "warning" not in stderr
    assert (
        "selected and scored on holdout:0.1 of train (no val split: optimistic)" in stdout and "val top-1" not in stdout
    )
    assert results["split"] == "holdout:0.1" and results["selection"]["images"] == 18
    assert results["top1"] == pytest.approx(results["selection"]["top1"])  # one split chose and scored


def test_without_val_and_too_few_images_one_default_head_trains_and_nothing_is_claimed(tmp_path, capsys, monkeypatch):
    features = _features(tmp_path, classes=3, n_train=15, n_val=0)
    stdout, stderr, results = _probe(capsys, monkeypatch, features, tmp_path / "p")
    assert stderr.count("nothing is selected and no held-out score exists") == 1, stderr
    assert "nothing selected (one head, default values, all of train); no held-out score exists" in stdout
    assert "trn top-1" in stdout and "sel top-1" not in stdout
    assert results["top1"] is None and results["split"] is None and results["selection"]["select"] == "none"
    metrics = json.loads((tmp_path / "p" / "metrics.json").read_text())
    assert [h["config"]["lr"] for h in metrics["heads"]] == [HeadConfig().lr]  # one head, the default values
    assert metrics["best"]["epoch"] == 3  # the last epoch, not one chosen on train


def test_the_estimator_warns_on_a_tiny_selection_split():
    x = np.random.default_rng(0).standard_normal((15, 8)).astype(np.float32)
    with pytest.warns(FeatxWarning, match=r"chooses on a holdout of 2 samples \(0.7 a class, under 5\)"):
        LinearProbeCV(lr=[1e-3], weight_decay=[1e-3], epochs=1).fit(x, np.arange(15) % 3)


def test_weight_decay_changes_the_heads_and_ties_are_said(tmp_path, capsys, monkeypatch):
    """The default sweep's weight decays reach the heads: each larger decay leaves smaller weights. Under Adam's
    L2 decay they move them little (the norms differ by about 0.1% after 3 epochs here), so a small selection
    split scores them alike; the summary then says they tie instead of implying a choice."""
    features = _features(tmp_path, classes=4, n_train=4 * 60, n_val=4 * 5)
    train_split, val = load_features(features, "train"), load_features(features, "val")
    decays = [0.0, *DEFAULT_SWEEP["weight_decay"]]
    result = train(train_split, val=val, heads=grid(lr=[1e-3], weight_decay=decays), epochs=3)
    norms = [float(result.heads.head_state(h)["weights.0"].norm()) for h in range(len(decays))]
    assert norms == sorted(norms, reverse=True) and len(set(norms)) == len(norms), norms
    assert 0.99 < norms[-1] / norms[0] < 1  # why the default sweep's decays tie on few images
    stdout, _, _ = _probe(capsys, monkeypatch, features, tmp_path / "p", "--select", "val")
    assert "tied with" in stdout and "too few images to tell them apart" in stdout


# --- compare ---------------------------------------------------------------------------------------------


def test_compare_checks_every_backbone_before_extracting(synth_cache, tmp_path):
    with pytest.raises(FeatxError, match="'resnt18': unknown; did you mean `resnet18`"):
        compare(data=synth_cache, backbones=["resnet18", "resnt18"], weights=["none", "none"], out=tmp_path / "c")
    assert not (tmp_path / "c" / "features").exists()


def test_compare_reports_the_extractions_own_rate_and_where_each_probe_chose(synth_cache, tmp_path, capsys):
    args = dict(
        data=synth_cache,
        backbones=["resnet18", "vgg_tiny"],
        weights=["none", "none"],
        out=tmp_path / "c",
        size=32,
        views="full",
        epochs=2,
        device="cpu",
        precision="fp32",
        progress=False,
    )
    board = compare(**args)
    for e in board:
        assert e.images_per_second == read_meta(e.features).images_per_second > 0
        assert e.selected_on == "val"  # 12 train images a class: the holdout fell back
    text = (tmp_path / "c" / "leaderboard.txt").read_text()
    assert "chosen on" in text.splitlines()[0]
    results = json.loads((tmp_path / "c" / "results.json").read_text())
    assert [r["selected_on"] for r in results["leaderboard"]] == ["val", "val"]
    capsys.readouterr()
    again = compare(**args)  # up to date: the same rates, not a new timing
    assert "featx: up to date" in capsys.readouterr().err
    assert [e.images_per_second for e in again] == [e.images_per_second for e in board]
    assert (tmp_path / "c" / "leaderboard.txt").read_text() == text


# --- the output contract in predict and report -----------------------------------------------------------


@pytest.fixture
def probe_run(tmp_path) -> Path:
    features = _features(tmp_path, classes=4, n_train=4 * 60, n_val=4 * 10)
    run_probe(features=features, out=tmp_path / "p", heads=grid(lr=[1e-3, 3e-3]), epochs=2, keep=2, device="cpu")
    return tmp_path / "p"


def _files(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


def test_predict_is_up_to_date_refuses_other_settings_and_forces_a_clean_folder(probe_run, capsys, monkeypatch):
    pr = probe_run.parent / "pr"
    cli = ("predict", "--run", probe_run, "--device", "cpu", "--out", pr)
    code, _, err = featx_cli(capsys, monkeypatch, *cli, "--ensemble", "top:2")
    assert code == 0 and "ensemble.csv" in _files(pr), err
    stamp = (pr / "predictions.csv").stat().st_mtime_ns
    code, out, err = featx_cli(capsys, monkeypatch, *cli, "--ensemble", "top:2")
    assert code == 0 and f"featx: up to date: {pr}" in err and (pr / "predictions.csv").stat().st_mtime_ns == stamp
    code, _, err = featx_cli(capsys, monkeypatch, *cli, "--ensemble", "top:2", "--quiet")
    assert code == 0 and "up to date" not in err  # --quiet silences the contract's lines
    code, _, err = featx_cli(capsys, monkeypatch, *cli, "--ensemble", "best")
    one_line(code, err, f"{pr}: holds an output made with other settings (ensemble top:2 → best)", "--force")
    (pr / "left-over.csv").write_text("a file of an earlier output\n")
    code, _, err = featx_cli(capsys, monkeypatch, *cli, "--ensemble", "best", "--force")
    assert code == 0 and "left-over.csv" not in _files(pr), err
    assert json.loads((pr / "results.json").read_text())["selection"]["ensemble"] == "best"
    assert not pr.with_name("pr.partial").exists()


def test_predict_without_out_names_its_folder_after_run_and_split(probe_run, capsys, monkeypatch):
    monkeypatch.chdir(probe_run.parent)
    for ensemble in ("top:2", "best"):  # other settings for the same run and split replace the default folder
        code, _, err = featx_cli(
            capsys, monkeypatch, "predict", "--run", "p", "--ensemble", ensemble, "--device", "cpu"
        )
        assert code == 0, err
    assert "featx: replacing preds/p-val (ensemble top:2 → best)" in err
    assert sorted(p.name for p in Path("preds").iterdir()) == ["p-val"]
    assert json.loads(Path("preds/p-val/results.json").read_text())["selection"]["ensemble"] == "best"


def test_report_follows_the_contract_and_leaves_no_earlier_files(probe_run, tmp_path, capsys, monkeypatch):
    other = tmp_path / "q"
    run_probe(features=tmp_path / "f.h5", out=other, heads=[HeadConfig()], epochs=1, device="cpu")
    r = tmp_path / "r"
    code, _, err = featx_cli(capsys, monkeypatch, "report", "--run", probe_run, "--out", r, "--device", "cpu")
    assert code == 0 and (r / "report.html").is_file(), err
    code, _, err = featx_cli(capsys, monkeypatch, "report", "--run", probe_run, "--out", r, "--device", "cpu")
    assert code == 0 and f"featx: up to date: {r}" in err
    code, _, err = featx_cli(capsys, monkeypatch, "report", "--run", other, "--out", r, "--device", "cpu")
    one_line(code, err, f"holds an output made with other settings (runs {probe_run} → {other})", "--force")
    (r / "thumb-old.png").write_bytes(b"a picture of the earlier report")
    code, _, err = featx_cli(capsys, monkeypatch, "report", "--run", other, "--out", r, "--device", "cpu", "--force")
    assert code == 0 and "thumb-old.png" not in _files(r) and not (tmp_path / "r.partial").exists(), err
    assert json.loads((r / "report.json").read_text())["settings"]["runs"] == [str(other)]


def test_a_folder_featx_did_not_write_is_never_replaced(probe_run, capsys, monkeypatch):
    mine = probe_run.parent / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me\n")
    code, _, err = featx_cli(capsys, monkeypatch, "predict", "--run", probe_run, "--out", mine, "--device", "cpu")
    one_line(code, err, f"--out {mine}: holds files featx did not write")
    assert _files(mine) == {"notes.txt"}


# --- messages --------------------------------------------------------------------------------------------


def test_a_changed_lr_is_refused_in_plain_words(probe_run, capsys, monkeypatch):
    code, _, err = featx_cli(
        capsys, monkeypatch, "probe", "--features", probe_run.parent / "f.h5", "--out", probe_run, "--lr", "0.01"
    )
    one_line(code, err, "lr 0.001,0.003 → 0.01")
    assert "{" not in err and "heads" not in err


def test_report_of_runs_over_other_classes_says_so(probe_run, tmp_path, capsys, monkeypatch):
    features = write_synthetic(tmp_path / "g.h5", classes=3, n_train=3 * 60, n_val=4 * 10)
    run_probe(features=features, out=tmp_path / "q", heads=[HeadConfig()], epochs=1, device="cpu")
    code, _, err = featx_cli(
        capsys, monkeypatch, "report", "--run", probe_run, "--run", tmp_path / "q", "--out", tmp_path / "r"
    )
    one_line(code, err, "trained on other classes (3) than --run", "(4)")
    assert not (tmp_path / "r").exists() and not (tmp_path / "r.partial").exists()  # refused before any writing


def test_data_prepare_and_info_print_one_size(tmp_path, capsys, monkeypatch):
    source = write_tiny_imagenet(tmp_path / "src", classes=3, train_per_class=6)
    code, prepared, _ = featx_cli(
        capsys, monkeypatch, "data", "prepare", "--data", source, "--cache", tmp_path / "c.h5"
    )
    assert code == 0
    code, described, _ = featx_cli(capsys, monkeypatch, "info", tmp_path / "c.h5")
    size = re.search(r"\((\d+\.\d MB)\)", prepared)[1]
    assert f", {size}" in described.splitlines()[0], (prepared, described)


def test_probe_takes_a_recipes_probe_table_as_config(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _features(tmp_path, classes=4, n_train=4 * 60, n_val=4 * 10)
    Path("recipe.toml").write_text(
        '[extract]\nout = "f.h5"\n\n[probe]\nfeatures = "${extract.out}"\nout = "elsewhere"\nlr = [3e-3]\nepochs = 2\n'
    )
    code, _, err = featx_cli(capsys, monkeypatch, "probe", "--config", "recipe.toml", "--out", "p", "--device", "cpu")
    assert code == 0, err
    options = json.loads(Path("p/run.json").read_text())["config"]["options"]
    assert options["features"] == "f.h5" and options["lr"] == [3e-3] and options["epochs"] == 2
    quickstart = Path(__file__).resolve().parents[1] / "pipelines" / "quickstart.toml"
    code, _, err = featx_cli(capsys, monkeypatch, "probe", "--config", quickstart, "--out", "q")
    one_line(code, err, "features/quickstart-mobilenet_v2-flip.h5: no such feature file")


def test_tsne_fills_up_to_seven_classes_from_those_present():
    classes = [f"n{k:08d}" for k in range(10)] + ["n04285008", "n02917067"]  # two of the report's seven
    assert _tsne_classes(None, classes) == [10, 11, 0, 1, 2, 3, 4]
    assert _tsne_classes(None, classes[:3]) == [0, 1, 2]


@pytest.mark.slow
def test_a_killed_probe_resumes_from_its_last_finished_epoch(tmp_path):
    features = write_synthetic(tmp_path / "big.h5", classes=10, dim=256, n_train=6000, n_val=200, noise=1.0)
    args = [*FEATX, "probe", "--features", str(features), "--epochs", "12", "--device", "cpu", "--lr", "1e-3,3e-3"]
    whole = subprocess.run([*args, "--out", str(tmp_path / "whole")], env=ENV, capture_output=True, text=True)
    assert whole.returncode == 0, whole.stderr
    killed = subprocess.Popen([*args, "--out", str(tmp_path / "p")], env=ENV, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not (tmp_path / "p" / "resume.pt").exists() and killed.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    again = subprocess.run([*args, "--out", str(tmp_path / "p")], env=ENV, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    done = int(re.search(r"featx: resuming: (\d+) of 12 epochs done", again.stderr)[1])
    assert 1 <= done < 12, again.stderr
    history = [json.loads((tmp_path / r / "metrics.json").read_text())["heads"] for r in ("whole", "p")]
    assert [h["epochs"] for h in history[1]] == [h["epochs"] for h in history[0]]  # as if never interrupted
    assert not (tmp_path / "p" / "resume.pt").exists()
