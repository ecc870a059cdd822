"""Stage 3's epoch: one process's share of a finetune run once set up (Training), its optimizer steps over the
images held on the device, and its evaluation on val, offered as a snapshot. featx.finetune.run sets a run up and
records it; this module only trains and scores.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DistributedSampler

from featx.core import runs
from featx.core.device import Dist
from featx.core.errors import FeatxError
from featx.core.progress import progress_bar
from featx.nets.augment import Augment
from featx.nets.heads import topk_correct
from featx.nets.models import MODEL_FORMAT, ModelSpec
from featx.nets.views import render_views

NAN_CHECK_STEPS = 50  # how often the loss is checked for NaN: each check waits for the device


@dataclass
class Training:
    """One process's share of a run, set up: what every epoch reads and updates."""

    d: Dist
    out: Path
    recorded: dict  # the config as run.json and every checkpoint record it
    spec: ModelSpec
    classes: list[str]
    model: nn.Module
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    augment: Augment
    criterion: nn.Module
    train_x: torch.Tensor  # the whole uint8 split on the device: a batch is one gather
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    sampler: DistributedSampler
    steps: int  # optimizer steps per epoch
    per_rank: int  # this process's rows of a global batch
    dtype: torch.dtype
    snapshots: runs.Snapshots
    rows: list[dict]  # the metrics of the epochs done
    start: int  # the first epoch to run
    epochs: int
    snapshot_every: int | None
    eval_batch_size: int
    progress: bool

    @property
    def last_path(self) -> Path:
        return self.out / runs.CHECKPOINTS / "last.pt"


def freeze_body(model: nn.Module, frozen: bool) -> None:
    # A frozen body also keeps its BatchNorm statistics, whatever --bn says: the head trains on the
    # pretrained features.
    model.get_submodule("body").requires_grad_(not frozen)
    model.get_submodule("body").train(not frozen)


def evaluate(model, images, labels, d: Dist, *, spec: ModelSpec, dtype, batch: int) -> tuple[float, float, float]:
    """(loss, top1, top5) over all rows; each process scores rows rank::world, sums are all-reduced."""
    model.eval()
    rows = torch.arange(d.rank, len(labels), d.world, device=images.device)
    loss, top1, top5 = (torch.zeros((), device=d.device) for _ in range(3))
    with torch.no_grad(), torch.autocast(d.device.type, dtype=dtype, enabled=dtype != torch.float32):
        for idx in rows.split(batch):
            x = render_views(
                images[idx].to(d.device, non_blocking=True),
                views=spec.views,
                crop=spec.crop,
                size=spec.size,
                mean=spec.mean,
                std=spec.std,
            )
            y = labels[idx].to(d.device, non_blocking=True)
            logits = model(x).float()
            loss += nn.functional.cross_entropy(logits, y, reduction="sum")
            top1 += topk_correct(logits[None], y, 1)[0]
            top5 += topk_correct(logits[None], y, 5)[0]
    loss_total, top1_total, top5_total = d.sum(loss, top1, top5)
    n = len(labels)
    return loss_total / n, top1_total / n, top5_total / n


def evaluate_and_offer(t: Training, epoch: int, step: int | None) -> tuple[float, float, float]:
    """Score the model on val and offer it as a snapshot; (loss, top1, top5)."""
    val = evaluate(t.model, t.val_x, t.val_y, t.d, spec=t.spec, dtype=t.dtype, batch=t.eval_batch_size)
    if t.d.rank == 0:
        t.snapshots.offer(
            0,
            epoch,
            val[1],
            val[2],
            lambda: {
                "format": MODEL_FORMAT,
                "state": t.model.state_dict(),
                "model": dataclasses.asdict(t.spec),
                "config": t.recorded,
                "classes": t.classes,
                "epoch": epoch,
                "step": step,
                "val_top1": val[1],
                "val_top5": val[2],
            },
            step=step,
        )
    return val


def _check_loss(t: Training, pending: list[torch.Tensor], epoch: int, step: int) -> None:
    """Stop at the first NaN/inf among the losses since the last check, naming its step."""
    bad = torch.stack(pending).isfinite().logical_not()
    if t.d.sum(bad.any())[0]:
        first = step - len(pending) + 1 + (int(bad.int().argmax()) if bad.any() else 0)
        good = f"{t.last_path} (epoch {epoch})" if t.last_path.exists() else "none (first epoch)"
        raise FeatxError(
            f"loss is NaN at epoch {epoch + 1} step {first + 1}; stopped, last good checkpoint: "
            f"{good}; lower --lr or use --precision fp32"
        )


def train_epoch(
    t: Training, net: Callable[..., torch.Tensor], epoch: int, frozen: bool
) -> tuple[float, float, float, float]:
    """One epoch of optimizer steps (0-based `epoch`), snapshots within it as asked; the train loss and top-1
    over all processes, the images seen and the seconds taken."""
    d = t.d
    t.sampler.set_epoch(epoch)
    order = torch.tensor(list(t.sampler), device=d.device)
    loss_sum, correct = torch.zeros((), device=d.device), torch.zeros((), device=d.device)
    pending: list[torch.Tensor] = []
    t0 = time.perf_counter()
    bar = progress_bar(
        range(t.steps), desc=f"epoch {epoch + 1}/{t.epochs}", enabled=t.progress and d.rank == 0, leave=False
    )
    for step in bar:
        idx = order[step * t.per_rank : (step + 1) * t.per_rank]
        x, target = t.augment(t.train_x[idx], t.train_y[idx])
        with torch.autocast(d.device.type, dtype=t.dtype, enabled=t.dtype != torch.float32):
            logits = net(x)
            loss = t.criterion(logits.float(), target)
        t.scaler.scale(loss).backward()
        t.scaler.step(t.opt)
        t.scaler.update()
        t.opt.zero_grad(set_to_none=True)
        t.sched.step()
        loss_sum += loss.detach() * len(idx)
        correct += (logits.argmax(1) == t.train_y[idx]).sum()
        pending.append(loss.detach())
        if len(pending) == NAN_CHECK_STEPS or step == t.steps - 1:
            _check_loss(t, pending, epoch, step)
            bar.set_postfix(loss=f"{float(torch.stack(pending).mean()):.3f}")
            pending = []
        done = epoch * t.steps + step + 1  # optimizer steps so far
        if t.snapshot_every and done % t.snapshot_every == 0 and step < t.steps - 1:  # the epoch's end comes later
            evaluate_and_offer(t, epoch + 1, done)
            t.model.train()
            freeze_body(t.model, frozen)
    if d.device.type == "cuda":
        torch.cuda.synchronize(d.device)
    seconds = time.perf_counter() - t0
    loss_total, correct_total, seen = d.sum(loss_sum, correct, torch.tensor(t.steps * t.per_rank, device=d.device))
    return loss_total / seen, correct_total / seen, seen, seconds
