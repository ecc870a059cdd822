"""featx: transfer learning on small-image classification.

Each stage takes its typed config, the same the CLI (`featx ...`) and the recipes build::

    from featx import ExtractConfig, PredictConfig, ProbeConfig, run_stage
    features = run_stage(ExtractConfig(backbone="resnet50", data="tiny-imagenet-200.zip"), out="features/r50.h5")
    run_stage(ProbeConfig(features=str(features), lr=(3e-4, 1e-3)), out="runs/r50")
    p = run_stage(PredictConfig(runs=("runs/r50",), ensemble="greedy"))

The stages' keyword functions (`extract_features`, `run_probe`, `predict_split`, ...) stay for convenience.
"""

__version__ = "0.3.0"

from featx import _layout

# Public API -> "module" or "module:attribute" defining it. Imported lazily so that `featx --help` does not pay
# for torch. Names differ from featx's submodules (finetune, predict, ...): once a submodule is imported, the
# package attribute of that name is the module, which would shadow a function exported under it.
_API = {
    "FeatxError": "featx.core.errors",
    # every stage's options, one typed config each, and the one call that runs any of them
    "PrepareConfig": "featx.core.configs",
    "ExtractConfig": "featx.core.configs",
    "ProbeConfig": "featx.core.configs",
    "PredictConfig": "featx.core.configs",
    "ReportConfig": "featx.core.configs",
    "CompareConfig": "featx.core.configs",
    "run_stage": "featx.front.stages",
    # stage 1: data and transfer values
    "prepare_cache": "featx.data.cache",
    "read_split": "featx.data.cache",
    "cache_info": "featx.data.cache",
    "create_backbone": "featx.nets.backbones",
    "list_backbones": "featx.nets.backbones",
    "extract_features": "featx.features.extract",
    "load_features": "featx.features.store",
    "load": "featx.features.store",
    # stage 2: heads on cached features
    "HeadConfig": "featx.probe.sweep",
    "grid": "featx.probe.sweep",
    "run_probe": "featx.probe.run",
    "train_heads": "featx.probe.sweep:train",
    # the probe on arrays, as scikit-learn estimators
    "LinearProbe": "featx.probe.estimator",
    "LinearProbeCV": "featx.probe.estimator",
    # stage 3: end-to-end training
    "FinetuneConfig": "featx.core.configs",
    "run_finetune": "featx.finetune.run:finetune",
    # stage 4: predictions, submission, report
    "predict_split": "featx.evaluate.scoring:predict",
    "predict_images": "featx.evaluate.images",
    "write_predictions": "featx.evaluate.writers",
    "write_submission": "featx.evaluate.writers",
    "write_report": "featx.evaluate.report",
    "compare_backbones": "featx.front.compare:compare",
    # recipes (pass the click group: run_recipe(recipe=..., commands=featx.front.cli.cli))
    "run_recipe": "featx.front.recipes",
}

__all__ = ["__version__", *_API]

_layout.install()


def __getattr__(name: str):
    if name in _API:
        import importlib

        module, _, attribute = _API[name].partition(":")
        return getattr(importlib.import_module(module), attribute or name)
    raise AttributeError(f"module 'featx' has no attribute {name!r}")
