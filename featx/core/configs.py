"""Every stage's options, stated once: one plain dataclass per stage is its schema.

A field's type (a `Literal` of featx.core.choices for enumerated options), default, allowed range and help text are
written here and nowhere else. The CLI's options (featx.front.cli), the recipes' tables (featx.front.recipes), run.json
and docs/options.md's option tables all derive from these classes, and `validate` checks a config in one place, naming
the field; the CLI turns the field into its flag.

Types and how they read from the command line and from TOML/JSON:
    bool                      a flag (`--x`, or `--x/--no-x` where the default is true)
    int, float, str           one value; `min`/`max` bound numbers
    Literal[...]              one of its values
    tuple[float, ...]         a comma list of numbers (`1e-4,3e-4`); probe's lists are sweeps
    tuple[int, ...]           a comma list of whole numbers >= 1
    tuple[str, ...]           a comma list of names (`flip,crop`), or a repeated option (`repeat=True`)
    X | None                  unset unless given

The bottom layer: it imports only featx.core.choices and featx.core.errors.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import re
import types
import typing
from dataclasses import MISSING, dataclass, field
from typing import Any, Literal, get_args, get_origin

from featx.core.choices import (
    Activation,
    BatchNormMode,
    Combine,
    CompileMode,
    Device,
    FeatureDtype,
    FinetuneHead,
    FinetuneSchedule,
    FrozenPrecision,
    ImageNormalize,
    KeepRule,
    Normalize,
    Optimizer,
    Precision,
    ProbeHead,
    ProbePrecision,
    ProbeSchedule,
    SaveMode,
    Split,
    ViewSet,
    WeightDecayOn,
)
from featx.core.errors import FeatxError


def option(
    default: Any = MISSING,
    help: str = "",
    *,
    flag: str | None = None,
    min: float | None = None,
    max: float | None = None,
    min_open: bool = False,
    max_open: bool = False,
    count: int | None = None,
    repeat: bool = False,
    metavar: str | None = None,
    aliases: tuple[str, ...] = (),
    show_default: bool = True,
    only_with: tuple[str, Any] | None = None,
) -> Any:
    """A config field with what the CLI and `validate` need. `flag`: the option's name where it is not the
    field's (predict's `--run` fills `runs`); `count`: a list of exactly that many numbers; `repeat`: the
    option repeats instead of taking a comma list; `aliases`: old names that still work, with a deprecation
    line (CHANGELOG.md lists them); `only_with` (field, value): the option matters only where that field has
    that value, and is left out of what a recipe stage's hash covers elsewhere (`in_use`), so that adding it
    left existing recipe outputs up to date."""
    meta = {
        "help": help,
        "flag": flag,
        "min": min,
        "max": max,
        "min_open": min_open,
        "max_open": max_open,
        "count": count,
        "repeat": repeat,
        "metavar": metavar,
        "aliases": aliases,
        "show_default": show_default,
        "only_with": only_with,
    }
    if isinstance(default, list):
        return field(default_factory=functools.partial(list, default), metadata=meta)
    return field(default=default, metadata=meta)


class Config:
    """What every stage's config shares: it is checked once, when it is built (featx.core.configs.validate)."""

    def __post_init__(self) -> None:
        validate(self)


VIEWS_HELP = "all (every deterministic view), full (the full image), or stored view names such as full,top_left,aug0"


@dataclass
class PrepareConfig(Config):
    """`featx data prepare`: decode a dataset once into the HDF5 cache every stage reads."""

    data: str | None = option(
        None,
        "tiny-imagenet-200.zip, its extracted folder, an ImageFolder root "
        "(train/<class>/*.jpg, val/<class>/..., test/...) or a cache .h5 [default: "
        "data/tiny-imagenet-200.zip, downloaded if absent].",
        metavar="SRC",
    )
    image_size: int = option(
        64, "Side of the square images in the cache (others are scaled and centre-cropped).", min=8
    )
    classes: int | None = option(None, "Keep only the first K classes (wnids order).", min=1)
    per_class: int | None = option(None, "Keep only the first N train images per class.", min=1)
    skip_bad: bool = option(False, "Skip undecodable images (listed, and recorded in the cache).")
    jobs: int = option(-1, "Decoding processes (-1: all cores).")


@dataclass
class ExtractConfig(Config):
    """`featx extract`: a frozen backbone's pooled features of every image and view, in one HDF5 file."""

    backbone: str = option(MISSING, "Registered name (see --list-backbones) or timm:<name>.")
    data: str | None = option(None, "Zip, folder, ImageFolder root or decoded cache [default: ./data].", metavar="SRC")
    weights: str = option(
        "default",
        "default, none, a torchvision weights name of the backbone (IMAGENET1K_V1, "
        "IMAGENET1K_V2, DEFAULT, ...), or a state_dict PATH.",
    )
    size: int | None = option(None, "Input resolution [default: per backbone].", min=16)
    views: ViewSet = option(
        "ten", "The views to compute and store: the full image, its mirror too, or five crops and their mirrors."
    )
    crop: int = option(56, "Corner-crop size in pixels.", min=1)
    splits: tuple[Split, ...] | None = option(None, "Comma-separated splits [default: all in the data].")
    classes: int | None = option(None, "Only the first K classes.", min=1)
    per_class: int | None = option(None, "Only the first N train images per class.", min=1)
    batch_size: int | None = option(
        None, "Images per batch [default: 256 on CUDA; on CPU 16 views' worth: 16 full, 8 flip, 1 ten].", min=1
    )
    device: Device = option("auto", "auto, cpu, cuda or cuda:N.", metavar="auto|cpu|cuda[:N]")
    precision: FrozenPrecision = option(
        "auto",
        "auto: bf16 on GPUs that have it (else fp16), bf16 on CPUs with "
        "AVX-512 BF16/AMX, fp32 elsewhere; the environment variable FEATX_CPU_BF16=1|0 "
        "makes auto act as on a BF16 / an AVX2 CPU. int8 (CPU, never chosen by auto): the backbone "
        "quantized after calibrating on --calibration training images, 2-10x faster than fp32 "
        "(needs torchao and a C++ compiler).",
    )
    calibration: int = option(
        128,
        "With --precision int8: training images (a fixed sample) the quantized model is calibrated on; "
        "they are stored in the feature file.",
        min=1,
        only_with=("precision", "int8"),
    )
    mean: tuple[float, ...] | None = option(None, "Normalisation mean override, e.g. 0.5,0.5,0.5.", count=3)
    std: tuple[float, ...] | None = option(None, "Normalisation std override, e.g. 0.5,0.5,0.5.", count=3)
    dtype: FeatureDtype = option("float16", "Storage type of the features.")
    compile: CompileMode = option(
        "auto",
        "torch.compile the backbone with Inductor's freezing: on, off, or auto "
        "(compile when the job is long enough to repay compiling).",
    )
    aug_views: int = option(
        0,
        "K augmented views per train image (aug0..augK-1): brightness/contrast jitter of "
        "the full image or a corner crop, as recipe milani_transfer_v3 trains.",
        min=0,
    )
    aug_seed: int = option(0, "Seed of the augmented views.")
    layers: str | None = option(
        None,
        "Several depths per view, concatenated: lastN (a CNN's last N stages, "
        "average-pooled; a ViT's class tokens of its last N blocks) or lastN+avg (a ViT's, "
        "plus its mean patch token).",
        metavar="SPEC",
    )


@dataclass(frozen=True)
class HeadConfig:
    """What differs between the heads of a probe sweep; the defaults are the single head of the transfer-learning
    report featx reproduces (Milani's vanilla transfer learning, tuned for Inception-v3's 2048-d features)."""

    lr: float = 6.5e-4
    weight_decay: float = 0.0116
    label_smoothing: float = 0.1
    dropout: float = 0.0
    lr_decay: float = 0.713  # the exponential schedule's factor per epoch

    def __post_init__(self) -> None:
        ranges = {f.name: f for f in schema(ProbeConfig)}  # the ranges of the lists that sweep these values
        for name in (*HYPERPARAMETERS, "lr_decay"):
            problem = _check_number(ranges[name], getattr(self, name))
            if problem:
                raise OptionError(name, getattr(self, name), problem)

    def label(self) -> str:
        return (
            f"lr={self.lr:g} wd={self.weight_decay:g} ls={self.label_smoothing:g} dropout={self.dropout:g} "
            f"decay={self.lr_decay:g}"
        )


# HeadConfig's fields: the options a probe sweeps (ProbeConfig's lists of the same names)
HYPERPARAMETERS = ("lr", "weight_decay", "label_smoothing", "dropout")

# `featx probe` with no hyperparameter sweeps this grid in its one pass and chooses on the holdout; given any of
# lr, weight_decay, label_smoothing, dropout it sweeps only those and the others keep the transfer-learning
# report's values (HeadConfig). lr_decay is an axis of its own: one value (the default) keeps the sweep as it
# is, a list multiplies it. A sweep is cheap: the heads share every minibatch.
DEFAULT_SWEEP = {"lr": (3e-4, 1e-3, 3e-3), "weight_decay": (1e-3, HeadConfig.weight_decay, 3e-2)}


@dataclass
class ProbeConfig(Config):
    """`featx probe`: classifier heads on cached features; comma lists sweep every combination in one pass."""

    features: str = option(MISSING, "Feature file from `featx extract`.", metavar="PATH")
    head: ProbeHead = option(
        "linear", "knn: cosine k-NN with votes exp(sim/0.07) (DINO); ncm: nearest class mean (cosine); no training."
    )
    hidden: int = option(1024, "MLP hidden units.", min=1)
    k: tuple[int, ...] = option((10, 20, 100), "--head knn: neighbour counts, all scored in one pass.")
    select: str = option(
        "holdout:0.1",
        "Where head, epoch, k and ensembles are chosen: holdout:F (a stratified "
        "share F of train, val then scored once) or val (the reports' protocol: optimistic).",
    )
    lr: tuple[float, ...] | None = option(
        None,
        "Learning rates [default: the default sweep when no hyperparameter is given, else 6.5e-4].",
        min=0,
        min_open=True,
        show_default=False,
    )
    weight_decay: tuple[float, ...] | None = option(
        None,
        "L2 (decoupled with adamw); weights only [default: the default sweep, else 0.0116].",
        min=0,
        show_default=False,
    )
    label_smoothing: tuple[float, ...] | None = option(
        None, "[default: 0.1]", min=0, max=1, max_open=True, show_default=False
    )
    dropout: tuple[float, ...] | None = option(
        None, "On the head's input [default: 0].", min=0, max=1, max_open=True, show_default=False
    )
    optimizer: Optimizer = option("adam", "")
    lr_decay: tuple[float, ...] = option(
        (HeadConfig.lr_decay,),
        "Exponential decay of the lr per epoch, applied smoothly at every step; a comma list sweeps it with the "
        "other hyperparameters (one value keeps the sweep they make).",
        min=0,
        max=1,
        min_open=True,
    )
    schedule: ProbeSchedule = option("exponential", "")
    epochs: int = option(10, "", min=1)
    batch_size: int = option(
        100,
        "Heads see the same minibatches; smaller than finetune's because a head's step is cheap and more steps help.",
        min=1,
    )
    train_views: str = option(
        "all", "Views drawn from, one at random per image and step: " + VIEWS_HELP + ".", metavar="all|full|NAME,..."
    )
    eval_views: str = option("all", "Views whose softmax is averaged: " + VIEWS_HELP + ".", metavar="all|full|NAME,...")
    epoch_views: bool = option(
        False,
        "Epoch e trains every image on the e-th of --train-views (each view once, none repeated; needs at least "
        "--epochs views) instead of a view drawn at random per image and step.",
    )
    normalize: Normalize = option("none", "Feature normalisation before the head.")
    feature_set: tuple[str, ...] = option(
        ("all",),
        "The columns heads see in a --layers file: all, lastN (the "
        "last N stages or class tokens), lastN+avg (and the mean patch token); "
        "a comma list sweeps several in one pass.",
        metavar="SETS",
    )
    seed: int = option(0, "")
    device: Device = option("auto", "auto, cpu, cuda or cuda:N.", metavar="auto|cpu|cuda[:N]")
    precision: ProbePrecision = option(
        "auto",
        "The training matmuls' precision (weights, their updates and scoring stay fp32). auto: bf16 on GPUs and on "
        "CPUs with AVX-512 BF16/AMX, fp32 elsewhere (FEATX_CPU_BF16=1|0 makes auto act as on a BF16 / an AVX2 CPU).",
    )
    save: SaveMode = option("best", "Keep snapshots of the best head only, or of every head.")
    keep: int = option(20, "Best snapshots kept per head (snapshot ensembles draw on them).", min=1)
    snapshot_every: int | None = option(
        None,
        "Also validate and offer a snapshot every STEPS training steps, not only after each epoch.",
        min=1,
        metavar="STEPS",
    )
    stream: bool = option(False, "Read batches from HDF5 instead of RAM (automatic when too big).")


@dataclass
class FinetuneConfig(Config):
    """`featx finetune`: end-to-end training (fine-tuning or from scratch); torchrun for several GPUs.

    batch_size is the global batch: under torchrun each of the K processes takes batch_size / K.
    overfit=N trains on N training images only, without augmentation (the sanity check that a model can
    memorise them); a warning is given when the last epoch's train top-1 is not 100%.
    bn is the BatchNorm mode (featx.nets.models.set_batchnorm); auto resolves to frozen or train once the weights
    are loaded, and the checkpoints' ModelSpec records the result.
    The body trains from the start, or after the head alone for freeze_epochs epochs; with unfreeze_on_plateau=P
    the head trains alone for at least freeze_epochs epochs and until val top-1 has not improved for P epochs, or
    for max_head_epochs at most. restart_schedule gives the whole network a schedule of its own from the switch.
    """

    backbone: str = option(MISSING, "Registered name (see `featx extract --list-backbones`).")
    data: str | None = option(None, "Zip, folder, ImageFolder root or decoded cache [default: ./data].", metavar="SRC")
    weights: str = option(
        "default",
        "default, none, a torchvision weights name of the backbone (IMAGENET1K_V1, "
        "IMAGENET1K_V2, DEFAULT, ...), or a state_dict PATH.",
    )
    size: int | None = option(None, "Input resolution the images are upsampled to [default: per backbone].", min=16)
    head: FinetuneHead = option("linear", "")
    lstm_group: int = option(64, "LSTM head: channels per group, the sequence length.", min=1)
    lstm_stages: tuple[str, ...] = option(
        ("layer3", "layer4"), "LSTM head: the ResNet stages it reads (layer1..layer4)."
    )
    activation: Activation = option("relu", "ResNets: every ReLU of the body.")
    normalize: ImageNormalize = option(
        "channel", "channel: the weights' mean/std; mean-image: subtract the mean training image."
    )
    epochs: int = option(10, "", min=1)
    batch_size: int = option(128, "Global batch (split over torchrun processes).", min=1)
    optimizer: Optimizer = option("adam", "")
    lr: float = option(1e-3, "Larger than the probe's: the whole network moves, at batch 128.", min=0, min_open=True)
    weight_decay: float = option(0.0, "", min=0)
    weight_decay_on: WeightDecayOn = option(
        "weights",
        "What --weight-decay shrinks: every weight matrix and convolution kernel (never biases or BatchNorm), or "
        "conv: convolution kernels only (the classifier and LSTMs undecayed).",
    )
    schedule: FinetuneSchedule = option("cosine", "")
    warmup_epochs: float = option(0.0, "", min=0)
    decay: float | None = option(
        None,
        "lr factor per epoch (exponential, default 0.9) or per --step-epochs (step, default 0.1).",
        min=0,
        max=1,
        min_open=True,
    )
    step_epochs: int | None = option(None, "Epochs between lr steps [default: epochs / 3].", min=1)
    label_smoothing: float = option(0.0, "", min=0, max=1, max_open=True)
    dropout: float = option(0.0, "Before the head.", min=0, max=1, max_open=True)
    drop_path: float | None = option(
        None, "Stochastic depth of the last block [default: the backbone's own].", min=0, max=1, max_open=True
    )
    aug: tuple[str, ...] = option(
        ("flip",),
        "Comma-separated: flip,crop,corners,color,rotate,scale,shift,"
        "shear,noise,invert (or none); NAME:VALUE sets a magnitude, e.g. rotate:45.",
    )
    crop: int = option(56, "Crop size of the crop/corners augmentations.", min=1)
    mixup: float = option(0.0, "MixUp alpha (0: off).", min=0)
    cutmix: float = option(0.0, "CutMix alpha (0: off).", min=0)
    freeze_epochs: int = option(0, "Train only the head for the first N epochs.", min=0)
    bn: BatchNormMode = option(
        "auto",
        "BatchNorm: frozen statistics and affine, train (batch statistics), sync "
        "(across torchrun processes, CUDA); auto: frozen for folded weights (identity "
        "statistics), else train.",
    )
    unfreeze_on_plateau: int | None = option(
        None,
        "Train only the head (for at least --freeze-epochs) until val top-1 has not improved for PATIENCE epochs.",
        min=1,
        metavar="PATIENCE",
    )
    max_head_epochs: int | None = option(
        None,
        "With --unfreeze-on-plateau: the head trains alone for at most N epochs; the body trains from the next "
        "whether or not val top-1 has stopped improving.",
        min=1,
        metavar="N",
    )
    restart_schedule: bool = option(
        False,
        "When the body starts training after head-only epochs, start --schedule afresh over the epochs left "
        "(after --body-warmup-epochs of warm-up) instead of going on with the head's.",
    )
    body_warmup_epochs: float = option(0.0, "With --restart-schedule: warm-up epochs of the restarted schedule.", min=0)
    init_head: str | None = option(None, "Start the head from the best head of this `featx probe` run.", metavar="RUN")
    init: str | None = option(None, "From scratch (--weights none): kaiming, xavier or gaussian:STD.")
    classes: int | None = option(None, "Only the first K classes.", min=1)
    per_class: int | None = option(None, "Only the first N train images per class.", min=1)
    overfit: int | None = option(None, "Sanity check: train on N training images, expect 100%.", min=1)
    seed: int = option(0, "")
    precision: Precision = option(
        "auto",
        "auto: bf16 on CUDA (fp16 where it lacks bf16); on CPU bf16 where it "
        "has AVX-512 BF16/AMX, else fp32 (FEATX_CPU_BF16=1|0 makes auto act as on a "
        "BF16 / an AVX2 CPU).",
    )
    channels_last: bool = option(True, "")
    compile: CompileMode = option(
        "auto", "torch.compile the model: on, off, or auto (compile when the steps to run repay compiling)."
    )
    device: Device = option("auto", "auto, cpu, cuda or cuda:N.", metavar="auto|cpu|cuda[:N]")
    keep: int = option(3, "Keep the K best checkpoints by val top-1.", min=1)
    keep_rule: KeepRule = option(
        "best",
        "Which checkpoints --keep holds: best (the K best of all evaluations) or records (each evaluation whose "
        "val top-1 beats every earlier one, the oldest dropped beyond K).",
    )
    score_crop: bool = option(
        True,
        "A model trained with the crop augmentation is scored on the centre --crop window, as training saw "
        "objects; --no-score-crop scores the whole image. It decides what val picks checkpoints on and what "
        "predict and report score as the run's full view.",
    )
    snapshot_every: int | None = option(
        None,
        "Also evaluate on val every STEPS optimizer steps and offer those snapshots to --keep.",
        min=1,
        metavar="STEPS",
    )
    eval_batch_size: int = option(256, "Images per evaluation batch (no gradients: larger than training's).", min=1)

    def __post_init__(self) -> None:
        self.data = None if self.data is None else str(self.data)
        if isinstance(self.compile, bool):  # run.json before 0.2 held a bool
            self.compile = "on" if self.compile else "off"
        super().__post_init__()


@dataclass
class PredictConfig(Config):
    """`featx predict`: score runs on a split or on image files; view, snapshot and run ensembles."""

    runs: tuple[str, ...] = option(
        MISSING,
        "Run directory of `featx probe` or `featx finetune`; repeat to average several runs.",
        flag="run",
        repeat=True,
        metavar="RUN",
    )
    split: Split = option("val", "")
    eval_views: str = option(
        "all",
        "Views whose softmax is averaged: " + VIEWS_HELP + " (a finetune run: full is the view its training "
        "scored, the centre --crop window of a crop-trained run unless trained with --no-score-crop; all adds its "
        "mirror).",
        metavar="all|full|NAME,...",
    )
    ensemble: str = option(
        "best",
        "Each run's checkpoints averaged: best, top:K, greedy (added best first while val top-1 improves), "
        "best-size (the top:K whose K scores best on the run's selection split, val for a finetune run) or all.",
    )
    images: tuple[str, ...] = option(
        (),
        "Classify these image files or folders instead of a split (`--images *.jpg` works).",
        repeat=True,
        metavar="PATH",
    )
    skip_bad: bool = option(False, "With --images: skip undecodable images instead of stopping.")
    image_size: int = option(64, "With --images: the side the dataset's images had (64 for Tiny ImageNet).", min=8)
    weights: str | None = option(
        None, "With --images: the backbone weights file a probe run's features were extracted with.", metavar="PATH"
    )
    data: str | None = option(None, "A finetune run's dataset [default: the one it trained on].", metavar="SRC")
    device: Device = option("auto", "auto, cpu, cuda or cuda:N.", metavar="auto|cpu|cuda[:N]")
    combine: Combine = option(
        "calibrated",
        "How checkpoint probabilities are combined: calibrated (each probe "
        "checkpoint at its fitted temperature), raw softmax (summed as the milani_* recipes do), or logits: a "
        "finetune run's logits averaged over views, checkpoints and runs before one softmax.",
    )
    compile: CompileMode = option(
        "auto",
        "With --images: torch.compile each run's model with Inductor's "
        "freezing: on, off, or auto (when the images x views repay compiling).",
    )


@dataclass
class ReportConfig(Config):
    """`featx report`: accuracy, per-class errors, confusions, curves, t-SNE (and filters) as HTML."""

    runs: tuple[str, ...] = option(
        MISSING,
        "Run directory to report on; repeat for a leaderboard and a paired comparison of the best two.",
        flag="run",
        repeat=True,
        metavar="RUN",
    )
    split: Split = option("val", "The split to analyse; it needs labels.")
    eval_views: str = option("all", "The views averaged, as in predict.", metavar="all|full|NAME,...")
    ensemble: str = option("best", "best, top:K, greedy, best-size or all (as in predict).")
    tsne_classes: tuple[str, ...] | None = option(
        None,
        "Classes of the t-SNE map of training images [default: convertible, sports car, plunger, Egyptian "
        "cat, Persian cat, golden retriever and bullet train where present, else the first 7].",
        metavar="WNID,...",
    )
    data: str | None = option(
        None,
        "A finetune run's dataset [default: the one it trained on]; for a probe run, "
        "the dataset its features came from, to show the error gallery's images.",
        metavar="SRC",
    )
    device: Device = option("auto", "auto, cpu, cuda or cuda:N.", metavar="auto|cpu|cuda[:N]")
    combine: Combine = option("calibrated", "How checkpoint probabilities are combined, as in predict.")


@dataclass
class CompareConfig(Config):
    """`featx compare`: several backbones on one dataset, extracted, probed with the default sweep and scored on
    val; one leaderboard."""

    backbones: tuple[str, ...] = option(
        MISSING, "Backbones to compare (registered names or timm:<name>).", flag="backbone"
    )
    data: str | None = option(None, "Zip, folder, ImageFolder root or decoded cache [default: ./data].", metavar="SRC")
    weights: tuple[str, ...] | None = option(
        None,
        "One per backbone: default, none, a torchvision weights name or a state_dict PATH [default: default for each].",
    )
    classes: int | None = option(None, "Only the first K classes.", min=1)
    per_class: int | None = option(None, "Only the first N train images per class.", min=1)
    size: int | None = option(None, "Input resolution [default: per backbone].", min=16)
    views: ViewSet = option("full", "The views extracted, as in extract; one view keeps a comparison quick.")
    crop: int = option(56, "Corner-crop size in pixels.", min=1)
    eval_views: str = option("all", "Views whose softmax is averaged: " + VIEWS_HELP + ".", metavar="all|full|NAME,...")
    select: str = option("holdout:0.1", "Where each probe chooses its head and epoch, as in probe.")
    epochs: int = option(10, "Probe epochs.", min=1)
    seed: int = option(0, "")
    device: Device = option("auto", "auto, cpu, cuda or cuda:N.", metavar="auto|cpu|cuda[:N]")
    precision: FrozenPrecision = option("auto", "As in extract.")
    calibration: int = option(128, "As in extract.", min=1, only_with=("precision", "int8"))


# --- reading the schema --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Field:
    """One option as the front ends see it: the field's name, its parsed type and its metadata."""

    name: str
    kind: str  # bool, int, float, str, choice, numbers, names
    choices: tuple = ()
    item: type | None = None  # numbers: int or float
    optional: bool = False
    required: bool = False
    default: Any = None
    meta: dict = dataclasses.field(default_factory=dict)

    @property
    def flag(self) -> str:
        return self.meta.get("flag") or self.name.replace("_", "-")


def _parse_type(tp) -> tuple[str, tuple, type | None, bool]:
    optional = False
    if get_origin(tp) in (typing.Union, types.UnionType) and type(None) in get_args(tp):
        optional = True
        (tp,) = [a for a in get_args(tp) if a is not type(None)]
    if get_origin(tp) is Literal:
        return "choice", get_args(tp), None, optional
    if get_origin(tp) in (tuple, list):
        item = get_args(tp)[0]
        if get_origin(item) is Literal:
            return "names", get_args(item), None, optional
        return ("numbers", (), item, optional) if item in (int, float) else ("names", (), None, optional)
    return tp.__name__, (), None, optional


@functools.cache
def schema(cls: type) -> tuple[Field, ...]:
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        kind, choices, item, optional = _parse_type(hints[f.name])
        required = f.default is MISSING and f.default_factory is MISSING
        default = None if required else f.default if f.default_factory is MISSING else f.default_factory()
        out.append(Field(f.name, kind, choices, item, optional, required, default, dict(f.metadata)))
    return tuple(out)


def field_named(cls: type, key: str) -> Field | None:
    """The field a key names: its name, its flag or an alias, with dashes or underscores."""
    key = key.replace("-", "_")
    for f in schema(cls):
        if key in (f.name, f.flag.replace("-", "_"), *(a.replace("-", "_") for a in f.meta["aliases"])):
            return f
    return None


class OptionError(FeatxError):
    """A value a field does not take. `field` lets each front end name it its own way: the CLI as its flag,
    a recipe as its key; the message then reads `<name> <value>: <reason>`."""

    def __init__(self, field: str, value: Any, reason: str) -> None:
        self.field, self.value, self.reason = field, value, reason
        super().__init__(f"{field}={value!r}: {reason}", option=field)

    def named(self, name: str) -> str:
        return f"{name} {show(self.value)}: {self.reason}"


def show(value, digits: int | None = None) -> str:
    """A value as a user reads and writes it, in messages, tables and command lines: a list as a comma list,
    None and an empty list as `none`, a mapping as `key value, ...`; `digits`: floats to that many significant
    digits."""
    if value is None:
        return "none"
    if isinstance(value, dict):
        return ", ".join(f"{k} {show(v, digits)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return ",".join(show(v, digits) for v in value) or "none"
    if isinstance(value, float) and digits:
        return f"{value:.{digits}g}"
    return str(value)


def describe_range(f: Field) -> str | None:
    """A numeric field's bounds as `--help` shows them (`x>=1`, `0<=x<1`), or None."""
    m = f.meta
    low = None if m["min"] is None else f"{m['min']:g}{'<' if m['min_open'] else '<='}"
    high = None if m["max"] is None else f"{'<' if m['max_open'] else '<='}{m['max']:g}"
    if low is None and high is None:
        return None
    if high is None:
        return f"x{'>' if m['min_open'] else '>='}{m['min']:g}"
    return f"{low or ''}x{high}"


class MissingOption(FeatxError):
    """A required field that was not given; `field` lets a front end name it its own way."""

    def __init__(self, field: Field, message: str) -> None:
        self.field = field
        super().__init__(message, option=field.name)


def _device_ok(value: str) -> bool:
    return value in get_args(Device) or re.fullmatch(r"cuda:\d+", value) is not None


def _check_number(f: Field, x) -> str | None:
    m = f.meta
    if isinstance(x, bool) or not isinstance(x, (int, float)) or ((f.item is int or f.kind == "int") and x != int(x)):
        return f"give {'a whole number' if (f.item is int or f.kind == 'int') else 'a number'}"
    low, high = m["min"], m["max"]
    if low is not None and (x < low or (m["min_open"] and x == low)):
        return f"must be {'>' if m['min_open'] else '>='} {low:g}"
    if high is not None and (x > high or (m["max_open"] and x == high)):
        return f"must be {'<' if m['max_open'] else '<='} {high:g}"
    return None


def _check_value(f: Field, value) -> str | None:
    if value is None:
        return None if f.optional else "required"
    if f.name == "device":
        return None if _device_ok(value) else f"choose one of {', '.join(get_args(Device))} or cuda:N"
    if f.kind == "choice":
        if value in f.choices:
            return None
        frozen = (
            " (int8 is for a frozen backbone: extract, compare)" if f.name == "precision" and value == "int8" else ""
        )
        return f"choose one of {', '.join(map(str, f.choices))}{frozen}"
    if f.kind in ("int", "float"):
        return _check_number(f, value)
    if f.kind == "bool":
        return None if isinstance(value, bool) else "give true or false"
    if f.kind == "numbers":
        if not value or (f.meta["count"] and len(value) != f.meta["count"]):
            return _how_many(f)
        if f.item is int and any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in value):
            return _list_of(f)
        return next((e for e in (_check_number(f, v) for v in value) if e), None)
    if f.kind == "names" and f.choices:
        bad = [v for v in value if v not in f.choices]
        return f"{', '.join(bad)}: choose from {', '.join(f.choices)}" if bad else None
    return None


def validate(config) -> None:
    """Check every field's type, choice and range; raise OptionError naming the first bad field."""
    for f in schema(type(config)):  # type: ignore[arg-type]  # mypy: a type(x) is not Hashable, wrongly
        problem = _check_value(f, getattr(config, f.name))
        if problem:
            raise OptionError(f.name, getattr(config, f.name), problem)


# --- building configs from text and tables --------------------------------------------------------------------


def _list_of(f: Field) -> str:
    """What a list of numbers takes: tuple[int, ...] is a list of counts."""
    return (
        "give whole numbers >= 1 (e.g. 10,20,100)" if f.item is int else "give comma-separated numbers (e.g. 1e-4,3e-4)"
    )


def _how_many(f: Field) -> str:
    return f"give {f.meta['count'] or 'one or more'} comma-separated numbers"


def _scalar(f: Field, text: str):
    try:
        return {"int": int, "float": float}.get(f.kind, str)(text)
    except ValueError:
        raise OptionError(f.name, text, f"give {'a whole number' if f.kind == 'int' else 'a number'}") from None


def _number_list(f: Field, value, items: list):
    if not items:
        raise OptionError(f.name, value, _how_many(f))
    kind = int if f.item is int else float
    try:
        return tuple(kind(v) if isinstance(v, str) or (kind is float and type(v) is int) else v for v in items)
    except ValueError:
        raise OptionError(f.name, value, _list_of(f)) from None


def coerce(f: Field, value):
    """A value from TOML, JSON or the command line as the field's type: comma strings split, lists become
    tuples, a single number becomes a one-item list, numbers read from text."""
    if value is None or (
        isinstance(value, str) and value.lower() == "none" and f.optional and f.kind not in ("str", "choice")
    ):
        return None
    if f.kind in ("numbers", "names"):
        items = (
            value.split(",") if isinstance(value, str) else list(value) if isinstance(value, (list, tuple)) else [value]
        )
        items = [v.strip() if isinstance(v, str) else v for v in items]
        items = [v for v in items if v != ""]
        if f.kind == "names":
            return () if items == ["none"] else tuple(str(v) for v in items)  # aug = "none": no item
        return _number_list(f, value, items)
    if f.kind in ("int", "float") and isinstance(value, str):
        return _scalar(f, value)
    if f.kind == "float" and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def from_dict(cls: type, table: dict, *, where: str, strict: bool = True) -> Any:
    """A config from a mapping of option names (fields, flags or aliases; dashes or underscores) to values,
    checked. An unknown key is one error naming the nearest option (strict) or is dropped (a run.json of an
    older version)."""
    values = {}
    for key, value in table.items():
        f = field_named(cls, key)
        if f is None:
            if not strict:
                continue
            names = [g.name for g in schema(cls)]
            close = difflib.get_close_matches(key.replace("-", "_"), names, n=1)
            hint = f"did you mean `{close[0]}`?" if close else f"its options: {', '.join(names)}"
            raise FeatxError(f"{where}: `{key}` is not an option of {cls.__name__}; {hint}")
        values[f.name] = coerce(f, value)
    missing = [f for f in schema(cls) if f.required and f.name not in values]
    if missing:
        raise MissingOption(missing[0], f"{where}: set `{missing[0].name}` (required)")
    return cls(**values)  # a Config checks itself


def to_dict(config) -> dict:
    """The config as JSON values (tuples as lists): what run.json and the recipe records store."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()}


def in_use(config) -> dict:
    """to_dict without the options that do nothing here (an `only_with` whose field has another value)."""
    unused = {
        f.name
        for f in dataclasses.fields(config)
        if f.metadata.get("only_with") and getattr(config, f.metadata["only_with"][0]) != f.metadata["only_with"][1]
    }
    return {k: v for k, v in to_dict(config).items() if k not in unused}
