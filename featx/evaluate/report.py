"""`featx report`: what a researcher looks at after a run, as one HTML page beside its PNGs and CSVs.

    from featx.evaluate.report import write_report
    write_report(run="runs/probe-inception", out="report")

The page links report/*.png and *.csv by relative path and loads nothing else, so the folder can be copied
or served as it is. The split's predictions come from featx.evaluate.scoring (same views and ensembles).
"""

from __future__ import annotations

import csv
import html
import json
from collections.abc import Sequence
from pathlib import Path
from typing import SupportsIndex

import numpy as np
from PIL import Image
from sklearn.metrics import confusion_matrix

from featx import __version__
from featx.core.atomic import make_dirs, replacing
from featx.core.choices import Combine, Device, Split, ViewSelection
from featx.core.configs import ReportConfig
from featx.core.errors import FeatxError
from featx.core.outputs import finish_folder, folder_settings, staging_folder
from featx.core.plots import (
    plot_confusion,
    plot_curves,
    plot_filters,
    plot_reliability,
    plot_tsne,
)
from featx.core.runs import load_checkpoint, read_run, write_json
from featx.core.stats import expected_calibration_error, paired_comparison, reliability
from featx.data.cache import Split as DecodedSplit
from featx.evaluate.metrics import Prediction
from featx.evaluate.scoring import FinetuneRun, ProbeRun, open_run, score_runs
from featx.evaluate.writers import write_curve, write_predictions
from featx.nets.models import load_model

# The seven classes of the transfer-learning report's t-SNE (Milani, section 4.3, Fig. 11), drawn as it drew them: every
# training image of each (500 in the full data). Convertible, sports car, plunger, Egyptian cat, Persian cat, golden
# retriever, bullet train (wnids from the dataset's words.txt).
DEFAULT_TSNE = ("n03100240", "n04285008", "n03970156", "n02124075", "n02123394", "n02099601", "n02917067")
TSNE_SPLIT, TSNE_PER_CLASS = "train", 500
PAIRS = 20  # most-confused pairs listed
GALLERY = (5, 4, 3)  # the worst classes shown; their most confident mistakes; correct examples of the class taken for


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
        rows.append(
            {
                "wnid": wnid,
                "name": name,
                "images": n,
                "errors": int(wrong.sum()),
                "error_rate": wrong.sum() / n,
                "wrong_classes": int((wrong > 0).sum()),
                "most_confused_with": names[top] if wrong[top] else "",
                "times": int(wrong[top]),
            }
        )
    return sorted(rows, key=lambda r: (-r["error_rate"], -r["errors"], r["wnid"]))


def confused_pairs(cm: np.ndarray, classes: Sequence[str], names: Sequence[str], n: int = PAIRS) -> list[dict]:
    """The n class pairs mistaken for each other most often (both directions counted)."""
    both = np.triu(cm + cm.T, k=1)
    order = np.argsort(-both, axis=None, kind="stable")[:n]
    rows = []
    for a, b in zip(*np.unravel_index(order, both.shape)):
        if both[a, b]:
            rows.append(
                {
                    "a": classes[a],
                    "name_a": names[a],
                    "b": classes[b],
                    "name_b": names[b],
                    "a_as_b": int(cm[a, b]),
                    "b_as_a": int(cm[b, a]),
                    "total": int(both[a, b]),
                }
            )
    return rows


def _write_csv(path: Path, rows: list[dict]) -> None:
    with replacing(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else [])
        w.writeheader()
        w.writerows(rows)


def _tsne_classes(wnids: Sequence[str] | None, classes: list[str]) -> list[int]:
    if wnids:
        unknown = [w for w in wnids if w not in classes]
        if unknown:
            raise FeatxError(
                f"--tsne-classes {','.join(unknown)}: not classes of the run; use wnids such as "
                f"{', '.join(classes[:3])}"
            )
        return [classes.index(w) for w in wnids]
    # the report's seven where the run has them, filled up to seven from the run's other classes
    present = [classes.index(w) for w in DEFAULT_TSNE if w in classes]
    return (present + [i for i in range(len(classes)) if i not in present])[: len(DEFAULT_TSNE)]


def _decoded_split(r, split: str, data: str | Path | None) -> DecodedSplit | None:
    """The split's decoded images: a finetune run's own dataset, a probe run's through its feature file's source
    (`data` overrides); None for features from before featx recorded their source, when no `data` is given."""
    if isinstance(r, FinetuneRun) or data is not None or r.meta.source:
        return r.images(data, split)
    return None


def _gallery(out: Path, pred: Prediction, images: DecodedSplit | None, per_class: list[dict]) -> list[str]:
    """For the worst classes: their most confident mistakes (true and predicted names) beside correct examples of
    the class each was taken for most often, as thumbnails in out/gallery/."""
    if images is None:
        return ["<p>Pass <code>--data</code> (the dataset the features came from) to see the images.</p>"]
    where = {i: n for n, i in enumerate(images.ids)}
    if any(i not in where for i in pred.ids):
        raise FeatxError(
            f"--data {images.cache}: lacks images of the run's {pred.split} split; pass the dataset "
            "its features were extracted from"
        )
    n_classes, n_mistakes, n_examples = GALLERY
    top1 = pred.top(1)[:, 0]
    conf = pred.probs[np.arange(len(top1)), top1]
    (out / "gallery").mkdir(exist_ok=True)

    def thumb(i: SupportsIndex, caption: str) -> str:
        row = where[pred.ids[i]]
        name = f"gallery/{pred.split}-{row}.png"
        with replacing(out / name) as tmp:
            Image.fromarray(images.read_images(row, row + 1)[0]).save(tmp, format="PNG")
        text = html.escape(caption)
        return f"<figure><img src='{name}' alt='{text}' width='96'><figcaption>{text}</figcaption></figure>"

    parts = []
    for row in [r for r in per_class if r["errors"]][:n_classes]:
        c = pred.classes.index(row["wnid"])
        wrong = np.flatnonzero((pred.labels == c) & (top1 != c))
        wrong = wrong[np.argsort(-conf[wrong], kind="stable")][:n_mistakes]
        taken = np.bincount(top1[wrong], minlength=len(pred.classes)).argmax()
        right = np.flatnonzero((pred.labels == taken) & (top1 == taken))
        right = right[np.argsort(-conf[right], kind="stable")][:n_examples]
        names = pred.class_names
        parts.append(
            f"<h3>{html.escape(names[c])}: {row['errors']} of {row['images']} wrong</h3><div class='gallery'>"
            + "".join(thumb(i, f"{names[c]} taken for {names[top1[i]]} ({conf[i]:.0%})") for i in wrong)
            + "</div><div class='gallery'>"
            + "".join(thumb(i, f"a correct {names[taken]} ({conf[i]:.0%})") for i in right)
            + "</div>"
        )
    return parts


def _selection_text(pred: Prediction) -> str:
    where = ", ".join(sorted(set(pred.selection)))
    return f"selected on {where}" + (" (optimistic)" if pred.optimistic else "")


def _check_comparable(scored: list) -> None:
    """Runs set side by side must classify the same classes and score the same images."""
    (da, _, a), *others = scored
    for db, _, b in others:
        if a.classes != b.classes:
            raise FeatxError(
                f"--run {db}: trained on other classes ({len(b.classes)}) than --run {da} ({len(a.classes)}); "
                "a report sets runs side by side only when they classify the same classes of the same dataset"
            )
        if a.ids != b.ids:
            raise FeatxError(f"--run {db}: scores other images than --run {da}; compare runs on the same split")


def _comparison(out: Path, scored: list, views: ViewSelection) -> list[str]:
    """The leaderboard of several runs (best top-1 first), the paired comparison of the best two and their
    per-class differences (per_class_diff.csv); returns the page's sections."""
    board = []
    for d, _opened, pred in scored:
        record = read_run(d)
        backbone = (record.features or {}).get("backbone") or (record.model or {}).get("backbone", "")
        stored = (record.features or {}).get("views")
        board.append(
            {
                "run": str(d),
                "kind": record.kind,
                "backbone": backbone,
                "views": f"{views} of {len(stored)} stored" if stored and views == "all" else views,
                "top1": pred.accuracy_text(1).removeprefix("top-1 "),
                "top5": pred.top_k(5),
                "selection": _selection_text(pred),
                "seconds": f"{record.seconds:.0f}" if record.seconds is not None else "",
            }
        )
    (da, _, a), (db, _, b) = scored[:2]
    c = paired_comparison(a.correct(1), b.correct(1))
    keep = a.labels >= 0
    per_class = []
    for i, (wnid, name) in enumerate(zip(a.classes, a.class_names)):
        rows = keep & (a.labels == i)
        if rows.any():
            acc_a, acc_b = a.correct(1)[rows[keep]].mean(), b.correct(1)[rows[keep]].mean()
            per_class.append(
                {
                    "wnid": wnid,
                    "name": name,
                    "images": int(rows.sum()),
                    "top1_a": float(acc_a),
                    "top1_b": float(acc_b),
                    "difference": float(acc_a - acc_b),
                }
            )
    per_class.sort(key=lambda r: (-abs(r["difference"]), r["wnid"]))
    _write_csv(out / "per_class_diff.csv", per_class)
    lo, hi = c.interval
    paired = (
        f"<p>{html.escape(str(da))} minus {html.escape(str(db))}: top-1 {100 * c.difference:+.2f} points "
        f"[95% bootstrap interval {100 * lo:+.2f}, {100 * hi:+.2f}] on {int(keep.sum())} images; right only "
        f"by the first {c.a_only}, only by the second {c.b_only}; McNemar's exact test p = {c.p_value:.3g}</p>"
    )
    return [
        "<h2>Leaderboard</h2>",
        _table(
            board,
            {
                "run": "run",
                "kind": "kind",
                "backbone": "backbone",
                "views": "views",
                "top1": "top-1 [95% interval]",
                "top5": "top-5",
                "selection": "selection",
                "seconds": "training seconds",
            },
        ),
        "<h2>The best two, image by image</h2>",
        paired,
        "<p><a href='per_class_diff.csv'>per_class_diff.csv</a>: the classes that differ most</p>",
        _table(
            per_class[:PAIRS],
            {
                "name": "class",
                "images": "images",
                "top1_a": "top-1 first",
                "top1_b": "top-1 second",
                "difference": "difference",
            },
        ),
    ]


def _pictures(
    figures: dict[str, str], gallery: list[str], pairs: list[dict], pred: Prediction, split: str
) -> list[str]:
    """The page after its summary: curves, confused pairs, gallery, confusion, calibration, t-SNE, then the rest."""

    def figure(title: str) -> str:
        name = figures.pop(title)
        return f"<h2>{html.escape(title)}</h2><img src='{name}' alt='{html.escape(title)}'>"

    first = [figure("Training curves")] if "Training curves" in figures else []
    first += [
        f"<h2>Most-confused pairs on {split}</h2><p><a href='confused_pairs.csv'>confused_pairs.csv</a></p>",
        _table(
            pairs,
            {
                "name_a": "class A",
                "name_b": "class B",
                "a_as_b": "A taken for B",
                "b_as_a": "B taken for A",
                "total": "total",
            },
        ),
        f"<h2>Error gallery on {split}: the worst classes' most confident mistakes</h2>",
        *gallery,
    ]
    first += [figure(t) for t in ("Confusion matrix", "Reliability diagram")]
    first += [figure(t) for t in list(figures) if t.startswith("t-SNE")]
    assert pred.curve is not None  # _score asks for it
    ensemble = [
        "<h2>Ensemble size</h2><p>val top-1 of the best N checkpoints averaged (top:N); the best N marked. "
        "<a href='ensemble.csv'>ensemble.csv</a></p>",
        _table(
            [{"n": f"{n}{' (best)' if n == pred.best_size else ''}", "top1": t} for n, t in enumerate(pred.curve, 1)],
            {"n": "N", "top1": "val top-1"},
        ),
    ]
    return first + [figure(t) for t in list(figures)] + ensemble


def _per_class_section(per_class: list[dict]) -> list[str]:
    """Last and collapsed: at 200 classes the table is thousands of pixels tall (sortable once opened)."""
    return [
        f"<details><summary><h2 style='display:inline'>Per-class errors, worst first ({len(per_class)} classes)"
        "</h2></summary><p><a href='per_class.csv'>per_class.csv</a></p>",
        _table(
            per_class,
            {
                "wnid": "wnid",
                "name": "class",
                "images": "images",
                "errors": "errors",
                "error_rate": "error",
                "wrong_classes": "distinct wrong classes",
                "most_confused_with": "most often predicted instead",
                "times": "times",
            },
        ),
        "</details>",
    ]


def _table(rows: list[dict], columns: dict[str, str]) -> str:
    """columns: key -> header. Rates become percentages."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in columns.values())
    body = "".join(
        "<tr>"
        + "".join(
            f"<td>{v:.1%}</td>" if isinstance(v, float) else f"<td>{html.escape(str(v))}</td>"
            for v in (r[k] for k in columns)
        )
        + "</tr>"
        for r in rows
    )
    return f"<table class='sortable'><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


# Click a header to sort by that column (numbers by value, ascending then descending); inline, fetches nothing.
SORT_SCRIPT = """document.querySelectorAll('table.sortable th').forEach(th => {
  th.title = 'click to sort'; th.style.cursor = 'pointer';
  th.addEventListener('click', () => {
    const col = th.cellIndex, body = th.closest('table').tBodies[0], rows = Array.from(body.rows);
    const key = r => { const t = r.cells[col].textContent.trim(), n = parseFloat(t.replace(/[%,+]/g, ''));
                       return isNaN(n) ? t.toLowerCase() : n; };
    const up = th.dataset.order !== 'asc'; th.dataset.order = up ? 'asc' : 'desc';
    rows.sort((a, b) => { const x = key(a), y = key(b); return (x < y ? -1 : x > y ? 1 : 0) * (up ? 1 : -1); });
    rows.forEach(r => body.appendChild(r));
  });
});"""


STYLE = """body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}
table{border-collapse:collapse;font-size:13px;margin:1em 0}td,th{border:1px solid #ccc;padding:2px 8px;text-align:left}
th{background:#eee}img{max-width:100%;border:1px solid #ddd}h2{margin-top:2em}
.gallery{display:flex;flex-wrap:wrap;gap:6px}figure{margin:0;width:110px;font-size:11px}
figure img{image-rendering:pixelated}"""


def _score(
    run: str | Path | Sequence[str | Path],
    *,
    split: Split,
    eval_views: ViewSelection,
    ensemble: str,
    data: str | Path | None,
    device: str,
    combine: Combine = "calibrated",
) -> list[tuple[str | Path, ProbeRun | FinetuneRun, Prediction]]:
    """Each run (directory, opened, its prediction on the split), the best top-1 first."""
    runs = [run] if isinstance(run, (str, Path)) else list(run)
    if not runs:
        raise FeatxError("--run: name at least one run directory")
    scored = []
    for d in runs:
        opened = open_run(d, data=data, device=device, combine=combine)
        scored.append(
            (d, opened, score_runs([opened], split=split, eval_views=eval_views, ensemble=ensemble, curve=True))
        )
        scored[-1][2].require_labels()
    scored.sort(key=lambda s: -s[2].top_k(1))
    return scored


def _figures(out: Path, scored: list, cm: np.ndarray, ece: float, tsne: list[int]) -> dict[str, str]:
    """The best run's figures, title -> PNG name: confusion, reliability, training and ensemble curves, t-SNE,
    and the first-layer filters of every finetuned run."""
    run, r, pred = scored[0]
    keep = pred.labels >= 0
    figures = {"Confusion matrix": plot_confusion(out / "confusion.png", cm, pred.class_names)}
    figures["Reliability diagram"] = plot_reliability(
        out / "reliability.png", reliability(pred.probs[keep], pred.labels[keep]), ece
    )
    metrics_path = Path(run) / "metrics.json"
    if metrics_path.exists():
        figures["Training curves"] = plot_curves(out / "curves.png", json.loads(metrics_path.read_text()))
    _, curve_png = write_curve(pred, out)
    figures["Val top-1 against ensemble size (top:N)"] = curve_png.name
    x, labels = r.embed(TSNE_SPLIT, tsne, per_class=TSNE_PER_CLASS)
    if len(x) >= 5:  # t-SNE needs a few points to place
        figures[f"t-SNE of {len(tsne)} classes ({len(x)} training images)"] = plot_tsne(
            out / "tsne.png", x, labels, pred.class_names
        )
    finetuned = {str(d): o for d, o, _ in scored if isinstance(o, FinetuneRun)}  # best first
    if finetuned:
        models = {d: load_model(load_checkpoint(o.dir / o.checkpoints[0].file))[0] for d, o in finetuned.items()}
        figures["First-layer filters"] = plot_filters(out / "filters.png", models)
    return figures


def write_report(
    *,
    run: str | Path | Sequence[str | Path],
    out: str | Path = "report",
    split: Split = ReportConfig.split,
    eval_views: ViewSelection = ReportConfig.eval_views,
    ensemble: str = ReportConfig.ensemble,
    tsne_classes: Sequence[str] | None = None,
    data: str | Path | None = None,
    device: Device = ReportConfig.device,
    combine: Combine = ReportConfig.combine,
    force: bool = False,
) -> Path:
    """Write out/report.html with its PNGs and CSVs for one run scored on a labelled split; returns the page.
    Several runs: a leaderboard and the paired comparison of the best two head the page, whose analysis is then
    of the best run. An existing `out` follows featx.core.outputs' contract: up to date with the same settings
    and runs, refused with others unless `force`; the report is written beside it and swapped in complete."""
    final = Path(out)
    runs = [run] if isinstance(run, (str, Path)) else list(run)
    settings = folder_settings(
        {
            "runs": [str(r) for r in runs],
            "split": split,
            "eval_views": eval_views,
            "ensemble": ensemble,
            "tsne_classes": list(tsne_classes or []),
            "combine": combine,
            "data": None if data is None else str(data),
        },
        runs,
    )
    staged = staging_folder(final, settings, force=force)
    if staged is None:
        return final / "report.html"
    out = staged
    scored = _score(
        run, split=split, eval_views=eval_views, ensemble=ensemble, data=data, device=device, combine=combine
    )
    run, r, pred = scored[0]
    tsne = _tsne_classes(tsne_classes, pred.classes)
    _check_comparable(scored)
    make_dirs(out, option="--out", path=out)  # only now: a refused report leaves no folder behind
    comparison = _comparison(out, scored, eval_views) if len(scored) > 1 else []

    keep = pred.labels >= 0
    cm = confusion_matrix(pred.labels[keep], pred.top(1)[keep, 0], labels=np.arange(len(pred.classes)))
    per_class = class_errors(cm, pred.classes, pred.class_names)
    pairs = confused_pairs(cm, pred.classes, pred.class_names)
    write_predictions(pred, out / "predictions.csv")
    gallery = _gallery(out, pred, _decoded_split(r, split, data), per_class)
    _write_csv(out / "per_class.csv", per_class)
    _write_csv(out / "confused_pairs.csv", pairs)

    ece = expected_calibration_error(pred.probs[keep], pred.labels[keep])
    figures = _figures(out, scored, cm, ece, tsne)
    n = int(keep.sum())
    summary = [
        {"what": "run", "value": f"{run} ({type(r).__name__.removesuffix('Run').lower()})"},
        {"what": "split", "value": f"{split}, {n} labelled images, views averaged: {'+'.join(pred.views)}"},
        {"what": "ensemble", "value": f"{ensemble}: {len(pred.members)} checkpoint(s)"},
        {"what": "selection", "value": _selection_text(pred)},
        {"what": "top-1 [95% bootstrap interval]", "value": pred.accuracy_text(1)},
        {"what": "top-5 [95% bootstrap interval]", "value": pred.accuracy_text(5)},
        {"what": "expected calibration error (15 bins, calibrated probabilities)", "value": f"{ece:.4f}"},
        {"what": "top-1 gain over the best single checkpoint", "value": f"{100 * pred.gain():+.2f} points"},
        {"what": "errors", "value": f"{sum(c['errors'] for c in per_class)} of {n}"},
    ]
    sections = [
        f"<h1>featx report: {html.escape(str(run))}</h1>",
        *comparison,
        f"<h2>{html.escape(str(run))}</h2>" if comparison else "",
        _table(summary, {"what": "", "value": ""}),
        *_pictures(figures, gallery, pairs, pred, split),
        *_per_class_section(per_class),
    ]
    sections.append("<p><a href='predictions.csv'>predictions.csv</a>: every image's top-5</p>")
    write_json(
        out / "report.json",
        {
            "featx_version": __version__,
            "settings": {
                "runs": [str(d) for d, _, _ in scored],
                "split": split,
                "eval_views": eval_views,
                "ensemble": ensemble,
                "combine": combine,
            },
            "metrics": {
                "top1": pred.top_k(1),
                "top1_interval": list(pred.interval(1)),
                "top5": pred.top_k(5),
                "views": pred.views,
                "selection": _selection_text(pred),
                "ece": ece,
            },
        },
    )  # for `featx info`
    page = out / "report.html"
    with replacing(page) as tmp:
        tmp.write_text(
            f"<!doctype html><html><head><meta charset='utf-8'><title>featx report</title>"
            f"<style>{STYLE}</style></head><body>{''.join(sections)}<script>{SORT_SCRIPT}</script></body></html>\n"
        )
    finish_folder(out, final, settings)
    return final / "report.html"
