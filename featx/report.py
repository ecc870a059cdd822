"""`featx report`: what a researcher looks at after a run, as one HTML page beside its PNGs and CSVs.

    from featx.report import write_report
    write_report(run="runs/probe-inception", out="report")

The page links report/*.png and *.csv by relative path and loads nothing else, so the folder can be copied
or served as it is. The split's predictions come from featx.predict (same views and ensembles).
"""

from __future__ import annotations

import csv
import html
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from sklearn.metrics import confusion_matrix

from featx.atomic import replacing
from featx.errors import FeatxError
from featx.models import load_model
from featx.plots import plot_confusion, plot_curves, plot_filters, plot_tsne
from featx.predict import FinetuneRun, open_run, score_runs, write_curve, write_predictions
from featx.runs import load_checkpoint

# The seven classes of the seed report's t-SNE (Milani, section 4.3, Fig. 11), drawn as it drew them: every
# training image of each (500 in the full data). Convertible, sports car, plunger, Egyptian cat, Persian cat,
# golden retriever, bullet train (wnids from the dataset's words.txt).
DEFAULT_TSNE = ("n03100240", "n04285008", "n03970156", "n02124075", "n02123394", "n02099601", "n02917067")
TSNE_SPLIT, TSNE_PER_CLASS = "train", 500
PAIRS = 20  # most-confused pairs listed


def class_errors(cm: np.ndarray, classes: Sequence[str], names: Sequence[str]) -> list[dict]:
    """One row per class with images, worst error rate first: errors, and over how many distinct wrong
    classes they spread, and the class most often predicted instead."""
    rows = []
    for i, (wnid, name) in enumerate(zip(classes, names)):
        n = int(cm[i].sum())
        if not n:
            continue
        wrong = cm[i].copy()
        wrong[i] = 0
        top = int(wrong.argmax())
        rows.append({"wnid": wnid, "name": name, "images": n, "errors": int(wrong.sum()),
                     "error_rate": wrong.sum() / n, "wrong_classes": int((wrong > 0).sum()),
                     "most_confused_with": names[top] if wrong[top] else "", "times": int(wrong[top])})
    return sorted(rows, key=lambda r: (-r["error_rate"], -r["errors"], r["wnid"]))


def confused_pairs(cm: np.ndarray, classes: Sequence[str], names: Sequence[str], n: int = PAIRS) -> list[dict]:
    """The n class pairs mistaken for each other most often (both directions counted)."""
    both = np.triu(cm + cm.T, k=1)
    order = np.argsort(-both, axis=None, kind="stable")[:n]
    rows = []
    for a, b in zip(*np.unravel_index(order, both.shape)):
        if both[a, b]:
            rows.append({"a": classes[a], "name_a": names[a], "b": classes[b], "name_b": names[b],
                         "a_as_b": int(cm[a, b]), "b_as_a": int(cm[b, a]), "total": int(both[a, b])})
    return rows


def _write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else [])
        w.writeheader()
        w.writerows(rows)


def _tsne_classes(wnids: Sequence[str] | None, classes: list[str]) -> list[int]:
    if wnids:
        unknown = [w for w in wnids if w not in classes]
        if unknown:
            raise FeatxError(f"--tsne-classes {','.join(unknown)}: not classes of the run; use wnids such as "
                             f"{', '.join(classes[:3])}")
        return [classes.index(w) for w in wnids]
    present = [classes.index(w) for w in DEFAULT_TSNE if w in classes]
    return present if len(present) >= 2 else list(range(min(len(DEFAULT_TSNE), len(classes))))


def _table(rows: list[dict], columns: dict[str, str]) -> str:
    """columns: key -> header. Rates become percentages."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in columns.values())
    body = "".join("<tr>" + "".join(f"<td>{v:.1%}</td>" if isinstance(v, float) else f"<td>{html.escape(str(v))}</td>"
                                    for v in (r[k] for k in columns)) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


STYLE = """body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}
table{border-collapse:collapse;font-size:13px;margin:1em 0}td,th{border:1px solid #ccc;padding:2px 8px;text-align:left}
th{background:#eee}img{max-width:100%;border:1px solid #ddd}h2{margin-top:2em}"""


def write_report(*, run: str | Path, out: str | Path = "report", split: str = "val", views: str = "all",
                 ensemble: str = "best", tsne_classes: Sequence[str] | None = None, data: str | Path | None = None,
                 device: str = "auto") -> Path:
    """Write out/report.html with its PNGs and CSVs for one run scored on a labelled split; returns the page."""
    out = Path(out)
    r = open_run(run, data=data, device=device)
    pred = score_runs([r], split=split, views=views, ensemble=ensemble, curve=True)
    pred.require_labels()
    tsne = _tsne_classes(tsne_classes, pred.classes)
    out.mkdir(parents=True, exist_ok=True)

    keep = pred.labels >= 0
    cm = confusion_matrix(pred.labels[keep], pred.top(1)[keep, 0], labels=np.arange(len(pred.classes)))
    per_class = class_errors(cm, pred.classes, pred.class_names)
    pairs = confused_pairs(cm, pred.classes, pred.class_names)
    write_predictions(pred, out / "predictions.csv")
    _write_csv(out / "per_class.csv", per_class)
    _write_csv(out / "confused_pairs.csv", pairs)

    figures = {"Confusion matrix": plot_confusion(out / "confusion.png", cm, pred.class_names)}
    metrics_path = Path(run) / "metrics.json"
    if metrics_path.exists():
        figures["Training curves"] = plot_curves(out / "curves.png", json.loads(metrics_path.read_text()))
    _, curve_png = write_curve(pred, out)
    figures["Val top-1 against ensemble size (top:N)"] = curve_png.name
    x, labels = r.embed(TSNE_SPLIT, tsne, per_class=TSNE_PER_CLASS)
    if len(x) >= 5:  # t-SNE needs a few points to place
        figures[f"t-SNE of {len(tsne)} classes ({len(x)} training images)"] = plot_tsne(out / "tsne.png", x, labels,
                                                                                       pred.class_names)
    if isinstance(r, FinetuneRun):
        model, _ = load_model(load_checkpoint(r.dir / r.checkpoints[0].file))
        figures["First-layer filters"] = plot_filters(out / "filters.png", model)

    n = int(keep.sum())
    summary = [{"what": "run", "value": f"{run} ({type(r).__name__.removesuffix('Run').lower()})"},
               {"what": "split", "value": f"{split}, {n} labelled images, views {views}"},
               {"what": "ensemble", "value": f"{ensemble}: {len(pred.members)} checkpoint(s)"},
               {"what": "top-1", "value": pred.top_k(1)}, {"what": "top-5", "value": pred.top_k(5)},
               {"what": "top-1 gain over the best single checkpoint", "value": f"{100 * pred.gain():+.2f} points"},
               {"what": "errors", "value": f"{sum(c['errors'] for c in per_class)} of {n}"}]
    sections = [f"<h1>featx report: {html.escape(str(run))}</h1>", _table(summary, {"what": "", "value": ""}),
                "<h2>Per-class errors, worst first</h2><p><a href='per_class.csv'>per_class.csv</a></p>",
                _table(per_class, {"wnid": "wnid", "name": "class", "images": "images", "errors": "errors",
                                   "error_rate": "error", "wrong_classes": "distinct wrong classes",
                                   "most_confused_with": "most often predicted instead", "times": "times"}),
                "<h2>Most-confused pairs</h2><p><a href='confused_pairs.csv'>confused_pairs.csv</a></p>",
                _table(pairs, {"name_a": "class A", "name_b": "class B", "a_as_b": "A taken for B",
                               "b_as_a": "B taken for A", "total": "total"}),
                "<h2>Ensemble size</h2><p>val top-1 of the best N checkpoints averaged (top:N); the best N marked. "
                "<a href='ensemble.csv'>ensemble.csv</a></p>",
                _table([{"n": f"{n}{' (best)' if n == pred.best_size else ''}", "top1": t}
                        for n, t in enumerate(pred.curve, 1)], {"n": "N", "top1": "val top-1"})]
    sections += [f"<h2>{html.escape(title)}</h2><img src='{name}' alt='{html.escape(title)}'>"
                 for title, name in figures.items()]
    sections.append("<p><a href='predictions.csv'>predictions.csv</a>: every image's top-5</p>")
    page = out / "report.html"
    with replacing(page) as tmp:
        tmp.write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>featx report</title>"
                       f"<style>{STYLE}</style></head><body>{''.join(sections)}</body></html>\n")
    return page
