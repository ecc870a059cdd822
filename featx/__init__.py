"""featx: transfer learning on small-image classification.

Each stage takes its typed config, the same the CLI (`featx ...`) and the recipes build::

    from featx import ExtractConfig, PredictConfig, ProbeConfig, run_stage
    features = run_stage(ExtractConfig(backbone="resnet50", data="tiny-imagenet-200.zip"), out="features/r50.h5")
    run_stage(ProbeConfig(features=str(features), lr=(3e-4, 1e-3)), out="runs/r50")
    p = run_stage(PredictConfig(runs=("runs/r50",), ensemble="greedy"))

The stages' keyword functions (`extract_features`, `run_probe`, `predict_split`, ...) stay for convenience.
"""

__version__ = "0.2.0"

# Public API -> "module" or "module:attribute" defining it. Imported lazily so that `featx --help` does not pay
# for torch. Names differ from featx's submodules (finetune, predict, ...): once a submodule is imported, the
# package attribute of that name is the module, which would shadow a function exported under it.
_API = {
    "FeatxError": "featx.errors",
    # every stage's options, one typed config each, and the one call that runs any of them
    "PrepareConfig": "featx.configs",
    "ExtractConfig": "featx.configs",
    "ProbeConfig": "featx.configs",
    "PredictConfig": "featx.configs",
    "ReportConfig": "featx.configs",
    "CompareConfig": "featx.configs",
    "run_stage": "featx.stages",
    # stage 1: data and transfer values
    "prepare_cache": "featx.data",
    "read_split": "featx.data",
    "cache_info": "featx.data",
    "create_backbone": "featx.backbones",
    "list_backbones": "featx.backbones",
    "extract_features": "featx.extract",
    "load_features": "featx.features",
    "load": "featx.features",
    # stage 2: heads on cached features
    "HeadConfig": "featx.sweep",
    "grid": "featx.sweep",
    "run_probe": "featx.probe",
    "train_heads": "featx.sweep:train",
    # the probe on arrays, as scikit-learn estimators
    "LinearProbe": "featx.estimator",
    "LinearProbeCV": "featx.estimator",
    # stage 3: end-to-end training
    "FinetuneConfig": "featx.configs",
    "run_finetune": "featx.finetune:finetune",
    # stage 4: predictions, submission, report
    "predict_split": "featx.predict:predict",
    "predict_images": "featx.predict",
    "write_predictions": "featx.predict",
    "write_submission": "featx.predict",
    "write_report": "featx.report",
    # recipes (pass the click group: run_recipe(recipe=..., commands=featx.cli.cli))
    "run_recipe": "featx.pipeline",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        import importlib

        module, _, attribute = _API[name].partition(":")
        return getattr(importlib.import_module(module), attribute or name)
    raise AttributeError(f"module 'featx' has no attribute {name!r}")
