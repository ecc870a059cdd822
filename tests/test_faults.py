"""Faults a user meets: a diverged head, a full disk, a second writer, bad paths and weights, a killed run.
Each must end in one line (exit 2) and leave nothing that looks finished; the run then resumes cleanly."""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from synth import write_tiny_imagenet
from torchvision.models import resnet18

from featx.core.atomic import exclusive
from featx.core.device import cpu_has_bf16
from featx.core.errors import FeatxError, FeatxWarning
from featx.evaluate.scoring import predict
from featx.features.extract import extract_features
from featx.features.store import load_features
from featx.front.cli import main
from featx.nets.heads import label_rank
from featx.probe.run import HeadConfig, run_probe


def featx_cli(capsys, monkeypatch, *args) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["featx", *map(str, args)])
    with pytest.raises(SystemExit) as exit:
        main()
    out, err = capsys.readouterr()
    return exit.value.code, out, err


def one_line(code: int, stderr: str, *messages: str) -> None:
    last = stderr.strip().splitlines()[-1].rsplit("\r", 1)[-1] if stderr.strip() else ""
    assert code == 2 and "Traceback" not in stderr, stderr
    assert last.startswith("featx: error:") and all(m in last for m in messages), stderr


@pytest.fixture(scope="module")
def features(synth_cache, tmp_path_factory) -> Path:
    """Real (random-weight ResNet-18) features of the synthetic dataset, computed in fp32."""
    return extract_features(
        data=synth_cache,
        backbone="resnet18",
        weights="none",
        size=32,
        views="flip",
        precision="fp32",
        out=tmp_path_factory.mktemp("f") / "r18.h5",
        progress=False,
    )


@pytest.fixture
def small_fs(tmp_path):
    """mount(size) -> a fresh tmpfs of that size (e.g. "300k"; "ro" for a read-only one); needs root."""
    mounted = []

    def mount(size: str, *, read_only: bool = False) -> Path:
        where = tmp_path / f"fs{len(mounted)}"
        where.mkdir()
        opts = f"size={size}" + (",ro" if read_only else "")
        if subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(where)], capture_output=True).returncode:
            pytest.skip("cannot mount a tmpfs here (needs root)")
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def grow(fs: Path, size: str) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(fs)], check=True)


# --- 1. a diverged head ------------------------------------------------------------------------------


def test_non_finite_scores_never_rank_their_label_first():
    scores = torch.tensor([[[0.1, 0.7, 0.2], [float("nan")] * 3, [0.5, float("inf"), 0.1]]])
    assert label_rank(scores, torch.tensor([1, 0, 1])).tolist() == [[1, 4, 4]]


def test_a_diverged_head_is_never_best_and_predict_never_sees_it(features, tmp_path, capsys, monkeypatch):
    code, out, err = featx_cli(
        capsys,
        monkeypatch,
        "probe",
        "--features",
        features,
        "--lr",
        "6.5e-4,1e30",
        "--batch-size",
        "1000",
        "--epochs",
        "3",
        "--device",
        "cpu",
        "--out",
        tmp_path / "o",
    )
    assert code == 0, err
    run = json.loads((tmp_path / "o" / "run.json").read_text())
    assert run["best"]["head"] == 0 and run["best"]["val_top1"] < 1.0
    assert all(c["key"] == 0 for c in run["checkpoints"])
    metrics = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert "NaN/inf" in metrics["heads"][1]["status"]
    assert metrics["heads"][1]["epochs"][-1]["val_top1"] is None  # NaN once stopped: null in JSON
    p = predict(runs=[tmp_path / "o"], split="val", ensemble="all", device="cpu")
    assert np.isfinite(p.probs).all() and p.top_k(1) == pytest.approx(run["best"]["val_top1"])

    code, out, err = featx_cli(
        capsys,
        monkeypatch,
        "probe",
        "--features",
        features,
        "--lr",
        "1e30",
        "--batch-size",
        "8",
        "--epochs",
        "2",
        "--device",
        "cpu",
        "--out",
        tmp_path / "all",
    )
    one_line(code, err, "every head diverged", "lower --lr")
    assert list((tmp_path / "all" / "checkpoints").iterdir()) == []


# --- 2. bf16 CPUs ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "precision",
    [
        "fp32",
        pytest.param(
            "bf16",
            marks=pytest.mark.skipif(
                not cpu_has_bf16(), reason="this CPU has no AVX-512 BF16/AMX: bf16 would be emulated"
            ),
        ),
    ],
)
@pytest.mark.numerics
def test_extract_precision_stays_within_its_tolerance(features, synth_cache, tmp_path, precision):
    # fp32 reproduces the fixture's fp32 run (float16 storage rounding only); bf16 keeps 8 mantissa bits, so
    # its features may differ by a few bf16 ulps of the largest activations
    x = extract_features(
        data=synth_cache,
        backbone="resnet18",
        weights="none",
        size=32,
        views="flip",
        precision=precision,
        out=tmp_path / "x.h5",
        progress=False,
    )
    a = load_features(features, "val").features.astype(np.float32)
    b = load_features(x, "val").features.astype(np.float32)
    scale = float(np.abs(a).max())
    atol = 1e-3 * scale if precision == "fp32" else 3 * 2.0**-8 * scale
    np.testing.assert_allclose(b, a, atol=atol)


# --- 3. a full disk ----------------------------------------------------------------------------------


def test_prepare_on_a_full_disk_is_one_line_and_resumes(small_fs, tmp_path, capsys, monkeypatch):
    source = write_tiny_imagenet(tmp_path)
    fs = small_fs("300k")
    code, out, err = featx_cli(capsys, monkeypatch, "data", "prepare", "--data", source, "--cache", fs / "c.h5")
    one_line(code, err, f"{fs / 'c.h5'}: no space left on device", "MB needed")
    assert list(fs.iterdir()) == []
    grow(fs, "4m")
    code, out, err = featx_cli(capsys, monkeypatch, "data", "prepare", "--data", source, "--cache", fs / "c.h5")
    assert code == 0, err
    assert [p.name for p in fs.iterdir()] == ["c.h5"]


def test_a_subprocess_hitting_a_full_disk_inside_hdf5_exits_2(small_fs, tmp_path):
    # the free-space check is bypassed: HDF5 itself meets the full disk, which used to crash at exit (139)
    fs = small_fs("200k")
    code = "import featx.core.atomic as a; a.require_space = lambda *_: None; from featx.front.cli import main; main()"
    r = subprocess.run(
        [
            sys.executable,
            "-c",
            code,
            "data",
            "prepare",
            "--data",
            str(write_tiny_imagenet(tmp_path)),
            "--cache",
            str(fs / "c.h5"),
        ],
        capture_output=True,
        text=True,
    )
    # h5py reports its failed deallocations above the line; the point is exit 2 with the line, not 139
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("featx: error:"), r.stderr
    assert "no space left on device" in r.stderr.strip().splitlines()[-1]
    assert list(fs.iterdir()) == []


def test_extract_stops_at_a_failed_shard_write_and_resumes(synth_cache, tmp_path, monkeypatch):
    kw = dict(
        data=synth_cache,
        backbone="resnet18",
        weights="none",
        size=32,
        views="full",
        precision="fp32",
        shard_rows=16,
        progress=False,
    )
    whole = load_features(extract_features(**kw, out=tmp_path / "whole.h5"), "train").features
    saves = []
    real_save = np.save

    def full_disk_on_third(path, x):  # an injected ENOSPC at the write call
        saves.append(path)
        if len(saves) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(path, x)

    monkeypatch.setattr(np, "save", full_disk_on_third)
    with pytest.raises(FeatxError, match=r"f\.h5\.partial/train-00002\.npy: no space left on device"):
        extract_features(**kw, out=tmp_path / "f.h5")
    assert not (tmp_path / "f.h5").exists()
    assert sorted(p.name for p in (tmp_path / "f.h5.partial").glob("*.npy")) == ["train-00000.npy", "train-00001.npy"]
    monkeypatch.setattr(np, "save", real_save)
    np.testing.assert_array_equal(load_features(extract_features(**kw, out=tmp_path / "f.h5"), "train").features, whole)


def test_extract_and_probe_on_a_full_disk_are_one_line_and_resume(features, synth_cache, small_fs, capsys, monkeypatch):
    fs = small_fs("256k")
    args = [
        "extract",
        "--data",
        synth_cache,
        "--backbone",
        "resnet18",
        "--weights",
        "none",
        "--size",
        "32",
        "--views",
        "flip",
        "--precision",
        "fp32",
        "--out",
        fs / "x.h5",
    ]
    code, out, err = featx_cli(capsys, monkeypatch, *args)
    one_line(code, err, f"{fs / 'x.h5'}: no space left on device", "MB needed")
    # the seed's single head (--lr): the disk check counts every head of a sweep
    probe = ["probe", "--features", features, "--epochs", "1", "--lr", "6.5e-4", "--device", "cpu", "--out", fs / "run"]
    code, out, err = featx_cli(capsys, monkeypatch, *probe, "--keep", "200")
    one_line(code, err, "no space left on device", "MB needed")
    assert not (fs / "run").exists()
    grow(fs, "8m")
    assert featx_cli(capsys, monkeypatch, *args)[0] == 0
    np.testing.assert_array_equal(load_features(fs / "x.h5", "val").features, load_features(features, "val").features)
    assert featx_cli(capsys, monkeypatch, *probe, "--keep", "200")[0] == 0
    assert sorted(p.name for p in fs.iterdir()) == ["run", "x.h5"]


# --- 4. two writers ----------------------------------------------------------------------------------


def test_a_second_writer_is_refused_at_once(features, synth_cache, tmp_path, capsys, monkeypatch):
    cases = {
        "data": [
            "data",
            "prepare",
            "--data",
            synth_cache.parent / "tiny-imagenet-200.zip",
            "--cache",
            tmp_path / "c.h5",
        ],
        "extract": [
            "extract",
            "--data",
            synth_cache,
            "--backbone",
            "resnet18",
            "--weights",
            "none",
            "--out",
            tmp_path / "x.h5",
        ],
        "probe": ["probe", "--features", features, "--out", tmp_path / "p"],
        "finetune": [
            "finetune",
            "--data",
            synth_cache,
            "--backbone",
            "resnet18",
            "--weights",
            "none",
            "--out",
            tmp_path / "ft",
        ],
    }
    for command, args in cases.items():
        out = args[-1]
        with exclusive(out):
            start = time.perf_counter()
            code, _, err = featx_cli(capsys, monkeypatch, *args)
            one_line(code, err, f"{out}: another featx process (pid {os.getpid()}) is writing it")
            assert time.perf_counter() - start < 5, command
        assert not Path(out).exists() and not Path(f"{out}.lock").exists(), command


@pytest.mark.slow
def test_two_extract_processes_on_one_output(synth_cache, tmp_path):
    args = [
        sys.executable,
        "-m",
        "featx",
        "extract",
        "--data",
        str(synth_cache),
        "--backbone",
        "resnet18",
        "--weights",
        "none",
        "--size",
        "224",
        "--views",
        "ten",
        "--classes",
        "1",
        "--batch-size",
        "1",
        "--precision",
        "fp32",
        "--out",
        str(tmp_path / "x.h5"),
    ]
    first = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not (tmp_path / "x.h5.lock").exists() and time.time() < deadline:
        time.sleep(0.05)
    second = subprocess.run(args, capture_output=True, text=True)
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    one_line(second.returncode, second.stderr, "is writing it")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.h5"]


# --- 5. one line, not a traceback --------------------------------------------------------------------


def test_weights_of_another_shape_are_one_line(synth_cache, tmp_path, capsys, monkeypatch):
    state = resnet18().state_dict()
    state["conv1.weight"] = torch.zeros(64, 3, 3, 3)
    torch.save(state, tmp_path / "w.pth")
    for command in (
        ["extract", "--out", tmp_path / "x.h5"],
        ["finetune", "--out", tmp_path / "ft", "--size", "32", "--batch-size", "8"],
    ):
        code, _, err = featx_cli(
            capsys,
            monkeypatch,
            *command,
            "--data",
            synth_cache,
            "--backbone",
            "resnet18",
            "--weights",
            tmp_path / "w.pth",
        )
        one_line(code, err, "does not fit this backbone (conv1.weight has shape [64, 3, 3, 3]")


def test_out_under_a_file_and_unwritable_out_are_one_line(
    features, synth_cache, small_fs, tmp_path, capsys, monkeypatch
):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    under = blocker / "sub" / "out"
    run = tmp_path / "run"
    run_probe(features=features, out=run, heads=[HeadConfig()], epochs=1, device="cpu")
    cases = [
        ["data", "prepare", "--data", synth_cache.parent / "tiny-imagenet-200.zip", "--cache", under],
        ["extract", "--data", synth_cache, "--backbone", "resnet18", "--weights", "none", "--out", under],
        ["probe", "--features", features, "--out", under],
        ["finetune", "--data", synth_cache, "--backbone", "resnet18", "--weights", "none", "--out", under],
        ["predict", "--run", run, "--device", "cpu", "--out", under],
        ["report", "--run", run, "--device", "cpu", "--out", under],
    ]
    for args in cases:
        code, _, err = featx_cli(capsys, monkeypatch, *args)
        assert code == 2, args
        one_line(code, err, f"{under}: {blocker} is a file, not a folder; choose another")
    ro = small_fs("1m", read_only=True)
    code, _, err = featx_cli(capsys, monkeypatch, "probe", "--features", features, "--out", ro / "run")
    one_line(code, err, f"--out {ro / 'run'}: cannot write there (Read-only file system)")


def test_a_rejected_hyperparameter_leaves_nothing(features, tmp_path, capsys, monkeypatch):
    code, _, err = featx_cli(
        capsys, monkeypatch, "probe", "--features", features, "--lr", "-1", "--out", tmp_path / "run"
    )
    one_line(code, err, "--lr -1.0: must be > 0")
    assert list(tmp_path.iterdir()) == []


# --- 6. loose ends -----------------------------------------------------------------------------------


def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_decode_workers_die_with_a_killed_prepare(shared_zip, tmp_path):
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "featx",
            "data",
            "prepare",
            "--data",
            str(shared_zip),
            "--cache",
            str(tmp_path / "c.h5"),
            "--jobs",
            "2",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    def workers() -> list[int]:  # loky's worker processes, not its resource trackers
        return [k for k in _children(proc.pid) if b"LokyProcess" in Path(f"/proc/{k}/cmdline").read_bytes()]

    deadline = time.time() + 120
    while len(workers()) < 2 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    pids = workers()
    assert len(pids) == 2, "prepare finished before it started its workers"
    time.sleep(1)  # into the decoding
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    # they used to wait out loky's idle timeout (20 s or more); a loaded machine may take a few seconds
    deadline = time.time() + 10
    while any(map(_alive, pids)) and time.time() < deadline:
        time.sleep(0.1)
    assert not any(map(_alive, pids))


def test_unreadable_images_are_named_and_skipped_on_their_own_line(tmp_path, capsys, monkeypatch):
    source = write_tiny_imagenet(tmp_path, as_zip=False)
    bad = next(source.glob("train/*/images/*.JPEG"))
    bad.write_bytes(b"this is text")
    code, _, err = featx_cli(capsys, monkeypatch, "data", "prepare", "--data", source, "--cache", tmp_path / "c.h5")
    one_line(code, err, f"{bad} is not a readable image (UnidentifiedImageError: not a JPEG or PNG image)")
    assert "BytesIO" not in err
    # library code warns through FeatxWarning (the CLI renders it as one `featx: warning:` line)
    with pytest.warns(FeatxWarning, match=f"^skipped {re.escape(str(bad))}: UnidentifiedImageError"):
        code, out, err = featx_cli(
            capsys, monkeypatch, "data", "prepare", "--data", source, "--cache", tmp_path / "c.h5", "--skip-bad"
        )
    assert code == 0, err


def test_skipped_images_in_predict_come_from_the_same_reader(tmp_path):
    from featx.evaluate.images import read_images

    Image.fromarray(np.full((64, 64, 3), 9, np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "b.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(FeatxError, match=r"b\.png is not a readable image \(UnidentifiedImageError"):
        read_images([tmp_path], size=64)
    with pytest.warns(FeatxWarning, match=r"^skipped .*b\.png: UnidentifiedImageError"):
        images, ids = read_images([tmp_path], size=64, skip_bad=True)
    assert ids == [str(tmp_path / "a.png")] and (images == 9).all()
