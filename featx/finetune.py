"""Stage 3: end-to-end training of a backbone with a classifier head.

The decoded uint8 cache is held in memory (on the GPU when there is one) and batches are indexed from it
directly; augmentation, upsampling and normalisation run on the device (featx.augment). Under torchrun the
model is wrapped in DistributedDataParallel, each process reads its share of every global batch through a
DistributedSampler and metrics are all-reduced; only rank 0 writes files.

Run directory (featx.runs): run.json, metrics.json/csv, curves.png, checkpoints/last.pt (the full training
state, rewritten atomically every epoch, what --resume reads) and checkpoints/epochNNN.pt (the --keep best
epochs by val top-1, model only, what `featx predict` ensembles). Every checkpoint carries the ModelSpec that
rebuilds its model.

Randomness is re-seeded from (seed, epoch, rank) at the start of every epoch, so a resumed epoch draws the
same data order, augmentations and dropout masks as the interrupted one.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler
from torchvision.models.resnet import BasicBlock, Bottleneck
from torchvision.ops import StochasticDepth
from tqdm import tqdm

from featx import runs
from featx.atomic import one_writer, replacing
from featx.augment import Augment, check_augmentations
from featx.backbones import create_backbone, get_spec, input_spec
from featx.data import dataset_info, prepare_cache, read_split
from featx.device import Dist, distributed, resolve_precision
from featx.errors import FeatxError
from featx.heads import topk_correct
from featx.lstm_head import LSTMNet
from featx.views import render_views

MODEL_FORMAT = "featx-model-1"
HEADS = ("linear", "lstm")
OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("cosine", "exponential", "step")

NAN_CHECK_STEPS = 50  # how often the loss is checked for NaN: each check waits for the device
RESUME_FREE = ("device", "compile", "eval_batch_size")  # options a resumed run may change: they leave results as they are


@dataclass
class ModelSpec:
    """Everything needed to rebuild a trained model and feed it images."""

    backbone: str
    size: int
    num_classes: int
    head: str
    mean: list[float]
    std: list[float]
    crop: int
    dropout: float = 0.0
    drop_path: float | None = None
    views: list[str] = dataclasses.field(default_factory=lambda: ["full"])


class Classifier(nn.Module):
    def __init__(self, body: nn.Module, head: nn.Module):
        super().__init__()
        self.body, self.head = body, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def build_model(spec: ModelSpec, *, weights: str = "none", init: str | None = None, seed: int = 0) -> nn.Module:
    """The backbone (pretrained or not) with drop path and a fresh head; `model.body` / `model.head`."""
    bb = create_backbone(spec.backbone, weights=weights, size=spec.size, seed=seed)
    if init:
        _init_weights(bb.model, init)
    if spec.drop_path is not None:
        _set_drop_path(bb.model, spec.drop_path, spec.backbone)
    if spec.head == "lstm":
        return LSTMNet(bb.model, size=spec.size, num_classes=spec.num_classes, dropout=spec.dropout)
    return Classifier(bb.model, nn.Sequential(nn.Dropout(spec.dropout), nn.Linear(bb.feature_dim, spec.num_classes)))


def load_model(checkpoint: dict) -> tuple[nn.Module, ModelSpec]:
    """Rebuild the model of a finetune checkpoint (a dict from runs.load_checkpoint), in eval mode."""
    if checkpoint.get("format") != MODEL_FORMAT:
        raise FeatxError(f"checkpoint format {checkpoint.get('format')!r}: not a featx finetune model")
    spec = ModelSpec(**checkpoint["model"])
    model = build_model(spec)
    model.load_state_dict(checkpoint["state"])
    return model.eval(), spec


def _init_weights(model: nn.Module, init: str) -> None:
    """--init kaiming|xavier|gaussian:STD for every conv and linear weight; biases start at zero."""
    kind, _, std = init.partition(":")
    if kind == "gaussian":
        try:
            std = float(std)
        except ValueError:
            raise FeatxError(f"--init {init}: write the standard deviation as gaussian:0.1") from None
    elif kind not in ("kaiming", "xavier") or std:
        raise FeatxError(f"--init {init}: choose kaiming, xavier or gaussian:STD")
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            if kind == "kaiming":
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif kind == "xavier":
                nn.init.xavier_uniform_(m.weight)
            else:
                nn.init.normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def _set_drop_path(model: nn.Module, p: float, name: str) -> None:
    """Stochastic depth with the final block dropped with probability p, earlier blocks linearly less.

    ConvNeXt, Swin and EfficientNet carry torchvision's StochasticDepth modules already: their rates are
    rescaled, keeping torchvision's per-block schedule. ResNet blocks get one after their last BatchNorm,
    which drops the residual branch (the identity path always stays).
    """
    native = [m for m in model.modules() if isinstance(m, StochasticDepth)]
    if native:
        top = max(m.p for m in native)
        for i, m in enumerate(native):
            m.p = p * (m.p / top if top else i / max(len(native) - 1, 1))
        return
    blocks = [m for m in model.modules() if isinstance(m, (BasicBlock, Bottleneck))]
    if not blocks:
        raise FeatxError(f"--drop-path: {name} has no residual blocks to drop; leave --drop-path out")
    for i, block in enumerate(blocks, 1):
        last = "bn3" if isinstance(block, Bottleneck) else "bn2"
        setattr(block, last, nn.Sequential(getattr(block, last), StochasticDepth(p * i / len(blocks), "row")))


def _probe_head(run_dir: str, *, backbone: str, classes: list[str], head: nn.Sequential) -> None:
    """Start the linear head from the best head of a `featx probe` run on the same backbone's features."""
    run = runs.read_run(run_dir)
    if run.get("kind") != "probe" or not run.get("checkpoints"):
        raise FeatxError(f"--init-head {run_dir}: not a probe run with a saved head; run `featx probe` first")
    if run["features"].get("backbone") != backbone:
        raise FeatxError(f"--init-head {run_dir}: trained on {run['features'].get('backbone')} features, not {backbone}")
    ckpt = runs.load_checkpoint(Path(run_dir) / run["checkpoints"][0]["file"])
    if ckpt["classes"] != classes:
        raise FeatxError(f"--init-head {run_dir}: its classes differ from the data's; probe with the same --classes")
    state, normalize = ckpt["state"], ckpt["config"].get("normalize", "none")
    if "weights.1" in state or normalize == "l2":
        raise FeatxError(f"--init-head {run_dir}: only a linear probe head without l2 normalisation fits; "
                         "probe with --hidden 0 --normalize none|standard")
    w, b = state["weights.0"][0].T, state["biases.0"][0, 0]  # (C, D), (C,)
    if normalize == "standard":  # fold (x - mean) / std into the linear layer
        w = w / state["norm_std"]
        b = b - w @ state["norm_mean"]
    with torch.no_grad():
        head[-1].weight.copy_(w)
        head[-1].bias.copy_(b)


def _optimizer(model: nn.Module, kind: str, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    # Decay weights only: shrinking BatchNorm scales and biases does not regularise anything.
    params = list(model.parameters())
    groups = [{"params": [p for p in params if p.ndim > 1], "weight_decay": weight_decay},
              {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]
    if kind == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9, nesterov=True)
    return {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[kind](groups, lr=lr)


def _scheduler(opt, kind: str, *, steps_per_epoch: int, epochs: int, warmup_epochs: float, decay: float | None,
               step_epochs: int | None):
    """Stepped every batch: warmup (linear) then cosine to zero, `decay` per epoch, or `decay` every step_epochs."""
    warm = round(warmup_epochs * steps_per_epoch)
    total = max(epochs * steps_per_epoch - warm, 1)
    S = torch.optim.lr_scheduler
    if kind == "cosine":
        main = S.CosineAnnealingLR(opt, T_max=total)
    elif kind == "exponential":
        main = S.ExponentialLR(opt, gamma=(0.9 if decay is None else decay) ** (1 / steps_per_epoch))
    else:
        step = (step_epochs or max(epochs // 3, 1)) * steps_per_epoch
        main = S.StepLR(opt, step_size=step, gamma=0.1 if decay is None else decay)
    if not warm:
        return main
    return S.SequentialLR(opt, [S.LinearLR(opt, start_factor=0.01, total_iters=warm), main], milestones=[warm])


def _freeze_body(model: nn.Module, frozen: bool) -> None:
    # A frozen body also keeps its BatchNorm statistics: the head trains on the pretrained features.
    model.body.requires_grad_(not frozen)
    model.body.train(not frozen)


def _evaluate(model, images, labels, d: Dist, *, spec: ModelSpec, dtype, batch: int) -> tuple[float, float, float]:
    """(loss, top1, top5) over all rows; each process scores rows rank::world, sums are all-reduced."""
    model.eval()
    rows = torch.arange(d.rank, len(labels), d.world, device=images.device)
    loss, top1, top5 = (torch.zeros((), device=d.device) for _ in range(3))
    with torch.no_grad(), torch.autocast(d.device.type, dtype=dtype, enabled=dtype != torch.float32):
        for idx in rows.split(batch):
            x = render_views(images[idx].to(d.device, non_blocking=True), views=spec.views, crop=images.shape[1],
                             size=spec.size, mean=spec.mean, std=spec.std)
            y = labels[idx].to(d.device, non_blocking=True)
            logits = model(x).float()
            loss += F.cross_entropy(logits, y, reduction="sum")
            top1 += topk_correct(logits[None], y, 1)[0]
            top5 += topk_correct(logits[None], y, 5)[0]
    loss, top1, top5 = d.sum(loss, top1, top5)
    n = len(labels)
    return loss / n, top1 / n, top5 / n


@dataclass
class FinetuneResult:
    out: Path
    epochs: list[dict]  # the per-epoch metrics rows
    best_val_top1: float
    snapshots: list[dict]  # kept checkpoints, best first


@one_writer("out")
def finetune(*, data: str | Path | None, backbone: str, out: str | Path, weights: str = "default",
             size: int | None = None, head: str = "linear", epochs: int = 10, batch_size: int = 128,
             optimizer: str = "adam", lr: float = 1e-3, weight_decay: float = 0.0, schedule: str = "cosine",
             warmup_epochs: float = 0.0, decay: float | None = None, step_epochs: int | None = None,
             label_smoothing: float = 0.0, dropout: float = 0.0, drop_path: float | None = None,
             aug: Sequence[str] = ("flip",), crop: int = 56, mixup: float = 0.0, cutmix: float = 0.0,
             freeze_epochs: int = 0, init_head: str | None = None, init: str | None = None,
             classes: int | None = None, per_class: int | None = None, overfit: int | None = None,
             seed: int = 0, precision: str = "auto", channels_last: bool = True, compile: bool = False,
             device: str = "auto", keep: int = 3, resume: bool = False, eval_batch_size: int = 256,
             progress: bool = True) -> FinetuneResult:
    """Fine-tune (or train from scratch) `backbone` with a new head on `data`; writes the run to `out`.

    batch_size is the global batch: under torchrun each of the K processes takes batch_size / K.
    overfit=N trains on N training images only, without augmentation (the sanity check that a model can
    memorise them); a warning is printed when the last epoch's train top-1 is not 100%.
    """
    config = {k: (list(v) if isinstance(v, tuple) else v) for k, v in locals().items()
              if k not in ("out", "resume", "progress", "data")}
    config["data"] = str(data)
    if overfit:
        batch_size = min(batch_size, overfit)
    out = Path(out)
    get_spec(backbone)  # an unknown backbone fails here, before any data is read
    if head not in HEADS:
        raise FeatxError(f"--head {head}: choose one of {', '.join(HEADS)}")
    for option, value, allowed in (("--optimizer", optimizer, OPTIMIZERS), ("--schedule", schedule, SCHEDULES)):
        if value not in allowed:
            raise FeatxError(f"{option} {value}: choose one of {', '.join(allowed)}")
    if init and weights != "none":
        raise FeatxError(f"--init {init}: only for training from scratch; add --weights none")
    if init_head and head != "linear":
        raise FeatxError("--init-head: probe heads are linear; use --head linear")
    if not 0 <= freeze_epochs <= epochs:
        raise FeatxError(f"--freeze-epochs {freeze_epochs}: must be between 0 and --epochs {epochs}")
    aug = [] if overfit else check_augmentations(aug)
    if overfit:
        mixup = cutmix = 0.0
    last_path = out / runs.CHECKPOINTS / "last.pt"
    state = None
    if last_path.exists():
        if not resume:
            raise FeatxError(f"--out {out}: holds a finetune run already; pass --resume to continue it or choose another --out")
        state = runs.load_checkpoint(last_path)
        changed = [k for k in config if k not in RESUME_FREE and state["config"].get(k) != config[k]]
        if changed:
            raise FeatxError(f"--resume: options differ from the run in {out} ({', '.join(changed)}); use its options or another --out")

    with distributed(device) as d:
        dtype = resolve_precision(precision, d.device) or torch.float32
        if batch_size % d.world:
            raise FeatxError(f"--batch-size {batch_size}: must be divisible by the {d.world} processes")
        per_rank = batch_size // d.world
        cache = prepare_cache(data, progress=progress and d.rank == 0)
        info = dataset_info(cache, classes=classes)
        train = read_split(cache, "train", classes=classes, per_class=per_class)
        val = read_split(cache, "val", classes=classes)
        if overfit:
            pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:overfit].sort().values
            train.rows, train.labels = train.rows[pick.numpy()], train.labels[pick.numpy()]
            train.ids = [train.ids[i] for i in pick.tolist()]
        if len(train) < batch_size:
            raise FeatxError(f"--batch-size {batch_size}: larger than the {len(train)} training images")
        # The whole uint8 split lives on the device (1.2 GB for Tiny ImageNet): a batch is one gather.
        train_x = torch.from_numpy(train.read_images()).to(d.device)
        train_y = torch.from_numpy(train.labels).to(d.device)
        val_x = torch.from_numpy(val.read_images()).to(d.device)
        val_y = torch.from_numpy(val.labels).to(d.device)

        mean, std, input_size = input_spec(backbone, weights)
        spec = ModelSpec(backbone, size or input_size, len(info.wnids), head, list(mean), list(std), crop, dropout,
                         drop_path)
        torch.manual_seed(seed)
        model = build_model(spec, weights=weights, init=init, seed=seed)
        if init_head:
            _probe_head(init_head, backbone=backbone, classes=info.wnids, head=model.head)
        model.to(d.device, memory_format=torch.channels_last if channels_last else torch.preserve_format)

        sampler = DistributedSampler(range(len(train)), num_replicas=d.world, rank=d.rank, shuffle=True,
                                     seed=seed, drop_last=True)
        steps = len(sampler) // per_rank
        opt = _optimizer(model, optimizer, lr, weight_decay)
        sched = _scheduler(opt, schedule, steps_per_epoch=steps, epochs=epochs, warmup_epochs=warmup_epochs,
                           decay=decay, step_epochs=step_epochs)
        scaler = torch.amp.GradScaler(d.device.type, enabled=dtype == torch.float16)
        augment = Augment(aug, crop=crop, size=spec.size, mean=spec.mean, std=spec.std,
                          num_classes=spec.num_classes, mixup=mixup, cutmix=cutmix)
        criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)

        rows: list[dict] = []
        kept: list[dict] = []  # snapshots on disk, best first
        start = 0
        if state:
            model.load_state_dict(state["state"])
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            scaler.load_state_dict(state["scaler"])
            start, rows, kept = state["epoch"], state["metrics"], state["snapshots"]
        elif d.rank == 0:
            runs.start_run(out, kind="finetune", config=config, features={
                "backbone": backbone, "weights": weights, "input_size": spec.size, "views": spec.views,
                "crop": crop, "mean": spec.mean, "std": spec.std, "dataset": info.name,
                "dataset_fingerprint": info.fingerprint})
        if d.rank == 0:  # snapshots an interrupted epoch wrote after the last full checkpoint
            listed = {s["file"] for s in kept}
            for f in (out / runs.CHECKPOINTS).glob("epoch*.pt"):
                if f"{runs.CHECKPOINTS}/{f.name}" not in listed:
                    f.unlink()

        def snapshot(epoch: int, row: dict) -> dict:
            return {"format": MODEL_FORMAT, "state": model.state_dict(), "model": dataclasses.asdict(spec),
                    "config": config, "classes": info.wnids, "epoch": epoch, "val_top1": row["val_top1"],
                    "val_top5": row["val_top5"]}

        net = None
        for epoch in range(start, epochs):
            torch.manual_seed(seed * 100003 + epoch * 1009 + d.rank)
            model.train()
            frozen = epoch < freeze_epochs
            _freeze_body(model, frozen)
            if net is None or epoch == freeze_epochs:  # DDP only tracks the parameters that train
                net = DistributedDataParallel(model) if d.world > 1 else model
                net = torch.compile(net) if compile else net
            sampler.set_epoch(epoch)
            order = torch.tensor(list(sampler), device=d.device)
            loss_sum, correct = torch.zeros((), device=d.device), torch.zeros((), device=d.device)
            pending: list[torch.Tensor] = []
            t0 = time.perf_counter()
            bar = tqdm(range(steps), desc=f"epoch {epoch + 1}/{epochs}", disable=not progress or d.rank != 0,
                       leave=False, file=sys.stderr)
            for step in bar:
                idx = order[step * per_rank:(step + 1) * per_rank]
                x, target = augment(train_x[idx], train_y[idx])
                with torch.autocast(d.device.type, dtype=dtype, enabled=dtype != torch.float32):
                    logits = net(x)
                    loss = criterion(logits.float(), target)
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
                opt.zero_grad(set_to_none=True)
                sched.step()
                loss_sum += loss.detach() * len(idx)
                correct += (logits.argmax(1) == train_y[idx]).sum()
                pending.append(loss.detach())
                if len(pending) == NAN_CHECK_STEPS or step == steps - 1:
                    bad = torch.stack(pending).isfinite().logical_not()
                    if d.sum(bad.any())[0]:
                        first = step - len(pending) + 1 + (int(bad.int().argmax()) if bad.any() else 0)
                        good = f"{last_path} (epoch {start})" if last_path.exists() else "none (first epoch)"
                        raise FeatxError(f"loss is NaN at epoch {epoch + 1} step {first + 1}; stopped, last good checkpoint: "
                                         f"{good}; lower --lr or use --precision fp32")
                    bar.set_postfix(loss=f"{float(torch.stack(pending).mean()):.3f}")
                    pending = []
            if d.device.type == "cuda":
                torch.cuda.synchronize(d.device)
            seconds = time.perf_counter() - t0
            loss_sum, correct, seen = d.sum(loss_sum, correct, torch.tensor(steps * per_rank, device=d.device))
            val_loss, val_top1, val_top5 = _evaluate(model, val_x, val_y, d, spec=spec, dtype=dtype,
                                                     batch=eval_batch_size)
            row = {"epoch": epoch + 1, "train_loss": loss_sum / seen, "train_top1": correct / seen,
                   "val_loss": val_loss, "val_top1": val_top1, "val_top5": val_top5,
                   "lr": opt.param_groups[0]["lr"], "seconds": seconds, "train_images_per_s": seen / seconds}
            rows.append(row)
            start = epoch + 1
            if d.rank == 0:
                kept = _save_epoch(out, rows, kept, keep=keep, last={
                    "config": config, "state": model.state_dict(), "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(), "scaler": scaler.state_dict(), "epoch": epoch + 1},
                    snapshot=lambda: snapshot(epoch + 1, row), spec=spec)
                if progress:
                    print(f"epoch {epoch + 1}/{epochs}: train loss {row['train_loss']:.4f} top-1 {row['train_top1']:.2%}"
                          f" | val loss {val_loss:.4f} top-1 {val_top1:.2%} top-5 {val_top5:.2%}"
                          f" | {row['train_images_per_s']:.0f} img/s", file=sys.stderr)
        if overfit and d.rank == 0 and rows and rows[-1]["train_top1"] < 1.0:
            print(f"featx: warning: --overfit {overfit}: reached {rows[-1]['train_top1']:.1%} train accuracy, not 100%, "
                  f"after {epochs} epochs; the model or its optimisation is broken, or it needs more --epochs",
                  file=sys.stderr)
    best = max((r["val_top1"] for r in rows), default=float("nan"))
    return FinetuneResult(out, rows, best, kept)


def _save_epoch(out: Path, rows: list[dict], kept: list[dict], *, keep: int, last: dict, snapshot, spec: ModelSpec) -> list[dict]:
    """Snapshot if among the best `keep`, then last.pt (atomic), then drop the snapshots that fell out."""
    row = rows[-1]
    kept = list(kept)
    if math.isfinite(row["val_top1"]) and (len(kept) < keep or row["val_top1"] > kept[-1]["val_top1"]):
        name = f"{runs.CHECKPOINTS}/epoch{row['epoch']:03d}.pt"
        with replacing(out / name) as tmp:
            torch.save(snapshot(), tmp)
        kept.append({"file": name, "key": 0, "epoch": row["epoch"], "val_top1": row["val_top1"],
                     "val_top5": row["val_top5"]})
        kept.sort(key=lambda s: -s["val_top1"])
    dropped, kept = kept[keep:], kept[:keep]
    with replacing(out / runs.CHECKPOINTS / "last.pt") as tmp:
        torch.save({**last, "metrics": rows, "snapshots": kept}, tmp)
    for s in dropped:
        (out / s["file"]).unlink(missing_ok=True)
    best = max(rows, key=lambda r: r["val_top1"])
    runs.write_metrics(out, [{"index": 0, "config": {"backbone": spec.backbone, "head_type": spec.head},
                              "status": "done", "epochs": rows}], best)
    runs.update_run(out, checkpoints=kept, model=dataclasses.asdict(spec))
    return kept
