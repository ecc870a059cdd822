"""How featx 0.2's flat module paths still import after the move into layer packages (featx 0.3).

`featx.models`, `featx.runs`, `featx.cli`, ... each name the module's new home: `import featx.models` and
`from featx.models import load_model` return `featx.nets.models` itself (not a copy), so a user's
monkeypatching and isinstance checks see the real objects. CHANGELOG.md lists every move.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any

MOVED = {
    "featx.errors": "featx.core.errors",
    "featx.choices": "featx.core.choices",
    "featx.configs": "featx.core.configs",
    "featx.atomic": "featx.core.atomic",
    "featx.device": "featx.core.device",
    "featx.compiled": "featx.core.compiled",
    "featx.progress": "featx.core.progress",
    "featx.env": "featx.core.env",
    "featx.outputs": "featx.core.outputs",
    "featx.runs": "featx.core.runs",
    "featx.stats": "featx.core.stats",
    "featx.plots": "featx.core.plots",
    "featx.sources": "featx.data.sources",
    "featx.download": "featx.data.download",
    "featx.backbones": "featx.nets.backbones",
    "featx.tinynets": "featx.nets.tinynets",
    "featx.views": "featx.nets.views",
    "featx.augment": "featx.nets.augment",
    "featx.heads": "featx.nets.heads",
    "featx.lstm_head": "featx.nets.lstm_head",
    "featx.optim": "featx.nets.optim",
    "featx.models": "featx.nets.models",
    "featx.extract": "featx.features.extract",
    "featx.feature_batches": "featx.features.batches",
    "featx.sweep": "featx.probe.sweep",
    "featx.calibration": "featx.probe.calibration",
    "featx.probe_tables": "featx.probe.tables",
    "featx.head_checkpoints": "featx.probe.checkpoints",
    "featx.estimator": "featx.probe.estimator",
    "featx.neighbors": "featx.probe.neighbors",
    "featx.finetune_epoch": "featx.finetune.epoch",
    "featx.predict": "featx.evaluate",
    "featx.report": "featx.evaluate.report",
    "featx.stages": "featx.front.stages",
    "featx.pipeline": "featx.front.recipes",
    "featx.cli": "featx.front.cli",
    "featx.compare": "featx.front.compare",
    "featx.info": "featx.front.info",
}


class MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports an old path as the module that replaced it."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        return importlib.machinery.ModuleSpec(name, self) if name in MOVED else None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        module = importlib.import_module(MOVED[spec.name])
        self.own_spec = module.__spec__
        return module

    def exec_module(self, module: ModuleType) -> None:
        # the import system stamped the old path's spec on the real module in between; give it back its own
        module.__spec__ = self.own_spec


def install() -> None:
    if not any(isinstance(f, MovedModules) for f in sys.meta_path):
        sys.meta_path.append(MovedModules())


def legacy_names(package: str, *modules: str) -> Callable[[str], Any]:
    """A package `__getattr__` that serves the names of the 0.2 module the package replaced (featx.data's
    `prepare_cache` from featx.data.cache), importing those modules only when such a name is asked for."""

    def __getattr__(name: str) -> Any:
        if not name.startswith("__"):
            for module in modules:
                target = importlib.import_module(f"{package}.{module}")
                if hasattr(target, name):
                    return getattr(target, name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
