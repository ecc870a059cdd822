"""Stage 2: classifier heads on cached features, a whole hyperparameter sweep in one pass.

    from featx.features import load_features
    from featx.probe import HeadConfig, grid, train
    result = train(load_features(f, "train"), val=load_features(f, "val"),
                   heads=grid(lr=[1e-4, 6.5e-4], weight_decay=[0, 0.0116]))
    result.best, result.history[result.best]

`train` is the Python API; `run_probe` is what `featx probe` calls: it reads the feature file, trains,
and writes the run directory (see featx.runs).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from featx.atomic import one_writer, replacing, require_space
from featx.choices import (PROBE_HEADS, TRAINED_HEADS, Device, Normalize, Optimizer, ProbeHead,
                           ProbeSchedule, SaveMode, TrainedHead, ViewSelection)
from featx.device import resolve_device
from featx.errors import FeatxError
from featx.features import (ALL, FeatureMeta, Features, feature_set_columns, feature_splits, load_features, open_split,
                            read_meta, require_same_extraction, select_views)
from featx.heads import FeatureSetHeads, HeadOptimizer, StackedHeads, label_rank, smoothed_cross_entropy
from featx.neighbors import KNN_FORMAT, NCM_FORMAT, TEMPERATURE, KNNHeads, NCMHead, heads_from_checkpoints
from featx.optim import make_scheduler
from featx.outputs import Existing, decide, promote, target
from featx.runs import (HEAD_FORMAT, Snapshots, load_checkpoint, read_run, start_run, update_run, write_metrics,
                        write_results)
from featx.stats import (apply_temperature, bootstrap_interval, calibration_temperature, expected_calibration_error,
                         holdout_rows, parse_select, selection_too_small)



@dataclass(frozen=True)
class HeadConfig:
    """What differs between the heads of a sweep."""

    lr: float = 6.5e-4
    weight_decay: float = 0.0116
    label_smoothing: float = 0.1
    dropout: float = 0.0

    def label(self) -> str:
        return f"lr={self.lr:g} wd={self.weight_decay:g} ls={self.label_smoothing:g} dropout={self.dropout:g}"


def grid(*, lr: Sequence[float] = (6.5e-4,), weight_decay: Sequence[float] = (0.0116,),
         label_smoothing: Sequence[float] = (0.1,), dropout: Sequence[float] = (0.0,)) -> list[HeadConfig]:
    """Every combination, lr varying slowest."""
    return [HeadConfig(*c) for c in itertools.product(lr, weight_decay, label_smoothing, dropout)]


@dataclass
class StreamedSplit:
    """A split read from HDF5 chunk by chunk instead of held in RAM; `views` as load_features takes them."""

    path: Path
    split: str
    views: str = "all"
    keep: np.ndarray | None = None  # rows whose labels count (the others read as unlabelled); None: all

    @property
    def meta(self) -> FeatureMeta:
        return read_meta(self.path)


@dataclass
class ProbeResult:
    heads: FeatureSetHeads  # final weights of every head, on the training device
    configs: list[HeadConfig]  # per head
    history: list[list[dict]]  # per head, per epoch: epoch, train_loss, train_top1, val_loss, val_top1, val_top5
    status: list[str]  # per head: "ok" or why it stopped
    best: int  # index of the head with the highest val top-1 (at its best epoch)
    best_epoch: int
    seconds: float
    names: list[str] = dataclasses.field(default_factory=list)  # per head, for tables; default: its config
    val: dict = dataclasses.field(default_factory=dict)  # run_probe: the selected checkpoint scored once on val
    feature_sets: list[str] = dataclasses.field(default_factory=list)  # per head; default: all

    def __post_init__(self):
        self.feature_sets = self.feature_sets or [ALL] * len(self.history)
        swept = set(self.feature_sets) != {ALL}
        self.names = self.names or [f"{s} {c.label()}" if swept else c.label()
                                    for s, c in zip(self.feature_sets, self.configs)]

    @property
    def best_metrics(self) -> dict:
        return self.history[self.best][self.best_epoch - 1]


# --- data --------------------------------------------------------------------------------------------


class _InMemory:
    def __init__(self, f: Features, device: torch.device):
        self.x = torch.from_numpy(f.features).to(device)  # float16 stays float16 until batched
        self.y = torch.from_numpy(f.labels).to(device)
        self.n_views = self.x.shape[1]

    def blocks(self, gen: torch.Generator | None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        yield self.x, self.y


class _Streamed:
    BLOCK_ROWS = 8192  # rows shuffled together: several chunks, read whole and in chunk order

    def __init__(self, s: StreamedSplit, device: torch.device):
        self.s, self.device = s, device
        meta = s.meta
        self.views = select_views(meta, s.split, s.views, path=s.path)
        self.n_views = len(self.views)
        self.every_view = self.views == list(range(len(meta.stored_views(s.split))))

    def blocks(self, gen: torch.Generator | None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        with open_split(self.s.path, self.s.split) as (ds, labels, chunk):
            labels = _kept(labels, self.s.keep)
            n_chunks = math.ceil(len(labels) / chunk)
            order = torch.randperm(n_chunks, generator=gen) if gen is not None else torch.arange(n_chunks)
            for group in order.split(max(1, self.BLOCK_ROWS // chunk)):
                rows = [(c * chunk, min((c + 1) * chunk, len(labels))) for c in sorted(group.tolist())]
                x = np.concatenate([ds[a:b] for a, b in rows])
                if not self.every_view:
                    x = np.ascontiguousarray(x[:, self.views])
                if not np.isfinite(x).all():
                    raise FeatxError(f"{self.s.path}: split {self.s.split!r} holds NaN/inf features; "
                                     "re-extract (try --precision fp32)")
                y = np.concatenate([labels[a:b] for a, b in rows])
                yield torch.from_numpy(x).to(self.device), torch.from_numpy(y).to(self.device)


def _source(f: Features | StreamedSplit, device: torch.device) -> _InMemory | _Streamed:
    return _InMemory(f, device) if isinstance(f, Features) else _Streamed(f, device)


def _labels(f: Features | StreamedSplit) -> np.ndarray:
    if isinstance(f, Features):
        return f.labels
    with open_split(f.path, f.split) as (_, labels, _):
        return _kept(labels, f.keep)


def _kept(labels: np.ndarray, keep: np.ndarray | None) -> np.ndarray:
    return labels if keep is None else np.where(keep, labels, -1)


def _only(f: Features | StreamedSplit, keep: np.ndarray) -> Features | StreamedSplit:
    """The split with the labels of the rows outside `keep` hidden: training and evaluation skip those rows."""
    if isinstance(f, Features):
        return dataclasses.replace(f, labels=_kept(f.labels, keep))
    return dataclasses.replace(f, keep=keep if f.keep is None else f.keep & keep)


def _batches(src, gen: torch.Generator, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Shuffled labelled rows of each block, each row as one view drawn at random from those stored."""
    for x, y in src.blocks(gen):
        rows = (y >= 0).nonzero().squeeze(1).cpu()
        order = rows[torch.randperm(len(rows), generator=gen)].to(x.device)
        n_views = x.shape[1]
        flat = order * n_views + torch.randint(n_views, (len(order),), generator=gen).to(x.device)
        rows_by_view = x.view(-1, x.shape[-1])  # index_select on this is ~10x faster than x[idx, view]
        for idx, pick in zip(order.split(batch_size), flat.split(batch_size)):
            yield rows_by_view.index_select(0, pick), y[idx]


def _pieces(src, rows: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """All rows in stored order, `rows` at a time."""
    for x, y in src.blocks(None):
        yield from zip(x.split(rows), y.split(rows))


@torch.no_grad()
def _standardization(src) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension mean and std over every stored row and view of the training split."""
    total, sq, n = 0.0, 0.0, 0
    for x, _ in _pieces(src, 4096):
        x = x.reshape(-1, x.shape[-1]).double()
        total, sq, n = total + x.sum(0), sq + (x * x).sum(0), n + len(x)
    mean = total / n
    return mean.float(), (sq / n - mean * mean).clamp_min(0).sqrt().float()


@torch.no_grad()
def evaluate(heads: StackedHeads, src) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per head: cross-entropy, top-1 and top-5 of the view-averaged softmax over the labelled rows."""
    loss = top1 = top5 = 0
    n = 0
    # ~2048 view-rows per forward: big enough for efficient matmuls, small enough that the allocator reuses
    # buffers instead of mapping fresh pages for each piece
    for x, y in _pieces(src, max(1, 2048 // src.n_views)):
        keep = y >= 0
        x, y = x[keep], y[keep]
        probs = heads.predict_proba(x)
        p_true = probs.gather(-1, y.view(1, -1, 1).expand(probs.shape[0], -1, 1)).squeeze(-1)
        loss = loss - p_true.clamp_min(1e-12).log().sum(1)
        rank = label_rank(probs, y)
        top1, top5, n = top1 + (rank <= 1).sum(1), top5 + (rank <= 5).sum(1), n + len(y)
    return tuple((t / n).double().cpu().numpy() for t in (loss, top1, top5))


# --- training ----------------------------------------------------------------------------------------


def _check_heads(heads: Sequence[HeadConfig], head: str) -> None:
    if head not in TRAINED_HEADS:
        raise FeatxError(f"--head {head}: choose one of {', '.join(TRAINED_HEADS)}")
    for c in heads:
        if not (c.lr > 0 and c.weight_decay >= 0 and 0 <= c.label_smoothing < 1 and 0 <= c.dropout < 1):
            raise FeatxError(f"head {c.label()}: need lr > 0, weight decay >= 0, label smoothing and dropout in [0, 1)")


def _check(features: Features | StreamedSplit, val: Features | StreamedSplit, heads: Sequence[HeadConfig],
           head: str) -> None:
    _check_heads(heads, head)
    require_same_extraction(features, val)
    if not (_labels(val) >= 0).any():
        raise FeatxError(f"{val.path}: split {val.split!r} has no labels to validate on; "
                         "extract a labelled split (e.g. --splits train,val)")
    if not (_labels(features) >= 0).any():
        raise FeatxError(f"{features.path}: split {features.split!r} has no labels to train on")


def train(features: Features | StreamedSplit, *, val: Features | StreamedSplit,
          heads: Sequence[HeadConfig] = (HeadConfig(),), head: TrainedHead = "linear", hidden: int = 1024,
          optimizer: Optimizer = "adam", lr_decay: float = 0.713, schedule: ProbeSchedule = "exponential",
          epochs: int = 10, batch_size: int = 100, normalize: Normalize = "none", seed: int = 0,
          device: Device = "auto", feature_sets: Sequence[str] = (ALL,),
          on_eval: Callable[[int, int, FeatureSetHeads, np.ndarray, np.ndarray], None] | None = None,
          eval_every: int | None = None, progress: bool = False) -> ProbeResult:
    """Train one head per config and feature set on `features`, all over the same minibatches, validating on
    `val`. Heads are numbered set by set: head s * len(heads) + c is config c on feature_sets[s].

    Each step draws one stored view per training image (load with views="full" to train on full images);
    validation averages the softmax over `val`'s views. `on_eval(epoch, step, heads, val_top1, val_top5)` runs
    after each validation (the CLI saves snapshots there): at the end of every epoch and, with `eval_every`,
    also every that many steps (counted from the start of training). `feature_sets` ("all", "last2", ...; see
    featx.features.feature_set_columns): each set's heads are a stack of their own on its columns.
    """
    _check(features, val, heads, head)
    start = time.perf_counter()
    dev = resolve_device(device)
    train_src, val_src = _source(features, dev), _source(val, dev)
    meta = features.meta
    n_train = int((_labels(features) >= 0).sum())
    columns = [feature_set_columns(meta, s, path=features.path) for s in feature_sets]
    dims = [len(range(_dim(features))[c]) for c in columns]
    stacks = [StackedHeads(heads=len(heads), in_dim=d, num_classes=len(meta.classes),
                           hidden=hidden if head == "mlp" else 0, dropout=[c.dropout for c in heads],
                           normalize=normalize, seed=seed).to(dev) for d in dims]
    model = FeatureSetHeads(stacks, columns)
    if normalize == "standard":
        mean, std = _standardization(train_src)
        for stack, c in zip(stacks, columns):
            stack.set_standardization(mean[c], std[c])
    opts = [HeadOptimizer(s, kind=optimizer, lr=[c.lr for c in heads], weight_decay=[c.weight_decay for c in heads])
            for s in stacks]
    scheds = [make_scheduler(o.opt, schedule, steps_per_epoch=math.ceil(n_train / batch_size), epochs=epochs,
                             decay=lr_decay) for o in opts]
    n_heads = len(heads) * len(columns)
    smoothing = torch.tensor([c.label_smoothing for c in heads] * len(columns), device=dev)
    with_dropout = any(c.dropout > 0 for c in heads)
    gen = torch.Generator().manual_seed(seed)  # minibatch order and views: the same for every head
    # a generator per feature set, so that each set's heads see the dropout masks they would see alone
    noise_gens = [torch.Generator(device=dev).manual_seed(seed) for _ in dims]
    history: list[list[dict]] = [[] for _ in range(n_heads)]
    status = ["ok"] * n_heads
    step = 0

    def stop(h: int, why: str) -> None:
        opt, local = opts[h // len(heads)], h % len(heads)
        if opt.active[local]:
            opt.stop(local)
            status[h] = why

    def active() -> list[bool]:
        return [a for opt in opts for a in opt.active]

    def validate(epoch: int) -> tuple[np.ndarray, ...]:
        # A step can turn weights NaN/inf with a finite loss, and the epoch's last step has no next loss to
        # show it: such a head is stopped before it is evaluated, let alone saved.
        for s, stack in enumerate(stacks):
            for local in (~stack.finite_heads()).nonzero().flatten().tolist():
                stop(s * len(heads) + local, f"stopped in epoch {epoch}: its weights turned NaN/inf")
        model.eval()
        val_loss, val_top1, val_top5 = evaluate(model, val_src)
        if on_eval is not None:
            on_eval(epoch, step, model, np.where(active(), val_top1, np.nan), np.where(active(), val_top5, np.nan))
        model.train()
        return val_loss, val_top1, val_top5

    for epoch in tqdm(range(1, epochs + 1), desc="probe", unit="epoch", disable=not progress):
        model.train()
        loss_sum = torch.zeros(n_heads, device=dev, dtype=torch.float64)
        correct = torch.zeros(n_heads, device=dev, dtype=torch.long)
        seen = 0
        for i, (x, y) in enumerate(_batches(train_src, gen, batch_size)):
            if eval_every and step % eval_every == 0 and i:  # the epoch's end validates anyway
                validate(epoch)
            noise = [torch.rand((len(x), d), generator=g, device=dev) for d, g in zip(dims, noise_gens)] \
                if with_dropout else None
            logits = model(x, noise)
            loss = smoothed_cross_entropy(logits, y, smoothing)
            loss.sum().backward()
            # one host sync per step, so a diverged head is frozen before its NaN reaches the optimizer state
            for h in (~torch.isfinite(loss.detach())).nonzero().flatten().tolist():
                stop(h, f"stopped in epoch {epoch}: training loss turned NaN")
            for opt, sched in zip(opts, scheds):
                opt.step()
                sched.step()
            step += 1
            loss_sum += loss.detach().double() * len(y)
            correct += (logits.detach().argmax(-1) == y).sum(1)
            seen += len(y)
        val_loss, val_top1, val_top5 = validate(epoch)
        train_loss, train_top1 = (loss_sum / seen).cpu().numpy(), (correct.double() / seen).cpu().numpy()
        for h, (hist, ok) in enumerate(zip(history, active())):
            hist.append({"epoch": epoch, **{k: float(v[h]) if ok else math.nan for k, v in [
                ("train_loss", train_loss), ("train_top1", train_top1), ("val_loss", val_loss),
                ("val_top1", val_top1), ("val_top5", val_top5)]}})
    best, best_epoch = _best(history)
    return ProbeResult(model, list(heads) * len(columns), history, status, best, best_epoch,
                       time.perf_counter() - start, feature_sets=[s for s in feature_sets for _ in heads])


def _dim(f: Features | StreamedSplit) -> int:
    if isinstance(f, Features):
        return f.features.shape[-1]
    with open_split(f.path, f.split) as (ds, _, _):
        return ds.shape[-1]


def _best(history: list[list[dict]]) -> tuple[int, int]:
    """(head, epoch) with the highest val top-1, then top-5; the earliest on ties."""
    scored = [(-r["val_top1"], -r["val_top5"], h, r["epoch"]) for h, hist in enumerate(history) for r in hist
              if math.isfinite(r["val_top1"])]
    if not scored:
        raise FeatxError("every head diverged (its loss or weights turned NaN/inf), none is saved; lower --lr")
    _, _, h, epoch = min(scored)
    return h, epoch


# --- the CLI's run -----------------------------------------------------------------------------------


def _fits_in_memory(path: Path, views: dict[str, str], device: torch.device) -> bool:
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


@one_writer("out")
def run_probe(*, features: str | Path, out: str | Path, heads: Sequence[HeadConfig], head: ProbeHead = "linear",
              hidden: int = 1024, optimizer: Optimizer = "adam", lr_decay: float = 0.713,
              schedule: ProbeSchedule = "exponential", epochs: int = 10, batch_size: int = 100,
              train_views: ViewSelection = "all", eval_views: ViewSelection = "all", normalize: Normalize = "none",
              seed: int = 0, device: Device = "auto", save: SaveMode = "best", keep: int = 20,
              snapshot_every: int | None = None, stream: bool = False, select: str = "holdout:0.1",
              k: Sequence[int] = (10, 20, 100), feature_sets: Sequence[str] = (ALL,), force: bool = False,
              progress: bool = False) -> ProbeResult:
    """`featx probe`: fit the heads (trained, or k-NN/NCM) on the file's train split, choose the head, epoch and
    k on the selection split (`select`: a stratified holdout of train, or val), score val once, write the run.

    `train_views`, `eval_views`: "all" (every deterministic view), "full" or a comma list of stored view names
    (augmented views train only). Snapshots are offered after every epoch and, with `snapshot_every`, every
    that many steps; the `keep` best of each head are kept, and run.json's best is the best of them all.
    `feature_sets`: the columns heads see (see featx.features.feature_set_columns); several sweep in one pass.
    An existing run in `out` follows featx.outputs' contract: up to date when finished with the same settings
    (its recorded result is returned), refused when made with others unless `force`."""
    path = Path(features)
    meta = read_meta(path)
    feature_sets = _check_feature_sets(meta, feature_sets, path=path, head=head)
    have = feature_splits(path)
    for split in ("train", "val"):
        if split not in have:
            raise FeatxError(f"{path}: no {split!r} split (has {', '.join(have)}); "
                             "extract it with `featx extract --splits train,val`")
    if keep < 1:
        raise FeatxError(f"--keep {keep}: keep at least 1 checkpoint")
    if head not in PROBE_HEADS:
        raise FeatxError(f"--head {head}: choose one of {', '.join(PROBE_HEADS)}")
    if head in TRAINED_HEADS:
        _check_heads(heads, head)  # before anything is written to `out`
    if head == "knn" and (not k or min(k) < 1):
        raise FeatxError(f"--k {','.join(map(str, k))}: give neighbour counts >= 1 (e.g. 10,20,100)")
    if snapshot_every is not None and snapshot_every < 1:
        raise FeatxError(f"--snapshot-every {snapshot_every}: give a number of steps, 1 or more")
    fraction = parse_select(select)
    views = {"train": train_views, "val": eval_views}
    for split, which in views.items():  # a misnamed view fails here, before any training
        select_views(meta, split, which, path=path)
    stream = stream or not _fits_in_memory(path, views, resolve_device(device))
    train_split, val_split = (_split(path, s, v, stream) for s, v in views.items())
    dim, n_classes = _dim(train_split), len(meta.classes)
    if head in ("knn", "ncm"):  # k-NN checkpoints hold the training bank, NCM's the class means
        need = len(k) * _labels(train_split).size * (dim + 1) * 4 if head == "knn" else (dim + 1) * n_classes * 4
    else:
        params = (dim + 1) * hidden + (hidden + 1) * n_classes if head == "mlp" else (dim + 1) * n_classes
        need = len(heads) * len(feature_sets) * keep * params * 4  # every head's snapshots (at most all columns)
    require_space(Path(out) / "run.json", need)
    if not (_labels(val_split) >= 0).any():
        raise FeatxError(f"{path}: split 'val' has no labels to validate on; "
                         "extract a labelled split (e.g. --splits train,val)")
    held = None if fraction is None else holdout_rows(_labels(train_split), fraction, seed)
    chosen_by = select  # what the run selects on: the user's option, or val where the holdout is too small
    if held is not None and selection_too_small(_labels(train_split), held, len(meta.classes)):
        held, chosen_by = None, "val"
    if held is None:
        fit, chosen_on = train_split, val_split
    else:
        fit = _only(train_split, ~held)
        chosen_on = _only(train_split if train_views == eval_views else _split(path, "train", eval_views, stream),
                          held)
    config = {"features": str(path), "head": head, "hidden": hidden if head == "mlp" else 0, "optimizer": optimizer,
              "lr_decay": lr_decay, "schedule": schedule, "epochs": epochs, "batch_size": batch_size,
              "train_views": train_views, "eval_views": eval_views, "normalize": normalize, "seed": seed,
              "device": device, "save": save, "keep": keep, "snapshot_every": snapshot_every, "stream": stream,
              "select": select, "feature_sets": feature_sets}
    if head == "knn":
        config["k"] = list(k)
    feature_info = {"path": str(path.resolve()), "identity": meta.identity(), "backbone": meta.backbone,
                    "weights": meta.weights, "views": meta.views, "dataset": meta.dataset,
                    "dataset_fingerprint": meta.dataset_fingerprint}
    dim, n_classes = _dim(train_split), len(meta.classes)
    params = (dim + 1) * hidden + (hidden + 1) * n_classes if head == "mlp" else (dim + 1) * n_classes
    require_space(Path(out) / "run.json", len(heads) * keep * params * 4)  # every head's snapshots, until the end
    recorded = {**config, "heads": [dataclasses.asdict(c) for c in heads]}
    action = decide(out, _existing_probe(Path(out)), _probe_settings(recorded, feature_info), force=force)
    if action == "up to date":
        return recorded_result(Path(out))
    written = target(out, forced=(Path(out) / "run.json").exists())
    run_dir = start_run(written, kind="probe", config=recorded, features=feature_info)
    # step-numbered names only when snapshots are taken within epochs, so that per-epoch runs keep theirs
    name = "head{key:02d}-epoch{epoch:03d}" + ("-step{step:06d}" if snapshot_every else "") + ".pt"
    snapshots = Snapshots(run_dir, keep=keep, name=name)
    common = {"features": feature_info, "classes": meta.classes}

    if head in ("knn", "ncm"):
        bank = load_features(path, "train", views="full")  # as DINO: the training images' centre view only
        result = _fit_neighbors(bank if held is None else _only(bank, ~held), chosen_on, head=head, ks=k,
                                device=device, feature_set=feature_sets[0])
        for h, hist in enumerate(result.history):
            r = hist[0]
            snapshots.offer(h, 1, r["val_top1"], r["val_top5"], lambda h=h, r=r: {
                **_neighbor_payload(result.heads.stacks[0], head, h), "config": {**config, "feature_set":
                feature_sets[0]}, **common, "epoch": 1, "val_top1": r["val_top1"], "val_top5": r["val_top5"]})
    else:
        plan = [(s, c) for s in feature_sets for c in heads]  # train's numbering of the heads

        def on_eval(epoch: int, step: int, model: FeatureSetHeads, top1: np.ndarray, top5: np.ndarray) -> None:
            for h, (fs, c) in enumerate(plan):
                snapshots.offer(h, epoch, float(top1[h]), float(top5[h]), lambda h=h, fs=fs, c=c: {
                    "format": HEAD_FORMAT, "normalize": normalize, "state": model.head_state(h),
                    "config": {**config, **dataclasses.asdict(c), "feature_set": fs}, **common, "epoch": epoch,
                    "step": step, "val_top1": float(top1[h]), "val_top5": float(top5[h])}, step=step)
            snapshots.prune()

        result = train(fit, val=chosen_on, heads=heads, head=head, hidden=hidden, optimizer=optimizer,
                       lr_decay=lr_decay, schedule=schedule, epochs=epochs, batch_size=batch_size,
                       normalize=normalize, seed=seed, device=device, feature_sets=feature_sets, on_eval=on_eval,
                       eval_every=snapshot_every, progress=progress)
    # Snapshot.rank orders as _best does, so without --snapshot-every this is result's best head and epoch;
    # with it, the best may fall within an epoch.
    top = snapshots.listing()[0]
    result.best, result.best_epoch = top.key, top.epoch
    if save == "best":
        snapshots.retain({top.key})
    result.val = _calibrate_and_score(run_dir, snapshots, chosen_on, val_split, select=chosen_by, device=device)
    best = {"head": top.key, "epoch": top.epoch, "step": top.step, "name": result.names[top.key],
            "config": dataclasses.asdict(result.configs[top.key]) if result.configs else {},
            "feature_set": result.feature_sets[top.key],
            "select": chosen_by, "select_top1": top.val_top1, "select_top5": top.val_top5, **result.val,
            "checkpoint": top.file}
    write_metrics(run_dir, [{"index": h, "config": dataclasses.asdict(c) if result.configs else {"name": name},
                             "feature_set": fs, "status": result.status[h], "epochs": result.history[h]}
                            for h, (c, name, fs) in enumerate(zip(result.configs or result.names, result.names,
                                                                  result.feature_sets))], best)
    update_run(run_dir, checkpoints=snapshots.listing(), best=best, seconds=round(result.seconds, 2))
    write_probe_results(run_dir, best, recorded, feature_info, result.seconds, 0 if held is None else int(held.sum()),
                        n_classes)
    promote(run_dir, out)
    return result


PROBE_FREE = ("device", "stream", "features")  # options that leave a probe's results as they are (the file: by identity)


def _probe_settings(config: dict, features: dict) -> dict:
    """A probe run's resolved settings as featx.outputs compares them (JSON-shaped, as run.json holds them)."""
    d = {k: v for k, v in config.items() if k not in PROBE_FREE}
    return json.loads(json.dumps({**d, "features_identity": features["identity"]}))


def _existing_probe(out: Path) -> Existing:
    """What a probe `out` holds, for featx.outputs.decide: finished once run.json records its best."""
    if not (out / "run.json").exists():
        return Existing(None)
    run = read_run(out)
    if run.kind != "probe":
        raise FeatxError(f"--out {out}: holds a `featx {run.kind}` run; choose another --out")
    return Existing(_probe_settings(run.config, run.features or {"identity": None}), complete=run.best is not None)


def recorded_result(run_dir: Path) -> ProbeResult:
    """The ProbeResult a finished run recorded (metrics.json, run.json), for a run found up to date; `heads`
    is None: the weights are in its checkpoints."""
    run = read_run(run_dir)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    hs = metrics["heads"]
    trained = run.config["head"] in TRAINED_HEADS
    configs = [HeadConfig(**{k: h["config"][k] for k in ("lr", "weight_decay", "label_smoothing", "dropout")})
               for h in hs] if trained else []
    best = run.best
    val = {k: best[k] for k in ("val_top1", "val_top1_interval", "val_top5", "val_ece", "val_ece_calibrated",
                                "temperature")}
    return ProbeResult(heads=None, configs=configs, history=[h["epochs"] for h in hs], status=[h["status"] for h in hs],
                       best=best["head"], best_epoch=best["epoch"], seconds=run.seconds or 0.0,
                       names=[] if trained else [h["config"]["name"] for h in hs],
                       val=val, feature_sets=[h["feature_set"] for h in hs])


def write_probe_results(run_dir: Path, best: dict, config: dict, features: dict, seconds: float, held: int,
                        classes: int) -> dict:
    """results.json of a probe run (featx.runs.write_results)."""
    select = best["select"]
    return write_results(run_dir, kind="probe", split="val", top1=best["val_top1"],
                         top1_interval=best["val_top1_interval"], top5=best["val_top5"],
                         selection={"protocol": "holdout of train" if select != "val" else "val (optimistic)",
                                    "select": select, "images": held or None, "top1": best["select_top1"],
                                    "chosen": {k: best[k] for k in ("head", "epoch", "step", "name", "feature_set")}},
                         views=config["eval_views"], settings=config, seconds={"train": seconds},
                         calibration={k: best[k] for k in ("val_ece", "val_ece_calibrated", "temperature")},
                         features=features, classes=classes)


def _split(path: Path, split: str, views: str, stream: bool) -> Features | StreamedSplit:
    return StreamedSplit(path, split, views) if stream else load_features(path, split, views=views)


def _check_feature_sets(meta: FeatureMeta, feature_sets: Sequence[str], *, path: Path, head: str) -> list[str]:
    """The distinct sets, each checked against the file's layout; k-NN and NCM take one."""
    sets = list(dict.fromkeys(feature_sets))
    for s in sets:
        feature_set_columns(meta, s, path=path)
    if not sets or (head in ("knn", "ncm") and len(sets) > 1):
        raise FeatxError(f"--feature-set {','.join(sets)}: --head {head} takes exactly one feature set")
    return sets


def probe_heads(ckpts: Sequence[dict], meta: FeatureMeta, *, path: str | Path) -> FeatureSetHeads:
    """A run's checkpoints as one module giving a head per checkpoint, in order: checkpoints of one feature set
    stacked (see featx.neighbors.heads_from_checkpoints), each stack reading its set's columns."""
    sets = [c.get("config", {}).get("feature_set", ALL) for c in ckpts]
    names = list(dict.fromkeys(sets))
    groups = [[i for i, s in enumerate(sets) if s == name] for name in names]
    stacked = [i for g in groups for i in g]
    return FeatureSetHeads([heads_from_checkpoints([ckpts[i] for i in g]) for g in groups],
                           [feature_set_columns(meta, name, path=path) for name in names],
                           order=None if len(groups) == 1 else [stacked.index(i) for i in range(len(ckpts))])


# --- k-NN and nearest class mean ---------------------------------------------------------------------


def _fit_neighbors(bank: Features, chosen_on: Features | StreamedSplit, *, head: str, ks: Sequence[int],
                   device: str, feature_set: str = ALL) -> ProbeResult:
    """k-NN (a head per k) or NCM on the labelled rows of `bank` (full view), scored on `chosen_on`."""
    start = time.perf_counter()
    dev = resolve_device(device)
    rows = bank.labels >= 0
    columns = feature_set_columns(bank.meta, feature_set, path=bank.path)
    x = torch.from_numpy(bank.features[rows, 0][:, columns]).to(dev)
    y = torch.from_numpy(bank.labels[rows]).to(dev)
    n_classes = len(bank.meta.classes)
    model = FeatureSetHeads([KNNHeads(x, y, num_classes=n_classes, ks=ks) if head == "knn"
                             else NCMHead.fit(x, y, n_classes)], [columns])
    loss, top1, top5 = evaluate(model, _source(chosen_on, dev))
    history = [[{"epoch": 1, "train_loss": math.nan, "train_top1": math.nan, "val_loss": float(loss[h]),
                 "val_top1": float(top1[h]), "val_top5": float(top5[h])}] for h in range(model.num_heads)]
    best, _ = _best(history)
    names = [f"k={k_}" for k_ in ks] if head == "knn" else ["ncm"]
    return ProbeResult(model, [], history, ["ok"] * len(history), best, 1, time.perf_counter() - start, names,
                       feature_sets=[feature_set] * len(history))


def _neighbor_payload(model: KNNHeads | NCMHead, head: str, h: int) -> dict:
    if head == "knn":
        return {"format": KNN_FORMAT, "state": model.state(), "k": model.ks[h], "temperature": model.temperature}
    return {"format": NCM_FORMAT, "state": model.state(), "temperature": TEMPERATURE}


# --- after selection: calibration and the one score on val -------------------------------------------


@torch.no_grad()
def _probabilities(model, src) -> tuple[np.ndarray, np.ndarray]:
    """(H, N, C) view-averaged probabilities of every head over the labelled rows, and their labels."""
    probs, labels = [], []
    for x, y in _pieces(src, max(1, 2048 // src.n_views)):
        keep = y >= 0
        probs.append(model.predict_proba(x[keep]).float().cpu())
        labels.append(y[keep].cpu())
    return torch.cat(probs, 1).numpy(), torch.cat(labels).numpy()


def _calibrate_and_score(run_dir: Path, snapshots: Snapshots, chosen_on, val, *, select: str,
                         device: str) -> dict:
    """Fit each kept checkpoint's temperature on the selection split and store it in the checkpoint; then score
    the best checkpoint on val, once: top-1 (with its 95% bootstrap interval), top-5, ECE before and after."""
    dev = resolve_device(device)
    listing = snapshots.listing()
    ckpts = [load_checkpoint(run_dir / s.file) for s in listing]
    meta, path = chosen_on.meta, chosen_on.path
    probs, labels = _probabilities(probe_heads(ckpts, meta, path=path).to(dev).eval(), _source(chosen_on, dev))
    for s, c, p in zip(listing, ckpts, probs):
        c["calibration"] = {"temperature": calibration_temperature(p, labels), "fitted_on": select}
        with replacing(run_dir / s.file) as tmp:
            torch.save(c, tmp)
    probs, labels = _probabilities(probe_heads(ckpts[:1], meta, path=path).to(dev).eval(), _source(val, dev))
    rank = label_rank(torch.from_numpy(probs), torch.from_numpy(labels))[0].numpy()
    calibrated = apply_temperature(probs[0], ckpts[0]["calibration"]["temperature"])
    return {"val_top1": float((rank <= 1).mean()), "val_top1_interval": bootstrap_interval(rank <= 1),
            "val_top5": float((rank <= 5).mean()), "val_ece": expected_calibration_error(probs[0], labels),
            "val_ece_calibrated": expected_calibration_error(calibrated, labels),
            "temperature": ckpts[0]["calibration"]["temperature"]}


def format_table(result: ProbeResult) -> str:
    """Selection-split top-1/top-5 of each head at its best epoch; the chosen head marked with *."""
    sets = set(result.feature_sets) != {ALL}  # a column of its own only when the run chose sets
    lines = [f"  {'#':>3}" + (f" {'set':>9}" if sets else "") +
             (f" {'lr':>9} {'wd':>9} {'ls':>5} {'drop':>5}" if result.configs else f" {'head':>21}") +
             f" {'sel top-1':>9} {'sel top-5':>9} {'epoch':>5}"]
    for h, (name, hist) in enumerate(zip(result.names, result.history)):
        finite = [r for r in hist if math.isfinite(r["val_top1"])]
        r = max(finite, key=lambda r: (r["val_top1"], r["val_top5"]), default=None)
        scores = f"{r['val_top1']:9.2%} {r['val_top5']:9.2%} {r['epoch']:5d}" if r else f"{'-':>9} {'-':>9} {'-':>5}"
        note = "" if result.status[h] == "ok" else f"  {result.status[h]}"
        mark = "*" if h == result.best else " "
        if result.configs:
            c = result.configs[h]
            head = f"{c.lr:>9.3g} {c.weight_decay:>9.3g} {c.label_smoothing:>5.3g} {c.dropout:>5.3g}"
        else:
            head = f"{name.removeprefix(result.feature_sets[h] + ' '):>21}"
        if sets:
            head = f"{result.feature_sets[h]:>9} {head}"
        lines.append(f"{mark} {h:>3} {head} {scores}{note}")
    return "\n".join(lines)


def format_summary(result: ProbeResult, select: str) -> str:
    """The chosen head, where it was chosen, and its one score on val with interval and calibration."""
    v, chosen = result.val, result.best_metrics
    where = "selected on val (optimistic)" if select == "val" else \
        f"selected on {select} of train (top-1 {chosen['val_top1']:.2%})"
    lo, hi = v["val_top1_interval"]
    return (f"probe: best {result.names[result.best]} (epoch {result.best_epoch}), {where}: val top-1 "
            f"{v['val_top1']:.2%} [95% CI {lo:.2%}, {hi:.2%}], top-5 {v['val_top5']:.2%}; ECE {v['val_ece']:.3f}, "
            f"{v['val_ece_calibrated']:.3f} at temperature {v['temperature']:.2f}")
