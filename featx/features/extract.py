"""Stage 1: run a frozen backbone over every image and view once; store pooled features in HDF5.

Work is cut into shards of consecutive rows. Each finished shard is saved atomically as its own .npy under
`<out>.partial/`, so Ctrl-C or kill -9 at any moment loses at most the shards in flight, and the same command
resumes after the last finished one. Under torchrun, shard k belongs to rank k % world_size; rank 0 then
assembles the shards in row order into the one file a single process would have written. Images travel to
the device as uint8; views, upsampling and normalisation happen there (featx.nets.views).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from torch.fx.experimental.optimization import fuse

from featx import __version__
from featx.core.atomic import one_writer, replacing, require_space
from featx.core.choices import CompileMode, Device, FeatureDtype, FrozenPrecision, Split, ViewSet
from featx.core.compiled import frozen, ran_compiled
from featx.core.configs import ExtractConfig
from featx.core.device import Dist, distributed, precision_name, resolve_precision
from featx.core.errors import FeatxError
from featx.core.outputs import Existing, say
from featx.core.outputs import decide as output_action
from featx.core.progress import progress_bar
from featx.data.cache import DatasetInfo, dataset_info, describe_data, prepare_cache, read_split
from featx.data.cache import Split as DecodedSplit
from featx.features.int8 import calibration_rows, check_int8, mean_cosine, quantize
from featx.features.store import CALIBRATION, FeatureMeta, create_file, feature_splits, file_bytes, read_meta
from featx.nets.backbones import Backbone, create_backbone
from featx.nets.views import AUG_BRIGHTNESS, AUG_CONTRAST, check_crop, render_aug_views, render_views, view_names

SHARD_ROWS = 1024


def _existing_splits(
    out: Path, meta: FeatureMeta, splits: list[str], *, force: bool, auto: dict[str, str]
) -> list[str] | None:
    """The output contract for the finished file: the splits to keep from it (they are copied into the new file
    beside the splits added), or None when it is up to date. A file of other settings is refused (or, forced,
    replaced once the new one is complete: nothing kept)."""
    if not out.exists():
        return []
    have = read_meta(out)
    stored = feature_splits(out)
    missing = [s for s in splits if s not in stored]
    done = Existing(have.settings(), complete=not missing)
    if output_action(out, done, meta.settings(), force=force, auto=auto) == "up to date":
        return None
    if have.settings() != meta.settings():  # forced over other settings
        return []
    if missing:
        say(f"adding split{'s' * (len(missing) > 1)} {','.join(missing)} to {out} (has {','.join(stored)})")
    return stored


def _open_partial(
    partial: Path,
    meta: FeatureMeta,
    shard_rows: int,
    shards: list[tuple[str, int, int]],
    *,
    force: bool,
    auto: dict[str, str],
) -> None:
    """The output contract for the unfinished extraction in `partial` (shards: split, index, rows)."""
    settings = partial / "meta.json"
    want = {**meta.settings(), "shard_rows": shard_rows}
    if settings.exists():
        stored = json.loads(settings.read_text())
        if "meta" in stored:
            have = {
                **FeatureMeta.from_json(json.dumps(stored["meta"])).settings(),
                "shard_rows": stored.get("shard_rows"),
            }
        else:  # a partial of an older featx records only its identity
            have, want = {"identity": stored.get("identity")}, {"identity": meta.identity()}
        done = sum(n for s, k, n in shards if _shard_file(partial, s, k).exists())
        total = sum(n for *_, n in shards)
        if (
            output_action(partial, Existing(have, done=done, total=total, unit="images"), want, force=force, auto=auto)
            == "resume"
        ):
            return
        shutil.rmtree(partial)  # forced: a partial output of other settings holds nothing of the new one
    partial.mkdir(parents=True, exist_ok=True)
    with replacing(settings) as tmp:
        tmp.write_text(
            json.dumps({"identity": meta.identity(), "shard_rows": shard_rows, "meta": json.loads(meta.to_json())})
        )


def _save_shard(path: Path, x: np.ndarray) -> None:
    with replacing(path, need=x.nbytes + 4096) as tmp:
        np.save(tmp, x)


def _fold_batchnorm(model: torch.nn.Module) -> torch.nn.Module:
    """Fold frozen BatchNorm into the preceding convolutions (1.2-2x on CPU); models that torch.fx cannot
    trace (data-dependent control flow) run as they are."""
    try:
        return fuse(model)
    except Exception:
        return model


def _images_at(split: DecodedSplit, rows: np.ndarray) -> np.ndarray:
    """uint8 images of these rows of the split, in that order."""
    order = np.argsort(rows)  # the cache reads increasing rows
    images = dataclasses.replace(split, rows=split.rows[rows[order]], labels=split.labels[rows[order]], ids=[])
    return images.read_images()[np.argsort(order)]


def calibration_images(train: DecodedSplit, n: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images of the seeded calibration sample of `train` (n), and of the images to check it on."""
    sample, check = (_images_at(train, rows) for rows in calibration_rows(len(train.rows), n))
    return sample, check


def _full_views(bb: Backbone, images: np.ndarray, crop: int) -> torch.Tensor:
    return render_views(
        torch.from_numpy(images), views=["full"], crop=crop, size=bb.input_size, mean=bb.mean, std=bb.std
    )


def int8_model(
    bb: Backbone, calibration: np.ndarray, *, crop: int, rows: int
) -> Callable[[torch.Tensor], torch.Tensor]:
    """The backbone quantized to int8 (featx.features.int8), calibrated on the full view of `calibration`
    (uint8 images): extraction and predictions on new images build it alike."""
    model = _fold_batchnorm(bb.model.eval().requires_grad_(False)).to(memory_format=torch.channels_last)
    try:
        return quantize(model, _full_views(bb, calibration, crop), rows=rows)
    except Exception as e:  # torchao's quantizer does not take every graph (ResNets' shared ReLU modules)
        first = (str(e).strip().splitlines() or [""])[0][:160]
        raise FeatxError(
            f"--precision int8: torchao cannot quantize {bb.name} ({type(e).__name__}: {first}); "
            "use --precision fp32 or bf16 for it"
        ) from None


def int8_model_of(path: Path, bb: Backbone, *, rows: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """The quantized model an int8 feature file's features came from, rebuilt from its stored calibration
    images: the same image gives the same features."""
    with h5py.File(path, "r") as f:
        images = f[CALIBRATION][:]
    return int8_model(bb, images, crop=read_meta(path).crop, rows=rows)


def _int8_frozen(
    bb: Backbone, calibration: np.ndarray, check: np.ndarray, *, crop: int, rows: int
) -> tuple[Callable[[torch.Tensor], torch.Tensor], float]:
    """int8_model of the `calibration` images and its mean cosine to fp32 on the `check` images."""
    model = int8_model(bb, calibration, crop=crop, rows=rows)
    reference = _fold_batchnorm(bb.model.eval().requires_grad_(False))
    return model, mean_cosine(reference, model, _full_views(bb, check, crop))


def _frozen_model(
    bb: Backbone, job: _Job, *, counts: dict[tuple[str, int], int], quiet: bool
) -> Callable[[torch.Tensor], torch.Tensor]:
    """The backbone as extraction runs it: eval, no gradients, BatchNorm folded, channels_last, and compiled as
    `compile` decides (featx.core.compiled.frozen) for the images still to do (`counts`: per (split, shard)),
    each making the job's views and in train the config's `aug_views` more."""
    model = _fold_batchnorm(bb.model.eval().requires_grad_(False))
    # Module.to takes a device and a memory_format together; torch's stubs have no overload for the pair
    model = model.to(job.device, memory_format=torch.channels_last)  # type: ignore[call-overload]
    views, aug_views = len(job.views), job.config.aug_views
    per_image = {s: views + (aug_views if s == "train" else 0) for s, _ in counts} or {"": views}
    return frozen(
        model,
        job.config.compile,
        example=example_batch(bb, job.batch_size * max(per_image.values()), job.device),
        views=sum(n * per_image[s] for (s, _), n in counts.items()),
        autocast=job.autocast,
        quiet=quiet,
    )


def example_batch(bb: Backbone, rows: int, device: torch.device) -> torch.Tensor:
    """A batch of the backbone's input shape, for timing (its speed does not depend on the values)."""
    return torch.zeros(rows, 3, bb.input_size, bb.input_size, device=device).contiguous(
        memory_format=torch.channels_last
    )


@torch.inference_mode()
def _forward_views(
    bb: Backbone,
    model: Callable[[torch.Tensor], torch.Tensor],
    images: np.ndarray,
    *,
    views: Sequence[str],
    crop: int,
    device: torch.device,
    autocast: torch.dtype | None,
    aug: tuple[int, int, int] = (0, 0, 0),
) -> torch.Tensor:
    """uint8 images (B, H, W, 3) -> float32 model outputs (B, V + k, D) of every view, left on the device: no
    host sync, so that on a GPU the next batches queue up while this one runs. `aug` = (k, seed, index of
    images[0] in its split) adds k augmented views per image after the deterministic ones."""
    x = torch.from_numpy(images)
    if device.type == "cuda":
        x = x.pin_memory().to(device, non_blocking=True)
    v = render_views(x, views=views, crop=crop, size=bb.input_size, mean=bb.mean, std=bb.std)
    k, seed, first = aug
    if k:
        a = render_aug_views(x, first=first, k=k, seed=seed, crop=crop, size=bb.input_size, mean=bb.mean, std=bb.std)
        v = torch.cat([v.unflatten(0, (len(images), -1)), a.unflatten(0, (len(images), -1))], 1).flatten(0, 1)
    with torch.autocast(device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
        y = model(v.contiguous(memory_format=torch.channels_last))
    return y.float().reshape(len(images), len(views) + k, -1)


def _to_host(outputs: list[torch.Tensor], out_dtype: np.dtype) -> np.ndarray:
    """Device outputs -> one host array in out_dtype, with one sync for all of them. Checked and narrowed
    on the device, so that half the bytes cross to the host and the host does no cast."""
    if out_dtype == np.float16:
        peak = torch.stack([y.abs().amax() for y in outputs]).max().item()
        if peak > torch.finfo(torch.float16).max:
            raise FeatxError(f"features reach {peak:.3g}, beyond float16; re-run with --dtype float32")
        outputs = [y.half() for y in outputs]
    return torch.cat(outputs).cpu().numpy()


def compute_features(
    bb: Backbone,
    model: Callable[[torch.Tensor], torch.Tensor],
    images: np.ndarray,
    *,
    views: Sequence[str],
    crop: int,
    device: torch.device,
    autocast: torch.dtype | None,
    out_dtype: np.dtype,
) -> np.ndarray:
    """uint8 images (B, H, W, 3) -> model outputs (B, V, D) of every view: the one step shared by extraction
    and by predictions on new images."""
    return _to_host(
        [_forward_views(bb, model, images, views=views, crop=crop, device=device, autocast=autocast)], out_dtype
    )


def extract_features(
    *,
    data: str | Path | None,
    backbone: str,
    out: str | Path,
    weights: str | Path = ExtractConfig.weights,
    size: int | None = None,
    views: ViewSet = ExtractConfig.views,
    crop: int = ExtractConfig.crop,
    splits: Sequence[Split] | None = None,
    classes: int | None = None,
    per_class: int | None = None,
    batch_size: int | None = None,
    device: Device = ExtractConfig.device,
    precision: FrozenPrecision = ExtractConfig.precision,
    calibration: int = ExtractConfig.calibration,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    compile: CompileMode = ExtractConfig.compile,
    dtype: FeatureDtype = ExtractConfig.dtype,
    aug_views: int = ExtractConfig.aug_views,
    aug_seed: int = ExtractConfig.aug_seed,
    shard_rows: int = SHARD_ROWS,
    layers: str | None = None,
    force: bool = False,
    progress: bool = True,
) -> Path:
    """`extract` with its options as keywords."""
    config = ExtractConfig(
        backbone=backbone,
        data=None if data is None else str(data),
        weights=str(weights),
        size=size,
        views=views,
        crop=crop,
        splits=None if splits is None else tuple(splits),
        classes=classes,
        per_class=per_class,
        batch_size=batch_size,
        device=device,
        precision=precision,
        calibration=calibration,
        mean=None if mean is None else tuple(mean),
        std=None if std is None else tuple(std),
        dtype=dtype,
        compile=compile,
        aug_views=aug_views,
        aug_seed=aug_seed,
        layers=layers,
    )
    return extract(config, out=out, force=force, progress=progress, shard_rows=shard_rows)


@dataclass(frozen=True)
class _Job:
    """An extraction as this process runs it: the config, and what its `auto` and defaults resolve to here."""

    config: ExtractConfig
    views: list[str]
    batch_size: int
    autocast: torch.dtype | None
    calibration: int  # int8's calibration images; 0 for a float precision
    dtype: np.dtype
    shard_rows: int
    device: torch.device


@one_writer("out")
def extract(
    config: ExtractConfig,
    *,
    out: str | Path,
    force: bool = False,
    progress: bool = True,
    shard_rows: int = SHARD_ROWS,
) -> Path:
    """Extract pooled features of every image and view; returns the finished feature file.

    `precision` int8 (CPU only, featx.features.int8): the backbone quantized after calibrating on `calibration`
    training images (a seeded sample, stored in the file), compiled whatever `compile` says.
    `layers` ("lastN", "lastN+avg"): store the last N stages' pooled outputs (CNNs) or blocks' class tokens
    (ViTs, with "+avg" their mean patch token) concatenated per view, their layout in the file's meta.
    `data` is anything `featx.data.cache.prepare_cache` accepts. `splits` defaults to every split in the data.
    `aug_views` K > 0 adds K augmented views per train image (featx.nets.views.aug_pixels), drawn from `aug_seed`.
    An existing `out` follows featx.core.outputs' contract: a finished extraction of the same settings is up to date
    (asked for splits it lacks, it gains them), an interrupted one resumes, one of other settings is refused
    unless `force`. `compile` (featx.core.compiled): on = torch.compile with Inductor's freezing, auto = that where
    it measured faster and the job repays the compilation (one information line says which and why); the file's
    meta records what ran, outside the settings compared. Under torchrun every rank takes its share of the
    shards and rank 0 writes the file. `shard_rows`: the images of one shard, the unit of resuming.
    """
    views = view_names(config.views)
    int8 = config.precision == "int8"
    with distributed(config.device) as d:
        if int8:
            check_int8(d.device)
        # On CPU, ~16 rows per forward keep the activations in cache: 10-15% faster than 32 images x 10 views
        default_batch = 256 if d.device.type == "cuda" else max(1, 16 // len(views))
        job = _Job(
            config,
            views,
            config.batch_size or default_batch,
            None if int8 else resolve_precision(config.precision, d.device),
            config.calibration if int8 else 0,
            np.dtype(config.dtype),
            shard_rows,
            d.device,
        )
        auto = {"precision": "--precision"} if config.precision == "auto" else {}
        return _extract(d, job, Path(out), force=force, progress=progress and d.rank == 0, auto=auto)


def _shard_size(job: _Job, sizes: dict[str, int], split: str, k: int) -> int:
    """The rows of shard k of a split (the last one may be short)."""
    return min(job.shard_rows, sizes[split] - k * job.shard_rows)


def _shard_file(partial: Path, split: str, k: int) -> Path:
    return partial / f"{split}-{k:05d}.npy"


def _extract(ranks: Dist, job: _Job, out: Path, *, force: bool, progress: bool, auto: dict) -> Path:
    c, shard_rows = job.config, job.shard_rows
    # the backbone and its weights first: a wrong path or a file of another model fails before any decoding
    bb = create_backbone(c.backbone, weights=c.weights, size=c.size, layers=c.layers)
    # Rank 0 decodes first so that the other ranks find the cache made instead of racing to make it.
    if ranks.rank == 0:
        cache = prepare_cache(c.data, classes=c.classes, per_class=c.per_class, progress=progress)
    ranks.barrier()
    if ranks.rank != 0:
        cache = prepare_cache(c.data, classes=c.classes, per_class=c.per_class, progress=False)
    info = dataset_info(cache, classes=c.classes)
    splits = list(c.splits or info.splits)
    unknown = [s for s in splits if s not in info.splits]
    if unknown:
        raise FeatxError(f"--splits {','.join(unknown)}: not in {cache} (has {','.join(info.splits)})")
    check_crop(c.crop, info.image_size, info.image_size)
    if c.mean is not None:
        bb.mean = tuple(c.mean)
    if c.std is not None:
        bb.std = tuple(c.std)
    meta = _feature_meta(bb, info, cache, job)
    kept = _existing_splits(out, meta, splits, force=force, auto=auto)  # every rank reads it: no broadcast
    if kept is None:
        return out
    if ranks.rank == 0:  # the work starts: say what it reads
        say(describe_data(cache, classes=c.classes, per_class=c.per_class))
    partial = out.with_name(out.name + ".partial")
    data_splits = {s: read_split(cache, s, classes=c.classes, per_class=c.per_class) for s in splits if s not in kept}
    sizes = {s: len(sp) for s, sp in data_splits.items()}
    shards = [(s, k) for s in data_splits for k in range(-(-sizes[s] // shard_rows))]
    if ranks.rank == 0:
        _open_partial(
            partial,
            meta,
            shard_rows,
            [(s, k, _shard_size(job, sizes, s, k)) for s, k in shards],
            force=force,
            auto=auto,
        )
    ranks.barrier()
    todo = [
        (s, k)
        for i, (s, k) in enumerate(shards)
        if i % ranks.world == ranks.rank and not _shard_file(partial, s, k).exists()
    ]
    if ranks.rank == 0:  # the shards still to write, then the file assembled from all of them
        left = sum(_shard_size(job, sizes, s, k) for s, k in shards if not _shard_file(partial, s, k).exists())
        require_space(
            out,
            file_bytes(meta, sizes, bb.feature_dim) + left * len(job.views) * bb.feature_dim * job.dtype.itemsize,
        )

    counts = {(s, k): _shard_size(job, sizes, s, k) for s, k in todo}
    sample = None  # an int8 extraction's calibration images
    if job.calibration:
        sample, check = calibration_images(
            read_split(cache, "train", classes=c.classes, per_class=c.per_class), job.calibration
        )
        per_image = len(job.views) + (c.aug_views if "train" in data_splits else 0)
        model, meta.int8_cosine = _int8_frozen(bb, sample, check, crop=c.crop, rows=job.batch_size * per_image)
    else:
        model = _frozen_model(bb, job, counts=counts, quiet=ranks.rank != 0)
    done = sum(
        _shard_size(job, sizes, s, k)
        for i, (s, k) in enumerate(shards)
        if i % ranks.world == ranks.rank and (s, k) not in todo
    )  # this process's share a resumed run has
    started = time.perf_counter()
    _write_shards(bb, model, data_splits, todo, partial, job, progress=progress, done=done)

    ranks.barrier()
    if ranks.rank == 0:
        meta.compile = "on" if job.calibration else ran_compiled(model)
        meta.images_per_second = round(sum(counts.values()) / (time.perf_counter() - started), 2)
        _assemble(out, partial, meta, data_splits, bb.feature_dim, shard_rows, kept, sample)
    ranks.barrier()
    return out


def _feature_meta(bb: Backbone, info: DatasetInfo, cache: Path, job: _Job) -> FeatureMeta:
    """What the feature file records: its backbone, views, precision, dataset, and the cache its images came
    from."""
    c = job.config
    return FeatureMeta(
        backbone=bb.name,
        weights=bb.weights_id,
        input_size=bb.input_size,
        views=list(job.views),
        crop=c.crop,
        mean=list(bb.mean),
        std=list(bb.std),
        precision="int8" if job.calibration else precision_name(job.autocast),
        calibration=job.calibration,
        dtype=job.dtype.name,
        dataset=info.name,
        dataset_fingerprint=info.fingerprint,
        classes=list(info.wnids),
        class_names=list(info.names),
        featx_version=__version__,
        layers=c.layers or "",
        parts=[[name, dim] for name, dim in bb.parts],
        source={"cache": str(Path(cache).resolve()), "fingerprint": info.fingerprint, "per_class": c.per_class},
        **(
            dict[str, Any](
                aug_views=c.aug_views, aug_seed=c.aug_seed, aug_brightness=AUG_BRIGHTNESS, aug_contrast=AUG_CONTRAST
            )
            if c.aug_views
            else {}
        ),
    )


def _write_shards(
    bb: Backbone,
    model: Callable[[torch.Tensor], torch.Tensor],
    data_splits: dict,
    todo: list[tuple[str, int]],
    partial: Path,
    job: _Job,
    *,
    progress: bool,
    done: int,
) -> None:
    """Compute this process's shards still to do, each saved as its own .npy under `partial` (`done` rows of
    its share are there already)."""
    shard_rows, batch_size, views = job.shard_rows, job.batch_size, job.views
    aug_views, aug_seed = job.config.aug_views, job.config.aug_seed
    sizes = {s: len(sp) for s, sp in data_splits.items()}
    total = sum(_shard_size(job, sizes, s, k) for s, k in todo)
    bar = progress_bar(
        total=done + total, initial=done, unit="img", desc=f"extract {bb.name} x{len(views)} views", enabled=progress
    )

    def read(shard):
        s, k = shard
        return data_splits[s].read_images(k * shard_rows, (k + 1) * shard_rows)

    # One thread reads the next shard from the cache and another writes finished shards, so the device
    # waits for neither.
    with ThreadPoolExecutor(1) as reader, ThreadPoolExecutor(1) as writer:
        pending: list[Future] = []
        nxt = reader.submit(read, todo[0]) if todo else None
        for i, (s, k) in enumerate(todo):
            assert nxt is not None  # submitted for each shard of todo
            images = nxt.result()
            nxt = reader.submit(read, todo[i + 1]) if i + 1 < len(todo) else None
            parts = []
            for b in range(0, len(images), batch_size):
                aug = (aug_views, aug_seed, k * shard_rows + b) if s == "train" else (0, 0, 0)
                parts.append(
                    _forward_views(
                        bb,
                        model,
                        images[b : b + batch_size],
                        views=views,
                        crop=job.config.crop,
                        device=job.device,
                        autocast=job.autocast,
                        aug=aug,
                    )
                )
                bar.update(len(parts[-1]))
            for p in [p for p in pending if p.done()]:
                p.result()  # a failed write (a full disk) stops the run here, not after the last shard
                pending.remove(p)
            pending.append(writer.submit(_save_shard, _shard_file(partial, s, k), _to_host(parts, job.dtype)))
        for p in pending:
            p.result()
    bar.close()


def _assemble(
    out: Path,
    partial: Path,
    meta: FeatureMeta,
    data_splits: dict,
    dim: int,
    shard_rows: int,
    kept: list[str],
    sample: np.ndarray | None,
) -> None:
    """Copy the shards, in row order, into the final file; memory stays at one shard. `kept`: splits of the
    existing `out` copied over as they are (extract asked for splits the file lacked). `sample`: an int8
    extraction's calibration images, stored as /calibration."""
    sizes = {s: len(sp) for s, sp in data_splits.items()}
    need = file_bytes(meta, sizes, dim) + (out.stat().st_size if kept else 0)
    with replacing(out, need=need) as tmp, create_file(tmp, meta, sizes, dim) as f:
        if kept:
            with h5py.File(out, "r") as old:
                for s in kept:
                    old.copy(old[s], f, name=s)
        for s, sp in data_splits.items():
            g = f[s]
            for k in range(-(-len(sp) // shard_rows)):
                x = np.load(_shard_file(partial, s, k))
                g["features"][k * shard_rows : k * shard_rows + len(x)] = x
            g["labels"][:] = sp.labels
            g["ids"][:] = sp.ids
        if sample is not None:
            f.create_dataset(CALIBRATION, data=sample)
        f.attrs["complete"] = True  # last: readers trust only files that carry it
    shutil.rmtree(partial)
