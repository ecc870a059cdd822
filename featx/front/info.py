"""`featx info PATH`: what any featx output is, described the same way whatever its kind.

A decoded-image cache, a feature file (or its unfinished `.partial` folder), a probe or finetune run, a predict
folder or a report: `info` returns a dict with `kind`, `path`, `complete`, `settings`, `splits` (name → images),
`size_bytes`, `metrics`, `source` (where it came from) and `made_by` (featx version, date), and `format_info`
turns it into lines. It only reads.
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py

from featx.core.atomic import size_text
from featx.core.configs import show
from featx.core.errors import FeatxError
from featx.core.runs import read_run
from featx.data.cache import cache_info
from featx.features.store import FORMAT as FEATURES_FORMAT
from featx.features.store import FeatureMeta, feature_splits, read_meta


def _size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _describe(
    kind: str,
    path: Path,
    *,
    complete: bool = True,
    settings: dict | None = None,
    splits: dict | None = None,
    metrics: dict | None = None,
    source: dict | None = None,
    made_by: dict | None = None,
) -> dict:
    return {
        "kind": kind,
        "path": str(path),
        "complete": complete,
        "settings": settings or {},
        "splits": splits or {},
        "size_bytes": _size(path),
        "metrics": metrics or {},
        "source": source or {},
        "made_by": made_by or {},
    }


def _features(path: Path) -> dict:
    meta = read_meta(path)
    with h5py.File(path, "r") as f:
        splits = {s: int(f[s]["labels"].shape[0]) for s in feature_splits(path)}
        dim = int(f[next(iter(splits))]["features"].shape[-1]) if splits else 0
    return _describe(
        "features",
        path,
        settings={**meta.settings(), "dim": dim},
        splits=splits,
        source={**meta.source, "dataset": meta.dataset, "dataset_fingerprint": meta.dataset_fingerprint},
        made_by={
            "featx_version": meta.featx_version,
            # an int8 file's check of its quantized model: mean cosine to the unquantized model's features
            **({"int8_cosine": round(meta.int8_cosine, 4)} if meta.int8_cosine is not None else {}),
        },
    )


def _h5(path: Path) -> dict:
    try:
        with h5py.File(path, "r") as f:
            fmt, complete = f.attrs.get("format"), bool(f.attrs.get("complete", False))
    except OSError:
        raise FeatxError(
            f"{path}: not an HDF5 file featx wrote; `featx info` takes caches, feature files, "
            "run, predict and report folders"
        ) from None
    if not complete:
        return _describe("features" if fmt == FEATURES_FORMAT else "cache", path, complete=False)
    if fmt == FEATURES_FORMAT:
        return _features(path)
    c = cache_info(path)
    return _describe(
        "cache",
        path,
        settings={"image_size": c["image_size"], "classes": c["classes"]},
        splits=c["splits"],
        source={
            "source": c["source"],
            "dataset": c["dataset"],
            "kind": c["kind"],
            "fingerprint": c["fingerprint"],
            "skipped": c["skipped"],
        },
    )


def _results(folder: Path) -> dict:
    path = folder / "results.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _metrics(results: dict) -> dict:
    keys = ("split", "top1", "top1_interval", "top5", "views", "selection", "calibration", "seconds")
    return {k: results[k] for k in keys if k in results}


def _run(folder: Path) -> dict:
    run = read_run(folder)
    results = _results(folder)
    source = run.features if run.kind == "probe" else run.data
    return _describe(
        run.kind,
        folder,
        complete=bool(results) or run.best is not None,
        settings=run.config,
        metrics=_metrics(results) or (run.best or {}),
        source=source or {},
        made_by={
            "featx_version": run.featx_version,
            "created": run.created,
            "checkpoints": [c.file for c in run.checkpoints],
        },
    )


def _partial_extraction(folder: Path) -> dict:
    stored = json.loads((folder / "meta.json").read_text())
    meta = FeatureMeta.from_json(json.dumps(stored["meta"])) if "meta" in stored else None
    shards = sorted(p.stem for p in folder.glob("*-*.npy"))
    return _describe(
        "features",
        folder,
        complete=False,
        settings=meta.settings() if meta else {},
        metrics={"shards_done": len(shards), "shard_rows": stored.get("shard_rows")},
        source=meta.source if meta else {},
        made_by={"featx_version": meta.featx_version} if meta else {},
    )


def info(path: str | Path) -> dict:
    """Describe the featx output at `path` (see the module's docstring)."""
    path = Path(path)
    if not path.exists():
        raise FeatxError(f"{path}: no such file or folder")
    if path.is_file():
        return _h5(path)
    if (path / "run.json").exists():
        return _run(path)
    if (path / "meta.json").exists() and path.name.endswith(".partial"):
        return _partial_extraction(path)
    results = _results(path)
    if results.get("kind") == "predict" or (
        (path / "predictions.csv").exists() and not (path / "report.html").exists()
    ):
        return _describe(
            "predict",
            path,
            complete=bool(results),
            settings=results.get("settings"),
            metrics=_metrics(results),
            made_by={"featx_version": results.get("featx_version")},
        )
    if (path / "report.html").exists():
        report = json.loads((path / "report.json").read_text()) if (path / "report.json").exists() else {}
        return _describe(
            "report",
            path,
            settings=report.get("settings"),
            metrics=report.get("metrics"),
            source={"runs": report.get("settings", {}).get("runs")},
            made_by={"featx_version": report.get("featx_version")},
        )
    raise FeatxError(
        f"{path}: not a featx output; `featx info` takes caches, feature files, run, predict and report folders"
    )


def format_info(d: dict) -> str:
    """`featx info`'s text: the kind and path, then one line per section."""
    lines = [f"{d['path']}: {d['kind']}{'' if d['complete'] else ' (unfinished)'}, {size_text(d['size_bytes'])}"]
    if d["splits"]:
        lines.append("  splits: " + ", ".join(f"{s} {n}" for s, n in d["splits"].items()))
    for section in ("metrics", "settings", "source", "made_by"):
        if d[section]:
            lines.append(f"  {section.replace('_', ' ')}:")
            lines += [f"    {k}: {show(v, digits=4)}" for k, v in d[section].items()]
    return "\n".join(lines)
