"""The run directory shared by probe, finetune, predict and report, and its typed record.

Layout of `--out`::

    run.json          a RunRecord: {"format": "featx-run-2", "kind": "probe"|"finetune", "featx_version",
                       "created", "config": {...every option of the command...},
                       "features": {"path", "identity", "backbone", "views", ...}   (probe: the feature file)
                       "data": {"source", "dataset", "dataset_fingerprint", "classes", "per_class"}  (finetune)
                       "model": {...the ModelSpec...}                               (finetune)
                       "checkpoints": [{"file", "key", "epoch", "val_top1", "val_top5", "step"}, ...]  best first,
                       "best": {...} | null, "seconds": float | null,
                       "resolved": {"precision", "compile"} | null}   (finetune: what ran where options said auto)
    metrics.json      {"heads": [{"index", "config", "status", "epochs": [{"epoch", "train_loss", "train_top1",
                       "val_loss", "val_top1", "val_top5"}, ...]}, ...], "best": {...}}   accuracies in [0, 1]
    metrics.csv       the same per-epoch rows, flat, one per (head, epoch)
    results.json      the chosen model's scores, selection, views, settings and timings (`write_results`)
    curves.png        train vs val top-1 per epoch
    checkpoints/*.pt  one file per kept snapshot

A checkpoint is a `torch.save`d dict readable with `torch.load(weights_only=True)`: "format" (what it
holds: "featx-head-1" for a probe head, "featx-model-1" for a finetune model), "state" (tensors), "config",
"classes", "epoch", "val_top1", "val_top5", and for a probe head "features" (the feature file's path and
identity, so a consumer can refuse features from another extraction) and "normalize".
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from featx import __version__
from featx.core.atomic import make_dirs, replacing
from featx.core.errors import FeatxError

RUN_FORMAT = "featx-run-2"
HEAD_FORMAT = "featx-head-1"  # a probe checkpoint: one head of a StackedHeads
CHECKPOINTS = "checkpoints"


def write_json(path: Path, data) -> None:
    """Atomic JSON write; NaN/inf become null so the file stays valid JSON."""
    with replacing(path) as tmp:
        tmp.write_text(json.dumps(_finite(data), indent=2) + "\n")


def _finite(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


@dataclass
class Snapshot:
    """A kept checkpoint, as listed in run.json."""

    file: str  # relative to the run directory
    key: int  # which model of the run (the head index of a sweep; 0 for finetune)
    epoch: int
    val_top1: float  # on the split the run selects on (a probe run's config "select": holdout of train, or val)
    val_top5: float
    step: int | None = None  # the optimizer step it was taken after, when taken within an epoch (--snapshot-every)

    def rank(self) -> tuple:
        """Best first: val top-1, then top-5, then the lower key and the earlier epoch and step."""
        return -self.val_top1, -self.val_top5, self.key, self.epoch, self.step or 0


@dataclass
class RunRecord:
    """run.json: what a run was (kind, options), what it trained on, and what it kept."""

    kind: str  # "probe" or "finetune"
    config: dict
    features: dict | None = None  # probe: the feature file's path, identity and extraction settings
    data: dict | None = None  # finetune: the dataset's source, name, fingerprint and subset
    model: dict | None = None  # finetune: the ModelSpec that rebuilds its checkpoints
    checkpoints: list[Snapshot] = field(default_factory=list)  # best first
    best: dict | None = None
    seconds: float | None = None
    resolved: dict | None = None  # finetune: what its auto options became ({"precision": "bf16", "compile": "on"})
    featx_version: str = __version__
    created: str = ""
    format: str = RUN_FORMAT

    @classmethod
    def from_json(cls, d: dict) -> RunRecord:
        return cls(**{**d, "checkpoints": [Snapshot(**c) for c in d.get("checkpoints", [])]})


def write_run(run_dir: str | Path, record: RunRecord) -> None:
    write_json(Path(run_dir) / "run.json", dataclasses.asdict(record))


def start_run(
    out: str | Path,
    *,
    kind: str,
    config: dict,
    features: dict | None = None,
    data: dict | None = None,
    model: dict | None = None,
) -> Path:
    """Create (or reuse) the run directory and write run.json; snapshots of an earlier run of the same kind there
    are removed (another kind's run is refused, not overwritten)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FeatxError(f"--out {out}: is a file; name a directory")
    if (out / "run.json").exists() and read_run(out).kind != kind:
        raise FeatxError(f"--out {out}: holds a `featx {read_run(out).kind}` run; choose another --out")
    make_dirs(out / CHECKPOINTS, option="--out", path=out)
    for old in (out / CHECKPOINTS).glob("*.pt"):
        old.unlink()
    write_run(
        out,
        RunRecord(
            kind=kind,
            config=config,
            features=features,
            data=data,
            model=model,
            created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        ),
    )
    return out


RESULTS_FORMAT = "featx-results-1"


@dataclass(frozen=True)
class Scores:
    """What a run or a prediction scored on `split`: top-1 with its 95% interval, and top-5, in [0, 1]; None
    where the split has no labels."""

    split: str
    top1: float | None
    top1_interval: Sequence[float] | None
    top5: float | None


def write_results(
    folder: str | Path,
    *,
    kind: str,
    scores: Scores,
    selection: dict | None,
    views: str | Sequence[str],
    settings: dict,
    seconds: dict,
    **extra,
) -> dict:
    """results.json, the one record of a probe's, finetune's or predict's scores (as timm's --results-file):
    the scores, how the model was chosen (`selection`), which views the number averages, the settings and
    timings. Returns what it wrote (for --json)."""
    views = views if isinstance(views, str) else ",".join(views)
    interval = scores.top1_interval
    results = {
        "format": RESULTS_FORMAT,
        "kind": kind,
        "featx_version": __version__,
        "split": scores.split,
        "top1": scores.top1,
        "top1_interval": list(interval) if interval is not None else None,
        "top5": scores.top5,
        "views": views,
        "selection": selection,
        **extra,
        "settings": settings,
        "seconds": seconds,
    }
    write_json(Path(folder) / "results.json", results)
    return _finite(results)


def read_run(run_dir: str | Path) -> RunRecord:
    path = Path(run_dir) / "run.json"
    try:
        run = json.loads(path.read_text())
    except (OSError, ValueError):
        raise FeatxError(
            f"{path}: missing or unreadable; pass a directory written by `featx probe` or `featx finetune`"
        ) from None
    if run.get("format") != RUN_FORMAT:
        raise FeatxError(f"{path}: not a featx run of this version (format {run.get('format')!r}); re-run its training")
    return RunRecord.from_json(run)


def update_run(run_dir: str | Path, **fields) -> None:
    """Replace fields of run.json (checkpoints as Snapshot objects)."""
    write_run(run_dir, dataclasses.replace(read_run(run_dir), **fields))


def load_checkpoint(path: str | Path) -> dict:
    import torch  # here, not at import: `featx info` starts in well under a second

    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError) as e:
        raise FeatxError(f"{path}: not a readable featx checkpoint ({e}); re-run the training") from None
    state = checkpoint.get("state", {}) if isinstance(checkpoint, dict) else {}
    if not all(t.isfinite().all() for t in state.values() if isinstance(t, torch.Tensor) and t.is_floating_point()):
        raise FeatxError(f"{path}: holds NaN/inf weights (a diverged run); re-run the training with a lower --lr")
    return checkpoint


def write_metrics(run_dir: Path, heads: list[dict], best: dict) -> None:
    """metrics.json, metrics.csv and curves.png from per-head records {"index", "config", "status", "epochs"}."""
    metrics = {"heads": heads, "best": best}
    write_json(run_dir / "metrics.json", metrics)
    from featx.core.plots import plot_curves  # matplotlib: only when there is a figure to draw

    plot_curves(run_dir / "curves.png", metrics)
    config_keys = list(heads[0]["config"]) if heads else []
    epoch_keys = list(heads[0]["epochs"][0]) if heads and heads[0]["epochs"] else []
    with replacing(run_dir / "metrics.csv") as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["head", *config_keys, *epoch_keys])
        for head in heads:
            for row in head["epochs"]:
                w.writerow([head["index"], *head["config"].values(), *row.values()])


class Snapshots:
    """Keeps the `keep` best checkpoints per key on disk (by Snapshot.rank); worse ones are deleted as training goes.
    With `records`, only a snapshot whose val top-1 beats every earlier one of its key is saved, and the oldest
    is deleted beyond `keep` (Milani's "surpassed the best seen so far"): records only rise, so the oldest is
    also the worst and the best-first order is newest first.

    `name` formats a new checkpoint's file name from its key, epoch and step. A snapshot that falls out of the best
    is deleted by `prune`, which a loop that lists the snapshots elsewhere (finetune's last.pt) calls only once
    that list is written, so a listed file always exists."""

    def __init__(
        self,
        run_dir: Path,
        *,
        keep: int,
        name: str = "head{key:02d}-epoch{epoch:03d}.pt",
        kept: Sequence[Snapshot] = (),
        records: bool = False,
    ):
        self.run_dir, self.keep, self.name, self.records = Path(run_dir), keep, name, records
        self.kept: dict[int, list[Snapshot]] = {}
        for s in kept:
            self.kept.setdefault(s.key, []).append(s)
        self.dropped: list[Snapshot] = []

    def offer(
        self,
        key: int,
        epoch: int,
        val_top1: float,
        val_top5: float,
        payload: Callable[[], dict],
        *,
        step: int | None = None,
    ) -> bool:
        """Save `payload()` if it ranks among the best `keep` of its key (with `records`: if it beats them all);
        `payload` is only called then."""
        kept = self.kept.setdefault(key, [])
        snap = Snapshot(
            f"{CHECKPOINTS}/{self.name.format(key=key, epoch=epoch, step=step)}", key, epoch, val_top1, val_top5, step
        )
        if not math.isfinite(val_top1) or (len(kept) >= self.keep and snap.rank() >= kept[-1].rank()):
            return False
        if self.records and kept and val_top1 <= kept[0].val_top1:
            return False
        checkpoint = payload()
        need = sum(t.nbytes for t in checkpoint["state"].values()) + (1 << 16)
        import torch

        with replacing(self.run_dir / snap.file, need=need) as tmp:
            torch.save(checkpoint, tmp)
        kept.append(snap)
        kept.sort(key=Snapshot.rank)
        self.dropped += kept[self.keep :]
        del kept[self.keep :]
        return True

    def prune(self) -> None:
        """Delete the files of the snapshots that fell out of the best."""
        for snap in self.dropped:
            (self.run_dir / snap.file).unlink(missing_ok=True)
        self.dropped = []

    def retain(self, keys: set[int]) -> None:
        """Delete the snapshots of every other key (`--save best`)."""
        for key in set(self.kept) - keys:
            self.dropped += self.kept.pop(key)
        self.prune()

    def remove_unlisted(self, *, besides: Sequence[str] = ()) -> None:
        """Delete the checkpoint files that are neither kept nor named in `besides`: an interrupted epoch's."""
        listed = {Path(s.file).name for s in self.listing()} | set(besides)
        for f in (self.run_dir / CHECKPOINTS).glob("*.pt"):
            if f.name not in listed:
                f.unlink()

    def listing(self) -> list[Snapshot]:
        """The kept snapshots, best first, as stored in run.json."""
        return sorted((s for kept in self.kept.values() for s in kept), key=Snapshot.rank)
