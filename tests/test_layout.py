"""The package's structure: one package per layer, imports point down through the layers, no import cycle.

The layers are the folders of featx/; their order is the one list below (lowest first). A module may import
modules of its own package or of a lower one, never of a higher one.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from featx import _API as API

PACKAGE = Path(__file__).resolve().parents[1] / "featx"
ORDER = ["core", "data", "nets", "features", "probe", "finetune", "evaluate", "front"]
FOLDERS = sorted(p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists())
# featx/__init__.py (the lazy public API) and __main__.py stand above every layer; _layout.py (the 0.2 paths) below
TOP = "featx"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def layer(module: str) -> int:
    if module == "featx._layout":  # import machinery only, below every layer
        return -1
    parts = module.split(".")
    return ORDER.index(parts[1]) if len(parts) > 1 and parts[1] in ORDER else len(ORDER)


def featx_imports(path: Path) -> set[str]:
    """The featx modules a file imports, at top level or inside functions (lazy imports count too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module == "featx":  # the public API: where each name lives
            found |= {API[a.name].partition(":")[0] for a in node.names if a.name in API}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "featx":
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("featx.")}
    return found & set(MODULES)


GRAPH = {m: featx_imports(p) - {m} for m, p in MODULES.items()}


def test_every_folder_is_a_layer():
    assert sorted(ORDER) == FOLDERS, f"featx/ has packages {FOLDERS}; ORDER names {sorted(ORDER)}"


def test_the_top_holds_no_stage_code():
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert top == ["__init__.py", "__main__.py", "_layout.py"], top


@pytest.mark.parametrize("module", sorted(m for m in GRAPH if layer(m) < len(ORDER)))
def test_imports_point_down(module):
    upward = sorted(m for m in GRAPH[module] if layer(m) > layer(module))
    assert not upward, f"{module} (layer {ORDER[layer(module)]}) imports higher layers: {upward}"


TRAINING_LOOPS = {"featx.probe.sweep", "featx.probe.run", "featx.finetune.epoch", "featx.finetune.run"}


def reachable(module: str) -> set[str]:
    """Every featx module that importing `module` imports, directly or through others."""
    seen, todo = set(), [module]
    while todo:
        for m in GRAPH[todo.pop()] - seen:
            seen.add(m)
            todo.append(m)
    return seen


@pytest.mark.parametrize(
    "module", ["featx.evaluate.scoring", "featx.evaluate.images", "featx.probe.checkpoints", "featx.probe.calibration"]
)
def test_scoring_imports_no_training_loop(module):
    assert not reachable(module) & TRAINING_LOOPS, f"{module} imports {sorted(reachable(module) & TRAINING_LOOPS)}"


def test_no_import_cycle():
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(GRAPH[m]):
            assert state.get(n) != 1, "import cycle: " + " -> ".join(path[path.index(n) :] + [n])
            if n not in state:
                visit(n, path + [n])
        state[m] = 2

    for m in sorted(GRAPH):
        if m not in state and m != TOP:
            visit(m, [m])
