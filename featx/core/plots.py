"""Every figure featx draws: training curves (written with each run), the ensemble-size curve, and the report's
confusion matrix, t-SNE map and first-layer filters. Matplotlib through Agg canvases, never pyplot: no global
figure state, nothing to close, safe in worker processes."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from featx.core.atomic import replacing

if TYPE_CHECKING:
    from torch import nn


def _short(name: str) -> str:
    """The first of a class's names ("German shepherd, German shepherd dog, ..." -> "German shepherd")."""
    return name.split(",")[0]


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: Path) -> str:
    fig.tight_layout()
    with replacing(path) as tmp:
        fig.savefig(tmp, dpi=100)
    return path.name


def plot_confusion(path: Path, cm: np.ndarray, names: Sequence[str], most: int = 30) -> str:
    """Rows normalised to 1 (the share of each true class predicted as each class). Beyond 40 classes the labels
    would overlap: then only the `most` classes with the most errors made or suffered, with their full names."""
    rates = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    shown = np.arange(len(names))
    title = "confusion matrix (rows sum to 1)"
    if len(names) > 40:
        off = cm - np.diag(np.diag(cm))
        shown = np.sort(np.argsort(-(off.sum(0) + off.sum(1)), kind="stable")[:most])
        title = f"the {len(shown)} most-confused of {len(names)} classes (rows of the full matrix)"
    fig = _figure(12, 11) if len(names) > 40 else _figure(9, 8)
    ax = fig.subplots()
    im = ax.imshow(rates[np.ix_(shown, shown)], cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.046)
    labels = [names[i] if len(names) > 40 else _short(names[i]) for i in shown.tolist()]
    ax.set_xticks(range(len(shown)), labels, rotation=90, fontsize=7)
    ax.set_yticks(range(len(shown)), labels, fontsize=7)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    return _save(fig, path)


def plot_curves(path: Path, metrics: dict) -> str:
    """Loss and top-1 per epoch, train dashed and the selection split solid (val, or a probe's held-out part of
    train, named so); the best head bold, the others faint."""
    best = metrics["best"].get("head", 0)
    select = metrics["best"].get("select", "val")
    names = {"train": "train", "val": "val" if select == "val" else f"held-out train ({select})"}
    fig = _figure(11, 4)
    axes = fig.subplots(1, 2)
    for head in metrics["heads"]:
        epochs = [r["epoch"] for r in head["epochs"]]
        style = {"linewidth": 2, "alpha": 1.0} if head["index"] == best else {"linewidth": 0.8, "alpha": 0.3}
        for key, ax in zip(("loss", "top1"), axes):
            for part, line, colour in (("train", "--", "C0"), ("val", "-", "C1")):
                values = np.array([r[f"{part}_{key}"] for r in head["epochs"]], dtype=float)  # null -> NaN
                ax.plot(
                    epochs, values, line, color=colour, label=names[part] if head["index"] == best else None, **style
                )
            ax.set(xlabel="epoch", ylabel=key)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
    axes[1].legend()
    return _save(fig, path)


def plot_ensemble(path: Path, top1: Sequence[float]) -> str:
    """Val top-1 against the number of snapshots averaged (best first), the best size marked in red, as the
    transfer-learning report's Fig. 6 (Milani) draws it."""
    sizes = np.arange(1, len(top1) + 1)
    best = int(np.argmax(top1))
    fig = _figure(6, 4)
    ax = fig.subplots()
    ax.plot(sizes, np.asarray(top1) * 100, "o-", color="C0")
    ax.plot(
        sizes[best],
        top1[best] * 100,
        "o",
        color="red",
        markersize=9,
        label=f"best: top:{sizes[best]}, {top1[best]:.2%}",
    )
    ax.set(xlabel="snapshots in the ensemble (best first)", ylabel="val top-1 (%)", title="ensemble size")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def plot_tsne(path: Path, x: np.ndarray, labels: np.ndarray, names: Sequence[str]) -> str:
    from sklearn.manifold import TSNE  # sklearn's import is seconds: only for a t-SNE map

    xy = TSNE(perplexity=min(30.0, (len(x) - 1) / 3), init="pca", random_state=0).fit_transform(x)
    fig = _figure(7, 6)
    ax = fig.subplots()
    for c in np.unique(labels):
        points = xy[labels == c]
        ax.scatter(points[:, 0], points[:, 1], s=12, label=_short(names[c]))
    ax.legend(fontsize=8)
    ax.set(xticks=[], yticks=[], title="t-SNE of the features")
    return _save(fig, path)


def first_filters(model: nn.Module) -> np.ndarray:
    """The first RGB convolution's weights as (O, k, k, 3)."""
    from torch import nn

    conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d) and m.in_channels == 3)
    return conv.weight.detach().float().cpu().numpy().transpose(0, 2, 3, 1)


def filter_grid(w: np.ndarray, scale: float) -> np.ndarray:
    """(O, k, k, 3) filters as one RGB image: a square grid on white, each weight at 0.5 + w / scale."""
    cols, k = math.ceil(math.sqrt(len(w))), w.shape[1]
    grid = np.ones((cols * (k + 1), cols * (k + 1), 3))
    for i, f in enumerate(0.5 + w / scale):
        r, c = divmod(i, cols)
        grid[r * (k + 1) : r * (k + 1) + k, c * (k + 1) : c * (k + 1) + k] = f
    return grid


def plot_filters(path: Path, models: dict[str, nn.Module]) -> str:
    """Each model's first-layer filters in a square grid, the models side by side (e.g. Ma's pretrained,
    fine-tuned and from-scratch runs). One scale for all: 0 is mid-grey and the largest |weight| of any model
    is black or white, so the panels compare in magnitude as well as in shape."""
    weights = {title: first_filters(m) for title, m in models.items()}
    scale = 2 * max(float(np.abs(w).max()) for w in weights.values()) or 1.0
    fig = _figure(5 * len(weights), 5.4)
    for ax, (title, w) in zip(np.atleast_1d(fig.subplots(1, len(weights))), weights.items()):
        ax.imshow(filter_grid(w, scale), interpolation="nearest")
        ax.set(xticks=[], yticks=[], title=f"{title}\n{len(w)} filters of {w.shape[1]}x{w.shape[1]}")
    fig.suptitle(f"first-layer filters (one scale: |w| = {scale / 2:.3g} is black or white)")
    return _save(fig, path)


def plot_reliability(path: Path, bins: dict[str, np.ndarray], ece: float) -> str:
    """Accuracy against confidence per bin (stats.reliability), bars sized by share of images; the diagonal is
    perfect calibration."""
    n = len(bins["count"])
    centres = (np.arange(n) + 0.5) / n
    fig = _figure(5, 5)
    ax = fig.subplots()
    ax.bar(centres, np.nan_to_num(bins["accuracy"]), width=1 / n, edgecolor="k", alpha=0.7, label="accuracy")
    ax.plot([0, 1], [0, 1], "--", color="grey", label="perfectly calibrated")
    ax.scatter(
        bins["confidence"],
        bins["accuracy"],
        s=10 + 200 * bins["count"] / bins["count"].sum(),
        color="C3",
        label="mean confidence",
        zorder=3,
    )
    ax.set(
        xlim=(0, 1),
        ylim=(0, 1),
        xlabel="confidence (top-1 probability)",
        ylabel="accuracy",
        title=f"reliability (ECE {ece:.3f})",
    )
    ax.legend(loc="upper left", fontsize=8)
    return _save(fig, path)
