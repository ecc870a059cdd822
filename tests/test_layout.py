"""The package's structure: imports point one way, through the layers README's "How the code is laid out" names,
and no module imports another of its own layer or a higher one in a cycle."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "featx"

# Lowest first. A module may import modules of its own layer or of lower ones, never of a higher one.
LAYERS = [
    # foundations, used everywhere
    {"errors", "choices", "configs", "atomic", "device", "compiled", "plots", "stats", "progress", "env",
     "outputs"},
    {"sources", "download", "data"},  # datasets and the decoded cache
    {"backbones", "tinynets", "views", "augment"},  # networks and what they see
    {"features", "extract"},  # stage 1 and its file
    # what stages 2 and 3 train and read, and the run directory
    {"heads", "optim", "lstm_head", "models", "runs", "neighbors", "feature_batches", "head_checkpoints"},
    {"sweep", "calibration", "probe_tables", "probe", "finetune_epoch", "finetune"},  # the training loops and runs
    {"estimator"},  # the probe as scikit-learn estimators on arrays
    {"predict"},
    {"report", "info"},
    {"compare"},  # several backbones, one leaderboard
    {"stages"},  # each stage's entry point, taking its config
    {"pipeline", "cli", "__main__", "__init__"},
]
RANK = {m: i for i, layer in enumerate(LAYERS) for m in layer}


def featx_imports(path: Path) -> set[str]:
    """The featx modules a file imports, at top level or inside functions (lazy imports count too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "featx":
            if node.module == "featx":
                found |= {a.name for a in node.names}
            else:
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("featx.")}
    return found & {p.stem for p in PACKAGE.glob("*.py")}


GRAPH = {p.stem: featx_imports(p) - {p.stem} for p in PACKAGE.glob("*.py")}


def test_every_module_has_a_layer():
    assert set(GRAPH) <= set(RANK), f"add {sorted(set(GRAPH) - set(RANK))} to LAYERS (and README's layout section)"


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_imports_point_down(module):
    upward = sorted(m for m in GRAPH[module] if RANK[m] > RANK[module])
    assert not upward, f"featx.{module} (layer {RANK[module]}) imports higher layers: {upward}"


TRAINING_LOOPS = {"sweep", "probe", "finetune_epoch", "finetune"}


def reachable(module: str) -> set[str]:
    """Every featx module that importing `module` imports, directly or through others."""
    seen, todo = set(), [module]
    while todo:
        for m in GRAPH[todo.pop()] - seen:
            seen.add(m)
            todo.append(m)
    return seen


@pytest.mark.parametrize("module", ["predict", "head_checkpoints", "calibration"])
def test_scoring_imports_no_training_loop(module):
    assert not reachable(module) & TRAINING_LOOPS, f"featx.{module} imports {sorted(reachable(module) & TRAINING_LOOPS)}"


def test_no_import_cycle():
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(GRAPH[m]):
            assert state.get(n) != 1, "import cycle: " + " -> ".join(path[path.index(n):] + [n])
            if n not in state:
                visit(n, path + [n])
        state[m] = 2

    for m in sorted(GRAPH):
        if m not in state:
            visit(m, [m])


def test_the_readme_lists_every_module():
    readme = (PACKAGE.parent / "README.md").read_text()
    section = readme[readme.index("## How the code is laid out"):]
    missing = [m for m in GRAPH if m not in ("__init__", "__main__") and f"`{m}.py`" not in section]
    assert not missing, f"README's layout section lacks {missing}"
