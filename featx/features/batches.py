"""What stage 2 reads: a split of a feature file, held in memory (featx.features.store.Features) or streamed from HDF5
chunk by chunk (StreamedSplit), served as shuffled minibatches for training or as pieces in stored order for
scoring.

A row whose label is -1 is unlabelled: training and scoring skip it. That is also how a split hides the rows it
does not use (`only`), e.g. the held-out part of train that selects the head.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch

from featx.core.choices import ViewSelection
from featx.core.errors import FeatxError
from featx.features.store import FeatureMeta, Features, load_features, open_split, read_meta, select_views


@dataclass
class StreamedSplit:
    """A split read from HDF5 chunk by chunk instead of held in RAM; `views` as load_features takes them."""

    path: Path
    split: str
    views: ViewSelection = "all"
    keep: np.ndarray | None = None  # rows whose labels count (the others read as unlabelled); None: all

    @property
    def meta(self) -> FeatureMeta:
        return read_meta(self.path)


class _InMemory:
    def __init__(self, f: Features, device: torch.device):
        self.x = torch.from_numpy(f.features).to(device)  # float16 stays float16 until batched
        self.y = torch.from_numpy(f.labels).to(device)
        self.n_views = self.x.shape[1]

    def blocks(self, gen: torch.Generator | None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        yield self.x, self.y


class _Streamed:
    BLOCK_ROWS = 8192  # rows shuffled together: several chunks, read whole and in chunk order

    def __init__(self, s: StreamedSplit, device: torch.device):
        self.s, self.device = s, device
        meta = s.meta
        self.views = select_views(meta, s.split, s.views, path=s.path)
        self.n_views = len(self.views)
        self.every_view = self.views == list(range(len(meta.stored_views(s.split))))

    def blocks(self, gen: torch.Generator | None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        with open_split(self.s.path, self.s.split) as (ds, labels, chunk):
            labels = _kept(labels, self.s.keep)
            n_chunks = math.ceil(len(labels) / chunk)
            order = torch.randperm(n_chunks, generator=gen) if gen is not None else torch.arange(n_chunks)
            for group in order.split(max(1, self.BLOCK_ROWS // chunk)):
                rows = [(c * chunk, min((c + 1) * chunk, len(labels))) for c in sorted(group.tolist())]
                x = np.concatenate([ds[a:b] for a, b in rows])
                if not self.every_view:
                    x = np.ascontiguousarray(x[:, self.views])
                if not np.isfinite(x).all():
                    raise FeatxError(
                        f"{self.s.path}: split {self.s.split!r} holds NaN/inf features; "
                        "re-extract (try --precision fp32)"
                    )
                y = np.concatenate([labels[a:b] for a, b in rows])
                yield torch.from_numpy(x).to(self.device), torch.from_numpy(y).to(self.device)


Source = _InMemory | _Streamed  # blocks of (rows, views, dim) features and their labels, on the device


def load_or_stream(path: Path, split: str, views: ViewSelection, stream: bool) -> Features | StreamedSplit:
    """The split loaded into RAM, or (stream) opened to be read chunk by chunk."""
    return StreamedSplit(path, split, views) if stream else load_features(path, split, views=views)


def batch_source(f: Features | StreamedSplit, device: torch.device) -> Source:
    """The split ready to be read in minibatches on `device`: from RAM, or streamed from its file."""
    return _InMemory(f, device) if isinstance(f, Features) else _Streamed(f, device)


def split_labels(f: Features | StreamedSplit) -> np.ndarray:
    """Every row's label, -1 where unlabelled or hidden."""
    if isinstance(f, Features):
        return f.labels
    with open_split(f.path, f.split) as (_, labels, _):
        return _kept(labels, f.keep)


def feature_dim(f: Features | StreamedSplit) -> int:
    if isinstance(f, Features):
        return f.features.shape[-1]
    with open_split(f.path, f.split) as (ds, _, _):
        return ds.shape[-1]


def _kept(labels: np.ndarray, keep: np.ndarray | None) -> np.ndarray:
    return labels if keep is None else np.where(keep, labels, -1)


SplitT = TypeVar("SplitT", bound="Features | StreamedSplit")


def only(f: SplitT, keep: np.ndarray) -> SplitT:
    """The split with the labels of the rows outside `keep` hidden: training and evaluation skip those rows."""
    if isinstance(f, Features):
        return dataclasses.replace(f, labels=_kept(f.labels, keep))
    return dataclasses.replace(f, keep=keep if f.keep is None else f.keep & keep)


def batches(
    src: Source, gen: torch.Generator, batch_size: int, *, view: int | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Shuffled labelled rows of each block, each row as one view drawn at random from those stored, or as
    the stored view `view` (an index into the source's views) for every row."""
    for x, y in src.blocks(gen):
        rows = (y >= 0).nonzero().squeeze(1).cpu()
        order = rows[torch.randperm(len(rows), generator=gen)].to(x.device)
        n_views = x.shape[1]
        picked = torch.randint(n_views, (len(order),), generator=gen) if view is None else torch.full_like(order, view)
        flat = order * n_views + picked.to(x.device)
        rows_by_view = x.view(-1, x.shape[-1])  # index_select on this is ~10x faster than x[idx, view]
        for idx, pick in zip(order.split(batch_size), flat.split(batch_size)):
            yield rows_by_view.index_select(0, pick), y[idx]


def pieces(src: Source, rows: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """All rows in stored order, `rows` at a time."""
    for x, y in src.blocks(None):
        yield from zip(x.split(rows), y.split(rows))


def scoring_pieces(src: Source) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The labelled rows in stored order, ~2048 view-rows at a time: big enough for efficient matmuls, small enough
    that the allocator reuses buffers instead of mapping fresh pages for each piece."""
    for x, y in pieces(src, max(1, 2048 // src.n_views)):
        keep = y >= 0
        yield x[keep], y[keep]
