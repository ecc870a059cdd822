"""`featx run`: every recipe resolves against the real CLI options, the quickstart runs end to end on the
shared real zip and weights, and re-runs redo only what changed."""

from __future__ import annotations

import json
import urllib.error
from importlib.metadata import version
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from featx.core.errors import FeatxError
from featx.front.cli import cli
from featx.front.recipes import run_recipe

PIPELINES = Path(__file__).resolve().parents[1] / "pipelines"
RECIPES = sorted(PIPELINES.glob("*.toml"))
QUICKSTART = PIPELINES / "quickstart.toml"


def test_the_issue_recipes_exist():
    names = {p.stem for p in RECIPES}
    assert {
        "quickstart",
        "best",
        "milani_transfer_vanilla",
        "milani_transfer_v2",
        "milani_transfer_v3",
        "milani_scratch_inception",
        "milani_scratch_inception_regularized",
        "inan_resnet_baseline",
        "inan_resnet_lstm",
        "inan_ensemble",
        "sun_resnet_stochastic_depth",
        "ma_resnet18",
        "ma_resnet18_scratch_xavier",
        "ma_resnet18_scratch_gaussian",
        "bastidas_vgg_like",
        "bastidas_inception_like",
    } <= names


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_every_recipe_resolves(recipe: Path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing exists here, so every stage is planned to run
    assert recipe.read_text().startswith("# "), "a recipe opens with what it reproduces and the reported number"
    stages = run_recipe(recipe=recipe, commands=cli, dry_run=True)
    assert stages and all(s.run and s.command_line() and s.params for s in stages)
    assert not any(tmp_path.iterdir()), "a dry run writes nothing"


@pytest.mark.parametrize(
    "edit, message",
    [
        (("backbone =", "backbon ="), "`backbon` is not an option of `featx extract`; did you mean `backbone`?"),
        (('views = "flip"', 'views = "eleven"'), "[extract]: views = eleven: choose one of full, flip, ten"),
        (("[probe]", "[probes]"), "[probes]: not a command"),
        (("${extract.out}", "${predict.out}"), "${predict.out} names no earlier stage"),
        (('cache = "data/cache/quickstart.h5"', ""), "[prepare]: set `cache`"),
    ],
)
def test_a_mistake_in_a_recipe_fails_before_anything_runs(edit, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe = tmp_path / "typo.toml"
    recipe.write_text(QUICKSTART.read_text().replace(*edit))
    with pytest.raises(FeatxError) as e:
        run_recipe(recipe=recipe, commands=cli, dry_run=True)
    assert message in e.value.message
    assert [p.name for p in tmp_path.iterdir()] == ["typo.toml"]


def test_set_overrides_parse_toml_literals_and_are_checked(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    stages = {
        s.name: s
        for s in run_recipe(
            recipe=QUICKSTART,
            commands=cli,
            dry_run=True,
            overrides=[
                "probe.lr=[1e-4, 2e-4]",
                "extract.weights=../shared/w.pth",
                "probe.stream=true",
                "prepare.per_class=7",
            ],
        )
    }
    assert stages["probe"].params["lr"] == [1e-4, 2e-4] and stages["probe"].params["stream"] is True
    assert stages["extract"].params["weights"] == "../shared/w.pth"
    assert stages["prepare"].params["per_class"] == 7
    for bad, message in (
        ("probe.lrr=1", "did you mean `lr`?"),
        ("probes.lr=1", "has no stage [probes]"),
        ("probe.epochs=0", "[probe]: epochs = 0: must be >= 1"),
        ("probe", "write STAGE.KEY=VALUE"),
    ):
        with pytest.raises(FeatxError) as e:
            run_recipe(recipe=QUICKSTART, commands=cli, dry_run=True, overrides=[bad])
        assert message in e.value.message


@pytest.mark.slow
@pytest.mark.numerics
def test_quickstart_end_to_end_then_skips_then_redoes_only_what_changed(
    shared_zip, shared_weights, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    small = [f"prepare.data={shared_zip}", "prepare.classes=4", "prepare.per_class=20", "extract.size=64"]

    # Offline with no cached torchvision weights: one line naming the fix, no traceback.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.setattr(
        torch.hub, "download_url_to_file", lambda *a, **k: (_ for _ in ()).throw(urllib.error.URLError("offline"))
    )
    result = CliRunner().invoke(cli, ["run", str(QUICKSTART), *(f"--set={s}" for s in small)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "featx: error: [extract] --weights IMAGENET1K_V2: cannot download" in result.output
    assert "(in the recipe: --set extract.weights=...)" in result.output

    small.append(f"extract.weights={shared_weights / 'mobilenet_v2_imagenet_tflite.pth'}")
    first = run_recipe(recipe=QUICKSTART, commands=cli, overrides=small)
    assert [s.name for s in first if s.run] == ["extract", "probe", "predict", "report"]  # prepare ran above
    probe = json.loads(Path("runs/quickstart/probe/metrics.json").read_text())
    assert probe["best"]["val_top1"] > 0.45  # 4 real classes at 64 pixels: well above chance (25%)
    assert Path("runs/quickstart/predict/predictions.csv").is_file()
    assert Path("runs/quickstart/report/report.html").is_file()
    record = json.loads(Path("runs/quickstart/probe/.featx-stage.json").read_text())
    assert record["recipe"]["text"] == QUICKSTART.read_text() and record["recipe"]["overrides"] == small
    assert record["params"]["lr"] == [3e-4, 1e-3, 3e-3] and record["versions"]["torch"] == version("torch")
    assert record["seconds"] > 0 and record["depends"] == {"extract": first[1].hash}
    assert (
        json.loads(Path("features/quickstart-mobilenet_v2-flip.h5.featx-stage.json").read_text())["stage"] == "extract"
    )

    assert not any(s.run for s in run_recipe(recipe=QUICKSTART, commands=cli, overrides=small))

    changed = run_recipe(recipe=QUICKSTART, commands=cli, overrides=[*small, "probe.lr=1e-3"])
    assert [s.name for s in changed if s.run] == ["probe", "predict", "report"]
    assert changed[2].reason == "options changed: lr [0.0003, 0.001, 0.003] -> [0.001]"
    assert changed[3].reason == "probe runs"
    assert json.loads(Path("runs/quickstart/probe/metrics.json").read_text())["best"]["config"]["lr"] == 1e-3
