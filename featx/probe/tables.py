"""What `featx probe` prints: the sweep as a table (each head at its best epoch) and the chosen head's summary."""

from __future__ import annotations

import math

from featx.features.store import ALL
from featx.probe.sweep import ProbeResult


def format_table(result: ProbeResult) -> str:
    """Selection-split top-1/top-5 of each head at its best epoch; the chosen head marked with *."""
    sets = set(result.feature_sets) != {ALL}  # a column of its own only when the run chose sets
    lines = [
        f"  {'#':>3}"
        + (f" {'set':>9}" if sets else "")
        + (f" {'lr':>9} {'wd':>9} {'ls':>5} {'drop':>5}" if result.configs else f" {'head':>21}")
        + f" {'sel top-1':>9} {'sel top-5':>9} {'epoch':>5}"
    ]
    for h, (name, hist) in enumerate(zip(result.names, result.history)):
        finite = [r for r in hist if math.isfinite(r["val_top1"])]
        r = max(finite, key=lambda r: (r["val_top1"], r["val_top5"]), default=None)
        scores = f"{r['val_top1']:9.2%} {r['val_top5']:9.2%} {r['epoch']:5d}" if r else f"{'-':>9} {'-':>9} {'-':>5}"
        note = "" if result.status[h] == "ok" else f"  {result.status[h]}"
        mark = "*" if h == result.best else " "
        if result.configs:
            c = result.configs[h]
            head = f"{c.lr:>9.3g} {c.weight_decay:>9.3g} {c.label_smoothing:>5.3g} {c.dropout:>5.3g}"
        else:
            head = f"{name.removeprefix(result.feature_sets[h] + ' '):>21}"
        if sets:
            head = f"{result.feature_sets[h]:>9} {head}"
        lines.append(f"{mark} {h:>3} {head} {scores}{note}")
    return "\n".join(lines)


def format_summary(result: ProbeResult, select: str) -> str:
    """The chosen head, where it was chosen, and its one score on val with interval and calibration."""
    v, chosen = result.val, result.best_metrics
    where = (
        "selected on val (optimistic)"
        if select == "val"
        else f"selected on {select} of train (top-1 {chosen['val_top1']:.2%})"
    )
    lo, hi = v["val_top1_interval"]
    return (
        f"probe: best {result.names[result.best]} (epoch {result.best_epoch}), {where}: val top-1 "
        f"{v['val_top1']:.2%} [95% CI {lo:.2%}, {hi:.2%}], top-5 {v['val_top5']:.2%}; ECE {v['val_ece']:.3f}, "
        f"{v['val_ece_calibrated']:.3f} at temperature {v['temperature']:.2f}"
    )
