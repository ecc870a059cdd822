"""What `featx probe` prints: the sweep as a table (each head at its best epoch) and the chosen head's summary."""

from __future__ import annotations

import math

from featx.features.store import ALL
from featx.probe.sweep import ProbeResult


def format_table(result: ProbeResult) -> str:
    """Selection-split top-1/top-5 of each head at its best epoch (where nothing selected: train's, last epoch);
    the chosen head marked with *."""
    sets = set(result.feature_sets) != {ALL}  # a column of its own only when the run chose sets
    on = "trn" if result.selected_on == "none" else "sel"
    lines = [
        f"  {'#':>3}"
        + (f" {'set':>9}" if sets else "")
        + (f" {'lr':>9} {'wd':>9} {'ls':>5} {'drop':>5}" if result.configs else f" {'head':>21}")
        + f" {on + ' top-1':>9} {on + ' top-5':>9} {'epoch':>5}"
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
    """The chosen head, where it was chosen (`result.selected_on` where run_probe recorded it, which a fallback
    may have changed from the asked-for `select`), and its one score with interval and calibration."""
    v, chosen = result.val, result.best_metrics
    select = result.selected_on or select
    name = f"{result.names[result.best]} (epoch {result.best_epoch})"
    if select == "none":
        return f"probe: {name}: nothing selected (one head, default values, all of train); no held-out score exists"
    where = (
        "selected on val (optimistic)"
        if select == "val"
        else f"selected on {select} of train (top-1 {chosen['val_top1']:.2%})"
    )
    if (result.scored_on or "val") != "val":
        where = f"selected and scored on {select} of train (no val split: optimistic)"
    lo, hi = v["val_top1_interval"]
    return (
        f"probe: best {name}, {where}{_ties(result)}: {'val ' if result.scored_on in (None, 'val') else ''}top-1 "
        f"{v['val_top1']:.2%} [95% CI {lo:.2%}, {hi:.2%}], top-5 {v['val_top5']:.2%}; ECE {v['val_ece']:.3f}, "
        f"{v['val_ece_calibrated']:.3f} at temperature {v['temperature']:.2f}"
    )


def _ties(result: ProbeResult) -> str:
    """Where other heads reach the chosen one's selection top-1 at their best epoch, how many: the split could not
    tell them apart (ties go to the lowest head number and epoch), which a larger holdout or val would."""
    best = result.best_metrics["val_top1"]
    tied = sum(max((r["val_top1"] for r in hist), default=math.nan) == best for hist in result.history)
    return f" (tied with {tied - 1} other head(s) there: too few images to tell them apart)" if tied > 1 else ""
