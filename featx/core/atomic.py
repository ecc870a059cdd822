"""How every output is written, so that no failure leaves something that looks finished:

- `replacing`: a file appears under its name only when complete; it is written to a temporary name beside it
  and renamed into place, so an interrupted run never leaves a half-written file.
- a full disk stops the write with one line naming the path and the space needed (FeatxError), checked before
  a write of known size starts and recognised when a write fails;
- `one_writer` / `exclusive`: one process per output; a second is refused at once (an advisory lock beside it).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

from featx.core.errors import FeatxError

MB = 1 << 20


def make_dirs(folder: str | Path, *, option: str, path: str | Path) -> Path:
    """mkdir -p `folder`, the place `option`'s `path` is written to; one line when that is impossible."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocker = next(p for p in (folder, *folder.parents) if p.exists() and not p.is_dir())
        raise FeatxError(f"{option} {path}: {blocker} is a file, not a folder; choose another {option}") from None
    except OSError as e:
        raise FeatxError(f"{option} {path}: cannot write there ({e.strerror}); choose another {option}") from None
    return folder


def free_bytes(path: str | Path) -> int:
    """Free space on the filesystem that holds `path` (or would: its nearest existing folder)."""
    path = Path(path).absolute()
    folder = next(p for p in (path, *path.parents) if p.exists())
    return shutil.disk_usage(folder).free


def size_text(n: int) -> str:
    """A size in bytes as every featx line prints one (MB of 2**20 bytes)."""
    return f"{n / MB:.1f} MB"


def _no_space(path: Path, need: int | None) -> FeatxError:
    needed = f", about {size_text(need)} needed" if need else ""
    return FeatxError(
        f"{path}: no space left on device ({size_text(free_bytes(path.parent))} free{needed}); "
        "free space there or write elsewhere, then run the same command again to go on"
    )


def require_space(path: str | Path, need: int) -> None:
    """Refuse before writing `need` bytes to `path` where they cannot fit. HDF5 must never meet a full disk:
    after a failed write it cannot close the file and crashes the interpreter at exit."""
    if free_bytes(Path(path).parent) < need:
        raise _no_space(Path(path), need)


def _disk_full(e: BaseException, folder: Path) -> bool:
    if getattr(e, "errno", None) == errno.ENOSPC or "errno = 28" in str(e):
        return True
    # np.save ("requested and written") and torch.save ("unexpected pos") report a short write without errno
    return isinstance(e, (OSError, RuntimeError)) and free_bytes(folder) < MB


@contextlib.contextmanager
def replacing(path: str | Path, *, need: int | None = None) -> Iterator[Path]:
    """Yields a temporary path beside `path` to write; renamed onto `path` when the block ends, deleted if
    it raises. The temporary keeps the suffix (`x.tmp.npy`): np.save would otherwise append one. `need`:
    the bytes the write takes, refused at once where they do not fit; a full disk met while writing is
    reported in one line either way."""
    path = Path(path)
    tmp = path.with_name(f"{path.stem}.tmp{path.suffix}")
    if need is not None:
        require_space(path, need)
    try:
        yield tmp
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        full = _disk_full(e, path.parent)
        tmp.unlink(missing_ok=True)
        if full:
            raise _no_space(path, need) from None
        raise
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def exclusive(path: str | Path, *, option: str = "--out") -> Iterator[None]:
    """Hold an advisory lock on `<path>.lock` while the block runs: a second writer of `path` is refused at
    once. Under torchrun only rank 0 takes it: the other ranks work for the same output. The lock file is
    removed on release; after kill -9 the kernel drops the lock and the next run takes it over."""
    path = Path(path)
    if os.environ.get("RANK", "0") != "0":
        yield
        return
    make_dirs(path.absolute().parent, option=option, path=path)
    lock = path.with_name(path.name + ".lock")
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise FeatxError(f"{option} {path}: cannot write there ({e.strerror}); choose another {option}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            # a lock file its holder removed just before we locked it guards nothing: count it as held
            if os.stat(lock).st_ino != os.fstat(fd).st_ino:
                raise BlockingIOError
        except (BlockingIOError, FileNotFoundError):
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise FeatxError(
                f"{option} {path}: another featx process (pid {holder}) is writing it; wait for it "
                f"to finish or choose another {option}"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        try:
            yield
        finally:
            lock.unlink(missing_ok=True)
    finally:
        os.close(fd)


def one_writer(option: str = "out") -> Callable:
    """Decorator: the keyword argument `option` names an output that this call holds `exclusive`ly."""

    def wrap(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def locked(*args, **kwargs):
            with exclusive(kwargs[option], option="--" + option.replace("_", "-")):
                return fn(*args, **kwargs)

        return locked

    return wrap
