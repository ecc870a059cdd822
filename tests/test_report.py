"""featx report: the page, its figures and tables, on a real probe run and a synthetic finetune run."""

from __future__ import annotations

import csv
import re
import sys

import numpy as np
import pytest
import torch
from sklearn.metrics import confusion_matrix

from featx.data.cache import dataset_info
from featx.evaluate.report import DEFAULT_TSNE, _tsne_classes, class_errors, confused_pairs, write_report
from featx.evaluate.scoring import predict
from featx.finetune.run import FinetuneConfig, finetune
from featx.front.cli import main
from featx.probe.run import HeadConfig, run_probe


def read_csv(path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def linked_files(page) -> set[str]:
    return set(re.findall(r"(?:src|href)='([^']+)'", page.read_text()))


def test_error_tables_from_a_known_confusion_matrix():
    # true class 0: 2 right, 3 taken for class 1, 1 for class 2; class 1: all right; class 2: 1 taken for 0
    y = np.array([0, 0, 0, 0, 0, 0, 1, 1, 2, 2, 2])
    p = np.array([0, 0, 1, 1, 1, 2, 1, 1, 2, 2, 0])
    cm = confusion_matrix(y, p, labels=[0, 1, 2])
    rows = class_errors(cm, ["a", "b", "c"], ["A", "B", "C"])
    assert [r["wnid"] for r in rows] == ["a", "c", "b"]  # worst first
    assert rows[0] | {"error_rate": 0} == {
        "wnid": "a",
        "name": "A",
        "images": 6,
        "errors": 4,
        "error_rate": 0,
        "wrong_classes": 2,
        "most_confused_with": "B",
        "times": 3,
    }
    assert rows[0]["error_rate"] == pytest.approx(4 / 6) and rows[2]["most_confused_with"] == ""
    pairs = confused_pairs(cm, ["a", "b", "c"], ["A", "B", "C"])
    assert [(r["a"], r["b"], r["a_as_b"], r["b_as_a"], r["total"]) for r in pairs] == [
        ("a", "b", 3, 0, 3),
        ("a", "c", 1, 1, 2),
    ]


@pytest.mark.slow
def test_real_report_files_links_and_per_class_errors(mobilenet_features_20, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    run_probe(features=mobilenet_features_20, out=run, heads=[HeadConfig()], epochs=3, keep=3, device="cpu")
    out = tmp_path / "report"
    monkeypatch.setattr(
        sys, "argv", ["featx", "report", "--run", str(run), "--out", str(out), "--device", "cpu", "--ensemble", "all"]
    )
    with pytest.raises(SystemExit) as exit:
        main()
    assert exit.value.code == 0
    assert capsys.readouterr().out.strip() == f"report: {out / 'report.html'}"

    page = out / "report.html"
    names = {
        "per_class.csv",
        "confused_pairs.csv",
        "predictions.csv",
        "confusion.png",
        "curves.png",
        "tsne.png",
        "reliability.png",
        "ensemble.csv",
        "ensemble.png",
    }
    gallery = {n for n in linked_files(page) if n.startswith("gallery/")}  # images found through the feature file
    assert gallery and linked_files(page) == names | gallery
    assert all((out / n).stat().st_size > 100 for n in names - {"ensemble.csv"})  # 3 short rows

    pred = predict(runs=[run], split="val", ensemble="all", device="cpu")
    per_class = read_csv(out / "per_class.csv")
    assert len(per_class) == 20 and sum(int(r["images"]) for r in per_class) == 1000
    errors = sum(int(r["errors"]) for r in per_class)
    assert errors == round((1 - pred.top_k(1)) * 1000)
    rates = [float(r["error_rate"]) for r in per_class]
    assert rates == sorted(rates, reverse=True)
    assert all(int(r["wrong_classes"]) <= int(r["errors"]) for r in per_class)
    assert f"{errors} of 1000" in page.read_text()
    # the report's seven t-SNE classes found among the first 20 (two), filled up to seven from the run's other
    # classes; every training image of each (50 here)
    assert len([w for w in DEFAULT_TSNE if w in pred.classes]) == 2
    assert "t-SNE of 7 classes (350 training images)" in page.read_text()
    assert len(read_csv(out / "ensemble.csv")) == 3
    pairs = read_csv(out / "confused_pairs.csv")
    assert pairs and all(int(r["total"]) == int(r["a_as_b"]) + int(r["b_as_a"]) > 0 for r in pairs)


def test_the_default_t_sne_classes_are_the_seed_reports_seven(real_cache):
    info = dataset_info(real_cache)
    picked = [info.names[i].split(",")[0] for i in _tsne_classes(None, list(info.wnids))]
    assert picked == [
        "convertible",
        "sports car",
        "plunger",
        "Egyptian cat",
        "Persian cat",
        "golden retriever",
        "bullet train",
    ]


def test_a_finetune_report_shows_the_first_layer_filters(synth_cache, tmp_path):
    run = tmp_path / "run"
    finetune(
        FinetuneConfig(
            data=synth_cache,
            backbone="resnet18",
            weights="none",
            size=32,
            epochs=1,
            batch_size=16,
            keep=1,
            device="cpu",
        ),
        out=run,
        progress=False,
    )
    page = write_report(run=run, out=tmp_path / "report", device="cpu")
    assert {"filters.png", "tsne.png", "curves.png", "confusion.png"} <= linked_files(page)
    assert (tmp_path / "report" / "filters.png").stat().st_size > 1000
    # the error gallery: thumbnails of the decoded images, every one with its alt text
    thumbs = re.findall(r"<img src='(gallery/[^']+)' alt='([^']+)'", page.read_text())
    assert thumbs and all((tmp_path / "report" / src).stat().st_size > 100 and alt for src, alt in thumbs)
    assert any(" taken for " in alt for _, alt in thumbs)


@pytest.mark.slow
def test_several_runs_give_a_leaderboard_and_a_paired_comparison(mobilenet_features_20, tmp_path):
    linear, ncm = tmp_path / "linear", tmp_path / "ncm"
    run_probe(
        features=mobilenet_features_20,
        out=linear,
        heads=[HeadConfig()],
        epochs=3,
        keep=1,
        device="cpu",
        select="holdout:0.25",
    )  # 5 a class: the smallest holdout featx selects on
    run_probe(features=mobilenet_features_20, out=ncm, heads=[HeadConfig()], head="ncm", select="val", device="cpu")
    page = write_report(run=[ncm, linear], out=tmp_path / "report", device="cpu")
    text = page.read_text()
    a, b = (predict(runs=[r], split="val", device="cpu") for r in (linear, ncm))
    first, second = (linear, ncm) if a.top_k(1) >= b.top_k(1) else (ncm, linear)
    assert text.index(f"<td>{first}</td>") < text.index(f"<td>{second}</td>")  # leaderboard, best first
    assert "McNemar&#x27;s exact test p = " in text or "McNemar's exact test p = " in text
    assert "selected on val (optimistic)" in text and "selected on holdout:0.25" in text
    assert re.search(r"top-1 \d+\.\d\d% \[\d+\.\d\d, \d+\.\d\d\]", text)
    diff = read_csv(tmp_path / "report" / "per_class_diff.csv")
    assert len(diff) == 20 and sum(int(r["images"]) for r in diff) == 1000
    right_a = sum(round(float(r["top1_a"]) * int(r["images"])) for r in diff)
    assert right_a == round(max(a.top_k(1), b.top_k(1)) * 1000)
    assert {"reliability.png", "per_class_diff.csv"} <= linked_files(page)


def test_filters_of_several_models_share_one_scale(tmp_path):
    # Ma's comparison: pretrained, fine-tuned and scratch filters side by side; a shared scale keeps a model whose
    # filters are twice as large twice as far from grey, where per-filter scaling made the panels identical.
    from PIL import Image

    from featx.core.plots import filter_grid, first_filters, plot_filters

    torch.manual_seed(0)
    small = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3))
    large = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3))
    with torch.no_grad():
        large[0].weight.copy_(2 * small[0].weight)
    w_small, w_large = first_filters(small), first_filters(large)
    scale = 2 * np.abs(w_large).max()
    cells = filter_grid(np.zeros_like(w_small), scale) == 0.5  # where the filters are drawn (the rest is white)
    a, b = filter_grid(w_small, scale)[cells] - 0.5, filter_grid(w_large, scale)[cells] - 0.5
    assert np.allclose(b, 2 * a, atol=1e-6) and np.abs(b).max() == pytest.approx(0.5)  # float32 grid: atol
    one = Image.open(tmp_path / plot_filters(tmp_path / "one.png", {"a": small})).size
    two = Image.open(tmp_path / plot_filters(tmp_path / "two.png", {"small": small, "large": large})).size
    assert two[0] > 1.8 * one[0] and two[1] == one[1]
