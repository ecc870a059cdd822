"""`featx run`: recipes that chain the stages and skip what is already done.

A recipe is a TOML file of stage tables, run in the order written::

    [prepare]                          # the table's name is the stage's name and, by default, its command
    cache = "data/cache/tiny-imagenet-200-64.h5"

    [extract]
    data = "${prepare.cache}"          # ${STAGE.KEY}: that earlier stage's value; this stage now depends on it
    backbone = "mobilenet_v2"
    out = "features/mobilenet_v2-flip.h5"

    [lstm]                             # a second stage of one kind takes another name and says its command
    command = "finetune"

Commands: prepare (`featx data prepare`), extract, probe, finetune, predict, report. Keys are the fields of
the command's config (featx.core.configs) or their flags, with dashes or underscores (`per-class`, `per_class`,
predict's `run` for `runs`), plus the command's control options (`out`, `cache`, `force`). A
table loads straight into the config, which checks it as the command line's does: a list is a list
(`lr = [1e-4, 3e-4]` is a sweep), a comma string too, `true`/`false` set a flag; an unknown key is one error
naming the nearest option. `--set probe.lr=1e-3` overrides one value: a TOML literal, else
a string (`--set extract.weights=../shared/weights/x.pth`).

Every stage names its output (`cache` for prepare, `out` for the others). When a stage finishes, a record
goes inside its output directory (`.featx-stage.json`) or beside its output file (`NAME.featx-stage.json`):
the stage's hash, the recipe, the resolved options, versions and timings. The hash covers the command's resolved
options (defaults included; not an option that does nothing with the others, such as --calibration without
--precision int8) and the hashes of the stages it references. A stage is skipped when its record holds the same
hash and no stage it references runs. Before a stage runs again, an output whose record holds another hash is
replaced: with `--force` where the command keeps the old output until the new one is complete (extract, probe,
finetune), else deleted first (the commands refuse to mix settings in one output); an output without a record, left
by an interrupted stage, is handed to the command as it is, which resumes it. Input files are not hashed: after
replacing a dataset under the same path, delete the outputs made from it.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import platform
import re
import shlex
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any, Protocol, cast

import click

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

from featx import __version__
from featx.core.configs import OptionError, field_named, from_dict, in_use, schema, show
from featx.core.errors import FeatxError
from featx.front.stages import STAGES

RECORD = ".featx-stage.json"
REFERENCE = re.compile(r"\$\{([\w-]+)\.([\w-]+)\}")


@dataclass
class Stage:
    name: str
    command: str  # a key of featx.front.stages.STAGES
    options: dict  # as in the recipe, after --set and ${...} substitution
    config: object  # the stage's config (featx.core.configs), defaults included
    control: dict  # its options without a config field: the output, force
    params: dict  # config and control as JSON values: what the hash covers
    depends: dict[str, str]  # referenced stage -> its hash
    hash: str
    output: Path
    run: bool = True
    reason: str = ""
    seconds: float | None = None

    def command_line(self) -> str:
        return shlex.join(["featx", *STAGES[self.command].command, *_argv(self.config, self.control)])


class StageRunner(Protocol):
    """What a recipe needs of a stage's command (featx.front.cli.StageCommand; the CLI imports this module)."""

    def run_config(self, config: Any, **control: Any) -> Any: ...


def _command(commands: click.Group, name: str) -> StageRunner:
    cmd: click.Command = commands
    for part in STAGES[name].command:
        assert isinstance(cmd, click.Group)  # every word but the last names a group
        cmd = cmd.commands[part]
    return cast(StageRunner, cmd)  # featx.front.cli builds every stage's command as one


def _key(key: str) -> str:
    return key.replace("-", "_")


def _literal(text: str):
    # TOML gives numbers, booleans and lists their types; anything else (a path, `none`) stays a string.
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def read_recipe(path: Path, *, overrides: Sequence[str] = ()) -> dict[str, dict]:
    """The recipe's stage tables in order, keys with underscores, `--set STAGE.KEY=VALUE` overrides applied."""
    try:
        tables = tomllib.loads(path.read_text())
    except OSError as e:
        raise FeatxError(f"{path}: cannot read the recipe ({e.strerror})") from None
    except tomllib.TOMLDecodeError as e:
        raise FeatxError(f"{path}: not valid TOML ({e})") from None
    for name, table in tables.items():
        if not isinstance(table, dict):
            raise FeatxError(f"{path}: `{name}` is outside a [stage] table; a recipe holds stage tables only")
    stages = {name: {_key(k): v for k, v in table.items()} for name, table in tables.items()}
    for item in overrides:
        target, eq, text = item.partition("=")
        name, dot, key = target.partition(".")
        if not (eq and dot and key):
            raise FeatxError(f"--set {item}: write STAGE.KEY=VALUE, e.g. --set probe.lr=1e-3")
        if name not in stages:
            raise FeatxError(f"--set {item}: {path} has no stage [{name}]; its stages: {', '.join(stages)}")
        stages[name][_key(key)] = _literal(text)
    return stages


def _substitute(table: dict, earlier: dict[str, Stage], where: str) -> tuple[dict, dict[str, str]]:
    depends: dict[str, str] = {}

    def value(m: re.Match) -> str:
        name, key = m[1], _key(m[2])
        if name not in earlier:
            raise FeatxError(f"{where}: {m[0]} names no earlier stage (earlier: {', '.join(earlier) or 'none'})")
        if key not in earlier[name].options:
            raise FeatxError(f"{where}: {m[0]}: stage [{name}] sets no `{key}`")
        depends[name] = earlier[name].hash
        return str(earlier[name].options[key])

    def sub(v):
        if isinstance(v, str):
            return REFERENCE.sub(value, v)
        return [sub(x) for x in v] if isinstance(v, list) else v

    return {k: sub(v) for k, v in table.items()}, depends


def _configure(command: str, options: dict, where: str) -> tuple[object, dict]:
    """The stage's config and control values from its table: the TOML loads straight into the config."""
    stage = STAGES[command]
    control_keys = {name for name, _ in stage.control}
    control = {k: options[k] for k in options if k in control_keys}
    fields = {k: v for k, v in options.items() if k not in control_keys}
    unknown = [k for k in fields if field_named(stage.config, k) is None]
    if unknown:
        names = [f.name for f in schema(stage.config)] + sorted(control_keys)
        close = difflib.get_close_matches(unknown[0], names, n=1)
        hint = f"did you mean `{close[0]}`?" if close else f"see `{stage.name} --help`"
        raise FeatxError(f"{where}: `{unknown[0]}` is not an option of `featx {stage.name}`; {hint}")
    for key, value in control.items():
        if isinstance(value, bool) != (key in stage.flags):
            raise FeatxError(
                f"{where}: `{key}` = {value!r}: "
                + (f"a flag; write {key} = true or false" if key in stage.flags else "give a path")
            )
    try:
        config = from_dict(stage.config, fields, where=where)
    except OptionError as e:
        raise FeatxError(f"{where}: {e.named(e.field + ' =')}") from None
    return config, control


def _argv(config, control: dict) -> list[str]:
    """The command line that runs the same config: the options that differ from their defaults."""
    argv = [a for k, v in control.items() if v is not False for a in ([f"--{k}"] if v is True else [f"--{k}", str(v)])]
    for f in schema(type(config)):  # type: ignore[arg-type]  # mypy: a type(x) is not Hashable, wrongly
        value = getattr(config, f.name)
        if not f.required and value == f.default:
            continue
        if f.kind == "bool":
            argv.append(f"--{f.flag}" if value else f"--no-{f.flag}")
        elif isinstance(value, tuple) and f.meta["repeat"]:
            argv += [a for v in value for a in (f"--{f.flag}", str(v))]
        elif value is not None:
            argv += [f"--{f.flag}", show(value)]
    return argv


def _record_path(output: Path) -> Path:
    return output / RECORD if output.is_dir() else output.with_name(output.name + RECORD)


def _read_record(output: Path) -> dict | None:
    try:
        return json.loads(_record_path(output).read_text())
    except (OSError, ValueError):
        return None


def _decide(stage: Stage, earlier: dict[str, Stage]) -> tuple[bool, str]:
    if not stage.output.exists():
        return True, f"no output yet ({stage.output})"
    upstream = [d for d in stage.depends if earlier[d].run]
    if upstream:
        return True, f"{', '.join(upstream)} runs"
    record = _read_record(stage.output)
    if record is None:
        return True, f"{stage.output} has no stage record (interrupted, or not made by `featx run`)"
    if record.get("hash") == stage.hash:
        return False, f"up to date ({stage.output}, hash {stage.hash})"
    old = record.get("params", {})
    changed = [
        f"{k.rstrip('_')} {json.dumps(old.get(k))} -> {json.dumps(v)}"
        for k, v in stage.params.items()
        if old.get(k) != v
    ]
    return True, "options changed: " + ("; ".join(changed) or "the options of a stage it references")


def plan(*, recipe: str | Path, overrides: Sequence[str] = ()) -> list[Stage]:
    """Resolve every stage of the recipe (all are checked before any runs) and decide which run and why."""
    recipe = Path(recipe)
    stages: dict[str, Stage] = {}
    cwd = Path.cwd().resolve()
    for name, table in read_recipe(recipe, overrides=overrides).items():
        where = f"{recipe} [{name}]"
        command = table.pop("command", name)
        if command not in STAGES:
            raise FeatxError(
                f'{where}: not a command ({", ".join(STAGES)}); add command = "..." to a stage named otherwise'
            )
        options, depends = _substitute(table, stages, where)
        config, control = _configure(command, options, where)
        params = {**in_use(config), **control}
        output_key = STAGES[command].output
        if output_key not in options:
            raise FeatxError(f"{where}: set `{output_key}`; a stage names its output so that a re-run finds it")
        output = Path(options[output_key])
        if output.resolve() in (cwd, *cwd.parents):  # outputs may be deleted when stale: never the working tree
            raise FeatxError(f"{where}: {output_key} = {output}: give the stage a directory of its own")
        digest = hashlib.sha256(json.dumps([command, params, depends], sort_keys=True).encode()).hexdigest()[:16]
        stage = Stage(name, command, options, config, control, params, depends, digest, output)
        stage.run, stage.reason = _decide(stage, stages)
        stages[name] = stage
    return list(stages.values())


def format_plan(stages: Sequence[Stage]) -> str:
    width = max(len(s.name) for s in stages)
    return "\n".join(
        f"  {s.name:<{width}}  {'run ' if s.run else 'skip'}  {s.reason}\n  {'':<{width}}        {s.command_line()}"
        for s in stages
    )


def _versions() -> dict:
    return {
        "featx": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        **{p: version(p) for p in ("torch", "torchvision", "numpy", "h5py", "click")},
    }


def _execute(stage: Stage, *, commands: click.Group, recipe: dict) -> None:
    from featx.core.runs import write_json  # torch comes with it: not needed to plan

    control = {k: Path(v) if isinstance(v, str) else v for k, v in stage.control.items()}
    if _read_record(stage.output) is not None:
        # Made by another configuration (or before an upstream stage ran again). A command that keeps the old
        # output until the new one is complete is forced; the others start afresh.
        if "force" in STAGES[stage.command].flags:
            control["force"] = True
        else:
            shutil.rmtree(stage.output) if stage.output.is_dir() else stage.output.unlink()
        _record_path(stage.output).unlink(missing_ok=True)
    click.echo(f"== [{stage.name}] {stage.command_line()}", err=True)
    started, t0 = time.strftime("%Y-%m-%dT%H:%M:%S%z"), time.perf_counter()
    cmd = _command(commands, stage.command)
    try:
        cmd.run_config(stage.config, **control)
    except OptionError as e:
        raise FeatxError(
            f"[{stage.name}] {e.named(e.field + ' =')} (in the recipe: --set {stage.name}.{e.field}=...)"
        ) from None
    except FeatxError as e:
        raise FeatxError(
            f"[{stage.name}] {e.message} (in the recipe: --set {stage.name}.{e.option or 'KEY'}="
            f"{'...' if e.option else 'VALUE'})"
        ) from None
    stage.seconds = time.perf_counter() - t0
    if not stage.output.exists():
        raise FeatxError(f"[{stage.name}] finished without writing {stage.output}")
    write_json(
        _record_path(stage.output),
        {
            "format": "featx-stage-1",
            "stage": stage.name,
            "command": stage.command_line(),
            "hash": stage.hash,
            "depends": stage.depends,
            "params": stage.params,
            "recipe": recipe,
            "versions": _versions(),
            "started": started,
            "seconds": round(stage.seconds, 3),
        },
    )
    click.echo(f"== [{stage.name}] done in {stage.seconds:.1f}s", err=True)


def run_recipe(
    *, recipe: str | Path, commands: click.Group, overrides: Sequence[str] = (), dry_run: bool = False
) -> list[Stage]:
    """Print the plan, then (unless dry_run) run the stages that need it, in order; returns the stages.
    `commands` is the `featx` click group (`featx.front.cli.cli`), whose commands run the stages and check their
    options: the pipeline drives the command line without importing it."""
    stages = plan(recipe=recipe, overrides=overrides)
    click.echo(f"{recipe}: {sum(s.run for s in stages)} of {len(stages)} stages to run")
    click.echo(format_plan(stages))
    if dry_run:
        return stages
    recorded = {"path": str(recipe), "text": Path(recipe).read_text(), "overrides": list(overrides)}
    for stage in stages:
        if stage.run:
            _execute(stage, commands=commands, recipe=recorded)
    ran = [f"{s.name} {s.seconds:.1f}s" for s in stages if s.run]
    click.echo(f"{recipe}: ran {', '.join(ran) or 'nothing'}; skipped {sum(not s.run for s in stages)} up-to-date")
    return stages
