"""The run directory shared by probe, finetune, predict and report.

Layout of `--out`::

    run.json          {"format": "featx-run-1", "kind": "probe"|"finetune", "featx_version", "created",
                       "features": {"path", "identity", "backbone", "views", ...},
                       "config": {...every option of the command...},
                       "checkpoints": [{"file", "key", "epoch", "val_top1", "val_top5"}, ...]  best first}
    metrics.json      {"heads": [{"index", "config", "status", "epochs": [{"epoch", "train_loss", "train_top1",
                       "val_loss", "val_top1", "val_top5"}, ...]}, ...], "best": {...}}   accuracies in [0, 1]
    metrics.csv       the same per-epoch rows, flat, one per (head, epoch)
    curves.png        train vs val top-1 per epoch
    checkpoints/*.pt  one file per kept snapshot

A checkpoint is a `torch.save`d dict readable with `torch.load(weights_only=True)`: "format" (what it
holds: "featx-head-1" for a probe head), "state" (tensors), "config", "features" (the feature file's
path and identity, so a consumer can refuse features from another extraction), "classes", "epoch",
"val_top1", "val_top5".
"""

from __future__ import annotations

import csv
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from featx import __version__
from featx.atomic import make_dirs, replacing
from featx.errors import FeatxError

RUN_FORMAT = "featx-run-1"
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


def start_run(out: str | Path, *, kind: str, config: dict, features: dict) -> Path:
    """Create (or reuse) the run directory and write run.json; snapshots of an earlier run of the same kind there
    are removed (another kind's run is refused, not overwritten)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FeatxError(f"--out {out}: is a file; name a directory")
    if (out / "run.json").exists() and read_run(out).get("kind") != kind:
        raise FeatxError(f"--out {out}: holds a `featx {read_run(out).get('kind')}` run; choose another --out")
    make_dirs(out / CHECKPOINTS, option="--out", path=out)
    for old in (out / CHECKPOINTS).glob("*.pt"):
        old.unlink()
    write_json(out / "run.json", {"format": RUN_FORMAT, "kind": kind, "featx_version": __version__,
                                  "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "features": features,
                                  "config": config, "checkpoints": []})
    return out


def read_run(run_dir: str | Path) -> dict:
    path = Path(run_dir) / "run.json"
    try:
        run = json.loads(path.read_text())
    except (OSError, ValueError):
        raise FeatxError(f"{path}: missing or unreadable; pass a directory written by `featx probe` or `featx finetune`") from None
    if run.get("format") != RUN_FORMAT:
        raise FeatxError(f"{path}: not a featx run (format {run.get('format')!r})")
    return run


def update_run(run_dir: str | Path, **fields) -> None:
    run = read_run(run_dir)
    run.update(fields)
    write_json(Path(run_dir) / "run.json", run)


def load_checkpoint(path: str | Path) -> dict:
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
    from featx.report import plot_curves  # report imports this module

    metrics = {"heads": heads, "best": best}
    write_json(run_dir / "metrics.json", metrics)
    plot_curves(run_dir / "curves.png", metrics)
    config_keys = list(heads[0]["config"]) if heads else []
    epoch_keys = list(heads[0]["epochs"][0]) if heads and heads[0]["epochs"] else []
    with open(run_dir / "metrics.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["head", *config_keys, *epoch_keys])
        for head in heads:
            for row in head["epochs"]:
                w.writerow([head["index"], *head["config"].values(), *row.values()])


@dataclass
class Snapshot:
    file: str  # relative to the run directory
    key: int  # which model of the run (the head index of a sweep)
    epoch: int
    val_top1: float
    val_top5: float

    def rank(self) -> tuple:
        """Best first: val top-1, then top-5, then the lower key and the earlier epoch."""
        return -self.val_top1, -self.val_top5, self.key, self.epoch


class Snapshots:
    """Keeps the `keep` best checkpoints per key on disk (by Snapshot.rank); worse ones are deleted as training goes."""

    def __init__(self, run_dir: Path, *, keep: int):
        self.run_dir, self.keep = run_dir, keep
        self.kept: dict[int, list[Snapshot]] = {}

    def offer(self, key: int, epoch: int, val_top1: float, val_top5: float, payload: Callable[[], dict]) -> None:
        """Save `payload()` if it ranks among the best `keep` of its key; `payload` is only called then."""
        kept = self.kept.setdefault(key, [])
        snap = Snapshot(f"{CHECKPOINTS}/head{key:02d}-epoch{epoch:03d}.pt", key, epoch, val_top1, val_top5)
        if not math.isfinite(val_top1) or (len(kept) >= self.keep and snap.rank() >= kept[-1].rank()):
            return
        checkpoint = payload()
        need = sum(t.nbytes for t in checkpoint["state"].values()) + (1 << 16)
        with replacing(self.run_dir / snap.file, need=need) as tmp:
            torch.save(checkpoint, tmp)
        kept.append(snap)
        kept.sort(key=Snapshot.rank)
        for dropped in kept[self.keep :]:
            (self.run_dir / dropped.file).unlink()
        del kept[self.keep :]

    def retain(self, keys: set[int]) -> None:
        """Delete the snapshots of every other key (`--save best`)."""
        for key in set(self.kept) - keys:
            for snap in self.kept.pop(key):
                (self.run_dir / snap.file).unlink()

    def listing(self) -> list[dict]:
        """The kept snapshots, best first, as stored in run.json."""
        snaps = sorted((s for kept in self.kept.values() for s in kept), key=Snapshot.rank)
        return [vars(s) for s in snaps]
