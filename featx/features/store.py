"""The feature store: transfer values in one HDF5 file per extraction.

Layout::

    /<split>/features   (N, V, D) float16 (or float32), chunked by rows: a batch of rows is one read
    /<split>/labels     (N,) int16, -1 where unlabelled
    /<split>/ids        (N,) file names
    /classes, /class_names
    attrs: format, complete, meta (JSON of FeatureMeta), identity

Views are stored in the fixed order of `featx.nets.views.VIEW_SETS`, view 0 always being the full image. An
extraction with augmented views stores them after those, in the train split only: `aug0`, `aug1`, ...
An extraction with `--layers` stores, per view, the concatenation of several depths' features: `meta.parts`
names each part and its dim, in column order, and `feature_set_columns` turns a feature set (`last2`,
`last4+avg`) into the columns a head reads.
A file is only ever renamed to its final name once complete, and `complete` is set just before that, so
readers can trust any file that carries the mark.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from featx.core.atomic import replacing
from featx.core.choices import ViewSelection
from featx.core.errors import FeatxError

FORMAT = "featx-features-1"
CALIBRATION = "calibration"  # an int8 extraction's calibration images, uint8 (N, H, W, 3)
CHUNK_BYTES = 1 << 21


@dataclass
class FeatureMeta:
    backbone: str
    weights: str
    input_size: int
    views: list[str]
    crop: int
    mean: list[float]
    std: list[float]
    precision: str
    dtype: str
    dataset: str
    dataset_fingerprint: str
    classes: list[str]
    class_names: list[str]
    featx_version: str
    # augmented training views (featx.nets.views.aug_pixels): how many per train image, their seed and jitter
    aug_views: int = 0
    aug_seed: int = 0
    aug_brightness: float = 0.0
    aug_contrast: float = 0.0
    layers: str = ""  # --layers of the extraction; "" = the backbone's one pooled vector
    parts: list[list] = field(default_factory=list)  # [name, dim] of each layer, in column order
    # where the images came from: {"cache": path, "fingerprint": the cache's, "per_class": N or None}; later
    # stages find the images through it. Not part of the identity: a moved cache holds the same images.
    source: dict = field(default_factory=dict)
    # what the run that finished the file ran: "on" compiled, "off" eager ("" before it was recorded); not part
    # of the identity, since compiling leaves the values within rounding of eager
    compile: str = ""
    # --precision int8: the training images the quantized model was calibrated on (stored as /calibration;
    # 0 otherwise), and the mean cosine of its features to the unquantized model's on a few others
    calibration: int = 0
    int8_cosine: float | None = None
    # images per second of that run's forward passes (every view of an image counts once; 0: not recorded, or a
    # run that only copied), what `featx compare` reports; not part of the identity: it describes the machine
    images_per_second: float = 0.0

    def identity(self) -> str:
        """Hash of everything that determines the stored values (not the featx version, labels' names or whether
        the model was compiled)."""
        d = dataclasses.asdict(self)
        for k in ("featx_version", "class_names", "source", "compile", "int8_cosine", "images_per_second"):
            d.pop(k)
        # fields that came later are left out where unused, so older files keep their identity
        unused = ["layers", "parts"] if not self.layers else []
        if not self.aug_views:
            unused += ["aug_views", "aug_seed", "aug_brightness", "aug_contrast"]
        if not self.calibration:
            unused.append("calibration")
        for k in unused:
            d.pop(k)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    def settings(self) -> dict:
        """The resolved settings an extraction is compared on (featx.core.outputs): the identity's fields, readable,
        with the class list as its count and the subset's images per class."""
        d = {
            k: v
            for k, v in dataclasses.asdict(self).items()
            if k
            not in (
                "featx_version",
                "class_names",
                "source",
                "compile",
                "images_per_second",
                "classes",
                "parts",
                "aug_brightness",
                "aug_contrast",
                "int8_cosine",
                *(() if self.calibration else ("calibration",)),
            )
        }
        d["classes"] = len(self.classes)
        if "per_class" in self.source:  # files from before featx recorded it compare without it
            d["per_class"] = self.source["per_class"]
        d["dataset_fingerprint"] = d.pop("dataset_fingerprint")  # last: named only when nothing plainer differs
        return d

    def extraction(self) -> str:
        """The identity of the extraction, whatever subset of its views was loaded: splits with equal
        `extraction()` came through the same model with the same settings and can be paired."""
        return dataclasses.replace(self, views=[], aug_views=0).identity()

    def stored_views(self, split: str) -> list[str]:
        """The names of the views stored for `split`, in order: augmented views only in train."""
        return self.views + ([f"aug{i}" for i in range(self.aug_views)] if split == "train" else [])

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> FeatureMeta:
        return cls(**json.loads(text))


ALL = "all"  # the feature set of every stored column


def feature_set_columns(meta: FeatureMeta, feature_set: str, *, path: str | Path) -> slice:
    """The columns of `feature_set` in a file's per-view vectors: "all", or "lastN" (the last N stages or class
    tokens) with "+avg" (the average-pooled patch tokens) after a --layers extraction."""
    if feature_set == ALL:
        return slice(None)
    if not meta.parts:
        raise FeatxError(
            f"--feature-set {feature_set}: {path} stores one vector per view; use all, or extract "
            "with --layers (e.g. last2) to probe feature sets"
        )
    from featx.nets.backbones import AVGPOOL, parse_layers  # torch's import: not for `featx info`

    n, avg = parse_layers(feature_set, "--feature-set")
    depths = [name for name, _ in meta.parts if name != AVGPOOL]
    if n > len(depths) or (avg and AVGPOOL not in dict(meta.parts)):
        sets = [f"last{k}" for k in range(1, len(depths) + 1)]
        sets += [f"{s}+avg" for s in sets] if AVGPOOL in dict(meta.parts) else []
        raise FeatxError(
            f"--feature-set {feature_set}: not in {path} (extracted with --layers {meta.layers}); "
            f"choose from all, {', '.join(sets)}"
        )
    wanted = depths[len(depths) - n :] + ([AVGPOOL] if avg else [])
    ends = np.cumsum([0] + [dim for _, dim in meta.parts])
    first = [name for name, _ in meta.parts].index(wanted[0])
    # Parts are stored deepest-last with the average at the end, so every set is one run of columns.
    return slice(int(ends[first]), int(ends[first + len(wanted)]))


@dataclass
class Features:
    split: str
    features: np.ndarray  # (N, V, D)
    labels: np.ndarray  # int64, -1 where unlabelled
    ids: list[str]
    meta: FeatureMeta
    path: Path


def chunk_rows(views: int, dim: int, itemsize: int) -> int:
    """Rows per HDF5 chunk: about 2 MiB, so a minibatch of rows costs one or two contiguous reads."""
    return max(1, CHUNK_BYTES // (views * dim * itemsize))


def _open(path: str | Path) -> h5py.File:
    path = Path(path)
    if not path.exists():
        partial = path.with_name(path.name + ".partial")
        if partial.exists():
            raise FeatxError(
                f"{path}: extraction unfinished ({partial} exists); re-run the same `featx extract` to finish it"
            )
        raise FeatxError(f"{path}: no such feature file; make it with `featx extract --out {path}`")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise FeatxError(f"{path}: not a readable HDF5 feature file ({e}); re-run `featx extract`") from None
    if f.attrs.get("format") != FORMAT:
        f.close()
        raise FeatxError(f"{path}: not a featx feature file; make one with `featx extract`")
    if not f.attrs.get("complete", False):
        f.close()
        raise FeatxError(f"{path}: extraction unfinished; re-run the same `featx extract` to finish it")
    return f


def read_meta(path: str | Path) -> FeatureMeta:
    with _open(path) as f:
        return FeatureMeta.from_json(f.attrs["meta"])


def feature_splits(path: str | Path) -> list[str]:
    with _open(path) as f:
        return [k for k in ("train", "val", "test") if k in f] + sorted(
            k for k in f if isinstance(f[k], h5py.Group) and k not in ("train", "val", "test")
        )


def _group(f: h5py.File, path, split: str) -> h5py.Group:
    if split not in f:
        have = ", ".join(k for k in f if isinstance(f[k], h5py.Group))
        raise FeatxError(f"{path}: no split {split!r} (has: {have}); extract it with `featx extract --splits {split}`")
    return f[split]


def select_views(meta: FeatureMeta, split: str, views: ViewSelection, *, path: str | Path | None = None) -> list[int]:
    """Indices of the stored views of `split` that `views` names: "all" (every deterministic view), "full",
    or view names as a list or comma list (augmented views only for train)."""
    stored = meta.stored_views(split)
    if views == "all":
        return list(range(len(meta.views)))
    names = [v.strip() for v in views.split(",") if v.strip()] if isinstance(views, str) else list(views)
    missing = [v for v in names if v not in stored]
    if missing or not names:
        train_only = " (augmented views are for training only)" if any(v.startswith("aug") for v in missing) else ""
        raise FeatxError(
            f"{path or 'feature file'}: split {split!r} has no view {', '.join(missing) or '(none named)'}"
            f"{train_only}; choose all, full or names among {','.join(stored)}"
        )
    return [stored.index(v) for v in names]


def load_features(path: str | Path, split: str, *, views: ViewSelection = "all") -> Features:
    """One split in memory. `views`: "all", "full" (view 0 only) or view names (a list or comma list)."""
    path = Path(path)
    with _open(path) as f:
        meta = FeatureMeta.from_json(f.attrs["meta"])
        g = _group(f, path, split)
        idx = select_views(meta, split, views, path=path)
        stored = meta.stored_views(split)
        if idx == list(range(len(stored))):
            data = g["features"][:]
        else:  # h5py reads increasing, distinct indices; names may come in any order
            have = sorted(set(idx))
            data = np.ascontiguousarray(g["features"][:, have, :][:, [have.index(i) for i in idx]])
        labels = g["labels"][:].astype(np.int64)
        ids = [s.decode() if isinstance(s, bytes) else s for s in g["ids"][:]]
    if not np.isfinite(data).all():
        raise FeatxError(f"{path}: split {split!r} holds NaN/inf features; re-extract (try --precision fp32)")
    meta.views = [stored[i] for i in idx]
    return Features(split=split, features=data, labels=labels, ids=ids, meta=meta, path=path)


def load(
    source: str | Path | Mapping[str, str | Path], splits: Sequence[str] | None = None, *, views: ViewSelection = "all"
) -> dict[str, Features]:
    """Several splits as one extraction: every split of a file (`load("f.h5")`), some of them
    (`load("f.h5", ["train", "val"])`), or splits from separate files (`load({"train": a, "val": b})`).
    Refuses splits made with different settings (backbone, weights, views, normalisation, dataset, ...)."""
    if isinstance(source, Mapping):
        missing = [s for s in splits or () if s not in source]
        if missing:
            raise FeatxError(f"splits {missing}: not among the files given (for {', '.join(source)})")
        paths = {split: Path(p) for split, p in source.items() if splits is None or split in splits}
    else:
        paths = {split: Path(source) for split in (splits or feature_splits(source))}
    loaded = {split: load_features(p, split, views=views) for split, p in paths.items()}
    first, *others = loaded.values()
    for other in others:
        require_same_extraction(first, other)
    return loaded


def require_same_extraction(a, b) -> None:
    """`a` and `b` (anything with .path, .split and .meta) must come from one extraction's settings."""
    if a.meta.extraction() != b.meta.extraction():
        diff = [
            k
            for k, v in dataclasses.asdict(a.meta).items()
            if k not in ("views", "featx_version", "class_names") and getattr(b.meta, k) != v
        ]
        raise FeatxError(
            f"{b.path}: split {b.split!r} comes from another extraction than {a.path} split "
            f"{a.split!r} (differs in {', '.join(diff)}); extract both with one `featx extract`"
        )


@contextlib.contextmanager
def open_split(path: str | Path, split: str) -> Iterator[tuple[h5py.Dataset, np.ndarray, int]]:
    """For streaming: the (N, V, D) dataset, the labels, and the rows per chunk (read in whole chunks)."""
    with _open(path) as f:
        g = _group(f, path, split)
        ds = g["features"]
        yield ds, g["labels"][:].astype(np.int64), ds.chunks[0]


def create_file(path: Path, meta: FeatureMeta, sizes: dict[str, int], dim: int) -> h5py.File:
    """An empty, not yet complete feature file with one (N, V, D) dataset per split; written under a
    `featx.core.atomic.replacing` name, it gets attrs["complete"] = True last."""
    f = h5py.File(path, "w")
    f.attrs["format"] = FORMAT
    f.attrs["complete"] = False
    f.attrs["meta"] = meta.to_json()
    f.attrs["identity"] = meta.identity()
    f.create_dataset("classes", data=np.array(meta.classes, dtype=object), dtype=h5py.string_dtype())
    f.create_dataset("class_names", data=np.array(meta.class_names, dtype=object), dtype=h5py.string_dtype())
    dtype = np.dtype(meta.dtype)
    for split, n in sizes.items():
        v = len(meta.stored_views(split))
        g = f.create_group(split)
        g.create_dataset(
            "features",
            shape=(n, v, dim),
            dtype=dtype,
            chunks=(max(1, min(n, chunk_rows(v, dim, dtype.itemsize))), v, dim),
        )
        g.create_dataset("labels", shape=(n,), dtype=np.int16)
        g.create_dataset("ids", shape=(n,), dtype=h5py.string_dtype())
    return f


def file_bytes(meta: FeatureMeta, sizes: dict[str, int], dim: int) -> int:
    """About what a feature file of these splits takes on disk (for the free-space check)."""
    rows = sum(sizes.values())
    return rows * (len(meta.views) * dim * np.dtype(meta.dtype).itemsize + 64) + (1 << 20)


def write_features(
    path: str | Path, meta: FeatureMeta, splits: dict[str, tuple[np.ndarray, np.ndarray, list[str]]]
) -> Path:
    """Write a whole feature file at once (atomic). Used for small files and tests."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    dims = {x.shape[2] for x, _, _ in splits.values()}
    if len(dims) != 1:
        raise ValueError(f"splits disagree on the feature dimension: {dims}")
    sizes = {s: len(v[0]) for s, v in splits.items()}
    dim = dims.pop()
    with replacing(path, need=file_bytes(meta, sizes, dim)) as tmp, create_file(tmp, meta, sizes, dim) as f:
        for split, (x, labels, ids) in splits.items():
            g = f[split]
            g["features"][:] = x
            g["labels"][:] = labels
            g["ids"][:] = ids
        f.attrs["complete"] = True  # last: readers trust only files that carry it
    return path
