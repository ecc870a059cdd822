"""Each report's recipes carry what the report states (tests/report_values.py), as `featx run --dry-run`
resolves them; the quoted sentences and numbers are the reports' own words."""

from __future__ import annotations

import functools
import re
from pathlib import Path

import pytest
import torch
from report_values import MA, MILANI, NUMBERS, READINGS, ROWS, SILENT, Row

from featx.front.cli import cli
from featx.front.recipes import run_recipe
from featx.nets.augment import draw
from featx.nets.models import ModelSpec, build_model

PIPELINES = Path(__file__).resolve().parents[1] / "pipelines"
REPORTS = Path(__file__).resolve().parents[2] / "shared" / "reports"
# The recipes of the five reports, but Milani's transfer learning (section 4).
COVERED = ("ma_", "inan_", "sun_", "bastidas_", "milani_scratch_")


@functools.cache
def resolved(recipe: str) -> dict[str, dict]:
    """stage name -> the stage's config (and control options) as JSON values, defaults included."""
    return {s.name: s.params for s in run_recipe(recipe=PIPELINES / f"{recipe}.toml", commands=cli, dry_run=True)}


def _items(value, *, names: bool = False) -> set[str]:
    """A comma list's items; names=True drops magnitudes (rotate:45 -> rotate)."""
    listed = value if isinstance(value, (list, tuple)) else str(value).split(",")
    items = {str(a).strip() for a in listed} - {"", "none"}
    return {a.partition(":")[0] for a in items} if names else items


def _row_id(row: Row) -> str:
    return f"{row.recipe}.{row.stage}.{row.option}={row.value}"


@pytest.mark.parametrize(
    "row",
    [
        pytest.param(
            r, id=_row_id(r), marks=[pytest.mark.xfail(strict=True, reason=f"needs {r.pending}")] if r.pending else []
        )
        for r in ROWS
    ],
)
def test_recipe_carries_the_reported_value(row: Row):
    assert (PIPELINES / f"{row.recipe}.toml").is_file(), f"no recipe pipelines/{row.recipe}.toml"
    stages = resolved(row.recipe)
    assert row.stage in stages, f"{row.recipe}: no stage [{row.stage}] ({row.report}, {row.section})"
    params = stages[row.stage]
    assert row.option in params, f"{row.recipe} [{row.stage}]: no option {row.option} ({row.report}, {row.section})"
    actual = params[row.option]
    where = f"{row.recipe} [{row.stage}] {row.option} = {actual!r}; {row.report}, {row.section}"
    if row.check == "eq":
        assert actual == row.value, where
    elif row.check == "has":
        assert row.value in _items(actual), where
    elif row.check == "items":
        assert _items(actual, names=True) == _items(row.value, names=True), where
    elif row.check == "set":
        assert actual not in (None, 0, 0.0, "", []), where
    else:
        assert row.check == "min" and actual is not None and actual >= row.value, where


def _report_text(name: str) -> str:
    path = REPORTS / name
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    # The conversion writes some numbers as LaTeX ($\sim 40\%$, $64 \times 64$): compare them as plain text.
    text = re.sub(r"\$|\\(?=%)", "", path.read_text())
    for latex, plain in (("\\sim ", "~"), ("\\times", "x"), ("\\epsilon", "epsilon")):
        text = text.replace(latex, plain)
    return " ".join(text.split())


@pytest.mark.parametrize("row", [pytest.param(r, id=_row_id(r)) for r in ROWS])
def test_quoted_sentences_are_the_reports_words(row: Row):
    text = _report_text(row.report)
    for quote in re.findall(r'"([^"]+)"', row.section):
        for piece in quote.split(" ... "):
            assert " ".join(piece.split()) in text, f"{row.report}: {piece!r} is not in the report"


def _opening(recipe: str) -> str:
    """The recipe's opening comment as one line."""
    lines = (PIPELINES / f"{recipe}.toml").read_text().splitlines()
    return " ".join(line.lstrip("# ") for line in lines[: lines.index("")] if line.startswith("#"))


@pytest.mark.parametrize("recipe", sorted(NUMBERS))
def test_recipe_opens_by_quoting_the_reported_numbers(recipe: str):
    report, numbers = NUMBERS[recipe]
    text = _report_text(report)
    opening = _opening(recipe)
    for number in numbers:
        assert number in text, f"{report}: does not say {number!r}"
        assert number in opening, f"pipelines/{recipe}.toml: its opening comment does not quote {number!r}"
    assert report in opening, f"pipelines/{recipe}.toml: name the report it transcribes ({report})"


def test_every_covered_recipe_is_in_the_table():
    recipes = {p.stem for p in PIPELINES.glob("*.toml") if p.stem.startswith(COVERED)}
    assert recipes <= {r.recipe for r in ROWS}
    assert recipes <= set(NUMBERS) | set(SILENT)
    assert {r.recipe for r in ROWS} <= recipes


@pytest.mark.parametrize("recipe", sorted(SILENT))
def test_a_recipe_without_a_number_quotes_the_report_saying_so(recipe: str):
    report, words = SILENT[recipe]
    assert words in _report_text(report)
    opening = _opening(recipe)
    assert report in opening and words in opening, f"pipelines/{recipe}.toml: quote {words!r} from {report}"


def test_inan_lstm_head_is_the_reports():
    # 3. Approach: conv4 256 channels at 14x14 -> 4 LSTMs of hidden 196, conv5 512 at 7x7 -> 8 of hidden 49,
    # "a vector of size 49 * 8 + 196 * 4 = 1176", then "a vector of size 200".
    p = resolved("inan_resnet_lstm")["finetune"]
    spec = ModelSpec(p["backbone"], p["size"], 200, p["head"], [0.5] * 3, [0.5] * 3, p["crop"])
    head = build_model(spec).head
    assert [lstm.hidden_size for lstm in head.lstms] == [196] * 4 + [49] * 8
    assert (head.fc.in_features, head.fc.out_features) == (1176, 200)
    with torch.no_grad():
        assert build_model(spec).eval()(torch.zeros(1, 3, 224, 224)).shape == (1, 200)


@pytest.mark.parametrize("recipe", sorted(READINGS))
def test_a_reading_of_a_lost_or_garbled_figure_says_so_and_quotes_the_report(recipe: str):
    report, quotes = READINGS[recipe]
    text, opening = _report_text(report), _opening(recipe)
    assert "featx's reading" in opening and report in opening, f'pipelines/{recipe}.toml: say "featx\'s reading"'
    for quote in quotes:
        assert quote in text, f"{report}: {quote!r} is not in the report"
        assert quote in opening, f"pipelines/{recipe}.toml: its opening comment does not quote {quote!r}"


@pytest.mark.parametrize(
    "recipe, std",
    [("ma_resnet18_scratch_gaussian", 0.1**0.5), ("ma_resnet18_scratch_xavier", (2 / (512 + 200)) ** 0.5)],
)
def test_ma_init_reaches_the_new_classifier(recipe: str, std: float):
    # MA, Weight initialization: "Gaussian initialization mean=0, variance=0.1" / "Xavier initialization" of the
    # ResNet, whose "last layer being fc-1000 instead of fc-200": the 200-way fc is initialised the same way
    # (it kept PyTorch's default, std ~0.0255, before issue 23)
    assert "Gaussian initialization mean=0, variance=0.1" in _report_text(MA)
    p = resolved(recipe)["finetune"]
    spec = ModelSpec(p["backbone"], p["size"], 200, p["head"], [0.5] * 3, [0.5] * 3, p["crop"])
    fc = build_model(spec, init=p["init"]).head[1]
    assert fc.weight.shape == (200, 512)
    assert float(fc.weight.detach().std()) == pytest.approx(std, rel=0.05) and not fc.bias.any()


def test_milani_flips_and_jitters_each_image_on_its_own():
    # MILANI 3.3: "each image was randomly flipped left-right (with probability 50%) and its brightness and
    # contrast were randomly adjusted": per image, not per group of images
    assert "each image was randomly flipped left-right (with probability 50%)" in _report_text(MILANI)
    aug = resolved("milani_scratch_inception_regularized")["finetune"]["aug"]
    torch.manual_seed(0)
    d = {x.name: x.value for x in draw(aug, n=1024, height=64, width=64, crop=56)}
    assert abs(float(d["flip"].float().mean()) - 0.5) < 4 * (0.25 / 1024) ** 0.5
    assert (d["flip"][1:] != d["flip"][:-1]).float().mean() > 0.4  # neighbours differ about half the time
    assert len(torch.unique(d["color"][:, :2], dim=0)) == 1024
