"""The decoded cache: every image of a dataset decoded once into one HDF5 file that later stages read.

Layout of a cache (one group per split present: train, val, test)::

    /<split>/images  uint8 (N, H, W, 3), chunked by 64 rows so that a batch is a cheap read
    /<split>/labels  int16, class index into /wnids, -1 where unlabelled
    /<split>/ids     file names (Tiny ImageNet: "val_123.JPEG"; ImageFolder: "<class>/<file>")
    /<split>/boxes   int16 (N, 4) x0 y0 x1 y1 (Tiny ImageNet train and val), -1 where unknown
    /wnids, /names   class ids and human-readable names
    attrs            format, complete, fingerprint, source_fingerprint, dataset, kind, source,
                     image_size, per_class, skipped (JSON list of "member: reason")
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
from joblib import Parallel, delayed, effective_n_jobs, parallel_config

from featx.core.atomic import exclusive, replacing
from featx.core.configs import PrepareConfig
from featx.core.errors import FeatxError
from featx.core.outputs import say
from featx.core.progress import progress_bar
from featx.data.sources import Layout, Tree, decode_batch, exit_with_parent, open_tree, read_layout, skip_or_stop

FORMAT = 1
DATA_DIR = Path("data")
CACHE_DIR = DATA_DIR / "cache"
SPLITS = ("train", "val", "test")
BATCH = 256  # images per worker task: big enough to amortise the task overhead, small enough to stream
CHUNK_ROWS = 64


def prepare_cache(
    data: str | Path | None = None,
    *,
    cache: str | Path | None = None,
    image_size: int = PrepareConfig.image_size,
    classes: int | None = None,
    per_class: int | None = None,
    skip_bad: bool = PrepareConfig.skip_bad,
    n_jobs: int = -1,
    progress: bool = True,
) -> Path:
    """Decode the source once into the HDF5 cache and return the cache path; reuse it when the source
    fingerprint (+ image_size/classes/per_class) is unchanged. `data` may be: the official zip, the extracted
    tiny-imagenet-200/ folder, an ImageFolder root, or an existing cache .h5 file (returned as is, after a check
    that it is a complete featx cache). None: look for data/tiny-imagenet-200.zip (or the folder) under ./data,
    else download it there."""
    for option, value in (("--image-size", image_size), ("--classes", classes), ("--per-class", per_class)):
        if value is not None and value < 1:
            raise FeatxError(f"{option} {value}: must be a positive integer")
    prepared = _prepared(image_size, classes, per_class) if data is None and cache is None else None
    src = prepared or _resolve_source(data)
    if src.is_file() and h5py.is_hdf5(src):
        _open_cache(src).close()
        return src
    quick = _source_key(src, image_size, classes, per_class)
    known = _decoded_from(src, quick, cache, skip_bad)
    if known is not None:
        if progress:
            say(f"up to date: {known} (decoded from {src})")
        return known
    tree = open_tree(src)
    layout = read_layout(tree, classes, per_class)
    fingerprint = _fingerprint(tree.fingerprint, image_size, layout.wnids, per_class)
    if cache is None:
        suffix = (f"-c{classes}" if classes else "") + (f"-p{per_class}" if per_class else "")
        cache = CACHE_DIR / f"{layout.name}-{image_size}{suffix}.h5"
    cache = Path(cache)
    if _reusable(cache, fingerprint, skip_bad):
        if progress:
            say(f"up to date: {cache} (decoded from {src})")
        return cache
    attrs = dict(
        format=FORMAT,
        fingerprint=fingerprint,
        source_fingerprint=tree.fingerprint,
        dataset=layout.name,
        kind=layout.kind,
        source=str(src),
        source_key=quick,
        image_size=image_size,
        per_class=per_class or -1,
    )
    # pixels plus room for labels, ids, boxes and HDF5's own metadata
    need = sum(len(s.members) for s in layout.splits.values()) * (image_size * image_size * 3 + 64) + (1 << 20)
    with exclusive(cache, option="--cache"), replacing(cache, need=need) as tmp, h5py.File(tmp, "w") as f:
        _write_cache(f, tree, layout, image_size, skip_bad, n_jobs, progress)
        f.attrs.update(attrs)
        f.attrs["complete"] = True  # last: a file without it was interrupted
    return cache


def _prepared(image_size: int, classes: int | None, per_class: int | None) -> Path | None:
    """Without --data and without the zip or folder under ./data: a complete cache `featx data prepare` made under
    data/cache with these options (or of the whole dataset, which any subset reads), so that nothing is downloaded."""
    if any(c.exists() for c in (DATA_DIR / "tiny-imagenet-200.zip", DATA_DIR / "tiny-imagenet-200")):
        return None
    suffix = (f"-c{classes}" if classes else "") + (f"-p{per_class}" if per_class else "")
    for pattern in dict.fromkeys((f"*-{image_size}{suffix}.h5", f"*-{image_size}.h5")):
        found = [c for c in sorted(CACHE_DIR.glob(pattern)) if _complete(c)]
        if len(found) > 1:  # several datasets: which one is meant is not ours to guess
            raise FeatxError(
                f"no --data given and {CACHE_DIR}/ holds {len(found)} prepared datasets "
                f"({', '.join(f'{c} ({_dataset_of(c)})' for c in found)}); pass --data with the one to use"
            )
        if found:
            return found[0]
    return None


def _complete(cache: Path) -> bool:
    try:
        _open_cache(cache).close()
    except FeatxError:
        return False
    return True


def _dataset_of(cache: Path) -> str:
    with _open_cache(cache) as f:
        return str(f.attrs["dataset"])


def describe_data(cache: str | Path, *, classes: int | None = None, per_class: int | None = None) -> str:
    """The data a stage reads, for its first line: the cache, its dataset and the images of each split used."""
    info = dataset_info(cache, classes=classes)
    counts = ", ".join(f"{len(read_split(cache, s, classes=classes, per_class=per_class))} {s}" for s in info.splits)
    return f"data: {cache} ({info.name}, {len(info.wnids)} classes; {counts} images)"


def _resolve_source(data: str | Path | None) -> Path:
    if data is None:
        for candidate in (DATA_DIR / "tiny-imagenet-200.zip", DATA_DIR / "tiny-imagenet-200"):
            if candidate.exists():
                return candidate
        from featx.data.download import download_tiny_imagenet

        return download_tiny_imagenet(DATA_DIR)
    path = Path(data)
    if not path.exists():
        from featx.data.download import URL

        raise FeatxError(
            f"--data {path}: no such file or folder (looked for {path.absolute()}); give the path where "
            f"tiny-imagenet-200.zip (from {URL}), its extracted folder, an ImageFolder root or a featx cache "
            f"(.h5) lies, or leave --data out to download Tiny ImageNet into {DATA_DIR}/"
        )
    if not os.access(path, os.R_OK | (os.X_OK if path.is_dir() else 0)):
        raise FeatxError(f"--data {path}: permission denied; make it readable (chmod) or copy it somewhere readable")
    return path


def _fingerprint(source_fingerprint: str, image_size: int, wnids: list[str], per_class: int | None) -> str:
    # Built from the classes actually kept, so a subset taken at prepare time and the same subset read from a
    # full cache (dataset_info(classes=K)) share a fingerprint: it is the same decoded data.
    key = f"featx-cache-{FORMAT}|{source_fingerprint}|{image_size}|{','.join(wnids)}|{per_class}"
    return hashlib.sha1(key.encode()).hexdigest()[:16]


def _source_key(src: Path, image_size: int, classes: int | None, per_class: int | None) -> str:
    """The source file's size and modification time with the options: what tells an unchanged zip without
    reading its 100,000-entry index (seconds), as make and rsync tell unchanged files. Folders have none."""
    if not src.is_file():
        return ""
    st = src.stat()
    return json.dumps([st.st_size, st.st_mtime_ns, image_size, classes, per_class])


def _decoded_from(src: Path, key: str, cache: str | Path | None, skip_bad: bool) -> Path | None:
    """A complete cache (the given one, or any in CACHE_DIR) decoded from this very source file with these
    options, found from its attributes alone; None where there is none or the source is a folder."""
    if not key:
        return None
    for path in [Path(cache)] if cache is not None else sorted(CACHE_DIR.glob("*.h5")):
        try:
            with h5py.File(path, "r") as f:
                attrs = dict(f.attrs)
        except OSError:
            continue
        same = attrs.get("source") == str(src) and attrs.get("source_key") == key
        if same and _reusable(path, attrs["fingerprint"], skip_bad):
            return path
    return None


def _reusable(cache: Path, fingerprint: str, skip_bad: bool) -> bool:
    if not cache.exists():
        return False
    try:
        with h5py.File(cache, "r") as f:
            attrs = dict(f.attrs)
    except OSError:
        attrs = {}
    if "fingerprint" not in attrs:
        raise FeatxError(f"--cache {cache}: exists and is not a featx cache; pass another --cache path or remove it")
    # A cache that skipped bad images only stands in for a run that allows skipping.
    return (
        attrs.get("format") == FORMAT
        and bool(attrs.get("complete"))
        and attrs["fingerprint"] == fingerprint
        and (skip_bad or not json.loads(attrs.get("skipped", "[]")))
    )


def _write_cache(
    f: h5py.File, tree: Tree, layout: Layout, size: int, skip_bad: bool, n_jobs: int, progress: bool
) -> None:
    tasks = [
        (split, start, s.members[start : start + BATCH])
        for split, s in layout.splits.items()
        for start in range(0, len(s.members), BATCH)
    ]
    # Starting worker processes costs about a second: not worth it for a handful of batches.
    jobs = min(effective_n_jobs(n_jobs), len(tasks)) if len(tasks) >= 4 else 1
    with parallel_config(backend="loky", initializer=exit_with_parent, initargs=(os.getpid(),)):
        results = Parallel(n_jobs=jobs, return_as="generator")(
            delayed(decode_batch)(str(tree.path), tree.is_zip, members, size) for _, _, members in tasks
        )

    images = {
        split: f.create_dataset(
            f"{split}/images",
            shape=(len(s.members), size, size, 3),
            dtype=np.uint8,
            maxshape=(None, size, size, 3),
            chunks=(max(1, min(CHUNK_ROWS, len(s.members))), size, size, 3),
        )
        for split, s in layout.splits.items()
    }
    keep = {split: np.ones(len(s.members), bool) for split, s in layout.splits.items()}
    written = dict.fromkeys(layout.splits, 0)
    skipped = []
    total = sum(len(s.members) for s in layout.splits.values())
    with progress_bar(total=total, unit="img", desc=f"decoding {layout.name}", enabled=progress) as bar:
        for (split, start, members), (batch, bad) in zip(tasks, results):
            skipped += skip_or_stop(
                [(tree.where(members[i]), reason) for i, reason in bad], skip_bad=skip_bad, fix="replace it"
            )
            for i, _ in bad:
                keep[split][start + i] = False
            good = batch[keep[split][start : start + len(members)]]
            images[split][written[split] : written[split] + len(good)] = good
            written[split] += len(good)
            bar.update(len(members))

    text = h5py.string_dtype()
    for split, s in layout.splits.items():
        k = keep[split]
        images[split].resize(written[split], axis=0)
        f[f"{split}/labels"] = s.labels[k]
        f.create_dataset(f"{split}/ids", data=np.array(s.ids, dtype=object)[k], dtype=text)
        if s.boxes is not None:
            f[f"{split}/boxes"] = s.boxes[k]
    f.create_dataset("wnids", data=layout.wnids, dtype=text)
    f.create_dataset("names", data=layout.names, dtype=text)
    f.attrs["skipped"] = json.dumps(skipped)


def _open_cache(cache: str | Path) -> h5py.File:
    path = Path(cache)
    if not path.is_file():
        raise FeatxError(f"--cache {path}: no such file; run `featx data prepare` first or pass the cache path")
    try:
        f = h5py.File(path, "r")
    except OSError:
        raise FeatxError(f"--cache {path}: not an HDF5 file; pass a cache written by `featx data prepare`") from None
    kind = f.attrs.get("format")
    if isinstance(kind, str) and kind.startswith("featx-"):  # another featx file: never advise overwriting it
        f.close()
        raise FeatxError(
            f"--cache {path}: a featx {kind.removeprefix('featx-').rsplit('-', 1)[0]} file, not a "
            f"decoded-image cache; `featx info {path}` describes it"
        )
    if kind != FORMAT or not f.attrs.get("complete"):
        f.close()
        raise FeatxError(
            f"--cache {path}: not a complete featx cache (format {FORMAT}); "
            f"run `featx data prepare --cache {path}` again"
        )
    return f


def _check_classes(cache: str | Path, classes: int | None, available: int) -> None:
    if classes is not None and not 1 <= classes <= available:
        raise FeatxError(f"--classes {classes}: {cache} has {available} classes; pass 1 to {available}")


@dataclass
class Split:
    name: str  # "train" | "val" | "test"
    cache: Path
    rows: np.ndarray  # int64 indices into /<split>/images of the cache, increasing
    labels: np.ndarray  # int64, class index into DatasetInfo.wnids (after subsetting), -1 where unlabelled
    ids: list[str]  # file names, e.g. "val_123.JPEG"

    def __len__(self) -> int:
        return len(self.rows)

    def read_images(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """uint8 (n, H, W, 3) for rows[start:stop]; reads only those rows from disk (memory must not grow
        with dataset size when callers read in batches)."""
        rows = self.rows[start:stop]
        with h5py.File(self.cache, "r") as f:
            images = f[self.name]["images"]
            out = np.empty((len(rows), *images.shape[1:]), np.uint8)
            # Contiguous runs are read as slices: h5py's point selections are an order of magnitude slower.
            edges = [0, *(np.flatnonzero(np.diff(rows) != 1) + 1), len(rows)]
            for i, j in zip(edges[:-1], edges[1:]):
                if j > i:
                    images.read_direct(out, np.s_[rows[i] : rows[i] + j - i], np.s_[i:j])
        return out


def read_split(cache: str | Path, split: str, *, classes: int | None = None, per_class: int | None = None) -> Split:
    """A split of the cache, optionally restricted to the first `classes` classes (wnids order) and, for
    train, the first `per_class` images of each class. Unlabelled test keeps all its images."""
    with _open_cache(cache) as f:
        if split not in f:
            present = ", ".join(s for s in SPLITS if s in f)
            raise FeatxError(f"{cache}: has no {split!r} split; use one of: {present}")
        labels = f[split]["labels"][()].astype(np.int64)
        ids = f[split]["ids"].asstr()[()].tolist()
        _check_classes(cache, classes, len(f["wnids"]))
    keep = np.ones(len(labels), bool)
    if classes is not None:
        keep &= labels < classes  # -1 (unlabelled) stays
    if per_class is not None and split == "train":
        keep &= _rank_in_class(labels) < per_class
    rows = np.flatnonzero(keep).astype(np.int64)
    return Split(split, Path(cache), rows, labels[rows], [ids[i] for i in rows])


def _rank_in_class(labels: np.ndarray) -> np.ndarray:
    """0 for the first image of each class (in cache order), 1 for the second, ..."""
    order = np.argsort(labels, kind="stable")
    ordered = labels[order]
    rank = np.empty(len(labels), np.int64)
    rank[order] = np.arange(len(labels)) - np.searchsorted(ordered, ordered)
    return rank


@dataclass
class DatasetInfo:
    name: str  # e.g. "tiny-imagenet-200" or the ImageFolder root's name
    wnids: list[str]  # class ids in wnids.txt order (ImageFolder: sorted class folder names), after subsetting
    names: list[str]  # human-readable names (words.txt; ImageFolder: the folder name)
    image_size: int
    fingerprint: str  # of the source (+ subset options): identifies the decoded data
    splits: list[str]


def dataset_info(cache: str | Path, *, classes: int | None = None) -> DatasetInfo:
    with _open_cache(cache) as f:
        a = dict(f.attrs)
        wnids = f["wnids"].asstr()[()].tolist()
        names = f["names"].asstr()[()].tolist()
        splits = [s for s in SPLITS if s in f]
    _check_classes(cache, classes, len(wnids))
    per_class = int(a["per_class"]) if a["per_class"] > 0 else None
    wnids, names = wnids[:classes], names[:classes]
    fingerprint = _fingerprint(a["source_fingerprint"], int(a["image_size"]), wnids, per_class)
    return DatasetInfo(a["dataset"], wnids, names, int(a["image_size"]), fingerprint, splits)


def cache_info(cache: str | Path) -> dict:
    """What `featx data info` prints."""
    with _open_cache(cache) as f:
        a = f.attrs
        return {
            "path": str(cache),
            "size_bytes": Path(cache).stat().st_size,
            "dataset": a["dataset"],
            "kind": a["kind"],
            "source": a["source"],
            "image_size": int(a["image_size"]),
            "classes": len(f["wnids"]),
            "splits": {s: len(f[s]["labels"]) for s in SPLITS if s in f},
            "skipped": json.loads(a["skipped"]),
            "fingerprint": a["fingerprint"],
        }
