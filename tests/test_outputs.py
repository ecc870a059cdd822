"""The output contract (featx.core.outputs) on real files: up to date, resuming, refusals naming each setting, --force
staged beside the old output, extract adding splits; results.json; `featx info` on every output kind; the image
source a feature file records; the small-sample guards."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

from featx import extract_features
from featx.core.errors import FeatxError, FeatxWarning
from featx.core.outputs import Existing, decide, differences, promote, resume_hint, target
from featx.core.stats import apply_temperature, calibration_temperature, expected_calibration_error, selection_holdout
from featx.data.cache import prepare_cache
from featx.evaluate.report import write_report
from featx.evaluate.scoring import open_run, predict
from featx.evaluate.writers import write_prediction_results
from featx.features.store import feature_splits, load_features, read_meta
from featx.front.info import format_info, info
from featx.probe.run import grid, run_probe

FEATX = [sys.executable, "-m", "featx"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TINY = {"backbone": "resnet18", "weights": "none", "size": 32, "views": "full", "progress": False}


def _extract_cli(cache: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            *FEATX,
            "extract",
            "--data",
            str(cache),
            "--backbone",
            "resnet18",
            "--weights",
            "none",
            "--size",
            "32",
            "--views",
            "full",
            "--device",
            "cpu",
            "--out",
            str(out),
            *extra,
        ],
        env=ENV,
        capture_output=True,
        text=True,
    )


# --- the contract itself ----------------------------------------------------------------------------


def test_decide_says_each_case_in_the_same_words(tmp_path, capsys):
    want = {"backbone": "resnet18", "precision": "bf16", "views": ["full"]}
    assert decide(tmp_path, Existing(None), want) == "fresh"
    assert decide(tmp_path, Existing(dict(want), complete=True), want) == "up to date"
    assert capsys.readouterr().err == f"featx: up to date: {tmp_path}\n"
    assert decide(tmp_path, Existing(dict(want), done=3, total=7, unit="epochs"), want) == "resume"
    assert capsys.readouterr().err == "featx: resuming: 3 of 7 epochs done\n"
    old = {**want, "backbone": "vgg16", "views": ["full", "full_flip"]}
    with pytest.raises(FeatxError) as e:
        decide(tmp_path, Existing(old, complete=True), want)
    assert str(e.value) == (
        f"{tmp_path}: holds an output made with other settings (backbone vgg16 → resnet18; views "
        "full,full_flip → full); pass --force to replace it (the old one stays until the new one "
        "is complete) or choose another --out"
    )
    assert decide(tmp_path, Existing(old, complete=True), want, force=True) == "fresh"
    # force replaces only what differs: a forced run's own partial output resumes under the same command
    assert decide(tmp_path, Existing(dict(want), done=1, total=2), want, force=True) == "resume"


def test_a_difference_only_in_what_auto_became_says_so():
    diffs = differences({"precision": "fp32"}, {"precision": "bf16"}, auto={"precision": "--precision"})
    assert diffs == ["precision fp32 → bf16 (--precision auto resolves to bf16 on this CPU)"]
    # hashes that follow from plainer settings are named only when nothing plainer differs
    assert differences({"per_class": 20, "dataset_fingerprint": "a"}, {"per_class": 5, "dataset_fingerprint": "b"}) == [
        "per_class 20 → 5"
    ]
    assert differences({"dataset_fingerprint": "a"}, {"dataset_fingerprint": "b"}) == ["dataset_fingerprint a → b"]
    assert differences({"a": 1}, {"a": 1, "new_setting": 2}) == []  # outputs from before a setting existed


def test_a_forced_folder_replaces_the_old_only_when_promoted(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "old.txt").write_text("old")
    new = target(out, forced=True)
    assert new == tmp_path / "run.new" and (out / "old.txt").read_text() == "old"
    new.mkdir()
    (new / "new.txt").write_text("new")
    promote(new, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"] and (out / "new.txt").read_text() == "new"
    assert target(tmp_path / "absent", forced=True) == tmp_path / "absent"


def test_the_resume_hint_is_the_same_command_quoted():
    assert (
        resume_hint(["extract", "--out", "my features.h5", "--force"])
        == "resume with: featx extract --out 'my features.h5' --force"
    )


# --- extract ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_extract_adds_the_splits_a_finished_file_lacks_then_is_up_to_date(synth_cache, tmp_path):
    out = tmp_path / "f.h5"
    first = _extract_cli(synth_cache, out, "--splits", "train,val")
    assert first.returncode == 0, first.stderr
    before = load_features(out, "train").features
    added = _extract_cli(synth_cache, out, "--splits", "train,val,test")
    assert added.returncode == 0 and f"featx: adding split test to {out} (has train,val)" in added.stderr
    assert feature_splits(out) == ["train", "val", "test"] and len(load_features(out, "test").ids) == 4
    np.testing.assert_array_equal(load_features(out, "train").features, before)  # copied, not recomputed
    again = _extract_cli(synth_cache, out, "--splits", "train,val,test")
    assert again.returncode == 0 and f"featx: up to date: {out}" in again.stderr
    refused = _extract_cli(synth_cache, out, "--splits", "train,val", "--per-class", "6")
    assert refused.returncode == 2 and "per_class none → 6" in refused.stderr and "--force" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1 and feature_splits(out) == ["train", "val", "test"]


@pytest.mark.slow
def test_a_forced_extraction_keeps_the_old_file_until_the_new_one_is_complete(synth_cache, tmp_path):
    out = tmp_path / "f.h5"
    extract_features(data=synth_cache, out=out, splits=["val"], **TINY)
    with pytest.raises(FeatxError, match=r"other settings \(views full → full,full_flip\); pass --force"):
        extract_features(data=synth_cache, out=out, splits=["val"], **{**TINY, "views": "flip"})
    forced = (
        "import sys; from featx import extract_features; extract_features(data=sys.argv[1], out=sys.argv[2], "
        "backbone='resnet18', weights='none', size=96, views='flip', shard_rows=2, batch_size=1, "
        "progress=False, force=True)"
    )
    proc = subprocess.Popen([sys.executable, "-c", forced, str(synth_cache), str(out)], env=ENV)
    partial = tmp_path / "f.h5.partial"
    deadline = time.time() + 120
    finished = lambda: [p for p in partial.glob("*.npy") if ".tmp." not in p.name]  # noqa: E731 (atomic's temp)
    while len(finished()) < 2 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert read_meta(out).views == ["full"] and len(load_features(out, "val").ids) == 16  # killed: the old file
    done = len(finished())
    if not 1 <= done < 34:
        pytest.fail(f"{done} of 34 shards when killed: the test needs a run stopped midway")
    resumed = subprocess.run(
        [sys.executable, "-c", forced, str(synth_cache), str(out)], env=ENV, capture_output=True, text=True
    )
    assert resumed.returncode == 0 and f"featx: resuming: {2 * done} of 68 images done" in resumed.stderr
    assert read_meta(out).views == ["full", "full_flip"] and not partial.exists()


# --- probe, results.json, info, the feature file's source, report ---------------------------------------


@pytest.fixture(scope="module")
def probed(synth_cache, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("contract")
    features = extract_features(data=synth_cache, out=root / "f.h5", **TINY)
    run = root / "probe"
    run_probe(features=features, out=run, heads=grid(lr=[1e-2]), epochs=2, batch_size=16, device="cpu", select="val")
    return {"features": features, "run": run, "root": root}


def test_probe_is_up_to_date_refuses_other_settings_and_forces_beside(probed, capsys):
    run, features = probed["run"], probed["features"]
    kw = dict(features=features, heads=grid(lr=[1e-2]), batch_size=16, device="cpu", select="val")
    stamp = (run / "run.json").stat().st_mtime_ns
    result = run_probe(out=run, epochs=2, **kw)
    assert f"featx: up to date: {run}" in capsys.readouterr().err and (run / "run.json").stat().st_mtime_ns == stamp
    assert (
        result.best_epoch in (1, 2) and result.val["val_top1"] == json.loads((run / "results.json").read_text())["top1"]
    )
    with pytest.raises(FeatxError, match=r"other settings \(epochs 2 → 3\); pass --force"):
        run_probe(out=run, epochs=3, **kw)
    copy = probed["root"] / "forced"
    subprocess.run(["cp", "-r", str(run), str(copy)], check=True)
    run_probe(out=copy, epochs=3, force=True, **kw)
    assert json.loads((copy / "run.json").read_text())["config"]["epochs"] == 3
    assert not (probed["root"] / "forced.new").exists()


def test_results_json_of_probe_and_predict(probed):
    r = json.loads((probed["run"] / "results.json").read_text())
    assert r["format"] == "featx-results-1" and r["kind"] == "probe" and r["split"] == "val"
    assert r["top1_interval"][0] <= r["top1"] <= r["top1_interval"][1] and 0 <= r["top5"] <= 1
    assert r["selection"]["protocol"] == "val (optimistic)" and r["views"] == "all"
    assert r["settings"]["epochs"] == 2 and r["seconds"]["train"] > 0
    p = predict(runs=[probed["run"]], split="val", eval_views="all", device="cpu")
    written = write_prediction_results(
        p, probed["root"] / "preds", runs=[probed["run"]], ensemble="best", eval_views="all", seconds=1.5
    )
    assert written["views"] == "full" and written["top1"] == p.top_k(1) and written["images"] == 16
    assert json.loads((probed["root"] / "preds" / "results.json").read_text()) == written
    described = info(probed["root"] / "preds")
    assert described["kind"] == "predict" and described["metrics"]["top1"] == p.top_k(1)


def test_the_feature_file_records_its_source_and_report_finds_the_images_through_it(probed, synth_cache, tmp_path):
    meta = read_meta(probed["features"])
    assert meta.source == {
        "cache": str(synth_cache.resolve()),
        "fingerprint": meta.dataset_fingerprint,
        "per_class": None,
    }
    page = write_report(run=probed["run"], out=tmp_path / "report", device="cpu")
    text = page.read_text()
    assert "Pass <code>--data</code>" not in text  # no --data: the images found through the file
    images = open_run(probed["run"], device="cpu").images(None, "val")
    assert images.ids == load_features(probed["features"], "val").ids and images.read_images().shape == (16, 64, 64, 3)
    # the page opens with its summary and pictures; the per-class table comes last, collapsed
    order = [
        text.index(s)
        for s in (
            "top-1 [95% bootstrap interval]",
            "Training curves",
            "Most-confused pairs on val",
            "Error gallery on val",
            "Confusion matrix",
            "Reliability diagram",
            "<details>",
        )
    ]
    assert order == sorted(order) and text.index("Per-class errors") > text.index("<details>")
    described = info(tmp_path / "report")
    assert described["kind"] == "report" and described["settings"]["runs"] == [str(probed["run"])]
    assert described["metrics"]["views"] == ["full"] and 0 <= described["metrics"]["top1"] <= 1


def test_a_moved_source_is_one_line(probed, synth_cache, tmp_path):
    from featx.evaluate.scoring import feature_source

    meta = read_meta(probed["features"])
    meta.source = {**meta.source, "cache": str(tmp_path / "gone.h5")}
    with pytest.raises(FeatxError, match=r"gone.h5 is gone \(moved or deleted\); pass --data"):
        feature_source(meta, None, path=probed["features"])
    assert feature_source(meta, synth_cache, path=probed["features"]) == synth_cache  # --data overrides


def test_info_on_every_output_kind(probed, synth_cache, tmp_path):
    cache = info(synth_cache)
    assert cache["kind"] == "cache" and cache["splits"] == {"train": 48, "val": 16, "test": 4}
    feats = info(probed["features"])
    assert feats["kind"] == "features" and feats["splits"] == {"train": 48, "val": 16, "test": 4}
    assert feats["settings"]["backbone"] == "resnet18" and feats["settings"]["dim"] == 512
    assert feats["source"]["cache"] == str(synth_cache.resolve())
    run = info(probed["run"])
    assert run["kind"] == "probe" and run["complete"] and run["metrics"]["top1"] is not None
    assert run["made_by"]["featx_version"] and run["source"]["identity"] == read_meta(probed["features"]).identity()
    text = format_info(run)
    assert text.startswith(f"{probed['run']}: probe, ") and "  metrics:" in text and "    top1: " in text
    assert json.loads(json.dumps(run)) == run  # what --json prints
    with pytest.raises(FeatxError, match="not a featx output"):
        info(tmp_path)


def test_data_info_on_a_feature_file_does_not_advise_overwriting_it(probed):
    r = subprocess.run(
        [*FEATX, "data", "info", "--cache", str(probed["features"])], env=ENV, capture_output=True, text=True
    )
    assert r.returncode == 2 and "a featx features file, not a decoded-image cache; `featx info" in r.stderr
    assert "prepare" not in r.stderr


def test_without_data_a_prepared_cache_of_the_same_options_is_used(tmp_path, monkeypatch):
    from synth import write_tiny_imagenet

    source = write_tiny_imagenet(tmp_path / "src", classes=3)
    monkeypatch.chdir(tmp_path)
    made = prepare_cache(source, classes=2, per_class=4, progress=False)
    assert made == Path("data/cache/tiny-imagenet-200-64-c2-p4.h5")
    assert prepare_cache(None, classes=2, per_class=4, progress=False) == made  # no download tried


# --- small-sample guards ---------------------------------------------------------------------------------


# 12 images of 4 classes, 5 right: the likelihood's T (about 3.1) flattens them and doubles the calibration error
WORSENED = (
    [
        [0.714, 0.179, 0.034, 0.074],
        [0.003, 0.423, 0.418, 0.157],
        [0.06, 0.328, 0.011, 0.602],
        [0.191, 0.341, 0.022, 0.446],
        [0.013, 0.022, 0.636, 0.33],
        [0.047, 0.489, 0.101, 0.363],
        [0.136, 0.806, 0.035, 0.024],
        [0.373, 0.147, 0.456, 0.023],
        [0.109, 0.838, 0.041, 0.011],
        [0.472, 0.042, 0.464, 0.022],
        [0.066, 0.818, 0.103, 0.013],
        [0.061, 0.431, 0.173, 0.335],
    ],
    [1, 3, 2, 3, 2, 0, 2, 2, 1, 0, 1, 3],
)


def test_a_temperature_that_worsens_calibration_keeps_t_1_with_one_warning():
    probs, labels = np.array(WORSENED[0]), np.array(WORSENED[1])
    probs /= probs.sum(1, keepdims=True)
    with pytest.warns(
        FeatxWarning,
        match=r"temperature 3.1\d worsens calibration on the selection split "
        r"\(ECE 0.141 → 0.257\); keeping T = 1",
    ):
        assert calibration_temperature(probs, labels) == 1.0
    probs[np.arange(12), labels] += 3  # right and sure: the fitted T sharpens and helps
    probs /= probs.sum(1, keepdims=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        t = calibration_temperature(probs, labels)
    assert t < 1 and expected_calibration_error(apply_temperature(probs, t), labels) < expected_calibration_error(
        probs, labels
    )


def test_a_tiny_selection_split_warns_and_selects_on_val():
    labels = np.repeat(np.arange(10), 20)
    with pytest.warns(
        FeatxWarning,
        match=r"hold out 20 images of train \(2.0 a class, under 5\), too few to choose on; selecting on val",
    ):
        assert selection_holdout(labels, 0.1, 0, 10, fallback="selecting on val") is None  # 2 a class
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert selection_holdout(labels, 0.5, 0, 10, fallback="selecting on val").sum() == 100


def test_finetune_names_why_a_timm_backbone_is_refused(tmp_path):
    r = subprocess.run(
        [*FEATX, "finetune", "--backbone", "timm:resnet18", "--out", str(tmp_path / "x")],
        env=ENV,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "finetune trains the registered backbones only" in r.stderr
    assert "with timm installed" not in r.stderr and not (tmp_path / "x").exists()


def test_a_probe_on_a_tiny_holdout_warns_and_selects_on_val(tmp_path):
    from test_probe import write_synthetic

    features = write_synthetic(tmp_path / "s.h5")  # 120 train images of 4 classes: 10% holds out 3 a class
    with pytest.warns(FeatxWarning, match="too few to choose on; selecting on val instead"):
        run_probe(features=features, out=tmp_path / "run", heads=grid(lr=[1e-2]), epochs=1, batch_size=20, device="cpu")
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["config"]["select"] == "holdout:0.1" and run["best"]["select"] == "val"  # the option as given
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["selection"]["protocol"] == "val (optimistic)"
    assert predict(runs=[tmp_path / "run"], split="val", device="cpu").optimistic


def test_info_on_a_finetune_run_and_an_interrupted_extraction(synth_cache, tmp_path):
    from featx.finetune.run import FinetuneConfig, finetune

    run = tmp_path / "ft"
    finetune(
        FinetuneConfig(
            data=synth_cache, backbone="resnet18", weights="none", size=32, epochs=1, batch_size=16, device="cpu"
        ),
        out=run,
        progress=False,
    )
    d = info(run)
    assert d["kind"] == "finetune" and d["complete"] and d["settings"]["epochs"] == 1
    assert d["metrics"]["views"] == "full" and d["source"]["source"] == str(synth_cache)
    partial = tmp_path / "f.h5.partial"
    partial.mkdir()
    meta = read_meta(extract_features(data=synth_cache, out=tmp_path / "done.h5", splits=["val"], **TINY))
    (partial / "meta.json").write_text(json.dumps({"shard_rows": 1024, "meta": json.loads(meta.to_json())}))
    d = info(partial)
    assert d["kind"] == "features" and not d["complete"] and d["metrics"]["shards_done"] == 0
