"""One schema per stage: every command-line option is a config field (or a listed control option), every field
an option; recipes, --config files and run.json go through the same configs; defaults are stated once."""

from __future__ import annotations

import inspect
import json
import sys

import click
import pytest
from click.testing import CliRunner

from featx.core import configs
from featx.core.configs import ExtractConfig, FinetuneConfig, OptionError, ProbeConfig, from_dict, schema, to_dict
from featx.core.errors import FeatxError
from featx.front.cli import cli, main
from featx.front.stages import STAGES, StageSpec

# The options without a field: outputs, and flags that steer a command rather than describe its work.
CONTROL = {
    "prepare": {"cache"},
    "extract": {"out", "force", "list_backbones"},
    "probe": {"out", "force", "as_json"},
    "finetune": {"out", "force", "as_json", "resume"},
    "predict": {"out", "force", "as_json", "more_images"},
    "report": {"out", "force"},
    "compare": {"out"},
}
COMMON_CONTROL = {"config_file", "quiet", "help"}


def command(stage: str) -> click.Command:
    cmd = cli
    for part in STAGES[stage].command:
        cmd = cmd.commands[part]
    return cmd


def test_the_command_line_has_a_command_per_stage_and_no_other():
    def stage_commands(group):
        for cmd in group.commands.values():
            yield from stage_commands(cmd) if isinstance(cmd, click.Group) else [cmd]

    made = {cmd.stage.name for cmd in stage_commands(cli) if hasattr(cmd, "stage")}
    assert made == set(STAGES) == set(CONTROL)
    for name, stage in STAGES.items():
        assert command(name).stage is stage and stage.output in dict(stage.control)


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_every_option_is_a_field_and_every_field_an_option(stage):
    cls, cmd = STAGES[stage].config, command(stage)
    params = {p.name for p in cmd.params} | {"help"}
    fields = {f.name for f in schema(cls)}
    assert params - fields - COMMON_CONTROL == CONTROL[stage], f"featx {stage}: options without a field"
    assert {name for name, _ in STAGES[stage].control} <= CONTROL[stage], f"featx {stage}: a recipe's control"
    assert fields <= params, f"featx {stage}: fields without an option: {fields - params}"
    options = {p.name: p for p in cmd.params if isinstance(p, click.Option)}
    for f in schema(cls):
        shown = options[f.name].default
        expected = None if f.required else f.default
        if isinstance(expected, tuple) and not f.meta["repeat"]:
            expected = ",".join(map(str, expected))
        assert shown == expected, f"--{f.flag}: click's default is not the field's"
        assert f"--{f.flag}" in options[f.name].opts


def test_a_new_field_is_a_new_option_with_no_other_edit():
    @configs.dataclass
    class Toy(configs.Config):
        backbone: str = configs.option(configs.MISSING, "Network.")
        views: configs.ViewSet = configs.option("flip", "Views.")
        lr: tuple[float, ...] = configs.option((1e-3,), "Rates.", min=0, min_open=True)
        warmup: int = configs.option(2, "Warm-up epochs.", min=0)

    group = click.Group()
    from featx.front.cli import StageCommand

    seen = {}
    toy = StageSpec("toy", ("toy",), Toy, run=lambda config: config)
    group.add_command(StageCommand(toy, lambda config: seen.setdefault("config", config), ()))
    runner = CliRunner()
    assert "--warmup INTEGER RANGE" in runner.invoke(group, ["toy", "--help"]).output
    assert runner.invoke(group, ["toy", "--backbone", "r18", "--warmup", "5", "--lr", "1e-4,1e-3"]).exit_code == 0
    assert seen["config"] == Toy(backbone="r18", warmup=5, lr=(1e-4, 1e-3))
    assert from_dict(Toy, {"backbone": "r18", "warmup": 3}, where="toy.toml").warmup == 3


@pytest.mark.parametrize(
    "table, message",
    [
        ({"features": "f.h5", "lrr": 1e-3}, "`lrr` is not an option of ProbeConfig; did you mean `lr`?"),
        ({"features": "f.h5", "lr": -1}, "lr=(-1.0,): must be > 0"),
        ({"features": "f.h5", "head": "svm"}, "head='svm': choose one of linear, mlp, knn, ncm"),
        ({"features": "f.h5", "k": [0]}, "give whole numbers >= 1"),
        ({"features": "f.h5", "device": "tpu"}, "choose one of auto, cpu, cuda or cuda:N"),
        ({"lr": 1e-3}, "set `features` (required)"),
    ],
)
def test_tables_are_checked_in_one_place_naming_the_field(table, message):
    with pytest.raises(FeatxError) as e:
        from_dict(ProbeConfig, table, where="r.toml [probe]")
    assert message in e.value.message


def test_values_read_alike_from_toml_json_and_text():
    a = from_dict(
        ProbeConfig, {"features": "f.h5", "lr": "1e-4,3e-4", "k": "5,10", "feature_set": "last2"}, where="cli"
    )
    b = from_dict(
        ProbeConfig, {"features": "f.h5", "lr": [1e-4, 3e-4], "k": [5, 10], "feature-set": ["last2"]}, where="toml"
    )
    assert a == b and a.lr == (1e-4, 3e-4) and a.k == (5, 10) and a.feature_set == ("last2",)
    assert from_dict(ProbeConfig, {"features": "f.h5", "lr": 1e-3}, where="toml").lr == (1e-3,)
    assert json.loads(json.dumps(to_dict(a))) == to_dict(a)
    assert from_dict(ProbeConfig, to_dict(a), where="run.json") == a


def test_an_old_finetune_record_still_loads():
    # run.json and last.pt before 0.2 stored compile as a bool and lists where the config now has tuples
    old = {
        "backbone": "resnet18",
        "compile": False,
        "aug": ["flip", "crop"],
        "lstm_stages": ["layer3", "layer4"],
        "removed_option": 1,
    }
    config = from_dict(FinetuneConfig, old, where="run.json", strict=False)
    assert config.compile == "off" and config.aug == ("flip", "crop")
    assert to_dict(config)["aug"] == ["flip", "crop"]


def test_option_errors_name_the_flag_on_the_command_line(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(
        sys, "argv", ["featx", "probe", "--features", "f.h5", "--lr", "-1", "--out", str(tmp_path / "r")]
    )
    with pytest.raises(SystemExit) as exit:
        main()
    err = capsys.readouterr().err
    assert exit.value.code == 2 and err == "featx: error: --lr -1.0: must be > 0\n"
    assert not (tmp_path / "r").exists()


def test_keyword_helpers_default_as_their_configs():
    """The keyword helpers and the configs agree on every default they share (the configs' are the ones the CLI,
    recipes and stages use)."""
    from featx.data.cache import prepare_cache
    from featx.evaluate.images import predict_images
    from featx.evaluate.report import write_report
    from featx.evaluate.scoring import predict
    from featx.features.extract import extract_features
    from featx.probe.run import run_probe

    pairs = [
        (prepare_cache, configs.PrepareConfig),
        (extract_features, ExtractConfig),
        (run_probe, ProbeConfig),
        (predict, configs.PredictConfig),
        (predict_images, configs.PredictConfig),
        (write_report, configs.ReportConfig),
    ]
    for function, cls in pairs:
        defaults = {f.name: f.default for f in schema(cls) if not f.required}
        for name, p in inspect.signature(function).parameters.items():
            if name in defaults and p.default is not inspect.Parameter.empty:
                given = tuple(p.default) if isinstance(p.default, list) else p.default
                assert given == defaults[name], f"{function.__name__}({name}={p.default!r}) vs {cls.__name__}"


def test_config_file_overridden_by_the_command_line(tmp_path, monkeypatch):
    from featx.front.cli import build_config

    toml = tmp_path / "probe.toml"
    toml.write_text('features = "f.h5"\nlr = [1e-4, 1e-3]\nepochs = 3\n')
    seen = {}
    cmd = command("probe")
    monkeypatch.setattr(
        cmd,
        "callback",
        lambda config_file, **params: seen.update(
            config=build_config(
                ProbeConfig, click.get_current_context(), {k: v for k, v in params.items() if k != "out"}, config_file
            )
        ),
    )
    CliRunner().invoke(cli, ["probe", "--config", str(toml), "--epochs", "5", "--out", "x"])
    assert seen["config"] == ProbeConfig(features="f.h5", lr=(1e-4, 1e-3), epochs=5)


def test_option_error_is_a_featx_error_with_the_field():
    e = OptionError("keep", 0, "must be >= 1")
    assert isinstance(e, FeatxError) and e.option == "keep" and e.named("--keep") == "--keep 0: must be >= 1"


def test_a_run_repeats_from_its_run_json(synth_cache, tmp_path, capsys, monkeypatch):
    from featx.core.runs import read_run
    from featx.features.extract import extract_features

    features = extract_features(
        data=synth_cache,
        backbone="resnet18",
        weights="none",
        size=32,
        views="flip",
        precision="fp32",
        out=tmp_path / "f.h5",
        progress=False,
    )

    def probe(*args):
        monkeypatch.setattr(sys, "argv", ["featx", "probe", *map(str, args)])
        with pytest.raises(SystemExit) as exit:
            main()
        assert exit.value.code == 0, capsys.readouterr().err

    probe(
        "--features",
        features,
        "--lr",
        "1e-3,3e-3",
        "--epochs",
        "2",
        "--select",
        "val",
        "--device",
        "cpu",
        "--out",
        tmp_path / "a",
    )
    probe("--config", tmp_path / "a" / "run.json", "--out", tmp_path / "b")
    a, b = read_run(tmp_path / "a"), read_run(tmp_path / "b")
    assert a.config["options"] == b.config["options"] and a.config["options"]["lr"] == [1e-3, 3e-3]
    assert a.config["resolved"] == b.config["resolved"] and a.config["resolved"]["device"] == "cpu"
    assert a.best["val_top1"] == b.best["val_top1"] and a.best["config"] == b.best["config"]


def test_library_warnings_are_one_line_on_the_command_line(capsys, monkeypatch):
    import warnings

    from featx.core.errors import FeatxWarning

    @cli.command("warns")
    def warns():
        warnings.warn("the holdout is small; selecting on loss", FeatxWarning, stacklevel=2)

    try:
        monkeypatch.setattr(sys, "argv", ["featx", "warns"])
        with pytest.raises(SystemExit) as exit:
            main()
        assert exit.value.code == 0
        assert capsys.readouterr().err == "featx: warning: the holdout is small; selecting on loss\n"
    finally:
        del cli.commands["warns"]


def test_each_default_is_written_once():
    """The keyword helpers take their defaults from the configs (`hidden: int = ProbeConfig.hidden`), never a
    literal of their own; the seed's head values live in HeadConfig alone."""
    import ast
    from pathlib import Path

    package = Path(configs.__file__).parents[1]
    helpers = {
        "probe/run.py": ["run_probe"],
        "features/extract.py": ["extract_features"],
        "data/cache.py": ["prepare_cache"],
        "evaluate/scoring.py": ["predict"],
        "evaluate/images.py": ["predict_images"],
        "evaluate/report.py": ["write_report"],
        "front/compare.py": ["compare"],
        "probe/sweep.py": ["train", "grid"],
    }
    fields = {f.name for stage in STAGES.values() for f in schema(stage.config)} | {
        "lr",
        "weight_decay",
        "label_smoothing",
    }
    for module, names in helpers.items():
        for node in ast.walk(ast.parse((package / module).read_text())):
            if isinstance(node, ast.FunctionDef) and node.name in names:
                args = node.args
                pairs = [
                    *zip(args.kwonlyargs, args.kw_defaults),
                    *zip(args.args[len(args.args) - len(args.defaults) :], args.defaults),
                ]
                for arg, default in pairs:
                    if arg.arg in fields and isinstance(default, (ast.Constant, ast.Tuple)):
                        try:
                            literal = ast.literal_eval(default)
                        except ValueError:  # a tuple of references, (HeadConfig.lr,)
                            continue
                        assert literal is None or literal == (), (
                            f"{module}:{node.name}({arg.arg}={literal!r}): take it from its config"
                        )
    for number in (6.5e-4, 0.0116, 0.713):  # the seed's lr, L2 and decay: numbers in code, not in prose
        places = [
            p.name
            for p in package.rglob("*.py")
            for node in ast.walk(ast.parse(p.read_text()))
            if isinstance(node, ast.Constant) and node.value == number
        ]
        assert places == ["configs.py"], f"{number} is written in {places}"


def test_an_empty_list_on_the_command_line_is_given(tmp_path, monkeypatch):
    # `--aug none` is the empty list, not the option left out (which would be the default flip)
    from featx.front.cli import build_config

    seen = {}
    cmd = command("finetune")
    monkeypatch.setattr(
        cmd,
        "callback",
        lambda config_file, **params: seen.update(
            config=build_config(
                FinetuneConfig,
                click.get_current_context(),
                {k: v for k, v in params.items() if k in ("backbone", "aug")},
                config_file,
            )
        ),
    )
    CliRunner().invoke(cli, ["finetune", "--backbone", "resnet18", "--aug", "none", "--out", "x"])
    assert seen["config"].aug == ()
    CliRunner().invoke(cli, ["finetune", "--backbone", "resnet18", "--out", "x"])
    assert seen["config"].aug == ("flip",)
