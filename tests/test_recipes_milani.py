"""The three Milani transfer-learning recipes pin what the seed report states (shared/reports/004_...txt):
each value below is checked against what `featx run --dry-run` resolves for the recipe's stage."""

from __future__ import annotations

from pathlib import Path

import pytest

from featx.front.cli import cli
from featx.front.recipes import run_recipe

PIPELINES = Path(__file__).resolve().parents[1] / "pipelines"
REPORT = "004_367cbcd3953dba97.txt"
TEN_CROPS = ["full", "top_left", "top_right", "bottom_left", "bottom_right"]

# (recipe, stage, option, value, where the report states it)
STATED = [
    *[
        (r, "extract", "backbone", "inception_v3", "4.1: the pre-trained Inception-v3 as feature extractor")
        for r in ("vanilla", "v2", "v3")
    ],
    *[(r, "extract", "size", 299, "4.1: images re-scaled to 299x299 (bilinear)") for r in ("vanilla", "v2", "v3")],
    *[
        (r, "probe", "head", "linear", "4.1: one fully connected layer on the transfer values")
        for r in ("vanilla", "v2", "v3")
    ],
    *[(r, "probe", "optimizer", "adam", "4.1: Adam with default parameters") for r in ("vanilla", "v2", "v3")],
    *[
        (r, "probe", "batch_size", 100, "4.1: training always with a mini-batch of 100")
        for r in ("vanilla", "v2", "v3")
    ],
    *[
        (r, "probe", "label_smoothing", [0.1], "4.2: the same label smoothing as 3.1, epsilon = 0.1")
        for r in ("vanilla", "v2", "v3")
    ],
    *[(r, "probe", "keep", 20, "3.4: at most 20 snapshots saved during one run") for r in ("vanilla", "v2", "v3")],
    *[
        (
            r,
            s,
            "ensemble",
            "best-size",
            "4.2: the best val top-1, whether or not it is an ensemble (size chosen on val)",
        )
        for r in ("vanilla", "v2", "v3")
        for s in ("predict", "submission", "report")
    ],
    *[
        (
            r,
            s,
            "combine",
            "raw",
            '4.2: the crops\' predictions "combined as explained in section 3.4" (Eq. 2: the softmax summed)',
        )
        for r in ("vanilla", "v2", "v3")
        for s in ("predict", "submission", "report")
    ],
    *[
        (r, "submission", "split", "test", '4.2: "the final predictions were submitted on the test set"')
        for r in ("vanilla", "v2", "v3")
    ],
    ("vanilla", "extract", "views", "full", "4.2: vanilla uses the image as it is"),
    ("vanilla", "probe", "lr", [6.5e-4], "4.2: initial learning rate 6.5e-4"),
    ("vanilla", "probe", "schedule", "exponential", "4.2: decayed per epoch"),
    ("vanilla", "probe", "lr_decay", [0.713], "4.2: decayed by 0.713 per epoch"),
    ("vanilla", "probe", "weight_decay", [0.0116], "4.2: L2 regularization strength 0.0116"),
    ("vanilla", "probe", "dropout", [0.0], "4.2: dropout only comes with v2"),
    ("vanilla", "probe", "epochs", 10, "4.2: 10 epochs is sufficient for convergence"),
    ("vanilla", "probe", "train_views", "full", "4.2: no crops in vanilla"),
    ("vanilla", "probe", "eval_views", "full", "4.2: no crops in vanilla"),
    ("v2", "extract", "views", "ten", "4.2: 10 crops at test time"),
    ("v2", "extract", "crop", 56, "4.2: corner crops of 56x56"),
    ("v2", "probe", "dropout", [0.2], "4.2: dropout with keep probability 0.8"),
    ("v2", "probe", "train_views", "full", "4.2: the crops are a test-time change"),
    ("v2", "probe", "eval_views", "all", "4.2: original, four corners and their mirrors"),
    ("v2", "predict", "eval_views", "all", "4.2: 10-crop averaging"),
    ("v3", "extract", "views", "ten", "4.2: 10-crop testing"),
    ("v3", "extract", "crop", 56, "4.2: a corner crop of 56x56"),
    ("v3", "probe", "dropout", [0.0], "4.2: I removed the dropout layer"),
    ("v3", "probe", "eval_views", "all", "4.2: 10-crop testing"),
    ("v3", "predict", "eval_views", "all", "4.2: 10-crop testing"),
]

# The numbers each recipe's opening comment quotes (4.2 and Table 2).
QUOTED = {
    "vanilla": ["74.7%", "66.8%", "6.5e-4", "0.713", "0.0116", "25.25%", "33.2%"],
    "v2": ["76.1%", "68.6%", "0.8", "23.89%", "31.4%"],
    "v3": ["76.7%", "69.1%", "23.30%", "30.9%"],
}


@pytest.fixture(scope="module")
def resolved() -> dict[str, dict[str, dict]]:
    return {
        r: {
            s.name: s.params
            for s in run_recipe(recipe=PIPELINES / f"milani_transfer_{r}.toml", commands=cli, dry_run=True)
        }
        for r in QUOTED
    }


@pytest.mark.parametrize(
    "recipe, stage, option, value, section", STATED, ids=[f"{r}-{s}-{o}" for r, s, o, _, _ in STATED]
)
def test_stated_values_are_pinned(resolved, recipe, stage, option, value, section):
    assert resolved[recipe][stage][option] == value, f"{REPORT} section {section}"


def test_v3_trains_on_jittered_crops_without_mirrors(resolved):
    # 4.2: brightness/contrast jitter of the original image or a corner crop; no mirrors named for training
    k = resolved["v3"]["extract"]["aug_views"]
    assert k >= 1
    assert resolved["v3"]["probe"]["train_views"].split(",") == [f"aug{i}" for i in range(k)]


def test_v3_reads_a_fresh_draw_every_epoch(resolved):
    # fresh jitter each epoch, from a finite file: epoch e reads draw e, so there must be a draw per epoch
    probe = resolved["v3"]["probe"]
    assert probe["epoch_views"] is True
    assert resolved["v3"]["extract"]["aug_views"] >= probe["epochs"]


def test_v2_reads_the_shared_file_s_full_view_only(resolved):
    assert resolved["v2"]["extract"]["out"] == resolved["v3"]["extract"]["out"]
    assert resolved["v2"]["probe"]["train_views"] == "full" and resolved["v2"]["probe"]["epoch_views"] is False


def test_v2_and_v3_sweep_what_the_report_re_tuned_without_stating_it(resolved):
    # 4.2: "A thorough cross-validation was performed on the learning rate, learning rate decay, and weight decay"
    # for vanilla, and "A new cross-validation was performed" for v2 (and v3): all three swept, in one pass
    for recipe in ("v2", "v3"):
        probe = resolved[recipe]["probe"]
        assert len(probe["lr"]) > 1 and 6.5e-4 in probe["lr"]
        assert len(probe["weight_decay"]) > 1 and 0.0116 in probe["weight_decay"]
        assert len(probe["lr_decay"]) > 1 and 0.713 in probe["lr_decay"]


def test_each_recipe_quotes_the_report_and_marks_featx_choices():
    for recipe, numbers in QUOTED.items():
        text = (PIPELINES / f"milani_transfer_{recipe}.toml").read_text()
        head = text.split("\n[")[0]
        assert REPORT in head and all(n in head for n in numbers), recipe
        assert "featx's choice" in head, recipe
