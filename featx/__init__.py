"""featx: transfer learning on small-image classification.

The stages are plain functions; the CLI (`featx ...`) is a thin layer over them::

    from featx import extract_features, grid, predict_split, prepare_cache, run_probe
    cache = prepare_cache("tiny-imagenet-200.zip")
    features = extract_features(data=cache, backbone="resnet50", views="ten", out="features/r50.h5")
    run_probe(features=features, out="runs/r50", heads=grid(lr=[3e-4, 1e-3]))
    p = predict_split(runs=["runs/r50"], split="val", eval_views="all", ensemble="greedy")
"""

__version__ = "0.1.0"

# Public API -> "module" or "module:attribute" defining it. Imported lazily so that `featx --help` does not pay
# for torch. Names differ from featx's submodules (finetune, predict, ...): once a submodule is imported, the
# package attribute of that name is the module, which would shadow a function exported under it.
_API = {
    "FeatxError": "featx.errors",
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
    # stage 3: end-to-end training
    "FinetuneConfig": "featx.finetune",
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
