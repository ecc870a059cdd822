"""The `featx` command line: a thin click layer over the Python API.

A stage command's options are its config's fields (featx.core.configs), generated here: a new field appears in
`--help` with no other edit. The few options without a field are control options (`--out`, `--resume`,
`--config`, ...). Every stage command takes `--config FILE` (a TOML table of options, or a run's run.json) so
a run can be repeated exactly; options given on the command line override the file's. Each command builds
its config, calls its stage's entry point (featx.front.stages) and prints its summary. User mistakes surface as
FeatxError (one line, exit 2); Ctrl-C exits 130 with a hint that the work resumes.
"""

from __future__ import annotations

import json
import os
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import click

from featx import __version__
from featx.core.configs import (
    CompareConfig,
    ExtractConfig,
    Field,
    FinetuneConfig,
    MissingOption,
    OptionError,
    PredictConfig,
    PrepareConfig,
    ProbeConfig,
    ReportConfig,
    describe_range,
    field_named,
    from_dict,
    schema,
    show,
)
from featx.core.errors import FeatxError, FeatxWarning
from featx.front.stages import STAGES, StageSpec


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
        formatwarning = warnings.formatwarning
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("always", FeatxWarning)
                warnings.showwarning = _warning_shower(warnings.showwarning)
                warnings.formatwarning = _format_warning(formatwarning)
                return super().invoke(ctx)
        except OptionError as e:
            raise CliError(e.named(f"--{_flag(e.field)}")) from None
        except FeatxError as e:
            error = CliError(e.message)
            error.exit_code = e.exit_code  # type: ignore[misc]  # click types it ClassVar; it reads the instance's
            raise error from None
        finally:
            warnings.formatwarning = formatwarning  # catch_warnings restores showwarning, not this


def _warning_shower(outer):
    """showwarning for the commands: a FeatxWarning is one line on stderr. Every warning still reaches `outer`,
    what showed warnings before: it writes the others to stderr, or where a caller records warnings
    (warnings.catch_warnings(record=True): pytest.warns, a notebook) adds them all to the record."""

    def shower(message, category, filename, lineno, file=None, line=None) -> None:
        if issubclass(category, FeatxWarning):
            click.echo(f"featx: warning: {message}", err=True)
        outer(message, category, filename, lineno, file, line)

    return shower


def _format_warning(outer):
    """formatwarning for the commands: a FeatxWarning is shown once already (_warning_shower), as one line."""

    def format_warning(message, category, filename, lineno, line=None) -> str:
        return "" if issubclass(category, FeatxWarning) else outer(message, category, filename, lineno, line)

    return format_warning


def _flag(field: str) -> str:
    """The flag of a field of any stage (the fields of one name are one option everywhere)."""
    for stage in STAGES.values():
        f = field_named(stage.config, field)
        if f is not None:
            return f.flag
    return field.replace("_", "-")


def _click_type(f: Field):
    """What click reads the text as: a number, one of the choices, else the text itself. Lists stay text:
    featx.core.configs reads them (`coerce`) and checks every value (`validate`) where the config is built."""
    if f.kind == "choice" and f.name != "device":  # device: a choice, or cuda:N
        return click.Choice(f.choices)
    return {"int": int, "float": float}.get(f.kind, click.STRING)


def _metavar(f: Field) -> str | None:
    m = f.meta
    if m["metavar"] or f.kind not in ("int", "float", "numbers", "names") or m["repeat"]:
        return m["metavar"]
    unit = "INTEGER" if f.kind == "int" else "FLOAT" if f.kind == "float" else "INT" if f.item is int else "FLOAT"
    if f.kind in ("int", "float"):
        return f"{unit} RANGE" if describe_range(f) else None  # as click names its range types
    if f.kind == "names":
        return "NAME[,NAME...]"
    return ",".join([unit] * m["count"]) if m["count"] else f"{unit}[,{unit}...]"


class FieldOption(click.Option):
    """A config field's option: --help states its range (from the field) beside its default, as click does for
    its own range types."""

    def __init__(self, decls: list[str], field: Field, **attrs) -> None:
        super().__init__(decls, **attrs)
        self.field = field

    @property
    def bounds(self) -> str | None:
        """The range of a single number (a list's is in its help text)."""
        return describe_range(self.field) if self.field.kind in ("int", "float") else None

    def get_help_extra(self, ctx: click.Context):
        extra = super().get_help_extra(ctx)
        if self.bounds:
            extra["range"] = self.bounds
        return extra


def _default_text(value):
    """A list default as the comma list one would type (a repeated option's empty list as it is); click shows
    and converts the others itself."""
    return show(value) if isinstance(value, tuple) and value else value


def _option(f: Field) -> click.Option:
    """The click option of a config field, with the field's default: a value left at it (click's
    ParameterSource.DEFAULT) yields to --config FILE's."""
    m = f.meta
    name = f.flag
    if f.kind == "bool":
        decls = [f"--{name}/--no-{name}" if f.default else f"--{name}", f.name]
        return FieldOption(decls, f, is_flag=True, default=f.default, show_default=True, help=m["help"])
    if f.name == "compile":  # the bare flag, as before 0.2, still means on
        return FieldOption(
            [f"--{name}", f.name],
            f,
            type=click.Choice(f.choices),
            is_flag=False,
            flag_value="on",
            default=f.default,
            show_default=True,
            help=m["help"],
        )
    return FieldOption(
        [f"--{name}", f.name],
        f,
        type=_click_type(f),
        multiple=m["repeat"],
        default=None if f.required else _default_text(f.default),
        show_default=m["show_default"] and not f.required,
        metavar=_metavar(f),
        help=m["help"] + (" [required]" if f.required else ""),
    )


def _alias(f: Field, old: str) -> click.Option:
    def warn(ctx, _param, value):
        if value is not None:
            click.echo(f"featx: warning: --{old} is deprecated; use --{f.flag}", err=True)
        return value

    return click.Option(
        [f"--{old}", f"{f.name}__{old.replace('-', '_')}"],
        type=_click_type(f),
        metavar=_metavar(f),
        hidden=True,
        default=None,
        callback=warn,
        expose_value=True,
    )


def read_config_file(path: Path, cls: type) -> dict:
    """The options a --config file gives: a TOML table, or a run's run.json (its recorded options)."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:
        import tomli as tomllib
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise FeatxError(f"--config {path}: cannot read it ({e.strerror})") from None
    if Path(path).suffix == ".json":
        try:
            record = json.loads(text)
        except ValueError as e:
            raise FeatxError(f"--config {path}: not valid JSON ({e})") from None
        config = record.get("config", record)
        options = config.get("options", config)  # a probe run.json keeps the options as given apart
        return {k: v for k, v in options.items() if field_named(cls, k) is not None}
    try:
        tables = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise FeatxError(f"--config {path}: not valid TOML ({e})") from None
    if tables and all(isinstance(v, dict) for v in tables.values()):
        return _recipe_table(Path(path), tables, cls)
    return tables


RECIPE_CONTROL = ("out", "cache", "force", "json")  # a recipe's own keys for the command line's control options


def _recipe_table(path: Path, tables: dict, cls: type) -> dict:
    """A recipe given as --config: its table of this stage, `${stage.key}` references filled in from the other
    tables; the output and other control keys are the command line's to give."""
    from featx.front.recipes import REFERENCE

    stage = next(s.name for s in STAGES.values() if s.config is cls)
    if stage not in tables:
        raise FeatxError(
            f"--config {path}: a recipe without a [{stage}] table (its tables: {', '.join(tables)}); "
            f"run the whole recipe with `featx run {path}`"
        )

    def resolve(value):
        if isinstance(value, list):
            return [resolve(v) for v in value]
        if not isinstance(value, str):
            return value
        return REFERENCE.sub(lambda m: str(resolve(_recipe_value(tables, m[1], m[2], m[0]))), value)

    return {k: resolve(v) for k, v in tables[stage].items() if k not in RECIPE_CONTROL}


def _recipe_value(tables: dict, stage: str, key: str, reference: str):
    table = tables.get(stage, {})
    for k in (key, key.replace("_", "-"), key.replace("-", "_")):
        if k in table:
            return table[k]
    raise FeatxError(f"--config: {reference}: the recipe's [{stage}] table sets no `{key}`")


def build_config(cls: type, ctx: click.Context, params: dict, config_file: Path | None):
    """The config from --config FILE's options overridden by those given on the command line."""
    from click.core import ParameterSource

    given = dict(read_config_file(config_file, cls)) if config_file else {}
    for key, value in params.items():
        name = key.split("__")[0]  # a deprecated alias fills its field
        if value is not None and ctx.get_parameter_source(key) != ParameterSource.DEFAULT:
            given[name] = value
    try:
        return from_dict(cls, given, where=f"--config {config_file}" if config_file else ctx.command_path)
    except MissingOption as e:
        raise click.UsageError(f"Missing option '--{e.field.flag}'", ctx) from None


class StageCommand(click.Command):
    """A stage's command (featx.front.stages.STAGES): its options are the stage config's fields plus `control`.
    `run_config(config, **control)` runs the stage and prints its summary: what the command line runs once it
    has built the config, and what `featx run` runs for a recipe's stage."""

    def __init__(self, stage: StageSpec, run_config: Callable, control: Sequence[click.Parameter]) -> None:
        self.stage, self.run_config = stage, run_config
        fields = schema(stage.config)
        options = [_option(f) for f in fields] + [_alias(f, old) for f in fields for old in f.meta["aliases"]]
        config_option = click.Option(
            ["--config", "config_file"],
            type=click.Path(dir_okay=False, path_type=Path),
            help="A TOML table of options or a run's run.json; options given here override its values.",
        )
        quiet_option = click.Option(
            ["--quiet", "-q"], is_flag=True, help="No progress bars or progress lines; results and errors still print."
        )
        super().__init__(
            stage.name,
            callback=self._run,
            params=[*control, *options, config_option, quiet_option],
            help=run_config.__doc__,
        )

    def _run(self, config_file, quiet, **params):
        from featx.core import progress

        progress.quiet = quiet
        fields = {k: params.pop(k) for k in list(params) if field_named(self.stage.config, k.split("__")[0])}
        config = build_config(self.stage.config, click.get_current_context(), fields, config_file)
        return self.run_config(config, **params)


def stage_command(name: str, *control: click.Parameter):
    """Make the decorated function (config, **control) the command of stage `name`, in the group its command
    words name."""

    def decorate(run_config):
        stage = STAGES[name]
        group = cli
        for word in stage.command[:-1]:
            group = group.commands[word]
        command = StageCommand(stage, run_config, control)
        group.add_command(command)
        return command

    return decorate


FORCE = click.Option(
    ["--force"],
    is_flag=True,
    help="Replace an output made with other settings; the old one stays until the new one is complete.",
)
JSON = click.Option(
    ["--json", "as_json"],
    is_flag=True,
    help="Print results.json (what the run scored, where it chose, which views) instead of the summary.",
)


def _echo_results(folder: Path) -> None:
    click.echo((folder / "results.json").read_text().rstrip())


OUT_FILE = click.Option(
    ["--out"], required=True, type=click.Path(dir_okay=False, path_type=Path), help="Feature file to write (.h5)."
)
OUT_RUN = click.Option(
    ["--out"], required=True, type=click.Path(file_okay=False, path_type=Path), help="Run directory to write."
)


@click.group(cls=FeatxGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="featx")
def cli() -> None:
    """Transfer learning on small-image classification: decode a dataset once (data prepare), extract a frozen
    backbone's transfer values (extract), train heads on them (probe) or the whole network (finetune), then
    predict, report and compare; `featx run` chains the stages of a recipe."""


# --- data --------------------------------------------------------------------------------------------


@cli.group()
def data() -> None:
    """Decode datasets into the cache that every stage reads."""


@stage_command(
    "prepare",
    click.Option(
        ["--cache"],
        type=click.Path(dir_okay=False, path_type=Path),
        help="Cache file to write. Default: data/cache/<dataset>-<size>[-c<K>][-p<N>].h5",
    ),
)
def data_prepare(config: PrepareConfig, *, cache: Path | None = None) -> None:
    """Decode a dataset once into the HDF5 cache (reused while the source is unchanged)."""
    from featx.data.cache import cache_info
    from featx.front.stages import prepare

    _echo_cache_info(cache_info(prepare(config, cache=cache)))


@data.command("info")
@click.option("--cache", type=click.Path(dir_okay=False), help="Cache file. Default: every cache in data/cache/.")
def data_info(cache) -> None:
    """Splits, counts, classes, image size, path and size on disk of a cache."""
    from featx.data.cache import CACHE_DIR, cache_info

    paths = [cache] if cache else sorted(CACHE_DIR.glob("*.h5"))
    if not paths:
        raise FeatxError(f"no cache in {CACHE_DIR}/; run `featx data prepare` first or pass --cache PATH")
    for path in paths:
        _echo_cache_info(cache_info(path))


def _echo_cache_info(info: dict) -> None:
    from featx.core.atomic import size_text

    click.echo(f"{info['path']}  ({size_text(info['size_bytes'])})")
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
    from featx.nets.backbones import list_backbones

    click.echo(f"{'name':<18}{'dim':>6}{'size':>6}  mean/std")
    for s in list_backbones():
        click.echo(f"{s.name:<18}{s.feature_dim:>6}{s.input_size:>6}  {s.mean}/{s.std}")
    click.echo("timm:<name>       any timm model, when timm is installed")
    ctx.exit(0)


@stage_command(
    "extract",
    OUT_FILE,
    FORCE,
    click.Option(
        ["--list-backbones"],
        is_flag=True,
        expose_value=False,
        is_eager=True,
        callback=_list_backbones,
        help="Print the registered backbones with feature dims and input sizes, then exit.",
    ),
)
def extract(config: ExtractConfig, *, out: Path, force: bool = False) -> None:
    """Stage 1: frozen backbone -> transfer values in HDF5."""
    from featx.front.stages import extract as run_extract

    click.echo(f"features: {run_extract(config, out=out, force=force)}")


# --- probe -------------------------------------------------------------------------------------------


@stage_command("probe", OUT_RUN, FORCE, JSON)
def probe(config: ProbeConfig, *, out: Path, force: bool = False, as_json: bool = False) -> None:
    """Stage 2: train classifier heads on cached features; comma lists sweep every combination in one pass.
    Given no --lr, --weight-decay, --label-smoothing or --dropout, a small default sweep (lr 3e-4,1e-3,3e-3 x
    weight decay 1e-3,0.0116,3e-2: DEFAULT_SWEEP in featx.core.configs) is trained and chosen on the holdout;
    given any, only those are swept and the others keep one value each (lr 6.5e-4, weight decay 0.0116,
    label smoothing 0.1, dropout 0)."""
    from featx.core.runs import read_run
    from featx.front.stages import probe as run_probe
    from featx.probe.run import format_summary, format_table

    result = run_probe(config, out=out, force=force, progress=True)
    if as_json:
        return _echo_results(out)
    click.echo(format_table(result))
    click.echo(
        f"{format_summary(result, config.select)}; {len(result.names)} head(s) in {result.seconds:.1f}s -> {out}"
    )
    if config.snapshot_every:
        snap = read_run(out).checkpoints[0]
        click.echo(
            f"best snapshot: head {snap.key}, epoch {snap.epoch}, step {snap.step}: val top-1 "
            f"{snap.val_top1:.2%} ({snap.file})"
        )


# --- finetune ----------------------------------------------------------------------------------------


@stage_command(
    "finetune",
    OUT_RUN,
    FORCE,
    JSON,
    click.Option(["--resume"], is_flag=True, hidden=True, help="No longer needed (before 0.2)."),
)
def finetune(
    config: FinetuneConfig, *, out: Path, force: bool = False, as_json: bool = False, resume: bool = False
) -> None:
    """Stage 3: end-to-end training (fine-tuning or from scratch); torchrun for several GPUs. The same command
    resumes an interrupted run."""
    from featx.finetune.run import eval_views
    from featx.front.stages import finetune as run_finetune

    if resume:
        click.echo(
            "featx: warning: --resume is deprecated and no longer needed: the same command resumes an interrupted run",
            err=True,
        )
    result = run_finetune(config, out=out, force=force)
    if as_json:
        return _echo_results(out)
    if result.epochs:
        click.echo(
            f"best val top-1 {result.best_val_top1:.2%} ({'+'.join(eval_views(config))} view); run: {result.out}"
        )


# --- predict -----------------------------------------------------------------------------------------


@stage_command(
    "predict",
    click.Option(
        ["--out"],
        type=click.Path(file_okay=False, path_type=Path),
        help="Folder for predictions.csv and results.json (and submission.txt for the test split). "
        "Default: preds/<run>-<split> (preds/<run>-images with --images), named after what it predicts and "
        "replaced when other settings predict it again.",
    ),
    FORCE,
    JSON,
    click.Argument(["more_images"], nargs=-1, type=click.Path(path_type=Path)),
)
def predict(
    config: PredictConfig,
    *,
    out: Path | None = None,
    force: bool = False,
    as_json: bool = False,
    more_images: tuple = (),
) -> None:
    """Score runs on a split or on image files: view, snapshot and run ensembles; the challenge submission."""
    from featx.core.configs import to_dict
    from featx.core.outputs import finish_folder, folder_settings, staging_folder

    if more_images and not config.images:
        raise FeatxError(f"{more_images[0]}: unexpected argument; to classify image files pass --images")
    config.images = (*config.images, *map(str, more_images))
    # without --out, the folder is named after the runs and split it predicts and replaced when other settings
    # predict them again, as before 0.3 (then one folder took every prediction)
    force = force or out is None
    out = out or default_predict_out(config)
    # what the predictions depend on: every option but where and how they are computed
    settings = folder_settings(
        {k: v for k, v in to_dict(config).items() if k not in ("device", "compile")}, config.runs
    )
    staging = staging_folder(out, settings, force=force)
    if staging is None:
        return _echo_results(out) if as_json else click.echo(f"predictions: {out / 'predictions.csv'}")
    _predict_into(config, staging, out, as_json=as_json)
    finish_folder(staging, out, settings)
    click.echo(f"predictions: {out / 'predictions.csv'}")


def default_predict_out(config: PredictConfig) -> Path:
    """preds/<runs>-<split or images>: predictions of other runs or splits land in other folders."""
    import re

    runs = "+".join(re.sub(r"[^\w.+-]+", "_", str(r)).strip("_.") for r in config.runs)
    return Path("preds") / f"{runs}-{'images' if config.images else config.split}"


def _predict_into(config: PredictConfig, folder: Path, out: Path, *, as_json: bool) -> None:
    """Score, print the summary and write every prediction file into `folder` (staged; `out` once complete)."""
    from featx.evaluate.writers import (
        format_curve,
        write_curve,
        write_prediction_results,
        write_predictions,
        write_submission,
    )
    from featx.front.stages import predict as run_predict

    started = time.perf_counter()
    p = run_predict(config)
    results = write_prediction_results(
        p,
        folder,
        runs=config.runs,
        ensemble=config.ensemble,
        eval_views=config.eval_views,
        seconds=time.perf_counter() - started,
        combine=config.combine,
    )
    if as_json:
        click.echo(json.dumps(results, indent=2))
    elif config.images:
        for i, row in enumerate(p.top(5)):
            click.echo(f"{p.ids[i]}: " + ", ".join(f"{p.class_names[c]} {p.probs[i, c]:.1%}" for c in row))
    if not config.images and not as_json:
        if p.has_labels:
            click.echo(
                f"{config.split}: {p.accuracy_text(1)}, {p.accuracy_text(5)} (95% bootstrap intervals) on "
                f"{len(p.ids)} images, views {'+'.join(p.views)} averaged; {len(p.members)} checkpoint(s) "
                f"of {len(config.runs)} run(s): "
                f"{100 * p.gain():+.2f} points top-1 over the best single checkpoint"
                + ("; selected on val (optimistic)" if p.optimistic else "")
            )
        if p.curve is not None:
            click.echo(f"val top-1 of the best N checkpoints (top:N), best marked *:\n{format_curve(p)}")
            click.echo(f"ensemble size: {', '.join(str(out / f.name) for f in write_curve(p, folder))}")
        if config.split == "test":
            write_submission(p, folder / "submission.txt")
            click.echo(f"submission: {out / 'submission.txt'}")
    write_predictions(p, folder / "predictions.csv")


# --- report ------------------------------------------------------------------------------------------


@stage_command(
    "report",
    click.Option(
        ["--out"],
        default="report",
        show_default=True,
        type=click.Path(file_okay=False, path_type=Path),
        help="Folder of the report page.",
    ),
    FORCE,
)
def report(config: ReportConfig, *, out: Path = Path("report"), force: bool = False) -> None:
    """Accuracy, per-class errors, confusions, curves, t-SNE (and a finetune run's filters) as HTML."""
    from featx.front.stages import report as run_report

    click.echo(f"report: {run_report(config, out=out, force=force)}")


# --- compare -----------------------------------------------------------------------------------------


@stage_command(
    "compare",
    click.Option(
        ["--out"],
        default="compare",
        show_default=True,
        type=click.Path(file_okay=False, path_type=Path),
        help="Folder of the feature files, runs, leaderboard and report.",
    ),
)
def compare(config: CompareConfig, *, out: Path = Path("compare")) -> None:
    """Several backbones on one dataset: extract, probe (the default sweep), score val; one leaderboard."""
    from featx.front.compare import format_leaderboard
    from featx.front.stages import compare as run_compare

    click.echo(format_leaderboard(run_compare(config, out=out)))
    click.echo(f"leaderboard: {out / 'leaderboard.txt'}, {out / 'results.json'}; report: {out / 'report'}")


# --- info --------------------------------------------------------------------------------------------


@cli.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print it as JSON.")
def info(path: Path, as_json: bool) -> None:
    """What PATH is (a cache, a feature file, a probe/finetune/predict run or a report): its settings, splits and
    sizes, its metrics, where it came from and what made it."""
    from featx.front.info import format_info
    from featx.front.info import info as describe

    d = describe(path)
    click.echo(json.dumps(d, indent=2, default=str) if as_json else format_info(d))


# --- env ---------------------------------------------------------------------------------------------


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print it as JSON.")
def env(as_json: bool) -> None:
    """Versions, CPU flags, what --precision auto and --device auto pick here, CUDA devices: for bug reports."""
    from featx.core.env import environment, format_environment

    click.echo(json.dumps(environment(), indent=2) if as_json else format_environment(environment()))


# --- run ---------------------------------------------------------------------------------------------


@cli.command()
@click.argument("recipe", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="STAGE.KEY=VALUE",
    help="Override one option of a stage (VALUE: a TOML literal, else a string); repeatable.",
)
@click.option(
    "--dry-run", is_flag=True, help="Print the plan (each stage: run or skip, why, its command line) and stop."
)
def run(recipe, overrides, dry_run) -> None:
    """Run a recipe (pipelines/NAME.toml): its stages in order, skipping those already done with the same options."""
    from featx.front.recipes import run_recipe

    run_recipe(recipe=recipe, commands=cli, overrides=overrides, dry_run=dry_run)


def option_table(command: click.Command) -> str:
    """The option table of a command (docs/options.md), rendered from its click parameters (config fields and control
    options alike) so that it cannot drift from `--help`: option (with metavar or choices), default, help."""
    ctx = click.Context(command, info_name=command.name)
    rows = ["| option | default | |", "| --- | --- | --- |"]
    for param in command.params:
        if isinstance(param, click.Option) and not param.hidden:
            help_text = " ".join((param.help or "").split())
            required = param.required or help_text.endswith("[required]")
            help_text = help_text.removesuffix("[required]").strip()
            option = " ".join(
                [
                    ", ".join(param.opts) + "".join(f"/{o}" for o in param.secondary_opts),
                    "" if param.is_bool_flag else param.make_metavar(ctx),
                ]
            ).strip()
            default = "(required)" if required else _table_default(param, param.get_default(ctx, call=False))
            rows.append(f"| `{_cell(option)}` | {default} | {_text(help_text)} |")
    return "\n".join(rows) + "\n"


def _table_default(param: click.Option, value) -> str:
    if param.is_bool_flag:
        return "on" if value is True else "off"
    hidden = not param.show_default or value in (None, ()) or callable(value)
    shown = "" if hidden else f"`{_cell(str(value))}`"
    bounds = param.bounds if isinstance(param, FieldOption) else None
    return ", ".join(filter(None, [shown, bounds and _text(bounds)]))


def _cell(text: str) -> str:
    """Text inside a table cell's code span: only the column separator needs escaping."""
    return text.replace("|", "\\|")


def _text(text: str) -> str:
    """Plain text in a table cell: `<name>` would read as an HTML tag, `*` as emphasis."""
    return _cell(text).replace("<", "\\<").replace("*", "\\*")


def main() -> None:
    try:
        rv = cli.main(prog_name="featx", standalone_mode=False)
    except (click.exceptions.Abort, KeyboardInterrupt):
        from featx.core.outputs import resume_hint

        click.echo(f"featx: interrupted; {resume_hint(sys.argv[1:])}", err=True)
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
