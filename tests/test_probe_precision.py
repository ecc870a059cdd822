"""featx probe --precision: bf16 training matmuls on fp32 weights choose the head fp32 chooses, and run.json
records what auto became."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_probe import write_synthetic

from featx.core.device import CPU_BF16_ENV
from featx.features.store import load_features
from featx.front.cli import main
from featx.probe.sweep import grid, train


@pytest.fixture(scope="module")
def overlapping(tmp_path_factory) -> Path:
    """10 classes whose blobs overlap (no head reaches 100%): heads differ by more than rounding moves them."""
    return write_synthetic(
        tmp_path_factory.mktemp("precision") / "overlapping.h5",
        classes=10,
        dim=32,
        views=1,
        n_train=2000,
        n_val=1000,
        noise=0.9,
    )


@pytest.mark.numerics
def test_bf16_matmuls_pick_the_head_fp32_picks(overlapping):
    tr, va = load_features(overlapping, "train"), load_features(overlapping, "val")
    heads = grid(lr=[1e-4, 1e-3, 1e-2], weight_decay=[0.0, 0.3])
    common = dict(heads=heads, epochs=4, batch_size=50, seed=1, device="cpu")
    fp32 = train(tr, val=va, precision="fp32", **common)
    bf16 = train(tr, val=va, precision="bf16", **common)

    # the bf16 path really ran: its weights moved by bf16's rounding, no more
    w32, w16 = fp32.heads.stacks[0].weights[0].detach(), bf16.heads.stacks[0].weights[0].detach()
    assert w16.dtype == torch.float32 and not torch.equal(w32, w16)
    torch.testing.assert_close(w16, w32, rtol=0.05, atol=0.02)

    # a problem where the choice means something: the best head beats the worst by far more than bf16 moves it
    tops = np.array([max(r["val_top1"] for r in h) for h in fp32.history])
    assert tops.max() - tops.min() > 0.05
    assert (bf16.best, bf16.best_epoch) == (fp32.best, fp32.best_epoch)
    assert bf16.best_metrics["val_top1"] == pytest.approx(fp32.best_metrics["val_top1"], abs=0.01)


@pytest.mark.parametrize(("forced", "expected"), [("1", "bf16"), ("0", "fp32")])
def test_run_json_records_what_auto_became(overlapping, tmp_path, monkeypatch, capsys, forced, expected):
    monkeypatch.setenv(CPU_BF16_ENV, forced)
    out = tmp_path / "run"
    argv = ["featx", "probe", "--features", str(overlapping), "--out", str(out), "--lr", "1e-3", "--epochs", "1"]
    monkeypatch.setattr(sys, "argv", [*argv, "--device", "cpu"])
    with pytest.raises(SystemExit) as exit:
        main()
    assert exit.value.code == 0, capsys.readouterr().err
    config = json.loads((out / "run.json").read_text())["config"]
    assert config["precision"] == "auto" and config["resolved"]["precision"] == expected
