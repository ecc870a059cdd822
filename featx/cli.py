"""The `featx` command line: a thin click layer over the Python API.

Every command parses and validates its options, calls one API function and prints its summary. User
mistakes surface as FeatxError (one line, exit 2); Ctrl-C exits 130 with a hint that the work resumes.
"""

from __future__ import annotations

import sys

import click

from featx import __version__
from featx.errors import FeatxError


def _not_implemented(command: str):
    raise FeatxError(f"`featx {command}` is not implemented yet")


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
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


class FloatList(click.ParamType):
    """Comma-separated floats, e.g. `0.5,0.5,0.5` or `1e-4,3e-4`."""

    name = "floats"

    def convert(self, value, param, ctx):
        if isinstance(value, (list, tuple)):
            return list(value)
        try:
            return [float(v) for v in str(value).split(",") if v.strip()]
        except ValueError:
            self.fail(f"{value!r} is not a comma-separated list of numbers", param, ctx)


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
@click.option("--views", type=click.Choice(["full", "flip", "ten"]), default="ten", show_default=True)
@click.option("--crop", type=click.IntRange(1), default=56, show_default=True, help="Corner-crop size in pixels.")
@click.option("--splits", help="Comma-separated splits [default: all in the data].")
@click.option("--classes", type=click.IntRange(1), help="Only the first K classes.")
@click.option("--per-class", type=click.IntRange(1), help="Only the first N train images per class.")
@click.option("--batch-size", type=click.IntRange(1), help="Images per batch [default: 256 on CUDA, 32 on CPU].")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), default="auto", show_default=True)
@click.option("--mean", type=FloatList(), help="Normalisation mean override, e.g. 0.5,0.5,0.5.")
@click.option("--std", type=FloatList(), help="Normalisation std override, e.g. 0.5,0.5,0.5.")
@click.option("--dtype", type=click.Choice(["float16", "float32"]), default="float16", show_default=True)
@click.option("--compile", "compile_", is_flag=True, help="torch.compile the backbone.")
def extract(data_, backbone, out, weights, size, views, crop, splits, classes, per_class, batch_size, device,
            precision, mean, std, dtype, compile_) -> None:
    """Stage 1: frozen backbone -> transfer values in HDF5."""
    for opt, v in (("--mean", mean), ("--std", std)):
        if v is not None and len(v) != 3:
            raise click.BadParameter("give three comma-separated numbers (R,G,B)", param_hint=opt)
    from featx.extract import extract_features

    path = extract_features(
        data=data_, backbone=backbone, out=out, weights=weights, size=size, views=views, crop=crop,
        splits=splits.split(",") if splits else None, classes=classes, per_class=per_class,
        batch_size=batch_size, device=device, precision=precision, mean=mean, std=std, compile=compile_,
        dtype=dtype)
    click.echo(f"features: {path}")


# --- probe -------------------------------------------------------------------------------------------


@cli.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
def probe() -> None:
    """Stage 2: train classifier heads on cached features."""
    _not_implemented("probe")


# --- finetune ----------------------------------------------------------------------------------------


@cli.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
def finetune() -> None:
    """Stage 3: end-to-end training."""
    _not_implemented("finetune")


# --- predict -----------------------------------------------------------------------------------------


@cli.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
def predict() -> None:
    """Crop and snapshot ensembles; the challenge submission."""
    _not_implemented("predict")


# --- report ------------------------------------------------------------------------------------------


@cli.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
def report() -> None:
    """Accuracy, confusions, curves and t-SNE of a run, as HTML."""
    _not_implemented("report")


# --- run ---------------------------------------------------------------------------------------------


@cli.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
def run() -> None:
    """Run a recipe (pipelines/NAME.toml) that chains the stages."""
    _not_implemented("run")


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
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    sys.exit(rv if isinstance(rv, int) else 0)
