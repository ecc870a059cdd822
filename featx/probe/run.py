"""Stage 2: `featx probe`, classifier heads on cached features, a whole hyperparameter sweep in one pass.

    from featx.probe.run import grid, run_probe
    result = run_probe(features="features/r50.h5", out="runs/r50", heads=grid(lr=[1e-4, 6.5e-4]))
    result.best, result.val

`run_probe` (its config-taking form: `probe`) reads the feature file, fits the heads (featx.probe.sweep trains
them, featx.probe.neighbors fits k-NN and NCM), chooses the head, epoch and k on the selection split, calibrates
and scores the choice once on val (featx.probe.calibration) and writes the run directory (featx.core.runs). The
loop's names (HeadConfig, grid, train, ProbeResult, StreamedSplit) and the console tables (featx.probe.tables)
are importable from here too.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import cast

import numpy as np
import torch

from featx.core.atomic import one_writer, replacing, require_space
from featx.core.choices import (
    TRAINED_HEADS,
    Device,
    Normalize,
    Optimizer,
    ProbeHead,
    ProbePrecision,
    ProbeSchedule,
    SaveMode,
    ViewSelection,
)
from featx.core.configs import HYPERPARAMETERS, ProbeConfig, show
from featx.core.device import resolve_device
from featx.core.errors import FeatxError
from featx.core.outputs import Existing, promote, target
from featx.core.outputs import decide as output_action
from featx.core.runs import (
    HEAD_FORMAT,
    Scores,
    Snapshot,
    Snapshots,
    read_run,
    start_run,
    update_run,
    write_metrics,
    write_results,
)
from featx.core.stats import parse_select, selection_holdout
from featx.features.batches import StreamedSplit, batch_source, feature_dim, load_or_stream, only, split_labels
from featx.features.store import (
    ALL,
    FeatureMeta,
    Features,
    feature_set_columns,
    feature_splits,
    load_features,
    open_split,
    read_meta,
    select_views,
)
from featx.nets.heads import FeatureSetHeads
from featx.probe.calibration import calibrate_and_score
from featx.probe.neighbors import KNNHeads, NCMHead, fit_neighbors
from featx.probe.sweep import (
    HeadConfig,
    OnEval,
    ProbeResult,
    best_head,
    check_epoch_views,
    evaluate,
    fit,
    grid,
    head_grid,
    train,
)
from featx.probe.tables import format_summary, format_table

# what `from featx.probe.run import ...` has always offered, besides run_probe
__all__ = ["HeadConfig", "ProbeResult", "StreamedSplit", "format_summary", "format_table", "grid", "run_probe", "train"]


def _check_feature_sets(meta: FeatureMeta, feature_sets: Sequence[str], *, path: Path, head: str) -> list[str]:
    """The distinct sets, each checked against the file's layout; k-NN and NCM take one."""
    sets = list(dict.fromkeys(feature_sets))
    for s in sets:
        feature_set_columns(meta, s, path=path)
    if not sets or (head in ("knn", "ncm") and len(sets) > 1):
        raise FeatxError(f"--feature-set {','.join(sets)}: --head {head} takes exactly one feature set")
    return sets


def _check_file(path: Path, meta: FeatureMeta, config: ProbeConfig) -> list[str]:
    """Refuse a feature file the options do not fit before anything is written to `out`; returns the distinct
    feature sets."""
    feature_sets = _check_feature_sets(meta, config.feature_set, path=path, head=config.head)
    have = feature_splits(path)
    if "train" not in have:
        raise FeatxError(
            f"{path}: no 'train' split to fit heads on (has {', '.join(have)}); "
            "extract it with `featx extract --splits train,val`"
        )
    if config.select == "val" and "val" not in have:
        raise FeatxError(
            f"--select val: {path} has no 'val' split (has {', '.join(have)}); choose on a share of train "
            "with --select holdout:0.1"
        )
    return feature_sets


def _fits_in_memory(path: Path, views: Mapping[str, ViewSelection], device: torch.device) -> bool:
    """Whether the selected splits, as stored (float16), fit comfortably in RAM (and on the GPU)."""
    size = 0
    meta = read_meta(path)
    for split, which in views.items():
        with open_split(path, split) as (ds, _, _):
            n, _, d = ds.shape
            size += n * len(select_views(meta, split, which, path=path)) * d * ds.dtype.itemsize
    available = _available_ram()
    if device.type == "cuda":
        available = min(available, torch.cuda.mem_get_info(device)[0])
    return size < 0.6 * available


def _available_ram() -> int:
    # MemAvailable counts reclaimable page cache, which the free page count (sysconf) does not
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _checkpoint_bytes(
    train_split: Features | StreamedSplit, n_classes: int, config: ProbeConfig, heads: Sequence[HeadConfig]
) -> int:
    """The most the run's checkpoints take on disk: k-NN's hold the training bank (a copy per k), NCM's the class
    means, trained heads' the `keep` snapshots of every head of every feature set (each at most all columns)."""
    dim, hidden = feature_dim(train_split), config.hidden
    if config.head == "knn":
        return len(config.k) * split_labels(train_split).size * (dim + 1) * 4
    if config.head == "ncm":
        return (dim + 1) * n_classes * 4
    params = (dim + 1) * hidden + (hidden + 1) * n_classes if config.head == "mlp" else (dim + 1) * n_classes
    return len(heads) * len(config.feature_set) * config.keep * params * 4


NOTHING_SELECTED = "none"  # what run.json's best.select says where neither val nor a holdout could choose
NOTHING_SELECTED_FALLBACK = (
    "without a val split, one head with the default values trains on all of train: nothing is selected and "
    "no held-out score exists (pass more images a class, or a val split, to choose and score)"
)
VAL_FALLBACK = "selecting on val instead (optimistic: pass more --per-class or a larger --select holdout fraction)"


def _selection_split(
    labels: np.ndarray, select: str, seed: int, classes: int, *, has_val: bool
) -> tuple[np.ndarray | None, str]:
    """The held-out rows of train to choose on (None: none) and where the choice is made: `holdout:F`, val
    (asked for, or the fallback where the holdout would be too small) or nothing at all."""
    fraction = parse_select(select)
    if fraction is None:
        return None, "val"
    fallback = VAL_FALLBACK if has_val else NOTHING_SELECTED_FALLBACK
    held = selection_holdout(labels, fraction, seed, classes, fallback=fallback)
    if held is not None:
        return held, select
    return None, "val" if has_val else NOTHING_SELECTED


def _selection(
    path: Path,
    train_split: Features | StreamedSplit,
    val_split: Features | StreamedSplit | None,
    held: np.ndarray | None,
    *,
    train_views: ViewSelection,
    eval_views: ViewSelection,
    stream: bool,
) -> tuple[Features | StreamedSplit, Features | StreamedSplit]:
    """What the heads fit on and what chooses among them: train and val, or (`held`, a holdout of train) the rest
    of train and the held-out rows, seen through the evaluation views. Without either (nothing is selected),
    all of train, which the epochs' scores then describe."""
    if held is None:
        return train_split, train_split if val_split is None else val_split
    chosen_on = train_split if train_views == eval_views else load_or_stream(path, "train", eval_views, stream)
    return only(train_split, ~held), only(chosen_on, held)


def _fit_neighbors(
    bank: Features,
    chosen_on: Features | StreamedSplit,
    *,
    head: str,
    ks: Sequence[int],
    device: str,
    feature_set: str = ALL,
) -> ProbeResult:
    """k-NN (a head per k) or NCM fitted on the labelled rows of `bank` (full view), scored on `chosen_on`."""
    start = time.perf_counter()
    dev = resolve_device(device)
    model = fit_neighbors(bank, head=head, ks=ks, device=dev, feature_set=feature_set)
    loss, top1, top5 = evaluate(model, batch_source(chosen_on, dev))
    history = [
        [
            {
                "epoch": 1,
                "train_loss": math.nan,
                "train_top1": math.nan,
                "val_loss": float(loss[h]),
                "val_top1": float(top1[h]),
                "val_top5": float(top5[h]),
            }
        ]
        for h in range(model.num_heads)
    ]
    best, _ = best_head(history)
    names = [f"k={k_}" for k_ in ks] if head == "knn" else ["ncm"]
    return ProbeResult(
        model,
        [],
        history,
        ["ok"] * len(history),
        best,
        1,
        time.perf_counter() - start,
        names,
        feature_sets=[feature_set] * len(history),
    )


def _offer_neighbors(result: ProbeResult, snapshots: Snapshots, config: dict, common: dict) -> None:
    """Each k-NN or NCM head's one checkpoint."""
    assert result.heads is not None  # fitted just now
    neighbors = cast("KNNHeads | NCMHead", result.heads.stacks[0])  # a ModuleList yields plain Modules
    for h, hist in enumerate(result.history):
        r = hist[0]
        snapshots.offer(
            h,
            1,
            r["val_top1"],
            r["val_top5"],
            lambda h=h, r=r: {  # type: ignore[misc]  # mypy cannot infer a lambda with defaults
                **neighbors.checkpoint(h),
                "config": {**config, "feature_set": result.feature_sets[h]},
                **common,
                "epoch": 1,
                "val_top1": r["val_top1"],
                "val_top5": r["val_top5"],
            },
        )


def _offer_heads(
    snapshots: Snapshots,
    plan: list[tuple[str, HeadConfig]],
    config: dict,
    common: dict,
    normalize: str,
    *,
    last_only: int | None = None,
) -> OnEval:
    """train's on_eval: a snapshot of every head after each validation (`plan`: train's numbering of the heads);
    with `last_only` (the epoch count, where nothing chooses among epochs) only the last epoch's."""

    def on_eval(epoch: int, step: int, model: FeatureSetHeads, top1: np.ndarray, top5: np.ndarray) -> None:
        if last_only is not None and epoch != last_only:
            return
        for h, (fs, c) in enumerate(plan):
            snapshots.offer(
                h,
                epoch,
                float(top1[h]),
                float(top5[h]),
                lambda h=h, fs=fs, c=c: {  # type: ignore[misc]  # mypy cannot infer a lambda with defaults
                    "format": HEAD_FORMAT,
                    "normalize": normalize,
                    "state": model.head_state(h),
                    "config": {**config, **dataclasses.asdict(c), "feature_set": fs},
                    **common,
                    "epoch": epoch,
                    "step": step,
                    "val_top1": float(top1[h]),
                    "val_top5": float(top5[h]),
                },
                step=step,
            )
        snapshots.prune()

    return on_eval


def _finish(
    run_dir: Path,
    snapshots: Snapshots,
    result: ProbeResult,
    chosen_on: Features | StreamedSplit,
    val: Features | StreamedSplit,
    config: ProbeConfig,
    *,
    select: str,
    scored: str | None,
) -> ProbeResult:
    """Choose the best kept snapshot, calibrate and score it on `scored` (val, or without it the holdout; None:
    nothing to score on), and record it all in the run directory."""
    # Snapshot.rank orders as best_head does, so without --snapshot-every this is result's best head and epoch;
    # with it, the best may fall within an epoch.
    top = snapshots.listing()[0]
    result.best, result.best_epoch = top.key, top.epoch
    if config.save == "best":
        snapshots.retain({top.key})
    result.val = (
        calibrate_and_score(run_dir, snapshots, chosen_on, val, select=select, device=config.device)
        if scored
        else dict.fromkeys(SCORE_KEYS)
    )
    result.selected_on, result.scored_on = select, scored
    best = {
        "head": top.key,
        "epoch": top.epoch,
        "step": top.step,
        "name": result.names[top.key],
        "config": dataclasses.asdict(result.configs[top.key]) if result.configs else {},
        "feature_set": result.feature_sets[top.key],
        "select": select,
        "select_top1": top.val_top1 if scored else None,
        "select_top5": top.val_top5 if scored else None,
        "scored_on": scored,
        **result.val,
        "checkpoint": top.file,
    }
    write_metrics(
        run_dir,
        [
            {
                "index": h,
                "config": dataclasses.asdict(c) if isinstance(c, HeadConfig) else {"name": name},
                "feature_set": fs,
                "status": result.status[h],
                "epochs": result.history[h],
            }
            for h, (c, name, fs) in enumerate(zip(result.configs or result.names, result.names, result.feature_sets))
        ],
        best,
    )
    update_run(run_dir, checkpoints=snapshots.listing(), best=best, seconds=round(result.seconds, 2))
    return result


def run_probe(
    *,
    features: str | Path,
    out: str | Path,
    heads: Sequence[HeadConfig],
    head: ProbeHead = ProbeConfig.head,
    hidden: int = ProbeConfig.hidden,
    optimizer: Optimizer = ProbeConfig.optimizer,
    schedule: ProbeSchedule = ProbeConfig.schedule,
    epochs: int = ProbeConfig.epochs,
    batch_size: int = ProbeConfig.batch_size,
    train_views: ViewSelection = ProbeConfig.train_views,
    eval_views: ViewSelection = ProbeConfig.eval_views,
    epoch_views: bool = ProbeConfig.epoch_views,
    normalize: Normalize = ProbeConfig.normalize,
    seed: int = ProbeConfig.seed,
    device: Device = ProbeConfig.device,
    precision: ProbePrecision = ProbeConfig.precision,
    save: SaveMode = ProbeConfig.save,
    keep: int = ProbeConfig.keep,
    snapshot_every: int | None = None,
    stream: bool = ProbeConfig.stream,
    select: str = ProbeConfig.select,
    k: Sequence[int] = ProbeConfig.k,
    feature_sets: Sequence[str] = (ALL,),
    force: bool = False,
    progress: bool = False,
) -> ProbeResult:
    """`probe` with its options as keywords and the heads given as a list (`grid(...)`, or any configs)."""
    config = ProbeConfig(
        features=str(features),
        head=head,
        hidden=hidden,
        k=tuple(k),
        select=select,
        optimizer=optimizer,
        epoch_views=epoch_views,
        schedule=schedule,
        epochs=epochs,
        batch_size=batch_size,
        train_views=show(train_views),  # a list of view names as the comma list the config holds
        eval_views=show(eval_views),
        normalize=normalize,
        feature_set=tuple(feature_sets),
        seed=seed,
        device=device,
        precision=precision,
        save=save,
        keep=keep,
        snapshot_every=snapshot_every,
        stream=stream,
    )
    return probe(config, out=out, heads=heads, force=force, progress=progress)


def _settings(config: ProbeConfig, feature_sets: list[str], stream: bool) -> dict:
    """What run.json records of the options (the output contract compares them): every field but the heads'
    hyperparameters and lr decays (run.json lists the heads), `hidden` only where a head has it, `k` only for
    k-NN, the distinct feature sets, and whether the run streamed."""
    settings = {
        k: v
        for k, v in dataclasses.asdict(config).items()
        if k not in (*HYPERPARAMETERS, "lr_decay", "k", "feature_set")
    }
    settings.update(hidden=config.hidden if config.head == "mlp" else 0, stream=stream, feature_sets=feature_sets)
    if config.head == "knn":
        settings["k"] = list(config.k)
    return settings


def _feature_info(path: Path, meta: FeatureMeta) -> dict:
    return {
        "path": str(path.resolve()),
        "identity": meta.identity(),
        "backbone": meta.backbone,
        "weights": meta.weights,
        "views": meta.views,
        "dataset": meta.dataset,
        "dataset_fingerprint": meta.dataset_fingerprint,
    }


def _checked(config: ProbeConfig, path: Path, meta: FeatureMeta) -> tuple[ProbeConfig, bool, bool]:
    """Everything about the feature file that can fail before any work, checked: the config with its feature
    sets resolved, whether the file has val, and whether its splits are streamed (they do not fit in memory)."""
    config = dataclasses.replace(config, feature_set=tuple(_check_file(path, meta, config)))
    has_val = "val" in feature_splits(path)
    views = {"train": config.train_views, "val": config.eval_views} if has_val else {"train": config.train_views}
    for split, which in views.items():  # a misnamed view fails here, before any training
        select_views(meta, split, which, path=path)
    if config.epoch_views and config.head in TRAINED_HEADS:
        check_epoch_views(len(select_views(meta, "train", config.train_views, path=path)), config.epochs)
    stream = config.stream or not _fits_in_memory(path, views, resolve_device(config.device))
    return config, has_val, stream


@one_writer("out")
def probe(
    config: ProbeConfig,
    *,
    out: str | Path,
    heads: Sequence[HeadConfig] | None = None,
    force: bool = False,
    progress: bool = False,
) -> ProbeResult:
    """`featx probe`: fit the heads (trained, or k-NN/NCM) on the file's train split, choose the head, epoch and
    k on the selection split (`config.select`: a stratified holdout of train, or val; without enough images for
    a holdout, val, and without val either, nothing: one head with the default values), score the choice once
    on val (without val, on the holdout), write the run. `heads`: the configs trained [default: the config's
    sweep, featx.probe.sweep.head_grid].

    `train_views`, `eval_views`: "all" (every deterministic view), "full" or a comma list of stored view names
    (augmented views train only); `epoch_views`: epoch e trains on every image's e-th training view. Each head's
    lr decay is its config's (HeadConfig.lr_decay). Snapshots are offered after every epoch and, with
    `snapshot_every`, every that many steps; the `keep` best of each head are kept, and run.json's best is the
    best of them all. `feature_set`: the columns heads see (see featx.features.store.feature_set_columns);
    several sweep in one pass. An existing run in `out` follows featx.core.outputs' contract: up to date when
    finished with the same settings (its recorded result is returned), resumed from its last finished epoch
    when interrupted, refused when made with others unless `force`."""
    heads = head_grid(config) if heads is None else list(heads)
    path = Path(config.features)
    meta = read_meta(path)
    config, has_val, stream = _checked(config, path, meta)
    feature_sets = list(config.feature_set)
    # the output contract first: an up-to-date run reads no features, a refused one warns of nothing
    settings = _settings(config, feature_sets, stream)
    feature_info = _feature_info(path, meta)
    recorded = {**settings, "heads": [dataclasses.asdict(c) for c in heads]}
    want = _probe_settings(recorded, feature_info)
    action = output_action(out, _existing_probe(Path(out)), want, force=force)
    if action == "up to date":
        return recorded_result(Path(out))
    train_split = load_or_stream(path, "train", config.train_views, stream)
    val_split = load_or_stream(path, "val", config.eval_views, stream) if has_val else None
    require_space(Path(out) / "run.json", _checkpoint_bytes(train_split, len(meta.classes), config, heads))
    if val_split is not None and not (split_labels(val_split) >= 0).any():
        raise FeatxError(
            f"{path}: split 'val' has no labels to validate on; extract a labelled split (e.g. --splits train,val)"
        )
    held, chosen_by = _selection_split(
        split_labels(train_split), config.select, config.seed, len(meta.classes), has_val=has_val
    )
    if chosen_by == NOTHING_SELECTED:
        heads = [HeadConfig()]
        config = dataclasses.replace(config, snapshot_every=None)
    fit_on, chosen_on = _selection(
        path, train_split, val_split, held, train_views=config.train_views, eval_views=config.eval_views, stream=stream
    )
    # an interrupted run of these settings goes on in its folder: `out`, or a forced run's staging folder
    run_dir = Path(out) if action == "resume" else target(out, forced=(Path(out) / "run.json").exists())
    resume = _resume_state(run_dir, want)
    if resume is None:
        run_dir = start_run(run_dir, kind="probe", config=recorded, features=feature_info)
    # step-numbered names only when snapshots are taken within epochs, so that per-epoch runs keep theirs
    name = "head{key:02d}-epoch{epoch:03d}" + ("-step{step:06d}" if config.snapshot_every else "") + ".pt"
    kept = [Snapshot(**d) for d in resume["snapshots"]] if resume else []
    snapshots = Snapshots(run_dir, keep=config.keep, name=name, kept=kept)
    common = {"features": feature_info, "classes": meta.classes}
    if config.head in ("knn", "ncm"):
        bank = load_features(path, "train", views="full")  # as DINO: the training images' centre view only
        result = _fit_neighbors(
            bank if held is None else only(bank, ~held),
            chosen_on,
            head=config.head,
            ks=config.k,
            device=config.device,
            feature_set=feature_sets[0],
        )
        _offer_neighbors(result, snapshots, settings, common)
    else:
        on_eval = _offer_heads(
            snapshots,
            [(s, c) for s in feature_sets for c in heads],
            settings,
            common,
            config.normalize,
            last_only=config.epochs if chosen_by == NOTHING_SELECTED else None,
        )
        result = fit(
            fit_on,
            val=chosen_on,
            config=config,
            heads=heads,
            on_eval=on_eval,
            progress=progress,
            after_epoch=lambda state: _save_resume_state(run_dir, state, snapshots),
            resume_from=resume,
        )
    # without val, the holdout is all there is to score on; with neither, nothing is scored
    scored = "val" if has_val else None if chosen_by == NOTHING_SELECTED else chosen_by
    _finish(
        run_dir,
        snapshots,
        result,
        chosen_on,
        chosen_on if val_split is None else val_split,
        config,
        select=chosen_by,
        scored=scored,
    )
    best = read_run(run_dir).best
    assert best is not None  # _finish recorded it
    write_probe_results(
        run_dir,
        best,
        recorded,
        feature_info,
        result.seconds,
        0 if held is None else int(held.sum()),
        len(meta.classes),
    )
    (run_dir / RESUME_STATE).unlink(missing_ok=True)  # finished: nothing to resume
    promote(run_dir, out)
    return result


RESUME_STATE = "resume.pt"  # a probe run's state after its last finished epoch, until the run finishes


def _save_resume_state(run_dir: Path, state: dict, snapshots: Snapshots) -> None:
    """After each epoch, atomically: what featx.probe.sweep.train needs to go on from it, and the kept snapshots."""
    with replacing(run_dir / RESUME_STATE) as tmp:
        torch.save({**state, "snapshots": [dataclasses.asdict(s) for s in snapshots.listing()]}, tmp)


def _resume_state(run_dir: Path, want: dict) -> dict | None:
    """The state an interrupted run of the settings `want` left in `run_dir`, or None (start afresh)."""
    if not (run_dir / RESUME_STATE).is_file() or not (run_dir / "run.json").is_file():
        return None
    run = read_run(run_dir)
    if run.best is not None or _probe_settings(run.config, run.features or {"identity": None}) != want:
        return None
    return torch.load(run_dir / RESUME_STATE, weights_only=False)


# run.json's best: the chosen checkpoint's one score (None where nothing was scored)
SCORE_KEYS = ("val_top1", "val_top1_interval", "val_top5", "val_ece", "val_ece_calibrated", "temperature")

# options that leave a probe's results as they are (the file: by identity), and what featx.front.stages adds to
# run.json's config after the run (the config as given, what auto became)
PROBE_FREE = ("device", "stream", "features", "options", "resolved")


def _probe_settings(config: dict, features: dict) -> dict:
    """A probe run's resolved settings as featx.core.outputs compares them (JSON-shaped, as run.json holds them);
    a 0.2 run's read as today's: one lr decay for all its heads, and no --epoch-views."""
    d = {k: v for k, v in config.items() if k not in PROBE_FREE}
    if "lr_decay" in d:
        decay = d.pop("lr_decay")
        d["heads"] = [{**h, "lr_decay": decay} for h in d.get("heads", [])]
    d.setdefault("epoch_views", False)
    d.setdefault("precision", "auto")  # runs before --precision trained in fp32, as auto still does on most CPUs
    # each hyperparameter's values by name, so that a refusal reads `lr 0.001 → 0.01`; the heads themselves
    # (which combinations) last, named only when nothing plainer differs
    heads = d.pop("heads", [])
    swept = {
        f.name: list(dict.fromkeys(c.get(f.name, getattr(HeadConfig, f.name)) for c in heads))
        for f in dataclasses.fields(HeadConfig)
    }
    return json.loads(json.dumps({**d, **swept, "features_identity": features["identity"], "heads": heads}))


def _existing_probe(out: Path) -> Existing:
    """What a probe `out` holds, for featx.core.outputs.decide: finished once run.json records its best."""
    if not (out / "run.json").exists():
        return Existing(None)
    run = read_run(out)
    if run.kind != "probe":
        raise FeatxError(f"--out {out}: holds a `featx {run.kind}` run; choose another --out")
    settings = _probe_settings(run.config, run.features or {"identity": None})
    if run.best is not None:
        return Existing(settings, complete=True)
    done = torch.load(out / RESUME_STATE, weights_only=False)["epoch"] if (out / RESUME_STATE).is_file() else 0
    return Existing(settings, done=done, total=run.config["epochs"], unit="epochs")


def _head_fields(head: dict) -> dict:
    """A metrics.json head's HeadConfig fields (a 0.2 run's lack lr_decay: its run.json has one for all)."""
    names = {f.name for f in dataclasses.fields(HeadConfig)}
    return {k: v for k, v in head["config"].items() if k in names}


def recorded_result(run_dir: Path) -> ProbeResult:
    """The ProbeResult a finished run recorded (metrics.json, run.json), for a run found up to date; `heads`
    is None: the weights are in its checkpoints."""
    run = read_run(run_dir)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    hs = metrics["heads"]
    trained = run.config["head"] in TRAINED_HEADS
    configs = (
        [HeadConfig(**{"lr_decay": run.config.get("lr_decay", HeadConfig.lr_decay), **_head_fields(h)}) for h in hs]
        if trained
        else []
    )
    best = run.best
    assert best is not None  # a finished run records its best head
    val = {k: best[k] for k in SCORE_KEYS}
    return ProbeResult(
        heads=None,
        configs=configs,
        history=[h["epochs"] for h in hs],
        status=[h["status"] for h in hs],
        best=best["head"],
        best_epoch=best["epoch"],
        seconds=run.seconds or 0.0,
        names=[] if trained else [h["config"]["name"] for h in hs],
        val=val,
        feature_sets=[h["feature_set"] for h in hs],
        selected_on=best["select"],
        scored_on=best.get("scored_on", "val"),  # runs of 0.2 scored on val
    )


def write_probe_results(
    run_dir: Path, best: dict, config: dict, features: dict, seconds: float, held: int, classes: int
) -> dict:
    """results.json of a probe run (featx.core.runs.write_results)."""
    select = best["select"]
    protocol = {"val": "val (optimistic)", NOTHING_SELECTED: "nothing selected"}.get(select, "holdout of train")
    return write_results(
        run_dir,
        kind="probe",
        scores=Scores(best.get("scored_on", "val"), best["val_top1"], best["val_top1_interval"], best["val_top5"]),
        selection={
            "protocol": protocol,
            "select": select,
            "images": held or None,
            "top1": best["select_top1"],
            "chosen": {k: best[k] for k in ("head", "epoch", "step", "name", "feature_set")},
        },
        views=config["eval_views"],
        settings=config,
        seconds={"train": seconds},
        calibration={k: best[k] for k in ("val_ece", "val_ece_calibrated", "temperature")},
        features=features,
        classes=classes,
    )
