"""Outputs appear under their name only when complete: each is written to a temporary name beside it and
renamed into place, so an interrupted run never leaves a half-written file that looks finished."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def replacing(path: str | Path) -> Iterator[Path]:
    """Yields a temporary path beside `path` to write; renamed onto `path` when the block ends, deleted if
    it raises. The temporary keeps the suffix (`x.tmp.npy`): np.save would otherwise append one."""
    path = Path(path)
    tmp = path.with_name(f"{path.stem}.tmp{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
