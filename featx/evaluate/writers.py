"""What `featx predict` writes: results.json, the predictions CSV, the ensemble curve and the challenge's submission."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

from featx.core.atomic import make_dirs, replacing
from featx.core.choices import (
    Combine,
)
from featx.core.plots import plot_ensemble
from featx.core.runs import Scores, write_results
from featx.evaluate.metrics import Prediction, top_k

# compute_features is extraction's own "render the views, run the model" step: reusing it keeps predictions on new
# images computed exactly as the stored features were.


def write_prediction_results(
    p: Prediction,
    folder: str | Path,
    *,
    runs: Sequence[str | Path],
    ensemble: str,
    eval_views: str,
    seconds: float,
    combine: Combine = "calibrated",
) -> dict:
    """results.json of `featx predict` (featx.core.runs.write_results): the ensemble's scores on its split, which
    checkpoints and views it averages, where they were chosen."""
    folder = make_dirs(folder, option="--out", path=folder)
    scored = p.has_labels
    return write_results(
        folder,
        kind="predict",
        scores=Scores(
            p.split, p.top_k(1) if scored else None, p.interval(1) if scored else None, p.top_k(5) if scored else None
        ),
        views=p.views,
        selection={
            "protocol": ", ".join(dict.fromkeys(p.selection)),
            "optimistic": p.optimistic,
            "ensemble": ensemble,
            "members": p.members,
        },
        settings={
            "runs": [str(r) for r in runs],
            "split": p.split,
            "eval_views": eval_views,
            "ensemble": ensemble,
            "combine": combine,
        },
        seconds={"predict": round(seconds, 2)},
        images=len(p.ids),
        single_best_top1=top_k(p.single, p.labels, 1) if scored else None,
    )


# --- outputs -----------------------------------------------------------------------------------------


def write_predictions(p: Prediction, path: str | Path) -> Path:
    """predictions.csv: id, label (true class id, empty where unknown), top1, top5 (space-separated), prob1, name1."""
    path = Path(path)
    make_dirs(path.parent, option="--out", path=path.parent)
    top5 = p.top(5)
    with replacing(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "label", "top1", "top5", "prob1", "name1"])
        for i, row in enumerate(top5):
            w.writerow(
                [
                    p.ids[i],
                    p.classes[p.labels[i]] if p.labels[i] >= 0 else "",
                    p.classes[row[0]],
                    " ".join(p.classes[c] for c in row),
                    f"{p.probs[i, row[0]]:.6f}",
                    p.class_names[row[0]],
                ]
            )
    return path


def format_curve(p: Prediction) -> str:
    """The ensemble-size curve as a table, the best N marked with *."""
    assert p.curve is not None, "a Prediction made without curve=True has no ensemble-size curve"
    return "\n".join(
        [f"  {'N':>3} {'val top-1':>9}"]
        + [f"{'*' if n == p.best_size else ' '} {n:>3} {t:9.2%}" for n, t in enumerate(p.curve, 1)]
    )


def write_curve(p: Prediction, folder: str | Path) -> tuple[Path, Path]:
    """ensemble.csv (n, val_top1, best) and ensemble.png of a prediction made with curve=True."""
    assert p.curve is not None, "a Prediction made without curve=True has no ensemble-size curve"
    folder = Path(folder)
    make_dirs(folder, option="--out", path=folder)
    with replacing(folder / "ensemble.csv") as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["n", "val_top1", "best"])
        w.writerows([n, f"{t:.6f}", int(n == p.best_size)] for n, t in enumerate(p.curve, 1))
    return folder / "ensemble.csv", folder / plot_ensemble(folder / "ensemble.png", p.curve)


def write_submission(p: Prediction, path: str | Path) -> Path:
    """The Tiny ImageNet challenge format: one `<image file> <wnid>` line per image."""
    path = Path(path)
    make_dirs(path.parent, option="--out", path=path.parent)
    with replacing(path) as tmp:
        tmp.write_text("".join(f"{Path(i).name} {p.classes[c]}\n" for i, c in zip(p.ids, p.top(1)[:, 0])))
    return path
