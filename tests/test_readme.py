"""README cannot drift: its option tables are the commands' own (featx.front.cli.option_table), and its Python blocks
run, in order, in one namespace, in a temporary directory on small data.

A block that cannot run here says why in its first line, `# not run: <reason>`, and is skipped. The blocks read
`tiny-imagenet-200.zip` from the working directory (here a synthetic 10-class one) and the shared weights as
`../shared/weights/...` (rewritten to the shared folder); the array example gets X_train, y_train, X_val,
y_val and X_test from this file. `python tests/test_readme.py --write` rewrites README's tables in place.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import click
import numpy as np
import pytest
from synth import write_tiny_imagenet

from featx.front.cli import cli, option_table
from featx.front.stages import STAGES

README = Path(__file__).resolve().parents[1] / "README.md"
SHARED = Path(__file__).resolve().parents[2] / "shared"
TABLE = re.compile(r"<!-- options: (featx[^>]*?) -->\n(.*?)<!-- /options -->", re.S)
BLOCK = re.compile(r"^```python\n(.*?)^```$", re.S | re.M)
SKIP = re.compile(r"#\s*not run:\s*(\S.*)")


def stage_commands() -> dict[str, click.Command]:
    """Every stage's command (featx.front.stages.STAGES), by its command line."""
    return {
        " ".join(["featx", *stage.command]): command_named(" ".join(["featx", *stage.command]))
        for stage in STAGES.values()
    }


def command_named(path: str) -> click.Command:
    command = cli
    for name in path.split()[1:]:
        command = command.commands[name]
    return command


def regenerated(text: str) -> str:
    return TABLE.sub(lambda m: f"<!-- options: {m[1]} -->\n{option_table(command_named(m[1]))}<!-- /options -->", text)


def test_every_stage_command_has_its_generated_table():
    text = README.read_text()
    tables = {m[1]: m[2] for m in TABLE.finditer(text)}
    missing = sorted(set(stage_commands()) - set(tables))
    assert not missing, (
        f"README has no option table for {missing}; add `<!-- options: NAME -->` ... `<!-- /options -->`"
    )
    for name, table in tables.items():
        expected = option_table(command_named(name))
        assert table == expected, (
            f"README's table of `{name}` differs from its options; paste this between its "
            f"markers (or run `python tests/test_readme.py --write`):\n\n{expected}"
        )


def test_no_hand_written_option_table_outside_the_markers():
    outside = TABLE.sub("", README.read_text())
    assert "| option | default |" not in outside


def python_blocks() -> list[str]:
    return BLOCK.findall(README.read_text())


def test_readme_opens_with_setup_example_and_contents():
    text = README.read_text()
    head = text[: text.index("\n## ")]
    assert "pip install" in head and "featx run pipelines/quickstart.toml" in head
    example = BLOCK.search(head)[1]
    assert len(example.strip().splitlines()) <= 10
    for title in re.findall(r"^## (.+)$", text, re.M):
        anchor = re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")
        assert f"(#{anchor})" in head, f"the table of contents lacks ## {title}"


@pytest.fixture
def readme_dir(tmp_path, monkeypatch, shared_weights):
    """A working directory with a 10-class synthetic tiny-imagenet-200.zip (12 train, 4 val images a class)."""
    zip_path = write_tiny_imagenet(tmp_path / "src", classes=10, train_per_class=12, val_per_class=4, test=4)
    zip_path.rename(tmp_path / "tiny-imagenet-200.zip")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FEATX_CPU_BF16", "0")  # the blocks' assertions are about fp32 runs on any CPU
    return tmp_path


def arrays() -> dict:
    """Separable 3-class data for the estimator example: 2 views, 16-d."""
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 3, (3, 16)).astype(np.float32)

    def draw(n):
        y = np.arange(n) % 3
        return centres[y][:, None, :] + rng.normal(0, 1, (n, 2, 16)).astype(np.float32), y

    (X_train, y_train), (X_val, y_val), (X_test, _) = draw(150), draw(60), draw(12)
    return dict(X_train=X_train, y_train=y_train, X_val=X_val, y_val=y_val, X_test=X_test)


def test_python_blocks_run(readme_dir):
    namespace = {"__name__": "readme", **arrays()}
    ran = 0
    for i, block in enumerate(python_blocks()):
        first = block.lstrip().splitlines()[0] if block.strip() else ""
        if SKIP.match(first):
            continue
        code = block.replace("../shared/", f"{SHARED}/")
        try:
            exec(compile(code, f"README python block {i + 1}", "exec"), namespace)
        except Exception as e:
            raise AssertionError(f"README python block {i + 1} failed: {e!r}\n\n{block}") from e
        ran += 1
    assert ran >= 6


if __name__ == "__main__" and sys.argv[1:] == ["--write"]:
    README.write_text(regenerated(README.read_text()))
