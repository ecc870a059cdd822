"""Stage 2's training loop: one head per config and feature set, all trained over the same minibatches.

    from featx.features.store import load_features
    from featx.probe.sweep import HeadConfig, grid, train
    result = train(load_features(f, "train"), val=load_features(f, "val"),
                   heads=grid(lr=[1e-4, 6.5e-4], weight_decay=[0, 0.0116]))
    result.best, result.history[result.best]

The heads of a feature set form one StackedHeads (featx.nets.heads), so a sweep costs little more than one head. A head
whose loss or weights turn NaN/inf stops alone; the others go on.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import cast

import numpy as np
import torch
from torch.optim.lr_scheduler import LambdaLR

from featx.core.choices import TRAINED_HEADS, Device, Normalize, Optimizer, ProbePrecision, ProbeSchedule, TrainedHead
from featx.core.configs import DEFAULT_SWEEP, HYPERPARAMETERS, HeadConfig, ProbeConfig
from featx.core.device import resolve_device, resolve_precision
from featx.core.errors import FeatxError
from featx.core.progress import progress_bar
from featx.features.batches import (
    Source,
    StreamedSplit,
    batch_source,
    batches,
    feature_dim,
    pieces,
    scoring_pieces,
    split_labels,
)
from featx.features.store import ALL, Features, feature_set_columns, require_same_extraction
from featx.nets.heads import FeatureSetHeads, HeadOptimizer, StackedHeads, label_rank, smoothed_cross_entropy
from featx.nets.optim import lr_factor


def grid(
    *,
    lr: Sequence[float] = (HeadConfig.lr,),
    weight_decay: Sequence[float] = (HeadConfig.weight_decay,),
    label_smoothing: Sequence[float] = (HeadConfig.label_smoothing,),
    dropout: Sequence[float] = (HeadConfig.dropout,),
    lr_decay: Sequence[float] = (HeadConfig.lr_decay,),
) -> list[HeadConfig]:
    """Every combination, lr varying slowest; what is not given keeps the transfer-learning report's value
    (HeadConfig)."""
    return [HeadConfig(*c) for c in itertools.product(lr, weight_decay, label_smoothing, dropout, lr_decay)]


def head_grid(config: ProbeConfig) -> list[HeadConfig]:
    """The heads a probe config trains: the default sweep when it gives no hyperparameter; else every
    combination of those it gives, the others at the transfer-learning report's values (HeadConfig)."""
    given = {h: getattr(config, h) for h in HYPERPARAMETERS if getattr(config, h) is not None}
    sweep = given or DEFAULT_SWEEP
    reported = HeadConfig()
    return grid(**{h: sweep.get(h, (getattr(reported, h),)) for h in HYPERPARAMETERS}, lr_decay=config.lr_decay)


@dataclass
class ProbeResult:
    heads: FeatureSetHeads | None  # final weights of every head, on the training device; None: read from files
    configs: list[HeadConfig]  # per head
    history: list[list[dict]]  # per head, per epoch: epoch, train_loss, train_top1, val_loss, val_top1, val_top5
    status: list[str]  # per head: "ok" or why it stopped
    best: int  # index of the head with the highest val top-1 (at its best epoch)
    best_epoch: int
    seconds: float
    names: list[str] = dataclasses.field(default_factory=list)  # per head, for tables; default: its config
    val: dict = dataclasses.field(default_factory=dict)  # run_probe: the selected checkpoint scored once on val
    feature_sets: list[str] = dataclasses.field(default_factory=list)  # per head; default: all
    selected_on: str | None = None  # run_probe: where the choice was made (holdout:F, val, or none)
    scored_on: str | None = None  # run_probe: the split `val` scores (val, or without it the holdout; None: none)

    def __post_init__(self):
        self.feature_sets = self.feature_sets or [ALL] * len(self.history)
        swept = set(self.feature_sets) != {ALL}
        self.names = self.names or [
            f"{s} {c.label()}" if swept else c.label() for s, c in zip(self.feature_sets, self.configs)
        ]

    @property
    def best_metrics(self) -> dict:
        return self.history[self.best][self.best_epoch - 1]


@torch.no_grad()
def evaluate(model: FeatureSetHeads, src: Source) -> tuple[np.ndarray, ...]:
    """Per head: cross-entropy, top-1 and top-5 of the view-averaged softmax over the labelled rows."""
    loss = top1 = top5 = torch.zeros(())  # per-head sums once the first piece is added
    n = 0
    for x, y in scoring_pieces(src):
        probs = model.predict_proba(x)
        p_true = probs.gather(-1, y.view(1, -1, 1).expand(probs.shape[0], -1, 1)).squeeze(-1)
        loss = loss - p_true.clamp_min(1e-12).log().sum(1)
        rank = label_rank(probs, y)
        top1, top5, n = top1 + (rank <= 1).sum(1), top5 + (rank <= 5).sum(1), n + len(y)
    return tuple((t / n).double().cpu().numpy() for t in (loss, top1, top5))


def best_head(history: list[list[dict]]) -> tuple[int, int]:
    """(head, epoch) with the highest val top-1, then top-5; the earliest on ties."""
    scored = [
        (-r["val_top1"], -r["val_top5"], h, r["epoch"])
        for h, hist in enumerate(history)
        for r in hist
        if math.isfinite(r["val_top1"])
    ]
    if not scored:
        raise FeatxError("every head diverged (its loss or weights turned NaN/inf), none is saved; lower --lr")
    _, _, h, epoch = min(scored)
    return h, epoch


def _check(features: Features | StreamedSplit, val: Features | StreamedSplit, head: str) -> None:
    if head not in TRAINED_HEADS:  # k-NN and NCM are fitted, not trained (featx.probe.neighbors)
        raise FeatxError(f"--head {head}: choose one of {', '.join(TRAINED_HEADS)}")
    require_same_extraction(features, val)
    if not (split_labels(val) >= 0).any():
        raise FeatxError(
            f"{val.path}: split {val.split!r} has no labels to validate on; "
            "extract a labelled split (e.g. --splits train,val)"
        )
    if not (split_labels(features) >= 0).any():
        raise FeatxError(f"{features.path}: split {features.split!r} has no labels to train on")


def check_epoch_views(n_views: int, epochs: int) -> None:
    """--epoch-views trains epoch e on view e: it needs a view for every epoch."""
    if n_views < epochs:
        raise FeatxError(
            f"--epoch-views: {n_views} training views for --epochs {epochs}; each epoch needs a view of its own: "
            "extract at least as many (--aug-views) or train fewer epochs"
        )


@torch.no_grad()
def _standardization(src: Source) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension mean and std over every stored row and view of the training split."""
    total = sq = torch.zeros((), dtype=torch.float64)
    n = 0
    for x, _ in pieces(src, 4096):
        x = x.reshape(-1, x.shape[-1]).double()
        total, sq, n = total + x.sum(0), sq + (x * x).sum(0), n + len(x)
    mean = total / n
    return mean.float(), (sq / n - mean * mean).clamp_min(0).sqrt().float()


def _build(
    features: Features | StreamedSplit,
    train_src: Source,
    columns: list[slice],
    configs: Sequence[HeadConfig],
    config: ProbeConfig,
    device: torch.device,
) -> FeatureSetHeads:
    """A stack of the configs' heads per feature set, each on its columns, standardised on the training split."""
    n_classes = len(features.meta.classes)
    stacks = [
        StackedHeads(
            heads=len(configs),
            in_dim=len(range(feature_dim(features))[c]),
            num_classes=n_classes,
            hidden=config.hidden if config.head == "mlp" else 0,
            dropout=[c.dropout for c in configs],
            normalize=config.normalize,
            seed=config.seed,
        ).to(device)
        for c in columns
    ]
    if config.normalize == "standard":
        mean, std = _standardization(train_src)
        for stack, c in zip(stacks, columns):
            stack.set_standardization(mean[c], std[c])
    return FeatureSetHeads(stacks, columns)


def training_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of the heads' training matmuls, or None for fp32: resolve_precision's, except that the
    heads train in fp32 where auto would pick fp16 (a GPU without bf16), having no loss scaler."""
    dtype = resolve_precision(precision, device)
    return None if dtype == torch.float16 else dtype


OnEval = Callable[[int, int, FeatureSetHeads, np.ndarray, np.ndarray], None]


class _Loop:
    """The state of a sweep as it trains: an optimizer and schedule per stack, each head's status, the step."""

    def __init__(
        self,
        model: FeatureSetHeads,
        configs: Sequence[HeadConfig],
        val_src: Source,
        config: ProbeConfig,
        *,
        steps_per_epoch: int,
        device: torch.device,
        on_eval: OnEval | None,
    ):
        self.model, self.per_stack, self.val_src, self.on_eval = model, len(configs), val_src, on_eval
        self.stacks = cast("list[StackedHeads]", list(model.stacks))  # trained heads: StackedHeads only
        self.opts = [
            HeadOptimizer(
                s, kind=config.optimizer, lr=[c.lr for c in configs], weight_decay=[c.weight_decay for c in configs]
            )
            for s in self.stacks
        ]
        # each head's own decay, on its two param groups (weights, biases: HeadOptimizer's order)
        factors = [
            lr_factor(config.schedule, steps_per_epoch=steps_per_epoch, epochs=config.epochs, decay=c.lr_decay)
            for c in configs
            for _ in range(2)
        ]
        self.scheds = [LambdaLR(o.opt, factors) for o in self.opts]
        self.smoothing = torch.tensor([c.label_smoothing for c in configs] * len(model.stacks), device=device)
        self.dims = [s.weights[0].shape[1] for s in self.stacks]
        # a generator per feature set, so that each set's heads see the dropout masks they would see alone
        self.noise_gens = (
            [torch.Generator(device=device).manual_seed(config.seed) for _ in model.stacks]
            if any(c.dropout > 0 for c in configs)
            else None
        )
        self.dtype = training_dtype(config.precision, device)
        self.status = ["ok"] * model.num_heads
        self.step = 0

    def state(self) -> dict:
        """What continues the sweep exactly after an epoch: weights, optimizers, schedules, dropout generators."""
        return {
            "model": self.model.state_dict(),
            "opts": [{"opt": o.opt.state_dict(), "active": o.active} for o in self.opts],
            "scheds": [s.state_dict() for s in self.scheds],
            "noise": [g.get_state() for g in self.noise_gens or []],
            "status": self.status,
            "step": self.step,
        }

    def load(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        for o, saved in zip(self.opts, state["opts"]):
            o.opt.load_state_dict(saved["opt"])
            o.active = saved["active"]
        for s, saved in zip(self.scheds, state["scheds"]):
            s.load_state_dict(saved)
        for g, saved in zip(self.noise_gens or [], state["noise"]):
            g.set_state(saved)
        self.status, self.step = state["status"], state["step"]

    def stop(self, h: int, why: str) -> None:
        opt, local = self.opts[h // self.per_stack], h % self.per_stack
        if opt.active[local]:
            opt.stop(local)
            self.status[h] = why

    def active(self) -> list[bool]:
        return [a for opt in self.opts for a in opt.active]

    def score_val(self, epoch: int) -> tuple[np.ndarray, ...]:
        # A step can turn weights NaN/inf with a finite loss, and the epoch's last step has no next loss to
        # show it: such a head is stopped before it is evaluated, let alone saved.
        for s, stack in enumerate(self.stacks):
            for local in (~stack.finite_heads()).nonzero().flatten().tolist():
                self.stop(s * self.per_stack + local, f"stopped in epoch {epoch}: its weights turned NaN/inf")
        self.model.eval()
        val_loss, val_top1, val_top5 = evaluate(self.model, self.val_src)
        if self.on_eval is not None:
            active = self.active()
            self.on_eval(
                epoch, self.step, self.model, np.where(active, val_top1, np.nan), np.where(active, val_top5, np.nan)
            )
        self.model.train()
        return val_loss, val_top1, val_top5

    def epoch(self, epoch: int, minibatches: Iterator, eval_every: int | None) -> tuple[np.ndarray, np.ndarray]:
        """One pass over `minibatches`; per head, the mean training loss and top-1."""
        self.model.train()
        dev = self.smoothing.device
        loss_sum = torch.zeros(self.model.num_heads, device=dev, dtype=torch.float64)
        correct = torch.zeros(self.model.num_heads, device=dev, dtype=torch.long)
        seen = 0
        for i, (x, y) in enumerate(minibatches):
            if eval_every and self.step % eval_every == 0 and i:  # the epoch's end validates anyway
                self.score_val(epoch)
            noise = (
                None
                if self.noise_gens is None
                else [torch.rand((len(x), d), generator=g, device=dev) for d, g in zip(self.dims, self.noise_gens)]
            )
            # bf16 matmuls (forward and weight gradient) on fp32 weights; the loss and the update in fp32
            with torch.autocast(dev.type, dtype=self.dtype or torch.bfloat16, enabled=self.dtype is not None):
                logits = self.model(x, noise).float()
            loss = smoothed_cross_entropy(logits, y, self.smoothing)
            loss.sum().backward()
            # one host sync per step, so a diverged head is frozen before its NaN reaches the optimizer state
            for h in (~torch.isfinite(loss.detach())).nonzero().flatten().tolist():
                self.stop(h, f"stopped in epoch {epoch}: training loss turned NaN")
            for opt, sched in zip(self.opts, self.scheds):
                opt.step()
                sched.step()
            self.step += 1
            loss_sum += loss.detach().double() * len(y)
            correct += (logits.detach().argmax(-1) == y).sum(1)
            seen += len(y)
        return (loss_sum / seen).cpu().numpy(), (correct.double() / seen).cpu().numpy()


def train(
    features: Features | StreamedSplit,
    *,
    val: Features | StreamedSplit,
    heads: Sequence[HeadConfig] = (HeadConfig(),),
    head: TrainedHead = ProbeConfig.head,  # type: ignore[assignment]  # its default, linear, is a TrainedHead
    hidden: int = ProbeConfig.hidden,
    optimizer: Optimizer = ProbeConfig.optimizer,
    schedule: ProbeSchedule = ProbeConfig.schedule,
    epochs: int = ProbeConfig.epochs,
    batch_size: int = ProbeConfig.batch_size,
    epoch_views: bool = ProbeConfig.epoch_views,
    normalize: Normalize = ProbeConfig.normalize,
    seed: int = ProbeConfig.seed,
    device: Device = ProbeConfig.device,
    precision: ProbePrecision = ProbeConfig.precision,
    feature_sets: Sequence[str] = (ALL,),
    on_eval: OnEval | None = None,
    eval_every: int | None = None,
    progress: bool = False,
    after_epoch: Callable[[dict], None] | None = None,
    resume_from: dict | None = None,
) -> ProbeResult:
    """`fit` with its options as keywords: one head per config of `heads` and feature set, validating every
    `eval_every` steps as well as after each epoch."""
    config = ProbeConfig(
        features=str(features.path),
        head=head,
        hidden=hidden,
        optimizer=optimizer,
        schedule=schedule,
        epochs=epochs,
        batch_size=batch_size,
        epoch_views=epoch_views,
        normalize=normalize,
        seed=seed,
        device=device,
        precision=precision,
        feature_set=tuple(feature_sets),
        snapshot_every=eval_every or None,
    )
    return fit(
        features,
        val=val,
        config=config,
        heads=heads,
        on_eval=on_eval,
        progress=progress,
        after_epoch=after_epoch,
        resume_from=resume_from,
    )


def fit(
    features: Features | StreamedSplit,
    *,
    val: Features | StreamedSplit,
    config: ProbeConfig,
    heads: Sequence[HeadConfig],
    on_eval: OnEval | None = None,
    progress: bool = False,
    after_epoch: Callable[[dict], None] | None = None,
    resume_from: dict | None = None,
) -> ProbeResult:
    """Train one head per config of `heads` and feature set of `config.feature_set` on `features`, all over the
    same minibatches, validating on `val`. Heads are numbered set by set: head s * len(heads) + c is config c on
    feature set s. `config` gives the rest of the probe's options (its features, lr... and selection are the
    caller's: featx.probe.run).

    Each step draws one stored view per training image (load with views="full" to train on full images), or
    with `config.epoch_views` epoch e takes every image's e-th view (there must be at least `epochs`);
    validation averages the softmax over `val`'s views. `on_eval(epoch, step, model, val_top1, val_top5)` runs
    after each validation (the CLI saves snapshots there): at the end of every epoch and, with
    `config.snapshot_every`, also every that many steps (counted from the start of training). Feature sets
    ("all", "last2", ...; see featx.features.store.feature_set_columns): each set's heads are a stack of their
    own on its columns. `after_epoch(state)` receives after every epoch what `resume_from` takes to go on from
    there exactly as an uninterrupted sweep would (featx.probe.run saves it beside the run).
    """
    _check(features, val, config.head)
    start = time.perf_counter()
    dev = resolve_device(config.device)
    train_src = batch_source(features, dev)
    if config.epoch_views:
        check_epoch_views(train_src.n_views, config.epochs)
    feature_sets = config.feature_set
    columns = [feature_set_columns(features.meta, s, path=features.path) for s in feature_sets]
    model = _build(features, train_src, columns, heads, config, dev)
    loop = _Loop(
        model,
        heads,
        batch_source(val, dev),
        config,
        steps_per_epoch=math.ceil(int((split_labels(features) >= 0).sum()) / config.batch_size),
        device=dev,
        on_eval=on_eval,
    )
    gen = torch.Generator().manual_seed(config.seed)  # minibatch order and views: the same for every head
    history: list[list[dict]] = [[] for _ in range(model.num_heads)]
    done = 0
    if resume_from is not None:
        loop.load(resume_from)
        gen.set_state(resume_from["gen"])
        history, done = resume_from["history"], resume_from["epoch"]
    epochs_left = range(done + 1, config.epochs + 1)
    bar = progress_bar(epochs_left, desc="probe", unit="epoch", total=config.epochs, initial=done, enabled=progress)
    for epoch in bar:
        view = epoch - 1 if config.epoch_views else None
        batched = batches(train_src, gen, config.batch_size, view=view)
        train_loss, train_top1 = loop.epoch(epoch, batched, config.snapshot_every)
        val_loss, val_top1, val_top5 = loop.score_val(epoch)
        for h, (hist, ok) in enumerate(zip(history, loop.active())):
            hist.append(
                {
                    "epoch": epoch,
                    **{
                        k: float(v[h]) if ok else math.nan
                        for k, v in [
                            ("train_loss", train_loss),
                            ("train_top1", train_top1),
                            ("val_loss", val_loss),
                            ("val_top1", val_top1),
                            ("val_top5", val_top5),
                        ]
                    },
                }
            )
        if after_epoch is not None:
            after_epoch({**loop.state(), "gen": gen.get_state(), "history": history, "epoch": epoch})
    best, best_epoch = best_head(history)
    return ProbeResult(
        model,
        list(heads) * len(columns),
        history,
        loop.status,
        best,
        best_epoch,
        time.perf_counter() - start,
        feature_sets=[s for s in feature_sets for _ in heads],
    )
