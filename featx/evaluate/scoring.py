"""Stage 4: score a run's checkpoints on a split or on new images, averaging over views, snapshots and runs.

    from featx.evaluate import predict, write_predictions
    p = predict(runs=["runs/probe-inception"], split="val", eval_views="all", ensemble="greedy")
    p.top_k(1), p.top_k(5), p.gain()
    write_predictions(p, "preds/predictions.csv")

A probe run is scored on its feature file (its checkpoints' heads stacked into one matmul), a finetune run on
the images of its dataset. Each checkpoint gives the softmax averaged over the views; the ensemble is the mean
of the selected checkpoints' softmaxes within a run, then the mean over runs (each run weighs the same).
`combine` "calibrated" takes each probe checkpoint's softmax at its fitted temperature, "raw" the softmax as
it is (Milani's Eq. 2 sums them: the mean has the same argmax), "logits" a finetune run's logits averaged over
views, checkpoints and runs before one softmax (metrics.pool).
Checkpoints are selected in the run's best-first order (by val top-1), so every selection starts with the best.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from featx.core.choices import (
    COMBINES,
    EVAL_VIEWS,
    Combine,
    CompileMode,
    Device,
    Split,
    ViewSelection,
)
from featx.core.compiled import frozen
from featx.core.configs import PredictConfig
from featx.core.device import resolve_device
from featx.core.errors import FeatxError
from featx.core.runs import RunRecord, load_checkpoint, read_run
from featx.core.stats import (
    holdout_rows,
    parse_select,
)
from featx.data.cache import Split as DecodedSplit
from featx.data.cache import dataset_info, prepare_cache, read_split
from featx.evaluate.metrics import (
    Prediction,
    Scored,
    best_size,
    calibrated,
    ensemble_curve,
    greedy,
    pool,
    ranked_picks,
)

# compute_features is extraction's own "render the views, run the model" step: reusing it keeps predictions on new
# images computed exactly as the stored features were.
from featx.features.extract import compute_features, example_batch, int8_model_of
from featx.features.int8 import check_int8
from featx.features.store import FeatureMeta, load_features, read_meta, select_views
from featx.nets.backbones import Backbone, create_backbone
from featx.nets.models import ModelSpec, load_model
from featx.probe.checkpoints import probe_heads

BATCH = 64  # images per forward pass
SELECTION = "selection"  # score_split's name for the split a run chose its checkpoints on

# --- the runs ----------------------------------------------------------------------------------------


def _run_model(
    bb: Backbone,
    images: np.ndarray,
    *,
    views: Sequence[str],
    crop: int,
    device: torch.device,
    compile: CompileMode = "off",
    int8_from: Path | None = None,
) -> np.ndarray:
    """bb.model's outputs (N, V, out) for uint8 images (N, H, W, 3), in batches; quantized as the int8 feature
    file `int8_from`'s were."""
    if int8_from is not None:
        check_int8(device)
        model = int8_model_of(int8_from, bb, rows=BATCH * len(views))
    else:
        rows = BATCH * len(views)
        model = frozen(bb.model, compile, example=example_batch(bb, rows, device), views=len(images) * len(views))
    return np.concatenate(
        [
            compute_features(
                bb,
                model,
                images[i : i + BATCH],
                views=views,
                crop=crop,
                device=device,
                autocast=None,
                out_dtype=np.dtype(np.float32),
            )
            for i in range(0, len(images), BATCH)
        ]
    )


def _first_of_classes(labels: np.ndarray, classes: Sequence[int], per_class: int | None) -> np.ndarray:
    """Mask of the rows labelled with one of `classes`, at most the first `per_class` of each."""
    keep = np.isin(labels, classes)
    if per_class is not None:
        for c in classes:
            keep[np.flatnonzero(labels == c)[per_class:]] = False
    return keep


class ProbeRun:
    """A `featx probe` run: heads scored on its feature file, or on new images through its backbone."""

    def __init__(self, run_dir: Path, run: RunRecord, device: torch.device, combine: Combine = "calibrated"):
        self.dir, self.device, self.combine = run_dir, device, combine
        assert run.features is not None  # every probe run records its feature file
        self.checkpoints = run.checkpoints
        self.path = Path(run.features["path"])
        self.meta = read_meta(self.path)
        if self.meta.identity() != run.features["identity"]:
            raise FeatxError(
                f"{self.path}: no longer the features run {run_dir} was trained on; re-run `featx probe` on it"
            )
        self.classes, self.class_names = self.meta.classes, self.meta.class_names
        # runs from before held-out selection chose on val
        # where it selected: best's (a holdout too small to choose on falls back to val), else its option
        self.select = (run.best or {}).get("select") or run.config.get("select", "val")
        self.seed = run.config.get("seed", 0)

    def view_names(self, views: ViewSelection) -> list[str]:
        """The stored views a score averages under --eval-views `views`: all, full or stored view names."""
        return [self.meta.views[i] for i in select_views(self.meta, "val", views, path=self.path)]

    def images(self, data: str | Path | None, split: str) -> DecodedSplit:
        """The split's decoded images: `data`'s, else those of the cache the features record as their source."""
        return read_split(
            feature_source(self.meta, data, path=self.path),
            split,
            classes=len(self.classes),
            per_class=self.meta.source.get("per_class"),
        )

    def _proba(self, x: np.ndarray, picks: Sequence[int]) -> np.ndarray:
        """(N, V, D) features -> (K, N, C) view-averaged softmax of the picked checkpoints."""
        ckpts = [load_checkpoint(self.dir / self.checkpoints[i].file) for i in picks]
        heads = probe_heads(ckpts, self.meta, path=self.path).to(self.device).eval()
        rows = max(1, 2048 // x.shape[1])
        probs = np.concatenate(
            [
                heads.predict_proba(torch.from_numpy(x[i : i + rows]).to(self.device)).cpu().numpy()
                for i in range(0, len(x), rows)
            ],
            axis=1,
        )
        return probs if self.combine == "raw" else np.stack([calibrated(p, c) for p, c in zip(probs, ckpts)])

    def score_split(self, split: str, views: ViewSelection, picks: Sequence[int]) -> Scored:
        """`split` may be SELECTION: the rows of train the run chose its checkpoints on (see selection_split)."""
        if split == SELECTION:
            fraction = parse_select(self.select)
            if fraction is None:
                return self.score_split("val", views, picks)
            f = load_features(self.path, "train", views=views)
            held = holdout_rows(f.labels, fraction, self.seed)
            return Scored([i for i, h in zip(f.ids, held) if h], f.labels[held], self._proba(f.features[held], picks))
        f = load_features(self.path, split, views=views)
        return Scored(f.ids, f.labels, self._proba(f.features, picks))

    def score_images(
        self,
        images: np.ndarray,
        views: ViewSelection,
        picks: Sequence[int],
        *,
        weights: str | Path | None,
        compile: CompileMode = "off",
    ) -> np.ndarray:
        bb = self._backbone(weights)
        return self._proba(
            _run_model(
                bb,
                images,
                views=self.view_names(views),
                crop=self.meta.crop,
                device=self.device,
                compile=compile,
                int8_from=self.path if self.meta.precision == "int8" else None,
            ),
            picks,
        )

    def _backbone(self, weights: str | Path | None) -> Backbone:
        m = self.meta
        if m.weights.startswith("sha256:"):
            if weights is None:
                raise FeatxError(
                    f"{self.dir}: its backbone weights came from a file ({m.weights[:19]}...); "
                    "pass that file with --weights PATH"
                )
            named = str(weights)
        else:
            named = "none" if m.weights == "none" else "default"
        bb = create_backbone(m.backbone, weights=named, size=m.input_size, layers=m.layers or None)
        if bb.weights_id != m.weights:
            raise FeatxError(f"--weights {named}: not the weights {self.path} was extracted with ({m.weights})")
        bb.mean, bb.std = tuple(m.mean), tuple(m.std)
        bb.model.eval().to(self.device)
        return bb

    def embed(self, split: str, classes: Sequence[int], per_class: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The stored full-view features and labels of the split's images of these classes (the first
        `per_class` of each)."""
        f = load_features(self.path, split, views="full")
        keep = _first_of_classes(f.labels, classes, per_class)
        return f.features[keep, 0].astype(np.float32), f.labels[keep]


class FinetuneRun:
    """A `featx finetune` run: its models scored on the images of its dataset (or `data`), or on new images.

    `views`: the view its training evaluates (the full image, or the centre crop of a model trained on random
    crops), or all = that view and its mirror image (flips suit any training; corner crops would change the scale
    the model learned at).
    """

    def __init__(
        self, run_dir: Path, run: RunRecord, device: torch.device, data: str | Path | None, combine: Combine = "raw"
    ):
        self.dir, self.device, self.combine = run_dir, device, combine
        assert run.data is not None and run.model is not None  # every finetune run records them
        self.checkpoints = run.checkpoints
        self.subset = {"classes": run.data["classes"], "per_class": run.data["per_class"]}
        self.select = "val"  # finetune chooses its checkpoints on val
        self.classes = load_checkpoint(run_dir / self.checkpoints[0].file)["classes"]
        dataset = data if data is not None else run.data["source"]
        self.cache = prepare_cache(dataset, progress=False)
        info = dataset_info(self.cache, classes=self.subset["classes"])
        if info.wnids != self.classes:
            raise FeatxError(
                f"--data {dataset}: its classes differ from those run {run_dir} was trained on; "
                "pass the dataset it was trained on"
            )
        self.class_names = info.names
        self.views = run.model.get("views", ["full"])

    def _split(self, split: str):
        return read_split(self.cache, split, **self.subset)

    def view_names(self, views: ViewSelection) -> list[str]:
        """The views a score averages: the one its training evaluated, with all also its mirror."""
        if views not in EVAL_VIEWS:
            raise FeatxError(
                f"--eval-views {views}: a finetune run averages all (the image and its mirror) or "
                "full; view names are a probe run's stored views"
            )
        return [*self.views, *(f"{v}_flip" for v in self.views if views == "all")]

    def images(self, data: str | Path | None, split: str) -> DecodedSplit:
        return self._split(split)

    def _model(self, i: int) -> tuple[Backbone, ModelSpec]:
        model, spec = load_model(load_checkpoint(self.dir / self.checkpoints[i].file))
        # _run_model takes a Backbone: here one whose "features" are the logits
        return Backbone(
            spec.backbone, model.to(self.device), spec.num_classes, spec.size, tuple(spec.mean), tuple(spec.std), ""
        ), spec

    def _logits(self, i: int, images: np.ndarray, views: ViewSelection, compile: CompileMode = "off") -> np.ndarray:
        """Checkpoint i's outputs (N, V, C) on the view its training evaluated, and with all also its mirror."""
        bb, spec = self._model(i)
        names = [*spec.views, *(f"{v}_flip" for v in spec.views if views == "all")]
        return _run_model(bb, images, views=names, crop=spec.crop, device=self.device, compile=compile)

    def score_images(
        self,
        images: np.ndarray,
        views: ViewSelection,
        picks: Sequence[int],
        *,
        weights: str | Path | None = None,
        compile: CompileMode = "off",
    ) -> np.ndarray:
        """`weights` is not needed: a finetune checkpoint holds its whole model."""
        logits = (torch.from_numpy(self._logits(i, images, views, compile)) for i in picks)
        if self.combine == "logits":  # (N, V, C): the views' mean logits, one softmax
            return np.stack([x.mean(1).softmax(-1).numpy() for x in logits])
        return np.stack([x.softmax(-1).mean(1).numpy() for x in logits])

    def score_split(self, split: str, views: ViewSelection, picks: Sequence[int]) -> Scored:
        s = self._split("val" if split == SELECTION else split)
        return Scored(s.ids, s.labels, self.score_images(s.read_images(), views, picks))

    def embed(self, split: str, classes: Sequence[int], per_class: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The best model's penultimate features (the input of its last Linear) for the split's images of
        these classes (the first `per_class` of each)."""
        s = self._split(split)
        keep = _first_of_classes(s.labels, classes, per_class)
        s = dataclasses.replace(s, rows=s.rows[keep], labels=s.labels[keep], ids=[])
        bb, spec = self._model(0)
        last = [m for m in bb.model.modules() if isinstance(m, nn.Linear)][-1]
        seen: list[torch.Tensor] = []
        hook = last.register_forward_pre_hook(lambda _, args: seen.append(args[0].float().cpu()))
        try:
            _run_model(bb, s.read_images(), views=spec.views[:1], crop=spec.crop, device=self.device)
        finally:
            hook.remove()
        return torch.cat(seen).numpy(), s.labels


def open_run(
    run_dir: str | Path, *, data: str | Path | None = None, device: str = "auto", combine: Combine = "calibrated"
) -> ProbeRun | FinetuneRun:
    if combine not in COMBINES:
        raise FeatxError(f"--combine {combine}: choose {' or '.join(COMBINES)}")
    run_dir = Path(run_dir)
    run = read_run(run_dir)
    if not run.checkpoints:
        raise FeatxError(f"{run_dir}: has no checkpoints; let its `featx {run.kind}` run finish")
    dev = resolve_device(device)
    if run.kind == "probe":
        if combine == "logits":
            raise FeatxError(
                f"--combine logits: averages finetune runs' logits; {run_dir} is a probe run: use calibrated or raw"
            )
        return ProbeRun(run_dir, run, dev, combine)
    if run.kind == "finetune":
        return FinetuneRun(run_dir, run, dev, data, combine)
    raise FeatxError(f"{run_dir}: a {run.kind!r} run; predict takes probe and finetune runs")


def open_runs(
    runs: Sequence[str | Path], *, data: str | Path | None = None, device: str = "auto", combine: Combine = "calibrated"
) -> list[ProbeRun | FinetuneRun]:
    """Open runs to be averaged together: they must share their classes."""
    if not runs:
        raise FeatxError("--run: name at least one run directory")
    opened = [open_run(r, data=data, device=device, combine=combine) for r in runs]
    first = opened[0]
    for run in opened[1:]:
        if run.classes != first.classes:
            raise FeatxError(
                f"--run {run.dir}: its {len(run.classes)} classes differ from the {len(first.classes)} "
                f"of --run {first.dir}; combine runs trained on the same classes"
            )
    return opened


def choose_members(
    run: ProbeRun | FinetuneRun, views: ViewSelection, ensemble: str, score_all: bool = False
) -> tuple[list[int], Scored | None]:
    """The picked checkpoints, and the val scores of every checkpoint where they were computed anyway (an
    ensemble chosen on val, or `score_all` for the ensemble-size curve). Greedy and best-size decide on the run's
    selection split, whatever split is scored: its held-out part of train, or val for a run selected on val."""
    everything = range(len(run.checkpoints))
    chosen = ensemble in ("greedy", "best-size")
    val = run.score_split("val", views, everything) if score_all or (chosen and run.select == "val") else None
    if not chosen:
        return ranked_picks(ensemble, len(run.checkpoints)), val
    chosen_on = val if run.select == "val" else run.score_split(SELECTION, views, everything)
    choose = greedy if ensemble == "greedy" else best_size
    assert chosen_on is not None  # scored above
    return choose(chosen_on.probs, chosen_on.labels, run.combine), val


def merge_runs(runs: list, scored: list[Scored], picks: list[list[int]], split: str) -> Prediction:
    for run, s in zip(runs[1:], scored[1:]):
        if s.ids != scored[0].ids:
            raise FeatxError(
                f"--run {run.dir}: scores other {split} images than --run {runs[0].dir}; "
                "combine runs on the same dataset and classes"
            )
    best = max(range(len(runs)), key=lambda r: runs[r].checkpoints[0].val_top1)
    return Prediction(
        split=split,
        ids=scored[0].ids,
        labels=scored[0].labels,
        probs=pool([pool(s.probs, runs[0].combine) for s in scored], runs[0].combine),
        single=scored[best].probs[0],  # every selection starts with the run's best checkpoint
        classes=runs[0].classes,
        class_names=runs[0].class_names,
        members=[str(run.dir / run.checkpoints[i].file) for run, p in zip(runs, picks) for i in p],
        selection=[run.select for run in runs],
    )


def predict(
    *,
    runs: Sequence[str | Path],
    split: Split = PredictConfig.split,
    eval_views: ViewSelection = PredictConfig.eval_views,
    ensemble: str = PredictConfig.ensemble,
    curve: bool = False,
    data: str | Path | None = None,
    device: Device = PredictConfig.device,
    combine: Combine = PredictConfig.combine,
) -> Prediction:
    """Score the runs' selected checkpoints on a split; `data` overrides a finetune run's dataset. `curve`: also
    the val top-1 of top:N for every N (Prediction.curve), which scores every checkpoint on val."""
    return score_runs(
        open_runs(runs, data=data, device=device, combine=combine),
        split=split,
        eval_views=eval_views,
        ensemble=ensemble,
        curve=curve,
    )


def score_runs(
    runs: list[ProbeRun | FinetuneRun],
    *,
    split: Split = "val",
    eval_views: ViewSelection = "all",
    ensemble: str = "best",
    curve: bool = False,
) -> Prediction:
    for run in runs:  # a view name the run lacks: one line before any scoring
        run.view_names(eval_views)
    scored, picks, vals = [], [], []
    for run in runs:
        p, val = choose_members(run, eval_views, ensemble, score_all=curve)
        picks.append(p)
        if val is not None:  # with curve, always
            vals.append(val)
        scored.append(val.take(p) if val is not None and split == "val" else run.score_split(split, eval_views, p))
    pred = merge_runs(runs, scored, picks, split)
    pred.views = list(dict.fromkeys(v for run in runs for v in run.view_names(eval_views)))
    if curve:
        pred.curve = ensemble_curve(vals, runs[0].combine)
    return pred


def feature_source(meta: FeatureMeta, data: str | Path | None, *, path: Path) -> Path:
    """The cache of the images a feature file was extracted from: `data` where given (it overrides), else the
    source the file records; a moved or changed source is one line."""
    if data is not None:
        return prepare_cache(data, progress=False)
    cache = meta.source.get("cache")
    if cache is None:
        raise FeatxError(
            f"{path}: records no image source (extracted before featx recorded one); pass --data, "
            "the dataset it was extracted from"
        )
    if not Path(cache).exists():
        raise FeatxError(
            f"{path}: its images' cache {cache} is gone (moved or deleted); pass --data with the "
            "dataset it was extracted from"
        )
    if dataset_info(cache, classes=len(meta.classes)).fingerprint != meta.dataset_fingerprint:
        raise FeatxError(
            f"{path}: its images' cache {cache} changed since the extraction; pass --data with the "
            "dataset it was extracted from, or extract again"
        )
    return Path(cache)
