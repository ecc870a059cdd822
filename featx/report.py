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
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from sklearn.manifold import TSNE
from sklearn.metrics import confusion_matrix
from torch import nn

from featx.atomic import make_dirs, replacing
from featx.errors import FeatxError
from featx.finetune import load_model
from featx.predict import FinetuneRun, open_run, score_runs, write_predictions
from featx.runs import load_checkpoint

# Confusable pairs as in the seed's analysis: convertible / sports car, Egyptian cat / tabby, and freight car.
DEFAULT_TSNE = ("n03100240", "n04285008", "n02124075", "n02123045", "n03393912")
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
    with replacing(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else [])
        w.writeheader()
        w.writerows(rows)


def _short(name: str) -> str:
    """The first of a class's names ("German shepherd, German shepherd dog, ..." -> "German shepherd")."""
    return name.split(",")[0]


def _figure(width: float, height: float) -> Figure:
    # Agg canvases without pyplot: no global figure state, nothing to close
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path.name


def plot_confusion(path: Path, cm: np.ndarray, names: Sequence[str]) -> str:
    """Rows normalised to 1 (the share of each true class predicted as each class)."""
    rates = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    fig = _figure(9, 8)
    ax = fig.subplots()
    im = ax.imshow(rates, cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.046)
    if len(names) <= 40:  # beyond that the labels overlap
        short = [_short(n) for n in names]
        ax.set_xticks(range(len(names)), short, rotation=90, fontsize=7)
        ax.set_yticks(range(len(names)), short, fontsize=7)
    ax.set(xlabel="predicted", ylabel="true", title="confusion matrix (rows sum to 1)")
    return _save(fig, path)


def plot_curves(path: Path, metrics: dict) -> str:
    """Loss and top-1 per epoch, train dashed and val solid; the best head bold, the others faint."""
    best = metrics["best"].get("head", 0)
    fig = _figure(11, 4)
    axes = fig.subplots(1, 2)
    for head in metrics["heads"]:
        epochs = [r["epoch"] for r in head["epochs"]]
        style = {"linewidth": 2, "alpha": 1.0} if head["index"] == best else {"linewidth": 0.8, "alpha": 0.3}
        for key, ax in zip(("loss", "top1"), axes):
            for part, line, colour in (("train", "--", "C0"), ("val", "-", "C1")):
                values = np.array([r[f"{part}_{key}"] for r in head["epochs"]], dtype=float)  # null -> NaN
                ax.plot(epochs, values, line, color=colour, label=part if head["index"] == best else None, **style)
            ax.set(xlabel="epoch", ylabel=key)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
    axes[1].legend()
    return _save(fig, path)


def plot_tsne(path: Path, x: np.ndarray, labels: np.ndarray, names: Sequence[str]) -> str:
    xy = TSNE(perplexity=min(30.0, (len(x) - 1) / 3), init="pca", random_state=0).fit_transform(x)
    fig = _figure(7, 6)
    ax = fig.subplots()
    for c in np.unique(labels):
        ax.scatter(*xy[labels == c].T, s=12, label=_short(names[c]))
    ax.legend(fontsize=8)
    ax.set(xticks=[], yticks=[], title="t-SNE of the features")
    return _save(fig, path)


def plot_filters(path: Path, model: nn.Module) -> str:
    """The first RGB convolution's filters, each scaled to [0, 1] on its own, in a square grid."""
    conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d) and m.in_channels == 3)
    w = conv.weight.detach().float().cpu().numpy().transpose(0, 2, 3, 1)  # (O, k, k, 3)
    lo, hi = w.min((1, 2, 3), keepdims=True), w.max((1, 2, 3), keepdims=True)
    w = (w - lo) / np.maximum(hi - lo, 1e-12)
    cols = math.ceil(math.sqrt(len(w)))
    k = w.shape[1]
    grid = np.ones((cols * (k + 1), cols * (k + 1), 3))
    for i, f in enumerate(w):
        r, c = divmod(i, cols)
        grid[r * (k + 1) : r * (k + 1) + k, c * (k + 1) : c * (k + 1) + k] = f
    fig = _figure(6, 6)
    ax = fig.subplots()
    ax.imshow(grid, interpolation="nearest")
    ax.set(xticks=[], yticks=[], title=f"first-layer filters ({len(w)} of {k}x{k})")
    return _save(fig, path)


def _tsne_classes(wnids: Sequence[str] | None, classes: list[str]) -> list[int]:
    if wnids:
        unknown = [w for w in wnids if w not in classes]
        if unknown:
            raise FeatxError(f"--tsne-classes {','.join(unknown)}: not classes of the run; use wnids such as "
                             f"{', '.join(classes[:3])}")
        return [classes.index(w) for w in wnids]
    present = [classes.index(w) for w in DEFAULT_TSNE if w in classes]
    return present if len(present) >= 2 else list(range(min(5, len(classes))))


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
    pred = score_runs([r], split=split, views=views, ensemble=ensemble)
    pred.require_labels()
    tsne = _tsne_classes(tsne_classes, pred.classes)
    make_dirs(out, option="--out", path=out)

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
    x, labels = r.embed(split, tsne)
    if len(x) >= 5:  # t-SNE needs a few points to place
        figures[f"t-SNE of {len(tsne)} classes"] = plot_tsne(out / "tsne.png", x, labels, pred.class_names)
    if isinstance(r, FinetuneRun):
        model, _ = load_model(load_checkpoint(r.dir / r.checkpoints[0]["file"]))
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
                               "b_as_a": "B taken for A", "total": "total"})]
    sections += [f"<h2>{html.escape(title)}</h2><img src='{name}' alt='{html.escape(title)}'>"
                 for title, name in figures.items()]
    sections.append("<p><a href='predictions.csv'>predictions.csv</a>: every image's top-5</p>")
    page = out / "report.html"
    with replacing(page) as tmp:
        tmp.write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>featx report</title>"
                       f"<style>{STYLE}</style></head><body>{''.join(sections)}</body></html>\n")
    return page
