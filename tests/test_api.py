"""The edges of featx: what `import featx` offers (lazily), the error type the library raises without
knowing click, the CLI's mapping of it to exit 2, comma lists read once (by featx.core.configs), the choices
stated once, and a pipeline that is handed the command group instead of importing the CLI."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
import subprocess
import sys
import typing

import click
import pytest
from click.testing import CliRunner

import featx
from featx.core import choices, configs
from featx.core.configs import coerce, field_named
from featx.core.errors import FeatxError
from featx.front.cli import cli, main
from featx.front.stages import STAGES


def _modules_loaded_by(code: str) -> set[str]:
    """The modules a fresh interpreter has loaded after running `code` (this process has imported torch)."""
    out = subprocess.run(
        [sys.executable, "-c", f"{code}\nimport sys; print(' '.join(sys.modules))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return set(out.split())


# --- the package's API ---------------------------------------------------------------------------------


def test_every_exported_name_resolves_to_what_its_module_defines():
    # Import every submodule first: a package attribute named like a submodule would now be that module.
    for info in pkgutil.iter_modules(featx.__path__):
        if info.name != "__main__":  # running it runs the CLI
            importlib.import_module(f"featx.{info.name}")
    for name in featx.__all__:
        value = getattr(featx, name)
        assert not inspect.ismodule(value), f"featx.{name} is a module, shadowing the export"
        if name != "__version__":
            module, _, attribute = featx._API[name].partition(":")
            assert value is getattr(importlib.import_module(module), attribute or name)
    from featx import HeadConfig, grid, predict_split, run_finetune, run_probe, run_recipe, train_heads

    assert run_finetune.__module__ == "featx.finetune.run" and run_finetune.__name__ == "finetune"
    assert predict_split.__name__ == "predict" and train_heads.__name__ == "train"
    assert grid(lr=[1e-3, 3e-3], dropout=[0.0, 0.5]) == [
        HeadConfig(lr=lr, dropout=d) for lr in (1e-3, 3e-3) for d in (0.0, 0.5)
    ]
    for function in (run_probe, run_recipe, predict_split):  # keyword-only, as the charter says
        assert all(p.kind == p.KEYWORD_ONLY for p in inspect.signature(function).parameters.values())
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        featx.nothing  # noqa: B018


def test_import_featx_and_its_command_line_do_not_import_torch():
    loaded = _modules_loaded_by("import featx; featx.__all__; featx.FeatxError")
    assert "torch" not in loaded and "click" not in loaded  # the error type needs no click either
    loaded = _modules_loaded_by("import featx.front.cli, featx.front.recipes")  # what `featx --help` and planning load
    assert "torch" not in loaded and "featx.front.cli" in loaded


def test_pipeline_does_not_import_the_cli():
    loaded = _modules_loaded_by("import featx.front.recipes")
    assert "featx.front.recipes" in loaded and "featx.front.cli" not in loaded
    assert "commands" in inspect.signature(featx.run_recipe).parameters


# --- errors ------------------------------------------------------------------------------------------


def test_featx_error_is_a_plain_exception_with_exit_code_2():
    assert not issubclass(FeatxError, click.ClickException) and issubclass(FeatxError, Exception)
    e = FeatxError("x.h5: no such file; pass --cache PATH")
    assert (e.message, str(e), e.exit_code) == ("x.h5: no such file; pass --cache PATH",) * 2 + (2,)


@pytest.mark.parametrize("how", ["main", "standalone"])
def test_the_cli_reports_a_featx_error_in_one_line_with_exit_2(how, tmp_path, capsys, monkeypatch):
    args = ["data", "info", "--cache", str(tmp_path / "missing.h5")]  # a nested group: featx data info
    if how == "main":
        monkeypatch.setattr(sys, "argv", ["featx", *args])
        with pytest.raises(SystemExit) as exit:
            main()
        code, stderr = exit.value.code, capsys.readouterr().err
    else:  # click's standalone mode, as CliRunner (and `cli()` called directly) runs the group
        result = CliRunner().invoke(cli, args)
        code, stderr = result.exit_code, result.stderr
    assert code == 2 and stderr.count("\n") == 1 and "Traceback" not in stderr
    assert stderr.startswith("featx: error: ") and "missing.h5: no such file" in stderr


def test_a_failing_recipe_stage_names_the_stage_and_the_recipe_key(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe = tmp_path / "r.toml"
    recipe.write_text('# a report on a run that is not there\n[report]\nrun = "nowhere"\nout = "report"\n')
    result = CliRunner().invoke(cli, ["run", str(recipe)])
    assert result.exit_code == 2 and "Traceback" not in result.stderr
    last = result.stderr.splitlines()[-1]
    assert last.startswith("featx: error: [report] ") and "nowhere" in last and last.endswith("=VALUE)")
    with pytest.raises(FeatxError, match=r"^\[report\] .*nowhere"):  # the Python API raises it as it is
        featx.run_recipe(recipe=recipe, commands=cli)


# --- comma lists -----------------------------------------------------------------------------------------


def _params(command: click.Command):
    for param in command.params:
        yield command, param
    for sub in getattr(command, "commands", {}).values():
        yield from _params(sub)


def test_comma_lists_are_read_once_by_the_configs():
    number_list = re.compile(r"(FLOAT|INT)(\[,|,)")
    lists = {(cmd.name, p.name) for cmd, p in _params(cli) if number_list.match(p.metavar or "")}
    assert lists == {
        ("extract", "mean"),
        ("extract", "std"),
        ("probe", "lr"),
        ("probe", "weight_decay"),
        ("probe", "label_smoothing"),
        ("probe", "dropout"),
        ("probe", "lr_decay"),
        ("probe", "k"),
    }
    for cmd, p in _params(cli):  # click passes them on as text: featx.core.configs.coerce reads them
        if (cmd.name, p.name) in lists:
            assert p.type is click.STRING
    import featx.front.cli as module

    assert not [
        n
        for n, v in vars(module).items()
        if inspect.isclass(v) and issubclass(v, click.ParamType) and v.__module__ == "featx.front.cli"
    ]
    assert coerce(field_named(configs.ProbeConfig, "lr"), "1e-4, 3e-4,") == (1e-4, 3e-4)
    assert coerce(field_named(configs.ExtractConfig, "mean"), "0.5,0.25,1") == (0.5, 0.25, 1.0)
    assert coerce(field_named(configs.ProbeConfig, "k"), "10,20") == (10, 20)
    with pytest.raises(configs.OptionError, match="whole numbers"):
        coerce(field_named(configs.ProbeConfig, "k"), "10,2.5")


@pytest.mark.parametrize(
    "args, message",
    [
        (["probe", "--lr", "1e-3,fast"], "--lr 1e-3,fast: give comma-separated numbers (e.g. 1e-4,3e-4)"),
        (["probe", "--dropout", ","], "--dropout ,: give one or more comma-separated numbers"),
        (["extract", "--backbone", "resnet18", "--mean", "0.5,0.5"], "--mean 0.5,0.5: give 3 comma-separated numbers"),
    ],
)
def test_float_list_errors_name_the_option(args, message, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["featx", *args, "--out", str(tmp_path / "out")])
    with pytest.raises(SystemExit) as exit:
        main()
    stderr = capsys.readouterr().err
    assert exit.value.code == 2 and stderr.count("\n") == 1 and message in stderr
    assert not (tmp_path / "out").exists()


# --- choices ---------------------------------------------------------------------------------------------


def test_every_cli_choice_comes_from_featx_choices():
    tuples = {v for v in vars(choices).values() if isinstance(v, tuple)}
    for cmd, p in _params(cli):
        if isinstance(p.type, click.Choice):
            assert tuple(p.type.choices) in tuples, f"featx {cmd.name} --{p.name}: choices not from featx.core.choices"
    for name, value in vars(choices).items():
        if typing.get_origin(value) is typing.Literal:
            derived = [v for v in vars(choices).values() if v == typing.get_args(value)]
            assert derived, f"{name}: no tuple derived from it"


def test_module_constants_are_the_choices_and_the_api_is_typed_with_the_literals():
    from featx.core import device
    from featx.evaluate import metrics, report
    from featx.evaluate import scoring as predict
    from featx.finetune import run as finetune
    from featx.nets import heads, optim, views
    from featx.probe import run as probe
    from featx.probe import sweep

    assert heads.NORMALIZE is choices.NORMALIZE and optim.OPTIMIZERS is choices.OPTIMIZERS
    assert optim.SCHEDULES is choices.FINETUNE_SCHEDULES
    assert device.PRECISIONS is choices.PRECISIONS and metrics.ENSEMBLES is choices.ENSEMBLES
    assert tuple(views.VIEW_SETS) == choices.VIEW_SET_NAMES
    hints = typing.get_type_hints
    assert hints(probe.run_probe)["eval_views"] == hints(probe.run_probe)["train_views"] == choices.ViewSelection
    assert hints(probe.run_probe)["head"] is choices.ProbeHead
    assert hints(finetune.FinetuneConfig)["schedule"] is choices.FinetuneSchedule
    assert all(hints(s.config)["device"] is choices.Device for s in STAGES.values() if "device" in hints(s.config))
    assert hints(predict.predict)["eval_views"] == hints(report.write_report)["eval_views"] == choices.ViewSelection
    assert hints(featx.extract_features)["views"] is choices.ViewSet
    with pytest.raises(FeatxError, match="--head knn: choose one of linear, mlp"):
        sweep._check(None, None, "knn")


# --- views ---------------------------------------------------------------------------------------------


def test_predict_and_report_take_eval_views_as_probe_does():
    by_command = {cmd.name: {p.name for p in cmd.params} for cmd in cli.commands.values()}
    for name in ("probe", "predict", "report"):
        assert "eval_views" in by_command[name] and "views" not in by_command[name]
    assert "views" in by_command["extract"]
    for function in (featx.predict_split, featx.predict_images, featx.write_report):
        assert "eval_views" in inspect.signature(function).parameters
