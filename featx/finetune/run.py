"""Stage 3: end-to-end training of a backbone with a classifier head.

The decoded uint8 cache is held in memory (on the GPU when there is one) and batches are indexed from it
directly; augmentation, upsampling and normalisation run on the device (featx.nets.augment). Under torchrun the
model is wrapped in DistributedDataParallel, each process reads its share of every global batch through a
DistributedSampler and metrics are all-reduced; only rank 0 writes files.

Run directory (featx.core.runs): run.json, metrics.json/csv, curves.png, checkpoints/last.pt (the full training
state, rewritten atomically every epoch, what --resume reads) and checkpoints/epochNNN.pt (the --keep best
epochs by val top-1, model only, what `featx predict` ensembles; with --snapshot-every, stepNNNNNNN.pt taken
every STEPS optimizer steps and at each epoch's end). Every checkpoint carries the ModelSpec that rebuilds its
model, including what evaluation feeds it: the centre crop of the --crop window when training crops at random,
and the mean training image with --normalize mean-image.

Randomness is re-seeded from (seed, epoch, rank) at the start of every epoch, so a resumed epoch draws the
same data order, augmentations and dropout masks as the interrupted one.

This module sets a run up (data, model, optimizer, or the state to resume) and records each epoch; an epoch's
steps and its evaluation are featx.finetune.epoch's.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler

from featx.core import runs
from featx.core.atomic import one_writer, replacing
from featx.core.choices import WeightDecayOn
from featx.core.compiled import CompileChoice, compile_training, decide, ran_compiled
from featx.core.configs import FinetuneConfig, from_dict, to_dict, validate
from featx.core.device import Dist, distributed, precision_name, resolve_precision
from featx.core.errors import FeatxError, FeatxWarning
from featx.core.outputs import Existing, promote, say, target
from featx.core.outputs import decide as output_action
from featx.core.stats import bootstrap_interval
from featx.data.cache import DatasetInfo, Split, dataset_info, describe_data, prepare_cache, read_split
from featx.finetune.epoch import Training, evaluate_and_offer, freeze_body, train_epoch
from featx.nets.augment import Augment, check_augmentations, parse_augmentation
from featx.nets.backbones import get_spec, input_spec
from featx.nets.lstm_head import GROUP, STAGES
from featx.nets.models import ModelSpec, build_model, pick_batchnorm, set_batchnorm
from featx.nets.optim import make_optimizer, make_scheduler
from featx.nets.views import to_input
from featx.probe.checkpoints import init_from_probe

RESUME_FREE = (
    "device",
    "compile",
    "eval_batch_size",
)  # options a resumed run may change: they leave results as they are


def check_config(c: FinetuneConfig) -> None:
    """Refuse inconsistent options before any data is read (featx.core.configs.validate checks each on its own)."""
    validate(c)
    if c.backbone.startswith("timm:"):  # get_spec's "unknown" would blame timm's absence
        raise FeatxError(
            f"--backbone {c.backbone}: finetune trains the registered backbones only (timm "
            "backbones extract and probe); see `featx extract --list-backbones`"
        )
    get_spec(c.backbone)
    if c.init and c.weights != "none":
        raise FeatxError(f"--init {c.init}: only for training from scratch; add --weights none")
    if c.init_head and c.head != "linear":
        raise FeatxError("--init-head: probe heads are linear; use --head linear")
    if not 0 <= c.freeze_epochs <= c.epochs:
        raise FeatxError(f"--freeze-epochs {c.freeze_epochs}: must be between 0 and --epochs {c.epochs}")
    if c.max_head_epochs is not None and not c.unfreeze_on_plateau:
        raise FeatxError(f"--max-head-epochs {c.max_head_epochs}: bounds --unfreeze-on-plateau; add it")
    if c.max_head_epochs is not None and c.max_head_epochs < c.freeze_epochs:
        raise FeatxError(f"--max-head-epochs {c.max_head_epochs}: must be at least --freeze-epochs {c.freeze_epochs}")
    if c.restart_schedule and not (c.freeze_epochs or c.unfreeze_on_plateau):
        raise FeatxError("--restart-schedule: restarts at the end of head-only epochs; add --freeze-epochs N")
    if c.head != "lstm" and (c.lstm_group != GROUP or list(c.lstm_stages) != list(STAGES)):
        raise FeatxError("--lstm-group/--lstm-stages: options of the LSTM head; add --head lstm")
    if not c.overfit:
        check_augmentations(c.aug)


def eval_views(c: FinetuneConfig) -> list[str]:
    """What evaluation feeds the model: training on random --crop windows (upsampled to the input size) is
    evaluated on the centre window of that size, so objects appear at the scale training saw them (unless
    --no-score-crop asks for the whole image)."""
    crops = c.score_crop and not c.overfit and any(parse_augmentation(a)[0] == "crop" for a in c.aug)
    return ["center"] if crops else ["full"]


def trains_head_alone(c: FinetuneConfig, rows: list[dict]) -> bool:
    """Whether the epoch after `rows` (the metrics so far) trains the head alone with the body frozen; a function
    of the recorded rows only, so a resumed run switches where the uninterrupted one did."""
    if len(rows) < c.freeze_epochs:
        return True
    if not c.unfreeze_on_plateau or (rows and not rows[-1]["frozen"]):
        return False  # once the body trains it keeps training
    if c.max_head_epochs is not None and len(rows) >= c.max_head_epochs:
        return False
    tops = [r["val_top1"] for r in rows]
    since_best = len(tops) - 1 - tops.index(max(tops)) if tops else 0
    return since_best < c.unfreeze_on_plateau


def unfrozen_epoch(rows: list[dict]) -> int | None:
    """The first epoch (1-based) the body trained, None while only the head has."""
    return next((r["epoch"] for r in rows if not r["frozen"]), None)


def _mean_image(images: torch.Tensor, size: int) -> torch.Tensor:
    """The mean of uint8 images (N, H, W, 3) as a (3, size, size) image in [0, 1], at the network's input size
    (resizing is linear, so this is also the mean of the resized images)."""
    total = sum(chunk.sum(0, dtype=torch.int64) for chunk in images.split(4096))  # exact, in bounded memory
    mean = (total.double() / (255 * len(images))).float().permute(2, 0, 1)[None]
    return to_input(mean, size=size, mean=(0.0,) * 3, std=(1.0,) * 3)[0].contiguous()


def _param_groups(model: nn.Module, weight_decay: float, on: WeightDecayOn = "weights") -> list[dict]:
    # Decay weights only: shrinking BatchNorm scales and biases does not regularise anything.
    convs = {id(m.weight) for m in model.modules() if isinstance(m, nn.Conv2d)}
    params = list(model.parameters())
    decayed = [(id(p) in convs) if on == "conv" else p.ndim > 1 for p in params]
    return [
        {"params": [p for p, d in zip(params, decayed) if d], "weight_decay": weight_decay},
        {"params": [p for p, d in zip(params, decayed) if not d], "weight_decay": 0.0},
    ]


def make_schedule(c: FinetuneConfig, opt: torch.optim.Optimizer, steps: int, *, start_epoch: int = 0):
    """The lr schedule over the epochs from `start_epoch`: 0, or with --restart-schedule the first epoch of the
    whole network, whose schedule starts afresh (after --body-warmup-epochs of warm-up)."""
    warmup = c.body_warmup_epochs if start_epoch else c.warmup_epochs
    return make_scheduler(
        opt,
        c.schedule,
        steps_per_epoch=steps,
        epochs=c.epochs - start_epoch,
        decay=c.decay,
        step_epochs=c.step_epochs,
        warmup_steps=round(warmup * steps),
    )


def _not_learning(row: dict, num_classes: int) -> bool:
    """Train loss within 1% of ln(classes) and train top-1 at chance (at most twice 1/classes, for noise)."""
    chance_loss = math.log(num_classes)
    return abs(row["train_loss"] - chance_loss) <= 0.01 * chance_loss and row["train_top1"] <= 2 / num_classes


@dataclass
class FinetuneResult:
    out: Path
    epochs: list[dict]  # the per-epoch metrics rows
    best_val_top1: float
    snapshots: list[runs.Snapshot]  # kept checkpoints, best first


def _resumed(out: Path, recorded: dict, *, epochs: int, force: bool) -> tuple[Path, dict | None]:
    """featx.core.outputs' contract for a finetune `out`: the folder to write (a staging folder when forced over a run
    of other settings) and the full training state to continue (None: a new run). A run of the same settings
    resumes without --resume; one of other settings is refused naming each, unless `force`."""
    last = out / runs.CHECKPOINTS / "last.pt"
    if not last.exists():
        return out, None
    state = runs.load_checkpoint(last)
    # read through the config's schema, so that a run of an older featx compares on today's values
    before = to_dict(from_dict(FinetuneConfig, state["config"], where=str(out), strict=False))

    def settings(config: dict) -> dict:
        return {k: v for k, v in config.items() if k not in RESUME_FREE}

    have = Existing(
        settings(before), complete=state["epoch"] >= epochs, done=state["epoch"], total=epochs, unit="epochs"
    )
    if output_action(out, have, settings(recorded), force=force) != "fresh":
        return out, state
    staged = target(out, forced=True)  # a killed forced run's staging folder resumes; one of other settings restarts
    nested, staged_state = _resumed(staged, recorded, epochs=epochs, force=True)
    return staged, staged_state if nested == staged else None


def _read_data(c: FinetuneConfig, d: Dist, batch_size: int, progress: bool) -> tuple[DatasetInfo, Split, Split, str]:
    """The dataset's info, train and val splits, and the line naming the data (said once the model is built, so
    that a refused option stays one line)."""
    cache = prepare_cache(c.data, progress=progress and d.rank == 0)
    info = dataset_info(cache, classes=c.classes)
    train = read_split(cache, "train", classes=c.classes, per_class=c.per_class)
    val = read_split(cache, "val", classes=c.classes)
    if c.overfit:
        pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(c.seed))[: c.overfit].sort().values
        train.rows, train.labels = train.rows[pick.numpy()], train.labels[pick.numpy()]
        train.ids = [train.ids[i] for i in pick.tolist()]
    if len(train) < batch_size:
        raise FeatxError(f"--batch-size {batch_size}: larger than the {len(train)} training images")
    return info, train, val, describe_data(cache, classes=c.classes, per_class=c.per_class)


def _build(c: FinetuneConfig, d: Dist, info: DatasetInfo, train_x: torch.Tensor) -> tuple[nn.Module, ModelSpec]:
    """The network, its BatchNorm mode resolved and its head initialised, on the device; and its ModelSpec."""
    mean, std, input_size = input_spec(c.backbone, c.weights)
    if c.normalize == "mean-image":  # the mean image replaces the weights' per-channel statistics
        mean, std = (0.0,) * 3, (1.0,) * 3
    spec = ModelSpec(
        c.backbone,
        c.size or input_size,
        len(info.wnids),
        c.head,
        list(mean),
        list(std),
        c.crop,
        c.dropout,
        c.drop_path,
        views=eval_views(c),
        activation=c.activation,
        normalize=c.normalize,
        lstm_group=c.lstm_group,
        lstm_stages=list(c.lstm_stages),
    )
    torch.manual_seed(c.seed)
    mean_image = _mean_image(train_x, spec.size).cpu() if c.normalize == "mean-image" else None
    model = build_model(spec, weights=c.weights, init=c.init, seed=c.seed, mean_image=mean_image)
    spec.bn = pick_batchnorm(c.bn, model, pretrained=c.weights != "none")
    set_batchnorm(model, spec.bn)
    if c.bn == "auto" and d.rank == 0:
        why = (
            "the weights' BatchNorms hold identity statistics, folded into the convolutions; --bn train to "
            "renormalise them"
            if spec.bn == "frozen"
            else "--bn frozen to fix statistics and affine"
        )
        print(f"featx: --bn auto: {spec.bn} BatchNorm: {why}", file=sys.stderr)
    if c.init_head:
        init_from_probe(c.init_head, backbone=c.backbone, classes=info.wnids, head=model.get_submodule("head"))
    layout = torch.channels_last if c.channels_last else torch.preserve_format
    model.to(d.device, memory_format=layout)  # type: ignore[call-overload]  # torch's stubs lack this pair
    return model, spec


def _setup(c: FinetuneConfig, d: Dist, out: Path, recorded: dict, state: dict | None, progress: bool) -> Training:
    """Data on the device, the model, its optimizer and schedule (restored from `state` when resuming), the run."""
    if c.bn == "sync" and d.device.type != "cuda":
        raise FeatxError(
            "--bn sync: torch's SyncBatchNorm runs on CUDA only; on CPU use --bn train "
            "(statistics per process) or --bn frozen"
        )
    dtype = resolve_precision(c.precision, d.device) or torch.float32
    batch_size = min(c.batch_size, c.overfit) if c.overfit else c.batch_size
    if batch_size % d.world:
        raise FeatxError(f"--batch-size {batch_size}: must be divisible by the {d.world} processes")
    info, train, val, described = _read_data(c, d, batch_size, progress)
    # The whole uint8 split lives on the device (1.2 GB for Tiny ImageNet): a batch is one gather.
    train_x, train_y, val_x, val_y = (
        torch.from_numpy(a).to(d.device) for a in (train.read_images(), train.labels, val.read_images(), val.labels)
    )
    model, spec = _build(c, d, info, train_x)
    if d.rank == 0:
        say(described)
    sampler: DistributedSampler[int] = DistributedSampler(
        range(len(train)),  # type: ignore[arg-type]  # a sampler only takes len() of its dataset
        num_replicas=d.world,
        rank=d.rank,
        shuffle=True,
        seed=c.seed,
        drop_last=True,
    )
    steps = len(sampler) // (batch_size // d.world)
    opt = make_optimizer(c.optimizer, _param_groups(model, c.weight_decay, c.weight_decay_on), lr=c.lr)
    switched = unfrozen_epoch(state["metrics"]) if state and c.restart_schedule else None
    sched = make_schedule(c, opt, steps, start_epoch=switched - 1 if switched and switched > 1 else 0)
    scaler = torch.amp.GradScaler(d.device.type, enabled=dtype == torch.float16)
    mixup, cutmix = (0.0, 0.0) if c.overfit else (c.mixup, c.cutmix)
    augment = Augment(
        [] if c.overfit else list(c.aug),
        crop=c.crop,
        size=spec.size,
        mean=spec.mean,
        std=spec.std,
        num_classes=spec.num_classes,
        mixup=mixup,
        cutmix=cutmix,
    )
    rows, start, kept = [], 0, []
    if state:
        model.load_state_dict(state["state"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        start, rows = state["epoch"], state["metrics"]
        kept = [runs.Snapshot(**s) for s in state["snapshots"]]
    elif d.rank == 0:
        runs.start_run(
            out,
            kind="finetune",
            config=recorded,
            model=dataclasses.asdict(spec),
            data={
                "source": c.data,
                "dataset": info.name,
                "dataset_fingerprint": info.fingerprint,
                "classes": c.classes,
                "per_class": c.per_class,
            },
        )
    name = "step{step:07d}.pt" if c.snapshot_every else "epoch{epoch:03d}.pt"
    snapshots = runs.Snapshots(out, keep=c.keep, name=name, kept=kept, records=c.keep_rule == "records")
    if d.rank == 0:  # snapshots an interrupted epoch wrote after the last full checkpoint
        snapshots.remove_unlisted(besides=["last.pt"])
    return Training(
        d,
        out,
        recorded,
        spec,
        info.wnids,
        model,
        opt,
        sched,
        scaler,
        augment,
        nn.CrossEntropyLoss(label_smoothing=c.label_smoothing),
        train_x,
        train_y,
        val_x,
        val_y,
        sampler,
        steps,
        batch_size // d.world,
        dtype,
        snapshots,
        rows,
        start,
        c.epochs,
        c.snapshot_every,
        c.eval_batch_size,
        progress,
    )


def _compile_choice(c: FinetuneConfig, t: Training) -> CompileChoice:
    """--compile for the steps still to run (a training step costs about three forward passes); run.json's
    `resolved` records it beside the precision auto became."""
    choice = decide(
        c.compile,
        t.model,
        size=t.spec.size,
        device=t.d.device,
        passes=3,
        quiet=t.d.rank != 0,
        views=(c.epochs - t.start) * t.steps * t.per_rank,
    )
    if t.d.rank == 0:
        runs.update_run(
            t.out, resolved={"precision": precision_name(t.dtype), "compile": "on" if choice.compiled else "off"}
        )
    return choice


def _save_epoch(t: Training, epoch: int, compiled: str) -> None:
    """Rank 0's record of the epoch just done: last.pt, the snapshots kept, the metrics, the progress line;
    `compiled`: what ran ("off" once a failed compilation fell back to eager)."""
    with replacing(t.last_path) as tmp:
        torch.save(
            {
                "config": t.recorded,
                "state": t.model.state_dict(),
                "optimizer": t.opt.state_dict(),
                "scheduler": t.sched.state_dict(),
                "scaler": t.scaler.state_dict(),
                "epoch": epoch + 1,
                "metrics": t.rows,
                "snapshots": [dataclasses.asdict(s) for s in t.snapshots.listing()],
            },
            tmp,
        )
    t.snapshots.prune()  # only now: last.pt no longer lists what falls out
    best = max(t.rows, key=lambda r: r["val_top1"])
    unfrozen = unfrozen_epoch(t.rows)
    runs.write_metrics(
        t.out,
        [
            {
                "index": 0,
                "config": {"backbone": t.spec.backbone, "head_type": t.spec.head},
                "status": "done",
                "unfrozen_epoch": unfrozen,
                "epochs": t.rows,
            }
        ],
        best,
    )
    resolved = {"precision": precision_name(t.dtype), "compile": compiled, "unfrozen_epoch": unfrozen}
    runs.update_run(t.out, checkpoints=t.snapshots.listing(), resolved=resolved)
    if t.progress:  # the views named: predict's default averages more of them (its mirror too)
        row = t.rows[-1]
        print(
            f"epoch {epoch + 1}/{t.epochs}: train loss {row['train_loss']:.4f} top-1 {row['train_top1']:.2%}"
            f" | val ({'+'.join(t.spec.views)} view) loss {row['val_loss']:.4f} top-1 {row['val_top1']:.2%}"
            f" top-5 {row['val_top5']:.2%}"
            f" | {row['train_images_per_s']:.0f} img/s",
            file=sys.stderr,
        )


def _warn_not_learning(t: Training, row: dict, lr: float) -> None:
    hint = (
        "training-mode BatchNorm erases folded pretrained weights: try --bn frozen"
        if t.spec.bn != "frozen"
        else "frozen statistics may not fit these weights: try --bn train"
    )
    warnings.warn(
        f"epoch 1: train loss {row['train_loss']:.3f} is within 1% of ln({t.spec.num_classes}) and train "
        f"top-1 {row['train_top1']:.1%} is at chance, so the model is not learning; usual causes: the "
        f"learning rate (try --lr {lr / 10:g}), the BatchNorm mode ({hint}), input normalisation that "
        "does not match the weights (their JSON's mean and std); the run goes on",
        FeatxWarning,
        stacklevel=4,
    )


@one_writer("out")
def finetune(
    config: FinetuneConfig, *, out: str | Path, resume: bool = False, force: bool = False, progress: bool = True
) -> FinetuneResult:
    """Fine-tune (or train from scratch) `config.backbone` with a new head on `config.data`; writes the run to `out`.
    An existing run in `out` follows featx.core.outputs' contract: a finished one of the same settings is up to date,
    an interrupted one resumes (`resume` is no longer needed: kept so that old scripts run), one of other settings
    is refused unless `force`."""
    c = config
    check_config(c)
    asked = Path(out)
    recorded = to_dict(c)
    out, state = _resumed(asked, recorded, epochs=c.epochs, force=force)
    if state is not None and state["epoch"] >= c.epochs:
        promote(out, asked)  # a forced run killed after its last epoch: its staging folder is complete
        return FinetuneResult(
            asked,
            state["metrics"],
            max(r["val_top1"] for r in state["metrics"]),
            [runs.Snapshot(**s) for s in state["snapshots"]],
        )
    with distributed(c.device) as d:
        t = _setup(c, d, out, recorded, state, progress)
        choice = _compile_choice(c, t)
        net: Callable[..., torch.Tensor] = t.model  # replaced in the first epoch (frozen changes from None)
        frozen: bool | None = None
        for epoch in range(t.start, c.epochs):
            torch.manual_seed(c.seed * 100003 + epoch * 1009 + d.rank)
            t.model.train()
            was_frozen, frozen = frozen, trains_head_alone(c, t.rows)
            freeze_body(t.model, frozen)
            if c.restart_schedule and t.rows and t.rows[-1]["frozen"] and not frozen:  # the whole network's start
                t.sched = make_schedule(c, t.opt, t.steps, start_epoch=epoch)
            if frozen != was_frozen:  # DDP only tracks the parameters that train
                net = DistributedDataParallel(t.model) if d.world > 1 else t.model
                net = compile_training(net, choice)
            train_loss, train_top1, seen, seconds = train_epoch(t, net, epoch, frozen)
            val_loss, val_top1, val_top5 = evaluate_and_offer(
                t, epoch + 1, (epoch + 1) * t.steps if c.snapshot_every else None
            )
            t.rows.append(
                {
                    "epoch": epoch + 1,
                    "train_loss": train_loss,
                    "train_top1": train_top1,
                    "val_loss": val_loss,
                    "val_top1": val_top1,
                    "val_top5": val_top5,
                    "lr": t.opt.param_groups[0]["lr"],
                    "seconds": seconds,
                    "train_images_per_s": seen / seconds,
                    "frozen": frozen,
                }
            )
            if epoch == 0 and d.rank == 0 and _not_learning(t.rows[-1], t.spec.num_classes):
                _warn_not_learning(t, t.rows[-1], c.lr)
            if d.rank == 0:
                _save_epoch(t, epoch, ran_compiled(net))
        if c.overfit and d.rank == 0 and t.rows and t.rows[-1]["train_top1"] < 1.0:
            warnings.warn(
                f"--overfit {c.overfit}: reached {t.rows[-1]['train_top1']:.1%} train accuracy, not 100%, "
                f"after {c.epochs} epochs; the model or its optimisation is broken, or it needs more --epochs",
                FeatxWarning,
                stacklevel=3,
            )
    best = max((r["val_top1"] for r in t.rows), default=float("nan"))
    if t.rows and d.rank == 0:
        _write_results(out, t.rows, recorded, t.spec.views, val_n=len(t.val_y))
        promote(out, asked)
    return FinetuneResult(asked, t.rows, best, t.snapshots.listing())


def _write_results(out: Path, rows: list[dict], recorded: dict, views: list[str], *, val_n: int) -> dict:
    """results.json: the best epoch's val scores, on the views finetune evaluates on (one, where predict's default
    averages several), chosen on val itself."""
    best = max(rows, key=lambda r: (r["val_top1"], r["val_top5"]))
    right = round(best["val_top1"] * val_n)  # the interval of a 0/1 vector depends only on its count
    interval = bootstrap_interval(np.r_[np.ones(right), np.zeros(val_n - right)]) if val_n else None
    return runs.write_results(
        out,
        kind="finetune",
        scores=runs.Scores("val", best["val_top1"], interval, best["val_top5"]),
        views=views,
        selection={"protocol": "val (optimistic)", "chosen": {"epoch": best["epoch"]}},
        settings=recorded,
        seconds={"train": round(sum(r["seconds"] for r in rows), 2)},
        epochs=len(rows),
        unfrozen_epoch=unfrozen_epoch(rows),
    )
