"""Dataset sources: a zip or folder tree, its Tiny ImageNet or ImageFolder layout, and the image decoder.

A source is read in place: zip members are read straight from the archive, so the 120k-file Tiny ImageNet
never has to be unpacked. The decode functions run in worker processes and only take plain arguments.
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
import re
import struct
import threading
import time
import warnings
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import simplejpeg
from PIL import Image, ImageOps, UnidentifiedImageError

from featx.core.errors import FeatxError, FeatxWarning

IMAGE_EXTS = (".jpg", ".jpeg", ".png")


@dataclass
class Tree:
    """The files of a zip or a folder, as sorted posix paths relative to its root."""

    path: Path
    is_zip: bool
    files: list[str]
    fingerprint: str  # zip: names + CRCs (content); folder: names + sizes + mtimes

    def where(self, name: str) -> str:
        """How error messages name a file of the tree."""
        return f"{self.path}: {name}" if self.is_zip else str(self.path / name)

    def read(self, name: str) -> bytes:
        return read_member(str(self.path), self.is_zip, name)

    def text(self, name: str) -> str:
        return self.read(name).decode("utf-8", errors="replace")


def open_tree(path: Path) -> Tree:
    digest = hashlib.sha1()
    if path.is_dir():
        files = []
        for dirpath, _, names in os.walk(path):
            for n in names:
                full = os.path.join(dirpath, n)
                st = os.stat(full)
                rel = os.path.relpath(full, path).replace(os.sep, "/")
                files.append(rel)
                digest.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        return Tree(path, False, sorted(files), digest.hexdigest()[:16])
    try:
        infos = [i for i in _zip_index(str(path))[1].values() if not i.is_dir()]
    except (zipfile.BadZipFile, OSError) as e:
        raise FeatxError(
            f"{path}: cannot read it as a zip or a folder ({e}); pass the dataset zip or folder to --data"
        ) from None
    for i in infos:
        digest.update(f"{i.filename}\0{i.CRC}\0{i.file_size}\n".encode())
    return Tree(path, True, sorted(i.filename for i in infos), digest.hexdigest()[:16])


def read_member(root: str, is_zip: bool, name: str) -> bytes:
    return _read_zip_member(root, name) if is_zip else Path(root, name).read_bytes()


def _zip_index(path: str) -> tuple[BinaryIO, dict[str, zipfile.ZipInfo]]:
    st = os.stat(path)
    return _zip_index_of(path, st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _zip_index_of(path: str, size: int, mtime_ns: int) -> tuple[BinaryIO, dict[str, zipfile.ZipInfo]]:
    # Once per process and version of the file (size and mtime are part of the key): parsing the central
    # directory of 120k members takes a good fraction of a second.
    with zipfile.ZipFile(path) as z:
        return open(path, "rb"), {i.filename: i for i in z.infolist()}


def _read_zip_member(path: str, name: str) -> bytes:
    """ZipFile.read without its per-member Python overhead, which costs a third of a 64x64 JPEG's decode."""
    f, index = _zip_index(path)
    info = index[name]
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED) or info.flag_bits & 1:
        with zipfile.ZipFile(path) as z:  # other compressions and encryption: rare, let zipfile handle them
            return z.read(name)
    f.seek(info.header_offset)
    header = f.read(30)
    if header[:4] != b"PK\x03\x04":
        raise zipfile.BadZipFile(f"bad local header of {name}")
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    f.seek(info.header_offset + 30 + name_len + extra_len)
    data = f.read(info.compress_size)
    if info.compress_type == zipfile.ZIP_DEFLATED:
        data = zlib.decompress(data, -zlib.MAX_WBITS)
    if zlib.crc32(data) != info.CRC:
        raise zipfile.BadZipFile(f"bad CRC-32 of {name}")
    return data


def _decode_jpeg_fast(data: bytes, size: int) -> np.ndarray | None:
    """libjpeg-turbo through simplejpeg: 4-5x faster than PIL on 64x64 JPEGs, with identical pixels. Only for
    complete JPEGs already at the target size; anything else (CMYK, truncated, other sizes) returns None and
    goes through PIL, which also names what is wrong."""
    if data[:2] != b"\xff\xd8" or data[-2:] != b"\xff\xd9":
        return None
    try:
        h, w, colour, _ = simplejpeg.decode_jpeg_header(data)
        if (h, w) != (size, size) or colour not in ("Gray", "YCbCr", "RGB"):
            return None
        return simplejpeg.decode_jpeg(data, colorspace="RGB")
    except ValueError:
        return None


def decode_image(data: bytes, size: int) -> np.ndarray:
    """uint8 (size, size, 3): grayscale, CMYK and palette images become RGB; other sizes are scaled so the
    shorter side is `size` and centre-cropped (the aspect ratio is kept)."""
    try:
        im: Image.Image = Image.open(io.BytesIO(data), formats=("JPEG", "PNG"))
    except UnidentifiedImageError:  # its message would name the in-memory buffer, not the file
        raise UnidentifiedImageError("not a JPEG or PNG image") from None
    if min(im.size) >= 2 * size:
        im.draft("RGB", (size, size))  # JPEG: libjpeg scales down by 2, 4 or 8 while decoding, much faster
    if im.mode != "RGB":
        im = im.convert("RGB")
    if im.size != (size, size):
        im = ImageOps.fit(im, (size, size), Image.Resampling.BICUBIC)
    return np.asarray(im)


def decode_batch(root: str, is_zip: bool, members: list[str], size: int) -> tuple[np.ndarray, list[tuple[int, str]]]:
    """Decode a batch in a worker: one array per batch keeps inter-process traffic cheap. Undecodable images
    are left black and reported as (index in batch, reason)."""
    out = np.zeros((len(members), size, size, 3), np.uint8)
    bad = []
    for i, name in enumerate(members):
        try:
            data = read_member(root, is_zip, name)
            fast = _decode_jpeg_fast(data, size)
            out[i] = fast if fast is not None else decode_image(data, size)
        except Exception as e:  # PIL and zipfile raise many types (OSError, SyntaxError, BadZipFile, ...)
            bad.append((i, f"{type(e).__name__}: {e}".splitlines()[0]))
    return out, bad


def skip_or_stop(bad: list[tuple[str, str]], *, skip_bad: bool, fix: str) -> list[str]:
    """What every reader does with undecodable images, given as (file as the user knows it, reason): stop at
    the first with one line, or (skip_bad) warn of each (a FeatxWarning) and return them as "file: reason"."""
    skipped = []
    for where, reason in bad:
        if not skip_bad:
            raise FeatxError(
                f"{where} is not a readable image ({reason}); {fix} or pass --skip-bad to skip undecodable images"
            )
        warnings.warn(f"skipped {where}: {reason}", FeatxWarning, stacklevel=2)
        skipped.append(f"{where}: {reason}")
    return skipped


def exit_with_parent(parent: int) -> None:
    """Initializer of decode worker processes: exit as soon as the process that started them is gone, even
    after kill -9 (loky's workers would otherwise wait out their idle timeout)."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.2)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


@dataclass
class SplitList:
    """What a split holds before decoding: members of the tree and their metadata, in cache order."""

    members: list[str]
    ids: list[str]
    labels: np.ndarray  # int16, -1 where unlabelled
    boxes: np.ndarray | None = None  # int16 (n, 4) x0 y0 x1 y1, -1 where unknown


@dataclass
class Layout:
    name: str
    kind: str  # "tiny-imagenet" | "imagefolder"
    wnids: list[str]
    names: list[str]
    splits: dict[str, SplitList]


def natural_key(s: str) -> list:
    """n01443537_10.JPEG after n01443537_9.JPEG: the order the dataset's authors numbered them in."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTS)


def read_layout(tree: Tree, classes: int | None, per_class: int | None) -> Layout:
    prefix = _find_root(tree)
    train_image = _train_image(prefix)
    tiny = any(
        f == prefix + "wnids.txt" or f == prefix + "val/val_annotations.txt" or train_image.fullmatch(f)
        for f in tree.files
    )
    name = prefix.rstrip("/") or (tree.path.name if tree.path.is_dir() else tree.path.stem)
    read = _tiny_imagenet if tiny else _image_folder
    return read(tree, prefix, name, classes, per_class)


def _train_image(prefix: str) -> re.Pattern:
    return re.compile(re.escape(prefix) + r"train/([^/]+)/images/[^/]+")


def _find_root(tree: Tree) -> str:
    """'' when train/ is at the top, 'x/' when it is inside exactly one top-level folder x."""
    if any(f.startswith("train/") for f in tree.files):
        return ""
    tops = {f.split("/", 1)[0] for f in tree.files if f.split("/")[1:2] == ["train"]}
    if len(tops) == 1:
        return tops.pop() + "/"
    raise FeatxError(
        f"{tree.path}: not a Tiny ImageNet or ImageFolder layout (no train/<class>/ folder at the top "
        f"or inside one folder); pass the official tiny-imagenet-200.zip or an ImageFolder root"
    )


def _subset(wnids: list[str], classes: int | None, where: str) -> list[str]:
    if classes is not None and classes > len(wnids):
        raise FeatxError(f"--classes {classes}: {where} has only {len(wnids)} classes; pass at most {len(wnids)}")
    return wnids[:classes]


def _class_split(members_by_class: dict[str, list[str]], wnids: list[str], per_class: int | None) -> SplitList:
    members, labels = [], []
    for k, w in enumerate(wnids):
        chosen = sorted(members_by_class.get(w, []), key=natural_key)[:per_class]
        members += chosen
        labels += [k] * len(chosen)
    return SplitList(members, [], np.array(labels, np.int16))


def _test_split(tree: Tree, folder: str) -> SplitList | None:
    members = sorted((f for f in tree.files if f.startswith(folder) and _is_image(f)), key=natural_key)
    if not members:
        return None
    return SplitList(members, [m[len(folder) :] for m in members], np.full(len(members), -1, np.int16))


def _tiny_imagenet(tree: Tree, prefix: str, name: str, classes: int | None, per_class: int | None) -> Layout:
    def need(rel: str) -> str:
        if prefix + rel not in files:
            raise FeatxError(
                f"{tree.where(prefix + rel)} is missing; use the complete official "
                f"tiny-imagenet-200.zip (or its fully extracted folder)"
            )
        return tree.text(prefix + rel)

    files = set(tree.files)
    all_wnids = [w.strip() for w in need("wnids.txt").splitlines() if w.strip()]
    known = set(all_wnids)
    wnids = _subset(all_wnids, classes, tree.where(prefix + "wnids.txt"))
    words = {}
    if prefix + "words.txt" in files:
        words = dict(line.split("\t", 1) for line in tree.text(prefix + "words.txt").splitlines() if "\t" in line)

    by_class: dict[str, list[str]] = {}
    train_image = _train_image(prefix)
    for f in tree.files:
        m = train_image.fullmatch(f)
        if m and _is_image(f):
            by_class.setdefault(m.group(1), []).append(f)
    stray = sorted(set(by_class) - known)
    if stray:
        raise FeatxError(
            f"{tree.where(prefix + 'train/' + stray[0])} is not a class in {prefix}wnids.txt; "
            f"add it to wnids.txt or remove the folder"
        )
    train = _class_split(by_class, wnids, per_class)
    train.ids = [m.rsplit("/", 1)[1] for m in train.members]
    train.boxes = _train_boxes(tree, files, prefix, wnids, train)

    ann = prefix + "val/val_annotations.txt"
    label = {w: k for k, w in enumerate(wnids)}
    val_rows = []
    for n, line in enumerate(need("val/val_annotations.txt").splitlines(), 1):
        if not line.strip():
            continue
        cols = line.split("\t")
        if len(cols) < 2 or cols[1] not in known:
            raise FeatxError(
                f"{tree.where(ann)} line {n} names class {cols[1] if len(cols) > 1 else '(none)'!r}, "
                f"which is not in {prefix}wnids.txt; fix the annotation or wnids.txt"
            )
        if prefix + "val/images/" + cols[0] not in files:
            raise FeatxError(
                f"{tree.where(ann)} line {n} lists {cols[0]} but {prefix}val/images/{cols[0]} is missing; "
                f"restore the image or remove the line"
            )
        if cols[1] in label:
            val_rows.append((cols[0], label[cols[1]], _box(cols[2:6])))
    val_rows.sort(key=lambda r: natural_key(r[0]))
    val = SplitList(
        [prefix + "val/images/" + r[0] for r in val_rows],
        [r[0] for r in val_rows],
        np.array([r[1] for r in val_rows], np.int16),
        np.array([r[2] for r in val_rows], np.int16).reshape(-1, 4),
    )

    splits = {"train": train, "val": val}
    test = _test_split(tree, prefix + "test/images/")
    if test:
        splits["test"] = test
    return Layout(name, "tiny-imagenet", wnids, [words.get(w, w) for w in wnids], splits)


def _box(fields: list[str]) -> tuple[int, int, int, int]:
    try:
        x0, y0, x1, y1 = (int(v) for v in fields)
        return x0, y0, x1, y1
    except ValueError:
        return -1, -1, -1, -1


def _train_boxes(tree: Tree, files: set[str], prefix: str, wnids: list[str], train: SplitList) -> np.ndarray:
    boxes = {}
    for w in wnids:
        path = f"{prefix}train/{w}/{w}_boxes.txt"
        if path in files:
            for line in tree.text(path).splitlines():
                f = line.split("\t")
                boxes[f[0]] = _box(f[1:5])
    return np.array([boxes.get(i, (-1, -1, -1, -1)) for i in train.ids], np.int16).reshape(-1, 4)


def _image_folder(tree: Tree, prefix: str, name: str, classes: int | None, per_class: int | None) -> Layout:
    def by_class(split: str) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for f in tree.files:
            parts = f[len(prefix) :].split("/")
            if f.startswith(prefix + split + "/") and len(parts) > 2 and _is_image(f):
                out.setdefault(parts[1], []).append(f)
        return out

    def ids(split: SplitList, folder: str) -> list[str]:
        return [m[len(prefix + folder) :] for m in split.members]

    train_files = by_class("train")
    if not train_files:
        raise FeatxError(
            f"{tree.where(prefix + 'train/')} has no <class>/ folders with .jpg/.jpeg/.png images; "
            f"pass an ImageFolder root (train/<class>/*.jpg) or the official Tiny ImageNet zip"
        )
    wnids = _subset(sorted(train_files), classes, tree.where(prefix + "train/"))
    train = _class_split(train_files, wnids, per_class)
    train.ids = ids(train, "train/")
    splits = {"train": train}

    val_files = by_class("val")
    if val_files:
        stray = sorted(set(val_files) - set(train_files))
        if stray:
            raise FeatxError(
                f"{tree.where(prefix + 'val/' + stray[0])}/ is not a class of {prefix}train/; "
                f"add train images for it or remove the folder"
            )
        val = _class_split(val_files, wnids, None)
        val.ids = ids(val, "val/")
        splits["val"] = val
    test = _test_split(tree, prefix + "test/")
    if test:
        splits["test"] = test
    return Layout(name, "imagefolder", wnids, list(wnids), splits)
