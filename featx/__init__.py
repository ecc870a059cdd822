"""featx: transfer learning on small-image classification.

The stages are plain functions; the CLI (`featx ...`) is a thin layer over them::

    from featx import prepare_cache, extract_features
    cache = prepare_cache("tiny-imagenet-200.zip")
    extract_features(data=cache, backbone="resnet50", views="ten", out="features/r50.h5")
"""

__version__ = "0.1.0"

# Public API -> defining module. Imported lazily so that `featx --help` does not pay for torch.
_API = {
    "FeatxError": "featx.errors",
    "prepare_cache": "featx.data",
    "read_split": "featx.data",
    "cache_info": "featx.data",
    "create_backbone": "featx.backbones",
    "list_backbones": "featx.backbones",
    "extract_features": "featx.extract",
    "load_features": "featx.features",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        import importlib

        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'featx' has no attribute {name!r}")
