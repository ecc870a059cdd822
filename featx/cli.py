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


# --- extract -----------------------------------------------------------------------------------------


@cli.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
def extract() -> None:
    """Stage 1: frozen backbone -> transfer values in HDF5."""
    _not_implemented("extract")


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
