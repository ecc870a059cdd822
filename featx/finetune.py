"""Stage 3: end-to-end training of a backbone with a classifier head.

The decoded uint8 cache is held in memory (on the GPU when there is one) and batches are indexed from it
directly; augmentation, upsampling and normalisation run on the device (featx.augment). Under torchrun the
model is wrapped in DistributedDataParallel, each process reads its share of every global batch through a
DistributedSampler and metrics are all-reduced; only rank 0 writes files.

Run directory (featx.runs): run.json, metrics.json/csv, curves.png, checkpoints/last.pt (the full training
state, rewritten atomically every epoch, what --resume reads) and checkpoints/epochNNN.pt (the --keep best
epochs by val top-1, model only, what `featx predict` ensembles; with --snapshot-every, stepNNNNNNN.pt taken
every STEPS optimizer steps and at each epoch's end). Every checkpoint carries the ModelSpec that rebuilds its
model, including what evaluation feeds it: the centre crop of the --crop window when training crops at random,
and the mean training image with --normalize mean-image.

Randomness is re-seeded from (seed, epoch, rank) at the start of every epoch, so a resumed epoch draws the
same data order, augmentations and dropout masks as the interrupted one.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler
from tqdm import tqdm

from featx import runs
from featx.atomic import one_writer, replacing
from featx.augment import Augment, check_augmentations, parse_augmentation
from featx.backbones import get_spec, input_spec
from featx.choices import BN_MODES, IMAGE_NORMALIZE
from featx.choices import FINETUNE_HEADS as HEADS
from featx.choices import (Activation, BatchNormMode, CompileMode, Device, FinetuneHead, FinetuneSchedule,
                           ImageNormalize, Optimizer, Precision)
from featx.compiled import compile_training, decide, ran_compiled
from featx.data import dataset_info, prepare_cache, read_split
from featx.device import Dist, distributed, precision_name, resolve_precision
from featx.errors import FeatxError
from featx.heads import topk_correct
from featx.lstm_head import GROUP, STAGES
from featx.models import ACTIVATIONS, MODEL_FORMAT, ModelSpec, build_model, pick_batchnorm, set_batchnorm
from featx.optim import OPTIMIZERS, SCHEDULES, make_optimizer, make_scheduler
from featx.views import render_views, to_input

NAN_CHECK_STEPS = 50  # how often the loss is checked for NaN: each check waits for the device
RESUME_FREE = ("device", "compile", "eval_batch_size")  # options a resumed run may change: they leave results as they are


@dataclass
class FinetuneConfig:
    """Every option of a finetune run (what run.json records and --resume compares).

    batch_size is the global batch: under torchrun each of the K processes takes batch_size / K.
    overfit=N trains on N training images only, without augmentation (the sanity check that a model can
    memorise them); a warning is printed when the last epoch's train top-1 is not 100%.
    bn is the BatchNorm mode (featx.models.set_batchnorm); auto resolves to frozen or train once the weights
    are loaded, and the checkpoints' ModelSpec records the result.
    The body trains from the start, or after the head alone for freeze_epochs epochs; with unfreeze_on_plateau=P
    the head trains alone for at least freeze_epochs epochs and until val top-1 has not improved for P epochs.
    """

    backbone: str
    data: str | None = None  # zip, folder, ImageFolder root or cache; None: ./data
    weights: str = "default"
    size: int | None = None
    head: FinetuneHead = "linear"
    epochs: int = 10
    batch_size: int = 128
    optimizer: Optimizer = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    schedule: FinetuneSchedule = "cosine"
    warmup_epochs: float = 0.0
    decay: float | None = None
    step_epochs: int | None = None
    label_smoothing: float = 0.0
    dropout: float = 0.0
    drop_path: float | None = None
    aug: list[str] = field(default_factory=lambda: ["flip"])
    crop: int = 56
    mixup: float = 0.0
    cutmix: float = 0.0
    freeze_epochs: int = 0
    bn: BatchNormMode = "auto"
    unfreeze_on_plateau: int | None = None
    init_head: str | None = None
    init: str | None = None
    classes: int | None = None
    per_class: int | None = None
    overfit: int | None = None
    seed: int = 0
    precision: Precision = "auto"
    channels_last: bool = True
    compile: CompileMode = "auto"  # run.json's "resolved" says what ran
    device: Device = "auto"
    keep: int = 3
    eval_batch_size: int = 256
    activation: Activation = "relu"
    normalize: ImageNormalize = "channel"
    lstm_group: int = GROUP
    lstm_stages: list[str] = field(default_factory=lambda: list(STAGES))
    snapshot_every: int | None = None

    def __post_init__(self):
        self.data = None if self.data is None else str(self.data)
        self.aug = list(self.aug)
        self.lstm_stages = list(self.lstm_stages)
        if isinstance(self.compile, bool):  # run.json and checkpoints before --compile auto|on|off
            self.compile = "on" if self.compile else "off"

    def check(self) -> None:
        """Refuse inconsistent options before any data is read."""
        get_spec(self.backbone)
        for option, value, allowed in (("--head", self.head, HEADS), ("--optimizer", self.optimizer, OPTIMIZERS),
                                       ("--schedule", self.schedule, SCHEDULES), ("--bn", self.bn, BN_MODES),
                                       ("--activation", self.activation, tuple(ACTIVATIONS)),
                                       ("--normalize", self.normalize, IMAGE_NORMALIZE)):
            if value not in allowed:
                raise FeatxError(f"{option} {value}: choose one of {', '.join(allowed)}")
        if self.init and self.weights != "none":
            raise FeatxError(f"--init {self.init}: only for training from scratch; add --weights none")
        if self.init_head and self.head != "linear":
            raise FeatxError("--init-head: probe heads are linear; use --head linear")
        if not 0 <= self.freeze_epochs <= self.epochs:
            raise FeatxError(f"--freeze-epochs {self.freeze_epochs}: must be between 0 and --epochs {self.epochs}")
        if self.head != "lstm" and (self.lstm_group != GROUP or self.lstm_stages != list(STAGES)):
            raise FeatxError("--lstm-group/--lstm-stages: options of the LSTM head; add --head lstm")
        if not self.overfit:
            check_augmentations(self.aug)

    def eval_views(self) -> list[str]:
        """What evaluation feeds the model: training on random --crop windows (upsampled to the input size) is
        evaluated on the centre window of that size, so objects appear at the scale training saw them."""
        crops = not self.overfit and any(parse_augmentation(a)[0] == "crop" for a in self.aug)
        return ["center"] if crops else ["full"]


def trains_head_alone(c: FinetuneConfig, rows: list[dict]) -> bool:
    """Whether the epoch after `rows` (the metrics so far) trains the head alone with the body frozen; a function
    of the recorded rows only, so a resumed run switches where the uninterrupted one did."""
    if len(rows) < c.freeze_epochs:
        return True
    if not c.unfreeze_on_plateau or (rows and not rows[-1]["frozen"]):
        return False  # once the body trains it keeps training
    tops = [r["val_top1"] for r in rows]
    since_best = len(tops) - 1 - tops.index(max(tops)) if tops else 0
    return since_best < c.unfreeze_on_plateau


def _mean_image(images: torch.Tensor, size: int) -> torch.Tensor:
    """The mean of uint8 images (N, H, W, 3) as a (3, size, size) image in [0, 1], at the network's input size
    (resizing is linear, so this is also the mean of the resized images)."""
    total = sum(chunk.sum(0, dtype=torch.int64) for chunk in images.split(4096))  # exact, in bounded memory
    mean = (total.double() / (255 * len(images))).float().permute(2, 0, 1)[None]
    return to_input(mean, size=size, mean=(0.0,) * 3, std=(1.0,) * 3)[0].contiguous()


def _probe_head(run_dir: str, *, backbone: str, classes: list[str], head: nn.Sequential) -> None:
    """Start the linear head from the best head of a `featx probe` run on the same backbone's features."""
    run = runs.read_run(run_dir)
    if run.kind != "probe" or not run.checkpoints:
        raise FeatxError(f"--init-head {run_dir}: not a probe run with a saved head; run `featx probe` first")
    if run.features.get("backbone") != backbone:
        raise FeatxError(f"--init-head {run_dir}: trained on {run.features.get('backbone')} features, not {backbone}")
    ckpt = runs.load_checkpoint(Path(run_dir) / run.checkpoints[0].file)
    if ckpt["classes"] != classes:
        raise FeatxError(f"--init-head {run_dir}: its classes differ from the data's; probe with the same --classes")
    state, normalize = ckpt["state"], ckpt["config"].get("normalize", "none")
    if "weights.1" in state or normalize == "l2":
        raise FeatxError(f"--init-head {run_dir}: only a linear probe head without l2 normalisation fits; "
                         "probe with --hidden 0 --normalize none|standard")
    w, b = state["weights.0"][0].T, state["biases.0"][0, 0]  # (C, D), (C,)
    if w.shape != head[-1].weight.shape:  # a head on several depths (probe --feature-set) reads other features
        raise FeatxError(f"--init-head {run_dir}: its head reads {w.shape[1]} features "
                         f"({ckpt['config'].get('feature_set', 'all')}), this network's head {head[-1].in_features}; "
                         "probe the pooled vector (--feature-set all, or last1 of a CNN's --layers file)")
    if normalize == "standard":  # fold (x - mean) / std into the linear layer
        w = w / state["norm_std"]
        b = b - w @ state["norm_mean"]
    with torch.no_grad():
        head[-1].weight.copy_(w)
        head[-1].bias.copy_(b)


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    # Decay weights only: shrinking BatchNorm scales and biases does not regularise anything.
    params = list(model.parameters())
    return [{"params": [p for p in params if p.ndim > 1], "weight_decay": weight_decay},
            {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]


def _freeze_body(model: nn.Module, frozen: bool) -> None:
    # A frozen body also keeps its BatchNorm statistics, whatever --bn says: the head trains on the
    # pretrained features.
    model.body.requires_grad_(not frozen)
    model.body.train(not frozen)


def _not_learning(row: dict, num_classes: int) -> bool:
    """Train loss within 1% of ln(classes) and train top-1 at chance (at most twice 1/classes, for noise)."""
    chance_loss = math.log(num_classes)
    return abs(row["train_loss"] - chance_loss) <= 0.01 * chance_loss and row["train_top1"] <= 2 / num_classes


def _evaluate(model, images, labels, d: Dist, *, spec: ModelSpec, dtype, batch: int) -> tuple[float, float, float]:
    """(loss, top1, top5) over all rows; each process scores rows rank::world, sums are all-reduced."""
    model.eval()
    rows = torch.arange(d.rank, len(labels), d.world, device=images.device)
    loss, top1, top5 = (torch.zeros((), device=d.device) for _ in range(3))
    with torch.no_grad(), torch.autocast(d.device.type, dtype=dtype, enabled=dtype != torch.float32):
        for idx in rows.split(batch):
            x = render_views(images[idx].to(d.device, non_blocking=True), views=spec.views, crop=spec.crop,
                             size=spec.size, mean=spec.mean, std=spec.std)
            y = labels[idx].to(d.device, non_blocking=True)
            logits = model(x).float()
            loss += nn.functional.cross_entropy(logits, y, reduction="sum")
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
    snapshots: list[runs.Snapshot]  # kept checkpoints, best first


@one_writer("out")
def finetune(config: FinetuneConfig, *, out: str | Path, resume: bool = False, progress: bool = True) -> FinetuneResult:
    """Fine-tune (or train from scratch) `config.backbone` with a new head on `config.data`; writes the run to `out`."""
    c = config
    c.check()
    out = Path(out)
    recorded = dataclasses.asdict(c)
    aug = [] if c.overfit else c.aug
    mixup, cutmix = (0.0, 0.0) if c.overfit else (c.mixup, c.cutmix)
    batch_size = min(c.batch_size, c.overfit) if c.overfit else c.batch_size
    last_path = out / runs.CHECKPOINTS / "last.pt"
    state = None
    if last_path.exists():
        if not resume:
            raise FeatxError(f"--out {out}: holds a finetune run already; pass --resume to continue it or choose another --out")
        state = runs.load_checkpoint(last_path)
        changed = [k for k in recorded if k not in RESUME_FREE and state["config"].get(k) != recorded[k]]
        if changed:
            raise FeatxError(f"--resume: options differ from the run in {out} ({', '.join(changed)}); use its options or another --out")

    with distributed(c.device) as d:
        if c.bn == "sync" and d.device.type != "cuda":
            raise FeatxError("--bn sync: torch's SyncBatchNorm runs on CUDA only; on CPU use --bn train "
                             "(statistics per process) or --bn frozen")
        dtype = resolve_precision(c.precision, d.device) or torch.float32
        if batch_size % d.world:
            raise FeatxError(f"--batch-size {batch_size}: must be divisible by the {d.world} processes")
        per_rank = batch_size // d.world
        cache = prepare_cache(c.data, progress=progress and d.rank == 0)
        info = dataset_info(cache, classes=c.classes)
        train = read_split(cache, "train", classes=c.classes, per_class=c.per_class)
        val = read_split(cache, "val", classes=c.classes)
        if c.overfit:
            pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(c.seed))[:c.overfit].sort().values
            train.rows, train.labels = train.rows[pick.numpy()], train.labels[pick.numpy()]
            train.ids = [train.ids[i] for i in pick.tolist()]
        if len(train) < batch_size:
            raise FeatxError(f"--batch-size {batch_size}: larger than the {len(train)} training images")
        # The whole uint8 split lives on the device (1.2 GB for Tiny ImageNet): a batch is one gather.
        train_x = torch.from_numpy(train.read_images()).to(d.device)
        train_y = torch.from_numpy(train.labels).to(d.device)
        val_x = torch.from_numpy(val.read_images()).to(d.device)
        val_y = torch.from_numpy(val.labels).to(d.device)

        mean, std, input_size = input_spec(c.backbone, c.weights)
        if c.normalize == "mean-image":  # the mean image replaces the weights' per-channel statistics
            mean, std = (0.0,) * 3, (1.0,) * 3
        spec = ModelSpec(c.backbone, c.size or input_size, len(info.wnids), c.head, list(mean), list(std), c.crop,
                         c.dropout, c.drop_path, views=c.eval_views(), activation=c.activation,
                         normalize=c.normalize, lstm_group=c.lstm_group, lstm_stages=c.lstm_stages)
        torch.manual_seed(c.seed)
        mean_image = _mean_image(train_x, spec.size).cpu() if c.normalize == "mean-image" else None
        model = build_model(spec, weights=c.weights, init=c.init, seed=c.seed, mean_image=mean_image)
        spec.bn = pick_batchnorm(c.bn, model, pretrained=c.weights != "none")
        set_batchnorm(model, spec.bn)
        if c.bn == "auto" and d.rank == 0:
            why = ("the weights' BatchNorms hold identity statistics, folded into the convolutions; --bn train to "
                   "renormalise them" if spec.bn == "frozen" else "--bn frozen to fix statistics and affine")
            print(f"featx: --bn auto: {spec.bn} BatchNorm: {why}", file=sys.stderr)
        if c.init_head:
            _probe_head(c.init_head, backbone=c.backbone, classes=info.wnids, head=model.head)
        model.to(d.device, memory_format=torch.channels_last if c.channels_last else torch.preserve_format)

        sampler = DistributedSampler(range(len(train)), num_replicas=d.world, rank=d.rank, shuffle=True,
                                     seed=c.seed, drop_last=True)
        steps = len(sampler) // per_rank
        opt = make_optimizer(c.optimizer, _param_groups(model, c.weight_decay), lr=c.lr)
        sched = make_scheduler(opt, c.schedule, steps_per_epoch=steps, epochs=c.epochs, decay=c.decay,
                               step_epochs=c.step_epochs, warmup_steps=round(c.warmup_epochs * steps))
        scaler = torch.amp.GradScaler(d.device.type, enabled=dtype == torch.float16)
        augment = Augment(aug, crop=c.crop, size=spec.size, mean=spec.mean, std=spec.std,
                          num_classes=spec.num_classes, mixup=mixup, cutmix=cutmix)
        criterion = nn.CrossEntropyLoss(label_smoothing=c.label_smoothing)

        rows: list[dict] = []
        start = 0
        kept: list[runs.Snapshot] = []
        if state:
            model.load_state_dict(state["state"])
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            scaler.load_state_dict(state["scaler"])
            start, rows = state["epoch"], state["metrics"]
            kept = [runs.Snapshot(**s) for s in state["snapshots"]]
        elif d.rank == 0:
            runs.start_run(out, kind="finetune", config=recorded, model=dataclasses.asdict(spec), data={
                "source": c.data, "dataset": info.name, "dataset_fingerprint": info.fingerprint,
                "classes": c.classes, "per_class": c.per_class})
        # auto decides on the steps still to run; a training step costs about three forward passes
        choice = decide(c.compile, model, size=spec.size, device=d.device, passes=3, quiet=d.rank != 0,
                        views=(c.epochs - start) * steps * per_rank)
        resolved = {"precision": precision_name(dtype), "compile": "on" if choice.compiled else "off"}
        if d.rank == 0:  # what ran, beside what was asked (config)
            runs.update_run(out, resolved=resolved)
        name = "step{step:07d}.pt" if c.snapshot_every else "epoch{epoch:03d}.pt"
        snapshots = runs.Snapshots(out, keep=c.keep, name=name, kept=kept)
        if d.rank == 0:  # snapshots an interrupted epoch wrote after the last full checkpoint
            snapshots.remove_unlisted(besides=[last_path.name])

        def evaluate_and_offer(epoch: int, step: int | None) -> tuple[float, float, float]:
            val = _evaluate(model, val_x, val_y, d, spec=spec, dtype=dtype, batch=c.eval_batch_size)
            if d.rank == 0:
                snapshots.offer(0, epoch, val[1], val[2], lambda: {
                    "format": MODEL_FORMAT, "state": model.state_dict(), "model": dataclasses.asdict(spec),
                    "config": recorded, "classes": info.wnids, "epoch": epoch, "step": step, "val_top1": val[1],
                    "val_top5": val[2]}, step=step)
            return val

        net, frozen = None, None
        for epoch in range(start, c.epochs):
            torch.manual_seed(c.seed * 100003 + epoch * 1009 + d.rank)
            model.train()
            was_frozen, frozen = frozen, trains_head_alone(c, rows)
            _freeze_body(model, frozen)
            if frozen != was_frozen:  # DDP only tracks the parameters that train
                net = DistributedDataParallel(model) if d.world > 1 else model
                net = compile_training(net, choice)
            sampler.set_epoch(epoch)
            order = torch.tensor(list(sampler), device=d.device)
            loss_sum, correct = torch.zeros((), device=d.device), torch.zeros((), device=d.device)
            pending: list[torch.Tensor] = []
            t0 = time.perf_counter()
            bar = tqdm(range(steps), desc=f"epoch {epoch + 1}/{c.epochs}", disable=not progress or d.rank != 0,
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
                done = epoch * steps + step + 1  # optimizer steps so far
                if c.snapshot_every and done % c.snapshot_every == 0 and step < steps - 1:  # the epoch's end comes below
                    evaluate_and_offer(epoch + 1, done)
                    model.train()
                    _freeze_body(model, frozen)
            if d.device.type == "cuda":
                torch.cuda.synchronize(d.device)
            seconds = time.perf_counter() - t0
            loss_sum, correct, seen = d.sum(loss_sum, correct, torch.tensor(steps * per_rank, device=d.device))
            end_step = (epoch + 1) * steps if c.snapshot_every else None
            val_loss, val_top1, val_top5 = evaluate_and_offer(epoch + 1, end_step)
            row = {"epoch": epoch + 1, "train_loss": loss_sum / seen, "train_top1": correct / seen,
                   "val_loss": val_loss, "val_top1": val_top1, "val_top5": val_top5,
                   "lr": opt.param_groups[0]["lr"], "seconds": seconds, "train_images_per_s": seen / seconds,
                   "frozen": frozen}
            rows.append(row)
            start = epoch + 1
            if epoch == 0 and d.rank == 0 and _not_learning(row, spec.num_classes):
                hint = ("training-mode BatchNorm erases folded pretrained weights: try --bn frozen"
                        if spec.bn != "frozen" else "frozen statistics may not fit these weights: try --bn train")
                print(f"featx: warning: epoch 1: train loss {row['train_loss']:.3f} is within 1% of "
                      f"ln({spec.num_classes}) and train top-1 {row['train_top1']:.1%} is at chance, so the model is "
                      f"not learning; usual causes: the learning rate (try --lr {c.lr / 10:g}), the BatchNorm mode "
                      f"({hint}), input normalisation that does not match the weights (their JSON's mean and std); "
                      "the run goes on", file=sys.stderr)
            if d.rank == 0:
                with replacing(last_path) as tmp:
                    torch.save({"config": recorded, "state": model.state_dict(), "optimizer": opt.state_dict(),
                                "scheduler": sched.state_dict(), "scaler": scaler.state_dict(), "epoch": epoch + 1,
                                "metrics": rows, "snapshots": [dataclasses.asdict(s) for s in snapshots.listing()]}, tmp)
                snapshots.prune()  # only now: last.pt no longer lists what falls out
                best = max(rows, key=lambda r: r["val_top1"])
                unfrozen = next((r["epoch"] for r in rows if not r["frozen"]), None)  # the first epoch the body trained
                runs.write_metrics(out, [{"index": 0, "config": {"backbone": spec.backbone, "head_type": spec.head},
                                          "status": "done", "unfrozen_epoch": unfrozen, "epochs": rows}], best)
                resolved["compile"] = ran_compiled(net)  # "off" once a failed compilation fell back to eager
                runs.update_run(out, checkpoints=snapshots.listing(), resolved=resolved)
                if progress:
                    print(f"epoch {epoch + 1}/{c.epochs}: train loss {row['train_loss']:.4f} top-1 {row['train_top1']:.2%}"
                          f" | val loss {val_loss:.4f} top-1 {val_top1:.2%} top-5 {val_top5:.2%}"
                          f" | {row['train_images_per_s']:.0f} img/s", file=sys.stderr)
        if c.overfit and d.rank == 0 and rows and rows[-1]["train_top1"] < 1.0:
            print(f"featx: warning: --overfit {c.overfit}: reached {rows[-1]['train_top1']:.1%} train accuracy, not 100%, "
                  f"after {c.epochs} epochs; the model or its optimisation is broken, or it needs more --epochs",
                  file=sys.stderr)
    best = max((r["val_top1"] for r in rows), default=float("nan"))
    return FinetuneResult(out, rows, best, snapshots.listing())
