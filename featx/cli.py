"""The `featx` command line: a thin click layer over the Python API.

Every command parses and validates its options, calls one API function and prints its summary. User
mistakes surface as FeatxError (one line, exit 2); Ctrl-C exits 130 with a hint that the work resumes.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from featx import __version__
from featx.choices import (ACTIVATION_NAMES, BN_MODES, DEVICES, IMAGE_NORMALIZE, EVAL_VIEWS, FEATURE_DTYPES, FINETUNE_HEADS, FINETUNE_SCHEDULES, NORMALIZE,
                           OPTIMIZERS, PRECISIONS, PROBE_HEADS, PROBE_SCHEDULES, SAVE_MODES, SPLITS, VIEW_SET_NAMES)
from featx.errors import FeatxError


class CliError(click.ClickException):
    """A FeatxError as click reports it: `featx: error: <the line>` on stderr, exit 2."""

    exit_code = 2

    def show(self, file=None) -> None:
        click.echo(f"featx: error: {self.format_message()}", err=True, file=file)


class FeatxGroup(click.Group):
    """The command group, translating the library's FeatxError into a click error. Done here rather than in
    main() so that every way of running the group reports it alike: main(), click's standalone mode
    (CliRunner in the tests) and `featx run`."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except FeatxError as e:
            error = CliError(e.message)
            error.exit_code = e.exit_code
            raise error from None


class NumberList(click.ParamType):
    """A comma list of numbers, e.g. `1e-4,3e-4` (a probe sweep: every combination of the lists is trained),
    `0.5,0.5,0.5` (count=3: exactly three) or `10,20,100` (whole=True: counts of at least 1)."""

    def __init__(self, count: int | None = None, *, whole: bool = False) -> None:
        self.count, self.whole = count, whole
        unit = "INT" if whole else "FLOAT"
        self.name = ",".join([unit] * count) if count else f"{unit}[,{unit}...]"

    def convert(self, value, param, ctx):
        if isinstance(value, (list, tuple)):
            return tuple(value)
        try:
            numbers = tuple(float(v) for v in str(value).split(",") if v.strip())
        except ValueError:
            self.fail(f"{value!r} is not a comma list of numbers (e.g. 1e-4,3e-4)", param, ctx)
        if not numbers or (self.count and len(numbers) != self.count):
            self.fail(f"{value!r}: give {self.count or 'one or more'} comma-separated numbers", param, ctx)
        if self.whole:
            if any(v < 1 or v != int(v) for v in numbers):
                self.fail(f"{value!r}: give whole numbers >= 1 (e.g. 10,20,100)", param, ctx)
            return tuple(int(v) for v in numbers)
        return numbers


@click.group(cls=FeatxGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="featx")
def cli() -> None:
    """Transfer learning on small-image classification.

    \b
    featx data prepare   decode a dataset once into an HDF5 cache
    featx extract        frozen backbone -> cached transfer values (stage 1)
    featx probe          heads on cached features, sweeps in one pass (stage 2)
    featx finetune       end-to-end training (stage 3)
    featx predict        crop and snapshot ensembles, challenge submission
    featx report         the analysis a researcher looks at
    featx run            recipes that chain the stages
    """


# --- data --------------------------------------------------------------------------------------------


@cli.group()
def data() -> None:
    """Decode datasets into the cache that every stage reads."""


@data.command("prepare")
@click.option("--data", "source", metavar="SRC",
              help="tiny-imagenet-200.zip, its extracted folder, an ImageFolder root (train/<class>/*.jpg, "
                   "val/<class>/..., test/...) or a cache .h5. Default: data/tiny-imagenet-200.zip, downloaded "
                   "if absent.")
@click.option("--cache", type=click.Path(dir_okay=False),
              help="Cache file to write. Default: data/cache/<dataset>-<size>[-c<K>][-p<N>].h5")
@click.option("--image-size", default=64, show_default=True, type=click.IntRange(min=8),
              help="Side of the square images in the cache (others are scaled and centre-cropped).")
@click.option("--classes", type=click.IntRange(min=1), help="Keep only the first K classes (wnids order).")
@click.option("--per-class", type=click.IntRange(min=1), help="Keep only the first N train images per class.")
@click.option("--skip-bad", is_flag=True, help="Skip undecodable images (listed, and recorded in the cache).")
@click.option("--jobs", default=-1, show_default=True, type=int, help="Decoding processes (-1: all cores).")
def data_prepare(source, cache, image_size, classes, per_class, skip_bad, jobs) -> None:
    """Decode a dataset once into the HDF5 cache (reused while the source is unchanged)."""
    from featx.data import cache_info, prepare_cache

    path = prepare_cache(source, cache=cache, image_size=image_size, classes=classes, per_class=per_class,
                         skip_bad=skip_bad, n_jobs=jobs)
    _echo_cache_info(cache_info(path))


@data.command("info")
@click.option("--cache", type=click.Path(dir_okay=False), help="Cache file. Default: every cache in data/cache/.")
def data_info(cache) -> None:
    """Splits, counts, classes, image size, path and size on disk of a cache."""
    from featx.data import CACHE_DIR, cache_info

    paths = [cache] if cache else sorted(CACHE_DIR.glob("*.h5"))
    if not paths:
        raise FeatxError(f"no cache in {CACHE_DIR}/; run `featx data prepare` first or pass --cache PATH")
    for path in paths:
        _echo_cache_info(cache_info(path))


def _echo_cache_info(info: dict) -> None:
    click.echo(f"{info['path']}  ({info['size_bytes'] / 1e6:.1f} MB)")
    size = info["image_size"]
    click.echo(f"  dataset  {info['dataset']} ({info['kind']}), {info['classes']} classes, {size}x{size} RGB")
    for split, count in info["splits"].items():
        click.echo(f"  {split:<8} {count} images")
    if info["skipped"]:
        click.echo(f"  skipped  {len(info['skipped'])} undecodable images (listed in the cache attributes)")


# --- extract -----------------------------------------------------------------------------------------


def _list_backbones(ctx: click.Context, _param, value: bool) -> None:
    if not value or ctx.resilient_parsing:
        return
    from featx.backbones import list_backbones

    click.echo(f"{'name':<18}{'dim':>6}{'size':>6}  mean/std")
    for s in list_backbones():
        click.echo(f"{s.name:<18}{s.feature_dim:>6}{s.input_size:>6}  {s.mean}/{s.std}")
    click.echo("timm:<name>       any timm model, when timm is installed")
    ctx.exit(0)


@cli.command()
@click.option("--list-backbones", is_flag=True, expose_value=False, is_eager=True, callback=_list_backbones,
              help="Print the registered backbones with feature dims and input sizes, then exit.")
@click.option("--data", "data_", metavar="SRC", help="Zip, folder, ImageFolder root or decoded cache (default: ./data).")
@click.option("--backbone", required=True, help="Registered name (see --list-backbones) or timm:<name>.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Feature file to write (.h5).")
@click.option("--weights", default="default", show_default=True, help="default (torchvision), none, or a state_dict PATH.")
@click.option("--size", type=click.IntRange(16), help="Input resolution [default: per backbone].")
@click.option("--views", type=click.Choice(VIEW_SET_NAMES), default="ten", show_default=True,
              help="The views to compute and store: the full image, its mirror too, or five crops and their mirrors.")
@click.option("--crop", type=click.IntRange(1), default=56, show_default=True, help="Corner-crop size in pixels.")
@click.option("--splits", help="Comma-separated splits [default: all in the data].")
@click.option("--classes", type=click.IntRange(1), help="Only the first K classes.")
@click.option("--per-class", type=click.IntRange(1), help="Only the first N train images per class.")
@click.option("--batch-size", type=click.IntRange(1), help="Images per batch [default: 256 on CUDA; on CPU 16 views' worth: 16 full, 8 flip, 1 ten].")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
@click.option("--precision", type=click.Choice(PRECISIONS), default="auto", show_default=True)
@click.option("--mean", type=NumberList(3), help="Normalisation mean override, e.g. 0.5,0.5,0.5.")
@click.option("--std", type=NumberList(3), help="Normalisation std override, e.g. 0.5,0.5,0.5.")
@click.option("--dtype", type=click.Choice(FEATURE_DTYPES), default="float16", show_default=True)
@click.option("--compile", "compile_", is_flag=True, help="torch.compile the backbone.")
@click.option("--aug-views", type=click.IntRange(0), default=0, show_default=True,
              help="K augmented views per train image (aug0..augK-1): brightness/contrast jitter of the full "
                   "image or a corner crop, as Milani's v3 trained.")
@click.option("--aug-seed", type=int, default=0, show_default=True, help="Seed of the augmented views.")
@click.option("--layers", metavar="SPEC",
              help="Several depths per view, concatenated: lastN (a CNN's last N stages, average-pooled; a ViT's "
                   "class tokens of its last N blocks) or lastN+avg (a ViT's, plus its mean patch token).")
def extract(data_, backbone, out, weights, size, views, crop, splits, classes, per_class, batch_size, device,
            precision, mean, std, dtype, compile_, aug_views, aug_seed, layers) -> None:
    """Stage 1: frozen backbone -> transfer values in HDF5."""
    from featx.extract import extract_features

    path = extract_features(
        data=data_, backbone=backbone, out=out, weights=weights, size=size, views=views, crop=crop,
        splits=splits.split(",") if splits else None, classes=classes, per_class=per_class,
        batch_size=batch_size, device=device, precision=precision, mean=mean, std=std, compile=compile_,
        dtype=dtype, aug_views=aug_views, aug_seed=aug_seed, layers=layers)
    click.echo(f"features: {path}")


# --- probe -------------------------------------------------------------------------------------------


@cli.command()
@click.option("--features", required=True, type=click.Path(path_type=Path), help="Feature file from `featx extract`.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Run directory to write.")
@click.option("--head", type=click.Choice(PROBE_HEADS), default="linear", show_default=True,
              help="knn: cosine k-NN with votes exp(sim/0.07) (DINO); ncm: nearest class mean (cosine); no training.")
@click.option("--hidden", type=click.IntRange(1), default=1024, show_default=True, help="MLP hidden units.")
@click.option("--k", type=NumberList(whole=True), default="10,20,100", show_default=True,
              help="--head knn: neighbour counts, all scored in one pass.")
@click.option("--select", default="holdout:0.1", show_default=True,
              help="Where head, epoch, k and ensembles are chosen: holdout:F (a stratified share F of train, "
                   "val then scored once) or val (the reports' protocol: optimistic).")
@click.option("--label-smoothing", type=NumberList(), default="0.1", show_default=True)
@click.option("--optimizer", type=click.Choice(OPTIMIZERS), default="adam", show_default=True)
@click.option("--lr", type=NumberList(), default="6.5e-4", show_default=True)
@click.option("--lr-decay", type=float, default=0.713, show_default=True, help="Exponential decay per epoch.")
@click.option("--schedule", type=click.Choice(PROBE_SCHEDULES), default="exponential", show_default=True)
@click.option("--weight-decay", type=NumberList(), default="0.0116", show_default=True,
              help="L2 (decoupled with adamw); weights only.")
@click.option("--dropout", type=NumberList(), default="0", show_default=True, help="On the head's input.")
@click.option("--epochs", type=click.IntRange(1), default=10, show_default=True)
@click.option("--batch-size", type=click.IntRange(1), default=100, show_default=True)
@click.option("--train-views", default="all", show_default=True, metavar="all|full|NAME,...",
              help="Views drawn from, one at random per image and step: all (every deterministic view), full, or "
                   "stored view names such as full,top_left,aug0,aug1.")
@click.option("--eval-views", default="all", show_default=True, metavar="all|full|NAME,...",
              help="Views whose softmax is averaged on val: all, full, or deterministic view names.")
@click.option("--normalize", type=click.Choice(NORMALIZE), default="none", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True)
@click.option("--save", type=click.Choice(SAVE_MODES), default="best", show_default=True,
              help="Keep snapshots of the best head only, or of every head.")
@click.option("--keep", type=int, default=20, show_default=True, help="Best snapshots kept per head.")
@click.option("--snapshot-every", type=int, metavar="STEPS",
              help="Also validate and offer a snapshot every STEPS training steps, not only after each epoch.")
@click.option("--stream", is_flag=True, help="Read batches from HDF5 instead of RAM (automatic when too big).")
@click.option("--feature-set", default="all", show_default=True, metavar="SETS",
              help="The columns heads see in a --layers file: all, lastN (the last N stages or class tokens), "
                   "lastN+avg (and the mean patch token); a comma list sweeps several in one pass.")
def probe(features, out, lr, weight_decay, label_smoothing, dropout, k, feature_set, **options) -> None:
    """Stage 2: train classifier heads on cached features; comma lists sweep every combination in one pass."""
    from featx.probe import format_summary, format_table, grid, run_probe

    heads = grid(lr=lr, weight_decay=weight_decay, label_smoothing=label_smoothing, dropout=dropout)
    result = run_probe(features=features, out=out, heads=heads, k=list(k), feature_sets=feature_set.split(","),
                       progress=sys.stderr.isatty(), **options)
    click.echo(format_table(result))
    click.echo(f"{format_summary(result, options['select'])}; {len(result.names)} head(s) in "
               f"{result.seconds:.1f}s -> {out}")
    if options["snapshot_every"]:
        from featx.runs import read_run

        snap = read_run(out).checkpoints[0]
        click.echo(f"best snapshot: head {snap.key}, epoch {snap.epoch}, step {snap.step}: val top-1 "
                   f"{snap.val_top1:.2%} ({snap.file})")


# --- finetune ----------------------------------------------------------------------------------------


@cli.command()
@click.option("--data", "data_", metavar="SRC", help="Zip, folder, ImageFolder root or decoded cache (default: ./data).")
@click.option("--backbone", required=True, help="Registered name (see `featx extract --list-backbones`).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run directory to write.")
@click.option("--weights", default="default", show_default=True, help="default (torchvision), none, or a state_dict PATH.")
@click.option("--size", type=click.IntRange(16), help="Input resolution the images are upsampled to [default: per backbone].")
@click.option("--head", type=click.Choice(FINETUNE_HEADS), default="linear", show_default=True)
@click.option("--lstm-group", type=click.IntRange(1), default=64, show_default=True, help="LSTM head: channels per group, the sequence length.")
@click.option("--lstm-stages", default="layer3,layer4", show_default=True, help="LSTM head: the ResNet stages it reads (layer1..layer4).")
@click.option("--activation", type=click.Choice(ACTIVATION_NAMES), default="relu", show_default=True, help="ResNets: every ReLU of the body.")
@click.option("--normalize", type=click.Choice(IMAGE_NORMALIZE), default="channel", show_default=True,
              help="channel: the weights' mean/std; mean-image: subtract the mean training image.")
@click.option("--epochs", type=click.IntRange(1), default=10, show_default=True)
@click.option("--batch-size", type=click.IntRange(1), default=128, show_default=True, help="Global batch (split over torchrun processes).")
@click.option("--optimizer", type=click.Choice(OPTIMIZERS), default="adam", show_default=True)
@click.option("--lr", type=click.FloatRange(0, min_open=True), default=1e-3, show_default=True)
@click.option("--weight-decay", type=click.FloatRange(0), default=0.0, show_default=True)
@click.option("--schedule", type=click.Choice(FINETUNE_SCHEDULES), default="cosine", show_default=True)
@click.option("--warmup-epochs", type=click.FloatRange(0), default=0.0, show_default=True)
@click.option("--decay", type=click.FloatRange(0, 1, min_open=True), help="lr factor per epoch (exponential, default 0.9) or per --step-epochs (step, default 0.1).")
@click.option("--step-epochs", type=click.IntRange(1), help="Epochs between lr steps [default: epochs / 3].")
@click.option("--label-smoothing", type=click.FloatRange(0, 1, max_open=True), default=0.0, show_default=True)
@click.option("--dropout", type=click.FloatRange(0, 1, max_open=True), default=0.0, show_default=True, help="Before the head.")
@click.option("--drop-path", type=click.FloatRange(0, 1, max_open=True), help="Stochastic depth of the last block [default: the backbone's own].")
@click.option("--aug", default="flip", show_default=True, help="Comma-separated: flip,crop,corners,color,rotate,scale,shift,shear,noise,invert (or none); NAME:VALUE sets a magnitude, e.g. rotate:45.")
@click.option("--crop", type=click.IntRange(1), default=56, show_default=True, help="Crop size of the crop/corners augmentations.")
@click.option("--mixup", type=click.FloatRange(0), default=0.0, show_default=True, help="MixUp alpha (0: off).")
@click.option("--cutmix", type=click.FloatRange(0), default=0.0, show_default=True, help="CutMix alpha (0: off).")
@click.option("--freeze-epochs", type=click.IntRange(0), default=0, show_default=True, help="Train only the head for the first N epochs.")
@click.option("--bn", type=click.Choice(BN_MODES), default="auto", show_default=True,
              help="BatchNorm: frozen statistics and affine, train (batch statistics), sync (across torchrun processes, CUDA); auto: frozen for folded weights (identity statistics), else train.")
@click.option("--unfreeze-on-plateau", type=click.IntRange(1), metavar="PATIENCE",
              help="Train only the head (for at least --freeze-epochs) until val top-1 has not improved for PATIENCE epochs.")
@click.option("--init-head", metavar="RUN", help="Start the head from the best head of this `featx probe` run.")
@click.option("--init", help="From scratch (--weights none): kaiming, xavier or gaussian:STD.")
@click.option("--classes", type=click.IntRange(1), help="Only the first K classes.")
@click.option("--per-class", type=click.IntRange(1), help="Only the first N train images per class.")
@click.option("--overfit", type=click.IntRange(1), help="Sanity check: train on N training images, expect 100%.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--precision", type=click.Choice(PRECISIONS), default="auto", show_default=True,
              help="auto: bf16 on CUDA (fp16 where it lacks bf16); on CPU bf16 where it has AVX-512 BF16/AMX, else fp32.")
@click.option("--channels-last/--no-channels-last", default=True, show_default=True)
@click.option("--compile", "compile_", is_flag=True, help="torch.compile the model.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
@click.option("--keep", type=click.IntRange(1), default=3, show_default=True, help="Keep the K best checkpoints by val top-1.")
@click.option("--snapshot-every", type=click.IntRange(1), metavar="STEPS",
              help="Also evaluate on val every STEPS optimizer steps and offer those snapshots to --keep.")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last checkpoint.")
def finetune(data_, aug, compile_, out, resume, lstm_stages, **options) -> None:
    """Stage 3: end-to-end training (fine-tuning or from scratch); torchrun for several GPUs."""
    from featx.finetune import FinetuneConfig
    from featx.finetune import finetune as run_finetune

    augs = [] if aug.strip() in ("", "none") else [a.strip() for a in aug.split(",")]
    config = FinetuneConfig(data=data_, aug=augs, compile=compile_, lstm_stages=[a.strip() for a in lstm_stages.split(",")],
                            **options)
    result = run_finetune(config, out=out, resume=resume)
    if result.epochs:
        click.echo(f"best val top-1 {result.best_val_top1:.2%}; run: {result.out}")


# --- predict -----------------------------------------------------------------------------------------


@cli.command()
@click.option("--run", "runs", multiple=True, required=True, type=click.Path(path_type=Path),
              help="Run directory of `featx probe` or `featx finetune`; repeat to average several runs.")
@click.option("--split", type=click.Choice(SPLITS), default="val", show_default=True)
@click.option("--eval-views", type=click.Choice(EVAL_VIEWS), default="all", show_default=True,
              help="all: softmax averaged over a probe run's stored views (a finetune run: the image and its "
                   "mirror); full: the full image only.")
@click.option("--ensemble", default="best", show_default=True,
              help="Each run's checkpoints averaged: best, top:K, greedy (added best first while val top-1 "
                   "improves) or all.")
@click.option("--out", default="preds", show_default=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder for predictions.csv (and submission.txt for the test split).")
@click.option("--images", multiple=True, type=click.Path(path_type=Path),
              help="Classify these image files or folders instead of a split (`--images *.jpg` works).")
@click.option("--skip-bad", is_flag=True, help="With --images: skip undecodable images instead of stopping.")
@click.option("--image-size", type=click.IntRange(8), default=64, show_default=True,
              help="With --images: the side the dataset's images had (64 for Tiny ImageNet).")
@click.option("--weights", type=click.Path(dir_okay=False, path_type=Path),
              help="With --images: the backbone weights file a probe run's features were extracted with.")
@click.option("--data", "data_", metavar="SRC", help="A finetune run's dataset [default: the one it trained on].")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
@click.argument("more_images", nargs=-1, type=click.Path(path_type=Path))
def predict(runs, split, eval_views, ensemble, out, images, skip_bad, image_size, weights, data_, device,
            more_images) -> None:
    """Score runs on a split or on image files: view, snapshot and run ensembles; the challenge submission."""
    from featx.predict import predict as predict_split
    from featx.predict import format_curve, predict_images, write_curve, write_predictions, write_submission

    if more_images and not images:
        raise FeatxError(f"{more_images[0]}: unexpected argument; to classify image files pass --images")
    if images:
        p = predict_images(runs=runs, images=[*images, *more_images], eval_views=eval_views, ensemble=ensemble,
                           skip_bad=skip_bad, image_size=image_size, weights=weights, data=data_, device=device)
        for i, row in enumerate(p.top(5)):
            click.echo(f"{p.ids[i]}: " + ", ".join(f"{p.class_names[c]} {p.probs[i, c]:.1%}" for c in row))
    else:
        p = predict_split(runs=runs, split=split, eval_views=eval_views, ensemble=ensemble, curve=split == "val",
                          data=data_, device=device)
        if p.has_labels:
            click.echo(f"{split}: {p.accuracy_text(1)}, {p.accuracy_text(5)} (95% bootstrap intervals) on "
                       f"{len(p.ids)} images; {len(p.members)} checkpoint(s) of {len(runs)} run(s): "
                       f"{100 * p.gain():+.2f} points top-1 over the best single checkpoint"
                       + ("; selected on val (optimistic)" if p.optimistic else ""))
        if p.curve is not None:
            click.echo(f"val top-1 of the best N checkpoints (top:N), best marked *:\n{format_curve(p)}")
            click.echo(f"ensemble size: {', '.join(map(str, write_curve(p, out)))}")
        if split == "test":
            click.echo(f"submission: {write_submission(p, out / 'submission.txt')}")
    click.echo(f"predictions: {write_predictions(p, out / 'predictions.csv')}")


# --- report ------------------------------------------------------------------------------------------


@cli.command()
@click.option("--run", multiple=True, required=True, type=click.Path(path_type=Path),
              help="Run directory to report on; repeat for a leaderboard and a paired comparison of the best two.")
@click.option("--out", default="report", show_default=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--split", type=click.Choice(SPLITS), default="val", show_default=True,
              help="The split to analyse; it needs labels.")
@click.option("--eval-views", type=click.Choice(EVAL_VIEWS), default="all", show_default=True,
              help="The stored views averaged, as in predict.")
@click.option("--ensemble", default="best", show_default=True, help="best, top:K, greedy or all (as in predict).")
@click.option("--tsne-classes", metavar="WNID,...",
              help="Classes of the t-SNE map of training images [default: the seed report's seven: convertible, "
                   "sports car, plunger, Egyptian cat, Persian cat, golden retriever, bullet train where present, "
                   "else the first 7].")
@click.option("--data", "data_", metavar="SRC",
              help="A finetune run's dataset [default: the one it trained on]; for a probe run, the dataset its "
                   "features came from, to show the error gallery's images.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
def report(run, out, split, eval_views, ensemble, tsne_classes, data_, device) -> None:
    """Accuracy, per-class errors, confusions, curves, t-SNE (and a finetune run's filters) as HTML."""
    from featx.report import write_report

    tsne = [w.strip() for w in tsne_classes.split(",") if w.strip()] if tsne_classes else None
    page = write_report(run=run, out=out, split=split, eval_views=eval_views, ensemble=ensemble, data=data_,
                        device=device, tsne_classes=tsne)
    click.echo(f"report: {page}")


# --- run ---------------------------------------------------------------------------------------------


@cli.command()
@click.argument("recipe", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--set", "overrides", multiple=True, metavar="STAGE.KEY=VALUE",
              help="Override one option of a stage (VALUE: a TOML literal, else a string); repeatable.")
@click.option("--dry-run", is_flag=True, help="Print the plan (each stage: run or skip, why, its command line) and stop.")
def run(recipe, overrides, dry_run) -> None:
    """Run a recipe (pipelines/NAME.toml): its stages in order, skipping those already done with the same options."""
    from featx.pipeline import run_recipe

    run_recipe(recipe=recipe, commands=cli, overrides=overrides, dry_run=dry_run)


def main() -> None:
    try:
        rv = cli.main(prog_name="featx", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("featx: interrupted; run the same command again to resume", err=True)
        sys.exit(130)
    except KeyboardInterrupt:
        click.echo("featx: interrupted; run the same command again to resume", err=True)
        sys.exit(130)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.UsageError as e:
        hint = f" (see `{e.ctx.command_path} --help`)" if e.ctx else ""
        click.echo(f"featx: error: {e.format_message()}{hint}", err=True)
        sys.exit(e.exit_code)
    except click.ClickException as e:
        e.show()
        _exit(e.exit_code)
    sys.exit(rv if isinstance(rv, int) else 0)


def _exit(code: int) -> None:
    """sys.exit, except where HDF5 holds a file it could not close (a write that met a full disk): the
    interpreter's cleanup would then crash in HDF5 (exit 139), so leave without it."""
    h5py = sys.modules.get("h5py")
    if h5py is not None and h5py.h5f.get_obj_ids(types=h5py.h5f.OBJ_FILE):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
