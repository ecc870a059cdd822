"""Progress as a person sees it: bars on a terminal, whole lines in a log (no carriage returns), nothing when
quiet, and a resumed run's count starting at what was already done."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time

import pytest
from synth import write_tiny_imagenet

import featx.core.progress
from featx.core.progress import progress_bar
from featx.data.cache import prepare_cache

RESUMABLE = """
import sys
from featx import extract_features
extract_features(data=sys.argv[1], backbone="resnet18", weights="none", size=96, views="ten", out=sys.argv[2],
                 shard_rows=4, batch_size=2)
"""


def shards(partial):
    """The finished shards: a kill can leave a `.tmp.npy` that is not one (featx.core.atomic writes, then renames)."""
    return [p for p in partial.glob("*-*.npy") if ".tmp." not in p.name]


def test_a_log_gets_one_line_per_tenth(capsys):
    with progress_bar(total=200, desc="stage", unit="img", initial=40) as bar:
        for _ in range(16):
            bar.update(10)
    err = capsys.readouterr().err
    assert "\r" not in err
    done = [int(m) for m in re.findall(r"^stage: +\d+% (\d+)/200 img", err, re.M)]
    assert done == [40, 60, 80, 100, 120, 140, 160, 180, 200]  # the start, then each tenth once


def test_prepare_in_a_log_prints_percent_lines_and_no_carriage_return(tmp_path):
    source = write_tiny_imagenet(tmp_path, classes=3, train_per_class=10, val_per_class=2, test=2)
    run = subprocess.run(
        [sys.executable, "-m", "featx", "data", "prepare", "--data", str(source), "--cache", str(tmp_path / "c.h5")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    assert "\r" not in run.stderr
    lines = re.findall(r"^decoding \S+: +(\d+)% (\d+)/38 img", run.stderr, re.M)  # 3 x (10 + 2) + 2 images
    assert lines[0] == ("0", "0") and lines[-1] == ("100", "38"), run.stderr


def test_quiet_prints_no_progress(tmp_path, capfd, monkeypatch):
    monkeypatch.setattr(featx.core.progress, "quiet", True)
    source = write_tiny_imagenet(tmp_path, classes=2, train_per_class=4, val_per_class=2, test=2)
    prepare_cache(source, cache=tmp_path / "c.h5", progress=True)
    assert capfd.readouterr().err == ""


@pytest.mark.slow
def test_a_resumed_extract_counts_from_the_rows_already_done(synth_cache, tmp_path):
    out, partial = tmp_path / "f.h5", tmp_path / "f.h5.partial"
    proc = subprocess.Popen([sys.executable, "-c", RESUMABLE, str(synth_cache), str(out)], stderr=subprocess.DEVNULL)
    deadline = time.time() + 300  # a loaded machine takes long to start the first shard
    while len(shards(partial)) < 3 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(shards(partial))
    if not 3 <= done < 17:
        pytest.fail(f"{done} of 17 shards when killed: the test needs a run stopped midway")
    run = subprocess.run(
        [sys.executable, "-c", RESUMABLE, str(synth_cache), str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    counts = re.findall(r"^extract resnet18 x10 views: +\d+% (\d+)/68 img", run.stderr, re.M)
    assert counts[0] == str(4 * done) and counts[-1] == "68", run.stderr  # 68 images in shards of 4 rows
