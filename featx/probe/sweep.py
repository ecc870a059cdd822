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

import numpy as np
import torch

from featx.core.choices import TRAINED_HEADS, Device, Normalize, Optimizer, ProbeSchedule, TrainedHead
from featx.core.configs import HeadConfig, ProbeConfig
from featx.core.device import resolve_device
from featx.core.errors import FeatxError
from featx.core.progress import progress_bar
from featx.features.batches import (
    Source,
    StreamedSplit,
    batches,
    feature_dim,
    pieces,
    scoring_pieces,
    source,
    split_labels,
)
from featx.features.store import ALL, Features, feature_set_columns, require_same_extraction
from featx.nets.heads import FeatureSetHeads, HeadOptimizer, StackedHeads, label_rank, smoothed_cross_entropy
from featx.nets.optim import make_scheduler


def grid(
    *,
    lr: Sequence[float] = (HeadConfig.lr,),
    weight_decay: Sequence[float] = (HeadConfig.weight_decay,),
    label_smoothing: Sequence[float] = (HeadConfig.label_smoothing,),
    dropout: Sequence[float] = (HeadConfig.dropout,),
) -> list[HeadConfig]:
    """Every combination, lr varying slowest; what is not given keeps the seed's value (HeadConfig)."""
    return [HeadConfig(*c) for c in itertools.product(lr, weight_decay, label_smoothing, dropout)]


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
def evaluate(heads: FeatureSetHeads, src: Source) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per head: cross-entropy, top-1 and top-5 of the view-averaged softmax over the labelled rows."""
    loss = top1 = top5 = 0
    n = 0
    for x, y in scoring_pieces(src):
        probs = heads.predict_proba(x)
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


def check_heads(heads: Sequence[HeadConfig], head: str) -> None:
    if head not in TRAINED_HEADS:
        raise FeatxError(f"--head {head}: choose one of {', '.join(TRAINED_HEADS)}")
    for c in heads:
        if not (c.lr > 0 and c.weight_decay >= 0 and 0 <= c.label_smoothing < 1 and 0 <= c.dropout < 1):
            raise FeatxError(f"head {c.label()}: need lr > 0, weight decay >= 0, label smoothing and dropout in [0, 1)")


def _check(
    features: Features | StreamedSplit, val: Features | StreamedSplit, heads: Sequence[HeadConfig], head: str
) -> None:
    check_heads(heads, head)
    require_same_extraction(features, val)
    if not (split_labels(val) >= 0).any():
        raise FeatxError(
            f"{val.path}: split {val.split!r} has no labels to validate on; "
            "extract a labelled split (e.g. --splits train,val)"
        )
    if not (split_labels(features) >= 0).any():
        raise FeatxError(f"{features.path}: split {features.split!r} has no labels to train on")


@torch.no_grad()
def _standardization(src: Source) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension mean and std over every stored row and view of the training split."""
    total, sq, n = 0.0, 0.0, 0
    for x, _ in pieces(src, 4096):
        x = x.reshape(-1, x.shape[-1]).double()
        total, sq, n = total + x.sum(0), sq + (x * x).sum(0), n + len(x)
    mean = total / n
    return mean.float(), (sq / n - mean * mean).clamp_min(0).sqrt().float()


def _build(
    features: Features | StreamedSplit,
    train_src: Source,
    columns: list[slice],
    heads: Sequence[HeadConfig],
    *,
    head: str,
    hidden: int,
    normalize: Normalize,
    seed: int,
    device: torch.device,
) -> FeatureSetHeads:
    """A stack of the configs' heads per feature set, each on its columns, standardised on the training split."""
    n_classes = len(features.meta.classes)
    stacks = [
        StackedHeads(
            heads=len(heads),
            in_dim=len(range(feature_dim(features))[c]),
            num_classes=n_classes,
            hidden=hidden if head == "mlp" else 0,
            dropout=[c.dropout for c in heads],
            normalize=normalize,
            seed=seed,
        ).to(device)
        for c in columns
    ]
    if normalize == "standard":
        mean, std = _standardization(train_src)
        for stack, c in zip(stacks, columns):
            stack.set_standardization(mean[c], std[c])
    return FeatureSetHeads(stacks, columns)


OnEval = Callable[[int, int, FeatureSetHeads, np.ndarray, np.ndarray], None]


class _Loop:
    """The state of a sweep as it trains: an optimizer and schedule per stack, each head's status, the step."""

    def __init__(
        self,
        model: FeatureSetHeads,
        heads: Sequence[HeadConfig],
        val_src: Source,
        *,
        optimizer: str,
        schedule: str,
        lr_decay: float,
        steps_per_epoch: int,
        epochs: int,
        seed: int,
        device: torch.device,
        on_eval: OnEval | None,
    ):
        self.model, self.per_stack, self.val_src, self.on_eval = model, len(heads), val_src, on_eval
        self.opts = [
            HeadOptimizer(s, kind=optimizer, lr=[c.lr for c in heads], weight_decay=[c.weight_decay for c in heads])
            for s in model.stacks
        ]
        self.scheds = [
            make_scheduler(o.opt, schedule, steps_per_epoch=steps_per_epoch, epochs=epochs, decay=lr_decay)
            for o in self.opts
        ]
        self.smoothing = torch.tensor([c.label_smoothing for c in heads] * len(model.stacks), device=device)
        self.dims = [s.weights[0].shape[1] for s in model.stacks]
        # a generator per feature set, so that each set's heads see the dropout masks they would see alone
        self.noise_gens = (
            [torch.Generator(device=device).manual_seed(seed) for _ in model.stacks]
            if any(c.dropout > 0 for c in heads)
            else None
        )
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

    def validate(self, epoch: int) -> tuple[np.ndarray, ...]:
        # A step can turn weights NaN/inf with a finite loss, and the epoch's last step has no next loss to
        # show it: such a head is stopped before it is evaluated, let alone saved.
        for s, stack in enumerate(self.model.stacks):
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
                self.validate(epoch)
            noise = (
                None
                if self.noise_gens is None
                else [torch.rand((len(x), d), generator=g, device=dev) for d, g in zip(self.dims, self.noise_gens)]
            )
            logits = self.model(x, noise)
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
    head: TrainedHead = ProbeConfig.head,
    hidden: int = ProbeConfig.hidden,
    optimizer: Optimizer = ProbeConfig.optimizer,
    lr_decay: float = ProbeConfig.lr_decay,
    schedule: ProbeSchedule = ProbeConfig.schedule,
    epochs: int = ProbeConfig.epochs,
    batch_size: int = ProbeConfig.batch_size,
    normalize: Normalize = ProbeConfig.normalize,
    seed: int = ProbeConfig.seed,
    device: Device = ProbeConfig.device,
    feature_sets: Sequence[str] = (ALL,),
    on_eval: OnEval | None = None,
    eval_every: int | None = None,
    progress: bool = False,
    after_epoch: Callable[[dict], None] | None = None,
    resume_from: dict | None = None,
) -> ProbeResult:
    """Train one head per config and feature set on `features`, all over the same minibatches, validating on
    `val`. Heads are numbered set by set: head s * len(heads) + c is config c on feature_sets[s].

    Each step draws one stored view per training image (load with views="full" to train on full images);
    validation averages the softmax over `val`'s views. `on_eval(epoch, step, heads, val_top1, val_top5)` runs
    after each validation (the CLI saves snapshots there): at the end of every epoch and, with `eval_every`,
    also every that many steps (counted from the start of training). `feature_sets` ("all", "last2", ...; see
    featx.features.store.feature_set_columns): each set's heads are a stack of their own on its columns.
    `after_epoch(state)` receives after every epoch what `resume_from` takes to go on from there exactly as an
    uninterrupted sweep would (featx.probe.run saves it beside the run).
    """
    _check(features, val, heads, head)
    start = time.perf_counter()
    dev = resolve_device(device)
    train_src = source(features, dev)
    columns = [feature_set_columns(features.meta, s, path=features.path) for s in feature_sets]
    model = _build(
        features, train_src, columns, heads, head=head, hidden=hidden, normalize=normalize, seed=seed, device=dev
    )
    loop = _Loop(
        model,
        heads,
        source(val, dev),
        optimizer=optimizer,
        schedule=schedule,
        lr_decay=lr_decay,
        steps_per_epoch=math.ceil(int((split_labels(features) >= 0).sum()) / batch_size),
        epochs=epochs,
        seed=seed,
        device=dev,
        on_eval=on_eval,
    )
    gen = torch.Generator().manual_seed(seed)  # minibatch order and views: the same for every head
    history: list[list[dict]] = [[] for _ in range(model.num_heads)]
    done = 0
    if resume_from is not None:
        loop.load(resume_from)
        gen.set_state(resume_from["gen"])
        history, done = resume_from["history"], resume_from["epoch"]
    epochs_left = range(done + 1, epochs + 1)
    for epoch in progress_bar(epochs_left, desc="probe", unit="epoch", total=epochs, initial=done, enabled=progress):
        train_loss, train_top1 = loop.epoch(epoch, batches(train_src, gen, batch_size), eval_every)
        val_loss, val_top1, val_top5 = loop.validate(epoch)
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
