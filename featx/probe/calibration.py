"""After a probe run has chosen its head: each kept checkpoint's temperature fitted on the selection split, and
the one score on val (top-1 with its bootstrap interval, top-5, calibration error before and after)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from featx.core.atomic import replacing
from featx.core.device import resolve_device
from featx.core.runs import Snapshots, load_checkpoint
from featx.core.stats import apply_temperature, bootstrap_interval, calibration_temperature, expected_calibration_error
from featx.features.batches import Source, StreamedSplit, batch_source, scoring_pieces
from featx.features.store import Features
from featx.nets.heads import label_rank
from featx.probe.checkpoints import probe_heads


@torch.no_grad()
def _probabilities(model, src: Source) -> tuple[np.ndarray, np.ndarray]:
    """(H, N, C) view-averaged probabilities of every head over the labelled rows, and their labels."""
    probs, labels = [], []
    for x, y in scoring_pieces(src):
        probs.append(model.predict_proba(x).float().cpu())
        labels.append(y.cpu())
    return torch.cat(probs, 1).numpy(), torch.cat(labels).numpy()


def calibrate_and_score(
    run_dir: Path,
    snapshots: Snapshots,
    chosen_on: Features | StreamedSplit,
    val: Features | StreamedSplit,
    *,
    select: str,
    device: str,
) -> dict:
    """Fit each kept checkpoint's temperature on the selection split and store it in the checkpoint; then score
    the best checkpoint on val, once: top-1 (with its 95% bootstrap interval), top-5, ECE before and after."""
    dev = resolve_device(device)
    listing = snapshots.listing()
    ckpts = [load_checkpoint(run_dir / s.file) for s in listing]
    meta, path = chosen_on.meta, chosen_on.path
    probs, labels = _probabilities(probe_heads(ckpts, meta, path=path).to(dev).eval(), batch_source(chosen_on, dev))
    for s, c, p in zip(listing, ckpts, probs):
        c["calibration"] = {"temperature": calibration_temperature(p, labels), "fitted_on": select}
        with replacing(run_dir / s.file) as tmp:
            torch.save(c, tmp)
    probs, labels = _probabilities(probe_heads(ckpts[:1], meta, path=path).to(dev).eval(), batch_source(val, dev))
    rank = label_rank(torch.from_numpy(probs), torch.from_numpy(labels))[0].numpy()
    calibrated = apply_temperature(probs[0], ckpts[0]["calibration"]["temperature"])
    return {
        "val_top1": float((rank <= 1).mean()),
        "val_top1_interval": bootstrap_interval(rank <= 1),
        "val_top5": float((rank <= 5).mean()),
        "val_ece": expected_calibration_error(probs[0], labels),
        "val_ece_calibrated": expected_calibration_error(calibrated, labels),
        "temperature": ckpts[0]["calibration"]["temperature"],
    }
