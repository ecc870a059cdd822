"""Download of the official Tiny ImageNet zip: resumable, MD5-verified, never leaves a file that looks done."""

from __future__ import annotations

import errno
import hashlib
import os
import urllib.error
import urllib.request
from pathlib import Path

from featx.core.errors import FeatxError
from featx.core.progress import progress_bar

URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
MD5 = "90528d7ca1a48142e341f4ef8d21d0de"


def download_tiny_imagenet(data_dir: str | Path, *, progress: bool = True) -> Path:
    """data_dir/tiny-imagenet-200.zip, downloaded (about 237 MB) unless it is already there."""
    return download(URL, Path(data_dir) / "tiny-imagenet-200.zip", MD5, progress=progress)


def download(url: str, dest: str | Path, md5: str, *, progress: bool = True) -> Path:
    """Fetch url to dest. An interrupted download stays in dest.partial and resumes from there on the next
    call (or restarts if the server ignores the range); dest appears only once its MD5 matches."""
    dest = Path(dest)
    if dest.exists():
        return dest
    part = dest.with_name(dest.name + ".partial")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        _fetch(url, part, progress)
    except OSError as e:  # URLError, HTTPError and socket timeouts are all OSErrors
        if e.errno == errno.ENOSPC:
            raise FeatxError(
                f"{part}: no space left on device; free space there or put {dest.name} in {dest.parent}/ yourself"
            ) from None
        reason = getattr(e, "reason", e)
        raise FeatxError(
            f"cannot download {url} ({reason}); download it elsewhere and put it at {dest}, or pass --data PATH"
        ) from None
    if _md5(part) != md5:
        part.unlink()
        raise FeatxError(
            f"{url}: downloaded file's MD5 is not {md5} (corrupt or changed); run again to restart "
            f"the download, or put a good copy at {dest}"
        )
    os.replace(part, dest)
    return dest


def _fetch(url: str, part: Path, progress: bool) -> None:
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=60)
    except urllib.error.HTTPError as e:
        if e.code == 416:  # nothing left to fetch: the MD5 check decides whether the partial file is good
            return
        raise
    with response:
        if response.status != 206:  # the server ignored the range: start over
            have = 0
        length = int(response.headers.get("Content-Length") or 0)
        with (
            open(part, "ab" if have else "wb") as out,
            progress_bar(
                total=have + length or None,
                initial=have,
                unit="B",
                unit_scale=True,
                desc=f"downloading {part.name.removesuffix('.partial')}",
                enabled=progress,
            ) as bar,
        ):
            while chunk := response.read(1 << 20):
                out.write(chunk)
                bar.update(len(chunk))


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()
