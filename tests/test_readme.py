"""README.md and docs/ cannot drift: the option tables of docs/options.md are the commands' own
(featx.front.cli.option_table), every Python block runs, docs/layout.md names every module, and the words a
newcomer reads carry no shorthand (issue numbers, "the seed", an author's name before their report is introduced).

Each file's Python blocks run in order, in one namespace, in a fresh temporary directory on small data. A block
that cannot run here says why in its first line, `# not run: <reason>`, and is skipped. The blocks read
`tiny-imagenet-200.zip` from the working directory (here a synthetic 10-class one) and the shared weights as
`../shared/weights/...` (rewritten to the shared folder); the array examples get X_train, y_train, X_val, y_val
and X_test from this file. `python tests/test_readme.py --write` rewrites docs/options.md's tables in place.
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

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
OPTIONS = ROOT / "docs" / "options.md"
SHARED = ROOT.parent / "shared"
TABLE = re.compile(r"<!-- options: (featx[^>]*?) -->\n(.*?)<!-- /options -->", re.S)
BLOCK = re.compile(r"^```python\n(.*?)^```$", re.S | re.M)
SKIP = re.compile(r"#\s*not run:\s*(\S.*)")
README_LINES = 300

# The reports the recipes reproduce, by their authors' names as the docs use them, and their file names
# (../shared/reports/): a page introduces a report by what it is before the author's name stands for it.
REPORTS = {
    "Ma": "000_f8a38b2bba7d0f35",
    "Inan": "001_b60d2f16989c40cf",
    "Sun": "002_d10c6a4bcd566876",
    "Bastidas": "003_71edc84977f1dd14",
    "Milani": "004_367cbcd3953dba97",
}
SHORTHAND = re.compile(r"\bissue\s+#?\d+|\bthe seed\b", re.I)


def pages() -> list[Path]:
    return [README, *DOCS]


def page_id(path: Path) -> str:
    return str(path.relative_to(ROOT))


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
    text = OPTIONS.read_text()
    tables = {m[1]: m[2] for m in TABLE.finditer(text)}
    missing = sorted(set(stage_commands()) - set(tables))
    assert not missing, (
        f"docs/options.md has no option table for {missing}; add `<!-- options: NAME -->` ... `<!-- /options -->`"
    )
    for name, table in tables.items():
        expected = option_table(command_named(name))
        assert table == expected, (
            f"docs/options.md's table of `{name}` differs from its options; paste this between its "
            f"markers (or run `python tests/test_readme.py --write`):\n\n{expected}"
        )


@pytest.mark.parametrize("page", pages(), ids=page_id)
def test_no_hand_written_option_table_outside_the_markers(page):
    outside = TABLE.sub("", page.read_text())
    assert "| option | default |" not in outside


def test_readme_is_short():
    lines = len(README.read_text().splitlines())
    assert lines <= README_LINES, f"README.md has {lines} lines (at most {README_LINES}): move details to docs/"


def test_readme_opens_with_setup_example_and_contents():
    text = README.read_text()
    head = text[: text.index("\n## ")]
    assert "pip install" in head and "featx run pipelines/quickstart.toml" in head
    example = BLOCK.search(head)[1]
    assert len(example.strip().splitlines()) <= 10
    for title in re.findall(r"^## (.+)$", text, re.M):
        assert f"(#{anchor(title)})" in head, f"the table of contents lacks ## {title}"


def test_readme_installs_as_ci_does():
    """CI (.ci/run) installs exactly as README's set-up says."""
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    installs = [line for line in ci if line.startswith("pip install")]
    setup = README.read_text().split("\n## Set up", 1)[1].split("\n## ", 1)[0]
    assert installs and all(line in setup.splitlines() for line in installs), (
        f"README's set-up section should say {installs} as .ci/run does"
    )


def anchor(title: str) -> str:
    """The fragment the code host gives a heading."""
    return re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")


@pytest.mark.parametrize("page", pages(), ids=page_id)
def test_links_resolve(page):
    """Every relative link names a file that exists and, after `#`, one of its headings."""
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, fragment = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists():
            broken.append(target)
        elif fragment and linked.suffix == ".md":
            headings = re.findall(r"^#+ (.+)$", linked.read_text(), re.M)
            if fragment not in {anchor(h) for h in headings}:
                broken.append(target)
    assert not broken, f"{page_id(page)} links to what is not there: {broken}"


def test_readme_links_every_doc():
    text = README.read_text()
    unlinked = [page_id(d) for d in DOCS if f"]({page_id(d)})" not in text]
    assert not unlinked, f"README.md does not link {unlinked}"


@pytest.mark.parametrize("page", pages(), ids=page_id)
def test_no_shorthand(page):
    found = [m[0] for m in SHORTHAND.finditer(page.read_text())]
    assert not found, f"{page_id(page)} says {found}: say what is meant (the change, the report, the values)"


@pytest.mark.parametrize("page", pages(), ids=page_id)
def test_reports_introduced_before_their_authors_name_them(page):
    """The paragraph where an author's name first appears, or one before it, introduces the report by its file."""
    text = page.read_text()
    for author, report in REPORTS.items():
        first = re.search(rf"\b{author}\b", text)
        if first is None:
            continue
        paragraph_end = text.find("\n\n", first.start())
        introduced = text.find(report, 0, paragraph_end if paragraph_end >= 0 else len(text))
        assert introduced >= 0, (
            f"{page_id(page)} names {author} (line {text.count(chr(10), 0, first.start()) + 1}) before saying "
            f"which report that is: introduce it first (title, author, ../shared/reports/{report}.txt)"
        )


def test_layout_names_every_module():
    layout = (ROOT / "docs" / "layout.md").read_text()
    modules = sorted((ROOT / "featx").rglob("*.py"))
    missing = [
        str(m.relative_to(ROOT))
        for m in modules
        if m.name != "__init__.py" and m.parent.name != "featx" and f"`{m.name}`" not in _section(layout, m.parent)
    ]
    assert not missing, f"docs/layout.md does not describe {missing} under its package"


def _section(layout: str, package: Path) -> str:
    """The part of docs/layout.md's module list for one package: from its `featx/NAME` heading to the next."""
    start = layout.find(f"\n`featx/{package.name}`,")
    assert start >= 0, f"docs/layout.md has no module list for featx/{package.name}"
    end = layout.find("\n`featx/", start + 1)
    return layout[start : end if end >= 0 else len(layout)]


@pytest.fixture
def docs_dir(tmp_path, monkeypatch, shared_weights):
    """A working directory with a 10-class synthetic tiny-imagenet-200.zip (12 train, 4 val images a class)."""
    zip_path = write_tiny_imagenet(tmp_path / "src", classes=10, train_per_class=12, val_per_class=4, test=4)
    zip_path.rename(tmp_path / "tiny-imagenet-200.zip")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FEATX_CPU_BF16", "0")  # the blocks' assertions are about fp32 runs on any CPU
    return tmp_path


def arrays() -> dict:
    """Separable 3-class data for the estimator examples: 2 views, 16-d."""
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 3, (3, 16)).astype(np.float32)

    def draw(n):
        y = np.arange(n) % 3
        return centres[y][:, None, :] + rng.normal(0, 1, (n, 2, 16)).astype(np.float32), y

    (X_train, y_train), (X_val, y_val), (X_test, _) = draw(150), draw(60), draw(12)
    return dict(X_train=X_train, y_train=y_train, X_val=X_val, y_val=y_val, X_test=X_test)


def python_blocks(page: Path) -> list[str]:
    return BLOCK.findall(page.read_text())


@pytest.mark.slow  # the real MobileNetV2 through every stage: about 3.5 min for README, 1.5 for docs/api.md on 2 cores
@pytest.mark.parametrize("page", [p for p in pages() if python_blocks(p)], ids=page_id)
def test_python_blocks_run(page, docs_dir):
    namespace = {"__name__": "docs", **arrays()}
    ran = 0
    for i, block in enumerate(python_blocks(page)):
        first = block.lstrip().splitlines()[0] if block.strip() else ""
        if SKIP.match(first):
            continue
        code = block.replace("../shared/", f"{SHARED}/")
        try:
            exec(compile(code, f"{page_id(page)} python block {i + 1}", "exec"), namespace)
        except Exception as e:
            raise AssertionError(f"{page_id(page)} python block {i + 1} failed: {e!r}\n\n{block}") from e
        ran += 1
    assert ran >= (8 if page == README else 1), f"{page_id(page)}: only {ran} python blocks ran"


if __name__ == "__main__" and sys.argv[1:] == ["--write"]:
    OPTIONS.write_text(regenerated(OPTIONS.read_text()))
