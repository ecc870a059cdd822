"""The data layer: every source, every bad input, subsets, cache reuse, the CLI, the download, and the real zip."""

from __future__ import annotations

import hashlib
import http.server
import io
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image, ImageOps
from synth import CMYK_ID, CORRUPT_ID, FOLDER_CLASSES, GRAY_ID, wnid, write_image_folder, write_tiny_imagenet

from featx.core.errors import FeatxError, FeatxWarning
from featx.data.cache import cache_info, dataset_info, prepare_cache, read_split
from featx.data.download import download
from featx.front.cli import cli

TOP = "tiny-imagenet-200"


def prepare(source: Path, tmp_path: Path, name: str = "c.h5", **kw) -> Path:
    return prepare_cache(source, cache=tmp_path / name, progress=False, **kw)


def read_source(source: Path, rel: str) -> bytes:
    if source.suffix == ".zip":
        with zipfile.ZipFile(source) as z:
            return z.read(f"{source.stem}/{rel}")
    return (source / rel).read_bytes()


def pil_rgb(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def damaged_tiny_imagenet(tmp_path: Path, as_zip: bool, edit) -> Path:
    """A miniature Tiny ImageNet folder changed by edit(folder), zipped like the official archive if as_zip."""
    folder = write_tiny_imagenet(tmp_path / "src", as_zip=False)
    edit(folder)
    if not as_zip:
        return folder
    return Path(shutil.make_archive(str(tmp_path / TOP), "zip", root_dir=folder.parent, base_dir=TOP))


# --- sources -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("as_zip", [True, False], ids=["zip", "folder"])
def test_tiny_imagenet_source(tmp_path, as_zip):
    source = write_tiny_imagenet(tmp_path, as_zip=as_zip)
    cache = prepare(source, tmp_path)

    info = dataset_info(cache)
    assert info.name == TOP and info.image_size == 64 and info.splits == ["train", "val", "test"]
    assert info.wnids == [wnid(k) for k in range(3)] and info.names[1] == "thing 1, object 1"

    train = read_split(cache, "train")
    assert train.labels.tolist() == [0] * 6 + [1] * 6 + [2] * 6
    assert train.ids[:3] == [f"{wnid(0)}_{i}.JPEG" for i in range(3)]
    images = train.read_images()
    assert images.dtype == np.uint8 and images.shape == (18, 64, 64, 3)
    for image, id_, label in zip(images, train.ids, train.labels):
        np.testing.assert_array_equal(image, pil_rgb(read_source(source, f"train/{wnid(label)}/images/{id_}")))
    gray = images[train.ids.index(GRAY_ID)]
    assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()
    cmyk = images[train.ids.index(CMYK_ID)]
    assert abs(cmyk.astype(int) - images[0].astype(int)).mean() < 40  # still the class colour, not inverted

    val = read_split(cache, "val")
    assert val.ids == [f"val_{i}.JPEG" for i in range(6)] and val.labels.tolist() == [0, 1, 2, 0, 1, 2]
    test = read_split(cache, "test")
    assert len(test) == 4 and (test.labels == -1).all() and test.ids[0] == "test_0.JPEG"
    with h5py.File(cache) as f:
        assert f["train/labels"].dtype == np.int16 and f["train/images"].chunks[0] <= 64
        assert f["train/boxes"][1].tolist() == [1, 0, 41, 50]
        assert f["val/boxes"][0].tolist() == [1, 2, 60, 63]


def test_zip_and_folder_decode_the_same(tmp_path):
    from_zip = prepare(write_tiny_imagenet(tmp_path / "z"), tmp_path, "z.h5")
    from_folder = prepare(write_tiny_imagenet(tmp_path / "f", as_zip=False), tmp_path, "f.h5")
    for split in ("train", "val", "test"):
        a, b = read_split(from_zip, split), read_split(from_folder, split)
        assert a.ids == b.ids
        np.testing.assert_array_equal(a.read_images(), b.read_images())


@pytest.mark.parametrize("as_zip", [True, False], ids=["zip", "folder"])
def test_image_folder_source(tmp_path, as_zip):
    source = write_image_folder(tmp_path, as_zip=as_zip)
    cache = prepare(source, tmp_path, image_size=32)
    info = dataset_info(cache)
    assert info.name == "shapes" and info.wnids == sorted(FOLDER_CLASSES[:3]) == info.names

    train = read_split(cache, "train")
    assert train.ids[:2] == ["ant/img_0.jpg", "ant/img_1.png"] and train.labels.tolist() == [0] * 6 + [1] * 6 + [2] * 6
    images = train.read_images()
    assert images.shape == (18, 32, 32, 3)
    for image, id_ in zip(images, train.ids):  # mixed sizes, grayscale and RGBA: scaled, centre-cropped RGB
        original = Image.open(io.BytesIO(read_source(source, f"train/{id_}"))).convert("RGB")
        np.testing.assert_array_equal(image, np.asarray(ImageOps.fit(original, (32, 32), Image.Resampling.BICUBIC)))
    assert read_split(cache, "val").labels.tolist() == [0, 0, 1, 1, 2, 2]
    test = read_split(cache, "test")
    assert test.ids == ["img_0.jpg", "img_1.png", "img_2.jpg"] and (test.labels == -1).all()


def test_image_folder_without_val(tmp_path):
    root = write_image_folder(tmp_path, val_per_class=0, test=0)
    assert dataset_info(prepare(root, tmp_path)).splits == ["train"]


def test_default_source_under_data(tmp_path, monkeypatch):
    write_tiny_imagenet(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    cache = prepare_cache(progress=False)
    assert cache == Path("data/cache/tiny-imagenet-200-64.h5") and cache.is_file()


# --- subsets and reading -----------------------------------------------------------------------------


def test_subsets_at_prepare_match_subsets_of_the_full_cache(tmp_path, monkeypatch):
    source = write_tiny_imagenet(tmp_path, classes=4)
    monkeypatch.chdir(tmp_path)
    small = prepare_cache(source, classes=2, per_class=3, progress=False)
    assert small == Path("data/cache/tiny-imagenet-200-64-c2-p3.h5")
    assert cache_info(small)["splits"] == {"train": 6, "val": 4, "test": 4}
    full = prepare_cache(source, progress=False)

    two_classes = prepare_cache(source, classes=2, progress=False)
    assert dataset_info(full, classes=2).fingerprint == dataset_info(two_classes).fingerprint
    assert len({dataset_info(c).fingerprint for c in (full, small, two_classes)}) == 3
    assert dataset_info(full, classes=2).wnids == dataset_info(small).wnids == [wnid(0), wnid(1)]
    for split in ("train", "val", "test"):
        a, b = read_split(full, split, classes=2, per_class=3), read_split(small, split)
        assert a.ids == b.ids and a.labels.tolist() == b.labels.tolist()
        np.testing.assert_array_equal(a.read_images(), b.read_images())
    assert len(read_split(full, "test", classes=1)) == 4  # unlabelled test keeps all its images
    with pytest.raises(FeatxError, match="--classes 5"):
        read_split(full, "train", classes=5)
    with pytest.raises(FeatxError, match="--classes 9"):
        prepare_cache(source, classes=9, progress=False)


def test_read_images_reads_the_requested_rows(synth_cache):
    with h5py.File(synth_cache) as f:
        everything = f["train/images"][()]
    split = read_split(synth_cache, "train", classes=3, per_class=5)  # rows in runs of 5 with gaps
    assert len(split) == 15 and np.all(np.diff(split.rows) > 0)
    np.testing.assert_array_equal(split.read_images(), everything[split.rows])
    np.testing.assert_array_equal(split.read_images(3, 11), everything[split.rows[3:11]])
    assert split.read_images(4, 4).shape == (0, 64, 64, 3)


# --- reuse -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("as_zip", [True, False], ids=["zip", "folder"])
def test_second_prepare_reuses_the_cache(tmp_path, as_zip):
    source = write_tiny_imagenet(tmp_path / "src", as_zip=as_zip)
    cache = prepare(source, tmp_path)
    before = cache.stat().st_mtime_ns
    time.sleep(0.01)
    assert prepare(source, tmp_path) == cache and cache.stat().st_mtime_ns == before
    assert prepare_cache(cache) == cache  # a cache is a source too

    pixels = read_split(cache, "val").read_images()
    write_tiny_imagenet(tmp_path / "src", as_zip=as_zip, seed=1)  # changed source: decoded again
    assert prepare(source, tmp_path) == cache and cache.stat().st_mtime_ns != before
    assert not np.array_equal(read_split(cache, "val").read_images(), pixels)
    assert prepare(source, tmp_path, image_size=32) == cache  # other options: decoded again
    assert dataset_info(cache).image_size == 32


# --- bad input ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("as_zip", [True, False], ids=["zip", "folder"])
@pytest.mark.parametrize("missing", ["wnids.txt", "val/val_annotations.txt"])
def test_missing_metadata(tmp_path, as_zip, missing):
    source = damaged_tiny_imagenet(tmp_path, as_zip, lambda folder: (folder / missing).unlink())
    with pytest.raises(FeatxError, match=f"{TOP}/{missing} is missing"):
        prepare(source, tmp_path)


@pytest.mark.parametrize("as_zip", [True, False], ids=["zip", "folder"])
def test_annotation_naming_an_unknown_class(tmp_path, as_zip):
    def edit(folder):
        ann = folder / "val/val_annotations.txt"
        ann.write_text(ann.read_text().replace(wnid(1), "n99999999", 1))

    with pytest.raises(FeatxError, match="val_annotations.txt line 2 names class 'n99999999'.*wnids.txt"):
        prepare(damaged_tiny_imagenet(tmp_path, as_zip, edit), tmp_path)


def test_truncated_member_fails_and_leaves_no_cache(tmp_path):
    source = write_tiny_imagenet(tmp_path, corrupt=True)
    with pytest.raises(FeatxError, match=f"{CORRUPT_ID} is not a readable image.*--skip-bad"):
        prepare(source, tmp_path)
    assert list(tmp_path.glob("c.h5*")) == []


def test_damaged_zip_member(tmp_path):
    source = write_tiny_imagenet(tmp_path)
    with zipfile.ZipFile(source) as z:
        info = z.getinfo(f"{TOP}/val/images/val_2.JPEG")
    data = bytearray(source.read_bytes())
    data[info.header_offset + 30 + len(info.filename) + len(info.extra) + info.compress_size // 2] ^= 0xFF
    source.write_bytes(data)
    with pytest.raises(FeatxError, match="val/images/val_2.JPEG is not a readable image"):
        prepare(source, tmp_path)


def test_non_image_member(tmp_path):
    source = damaged_tiny_imagenet(tmp_path, False, lambda f: (f / "val/images/val_3.JPEG").write_text("hello"))
    with pytest.raises(FeatxError, match="val/images/val_3.JPEG is not a readable image"):
        prepare(source, tmp_path)


def test_skip_bad_records_the_skipped_images(tmp_path):
    source = write_tiny_imagenet(tmp_path, corrupt=True)
    with pytest.warns(FeatxWarning, match=f"^skipped .*{CORRUPT_ID}"):
        cache = prepare(source, tmp_path, skip_bad=True)
    info = cache_info(cache)
    assert info["splits"]["train"] == 18 and len(info["skipped"]) == 1 and CORRUPT_ID in info["skipped"][0]
    assert CORRUPT_ID not in read_split(cache, "train").ids
    with pytest.raises(FeatxError, match=CORRUPT_ID):  # a skipping cache does not stand in for a strict run
        prepare(source, tmp_path)


@pytest.mark.parametrize(
    "kind, message",
    [
        ("missing", "x: no such file or folder"),
        ("text", "x: cannot read it as a zip or a folder"),
        ("empty-folder", "x: not a Tiny ImageNet or ImageFolder layout"),
    ],
)
def test_unusable_paths(tmp_path, kind, message):
    path = tmp_path / "x"
    if kind == "text":
        path.write_text("not a zip")
    elif kind == "empty-folder":
        path.mkdir()
    with pytest.raises(FeatxError, match=message):
        prepare(path, tmp_path)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads unreadable files")
def test_unreadable_path(tmp_path):
    source = write_tiny_imagenet(tmp_path)
    source.chmod(0)
    with pytest.raises(FeatxError, match="permission denied"):
        prepare(source, tmp_path)


def test_zip_of_another_layout(tmp_path):
    path = tmp_path / "photos.zip"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("photos/a/b.jpg", b"...")
        z.writestr("notes/readme.txt", b"...")
    with pytest.raises(FeatxError, match="photos.zip: not a Tiny ImageNet or ImageFolder layout"):
        prepare(path, tmp_path)


def test_image_folder_without_images(tmp_path):
    (tmp_path / "ds/train/cat").mkdir(parents=True)
    (tmp_path / "ds/train/cat/notes.txt").write_text("no images here")
    with pytest.raises(FeatxError, match="ds/train has no <class>/ folders"):
        prepare(tmp_path / "ds", tmp_path)


def test_image_folder_val_class_not_in_train(tmp_path):
    root = write_image_folder(tmp_path)
    shutil.copytree(root / "val/ant", root / "val/gnu")
    with pytest.raises(FeatxError, match="val/gnu/ is not a class of train/"):
        prepare(root, tmp_path)


def test_files_that_are_not_featx_caches(tmp_path):
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f["x"] = 1
    with pytest.raises(FeatxError, match="not a complete featx cache"):
        prepare_cache(other)
    with pytest.raises(FeatxError, match="exists and is not a featx cache"):
        prepare(write_tiny_imagenet(tmp_path), tmp_path, "other.h5")
    with pytest.raises(FeatxError, match="no such file"):
        read_split(tmp_path / "none.h5", "train")


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_full_disk(tmp_path):
    # The temporary cache file is /dev/full, whose every write fails with ENOSPC: a real full disk.
    (tmp_path / "c.tmp.h5").symlink_to("/dev/full")
    with pytest.raises(FeatxError, match="c.h5: no space left on device"):
        prepare(write_tiny_imagenet(tmp_path), tmp_path)
    assert not (tmp_path / "c.h5").exists()


# --- CLI ---------------------------------------------------------------------------------------------


def test_cli_prepare_and_info(tmp_path):
    source = write_tiny_imagenet(tmp_path)
    cache = tmp_path / "cli.h5"
    runner = CliRunner()
    result = runner.invoke(cli, ["data", "prepare", "--data", str(source), "--cache", str(cache), "--classes", "2"])
    assert result.exit_code == 0, result.output
    assert str(cache) in result.stdout and "train    12 images" in result.stdout and "2 classes" in result.stdout
    result = runner.invoke(cli, ["data", "info", "--cache", str(cache)])
    assert result.exit_code == 0 and "val      4 images" in result.stdout and "MB)" in result.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["data", "prepare", "--data", "{tmp}/missing.zip"], "missing.zip: no such file"),
        (["data", "prepare", "--data", "{corrupt}", "--cache", "{tmp}/c.h5"], f"{CORRUPT_ID} is not a readable image"),
        (["data", "info", "--cache", "{tmp}/missing.h5"], "missing.h5: no such file"),
    ],
    ids=["missing-source", "corrupt-member", "missing-cache"],
)
def test_cli_errors_are_one_line(tmp_path, args, message):
    corrupt = write_tiny_imagenet(tmp_path / "bad", corrupt=True)
    args = [a.format(tmp=tmp_path, corrupt=corrupt) for a in args]
    result = CliRunner().invoke(cli, args)
    last = result.stderr.splitlines()[-1].rsplit("\r", 1)[-1]  # after any progress bar
    assert result.exit_code == 2 and "Traceback" not in result.stderr
    assert last.startswith("featx: error:") and message in last


def test_cli_entry_point_has_no_traceback(tmp_path):
    run = subprocess.run(
        [
            sys.executable,
            "-c",
            "from featx.front.cli import main; main()",
            "data",
            "prepare",
            "--data",
            str(tmp_path / "nope"),
        ],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 2 and run.stderr.count("\n") == 1 and "Traceback" not in run.stderr


def test_cli_info_without_caches(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli, ["data", "info"])
    assert result.exit_code == 2 and "run `featx data prepare` first" in result.stderr


# --- download ----------------------------------------------------------------------------------------


@pytest.fixture
def server():
    """A local HTTP server for `payload` that honours Range requests unless `ranges` is False."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            asked = self.headers.get("Range") if state["ranges"] else None
            state["requests"].append(self.headers.get("Range"))
            start = int(asked.removeprefix("bytes=").rstrip("-")) if asked else 0
            body = state["payload"][start:]
            self.send_response(206 if asked else 200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    state = {"payload": os.urandom(300_000), "ranges": True, "requests": []}
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    state["url"] = f"http://127.0.0.1:{httpd.server_address[1]}/tiny-imagenet-200.zip"
    yield state
    httpd.shutdown()


@pytest.mark.parametrize("ranges", [True, False], ids=["resume", "restart"])
def test_download_continues_an_interrupted_download(tmp_path, server, ranges):
    server["ranges"] = ranges
    payload = server["payload"]
    dest = tmp_path / "tiny-imagenet-200.zip"
    (tmp_path / "tiny-imagenet-200.zip.partial").write_bytes(payload[:100_000])
    assert download(server["url"], dest, hashlib.md5(payload).hexdigest(), progress=False) == dest
    assert dest.read_bytes() == payload and server["requests"] == ["bytes=100000-"]
    assert not (tmp_path / "tiny-imagenet-200.zip.partial").exists()


def test_download_with_a_wrong_md5(tmp_path, server):
    dest = tmp_path / "tiny-imagenet-200.zip"
    with pytest.raises(FeatxError, match=r"MD5 is not 0+ \(corrupt or changed\); run again to restart"):
        download(server["url"], dest, "0" * 32, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_download_offline_says_where_to_put_the_zip(tmp_path):
    with socket.socket() as s:  # a port that nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(FeatxError, match=f"cannot download .*put it at {tmp_path}/tiny-imagenet-200.zip"):
        download(
            f"http://127.0.0.1:{port}/tiny-imagenet-200.zip",
            tmp_path / "tiny-imagenet-200.zip",
            "0" * 32,
            progress=False,
        )


# --- the real zip ------------------------------------------------------------------------------------


def test_real_tiny_imagenet(real_cache, shared_zip):
    info = dataset_info(real_cache)
    assert info.name == TOP and len(info.wnids) == 200 and info.names[0] == "Egyptian cat"
    train, val, test = (read_split(real_cache, s) for s in ("train", "val", "test"))
    assert (len(train), len(val), len(test)) == (20_000, 10_000, 500)
    assert np.bincount(train.labels).tolist() == [100] * 200

    with zipfile.ZipFile(shared_zip) as z:
        lines = z.read(f"{TOP}/val/val_annotations.txt").decode().splitlines()
        annotated = dict(line.split("\t")[:2] for line in lines)
        assert [info.wnids[label] for label in val.labels] == [annotated[i] for i in val.ids]
        assert sorted(val.ids) == sorted(annotated)

        for split in (train, val, test):
            for start in range(0, len(split), 4096):
                images = split.read_images(start, start + 4096)
                assert images.dtype == np.uint8 and images.shape[1:] == (64, 64, 3)
                assert images.reshape(len(images), -1).max(axis=1).min() > 0  # nothing left undecoded

        named = {
            "val_0.JPEG": (val, "val/images/val_0.JPEG"),
            "test_0.JPEG": (test, "test/images/test_0.JPEG"),
            "n01443537_0.JPEG": (train, "train/n01443537/images/n01443537_0.JPEG"),
        }
        gray = next(n for n in z.namelist() if n.endswith(".JPEG") and Image.open(z.open(n)).mode == "L")
        split_of = {"train": train, "val": val, "test": test}
        named[gray.rsplit("/", 1)[1]] = (split_of[gray.split("/")[1]], gray.removeprefix(TOP + "/"))
        for id_, (split, member) in named.items():
            row = split.ids.index(id_)
            expected = np.asarray(Image.open(io.BytesIO(z.read(f"{TOP}/{member}"))).convert("RGB"))
            np.testing.assert_array_equal(split.read_images(row, row + 1)[0], expected)


def test_real_cache_is_reused(real_cache, shared_zip):
    before = real_cache.stat().st_mtime_ns
    start = time.perf_counter()
    assert prepare_cache(shared_zip, cache=real_cache, progress=False) == real_cache
    assert real_cache.stat().st_mtime_ns == before and time.perf_counter() - start < 5


def test_fast_jpeg_path_equals_pil_and_leaves_the_rest_to_it(shared_zip, tmp_path):
    """libjpeg-turbo (simplejpeg) decodes the common case; its pixels must be PIL's, and CMYK or truncated
    files must fall through to PIL (which converts the one and names the other)."""
    from featx.data.sources import _decode_jpeg_fast, decode_image

    with zipfile.ZipFile(shared_zip) as z:
        members = [n for n in z.namelist() if n.endswith(".JPEG")][::50]
        for name in members:
            data = z.read(name)
            fast = _decode_jpeg_fast(data, 64)
            assert fast is not None and np.array_equal(fast, decode_image(data, 64)), name
    root = write_tiny_imagenet(tmp_path, as_zip=False, corrupt=True)
    cmyk = next(root.glob(f"train/*/images/{CMYK_ID}")).read_bytes()
    truncated = next(root.glob(f"train/*/images/{CORRUPT_ID}")).read_bytes()
    assert _decode_jpeg_fast(cmyk, 64) is None and _decode_jpeg_fast(truncated, 64) is None
    assert _decode_jpeg_fast(data, 32) is None  # a 64x64 JPEG asked for at 32 goes through PIL's resize
