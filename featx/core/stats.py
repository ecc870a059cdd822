"""The numbers a reviewer checks: bootstrap intervals, McNemar's paired test, the held-out selection split,
expected calibration error and temperature scaling. numpy, scipy and sklearn only; every draw is seeded."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.stats import binomtest
from sklearn.model_selection import train_test_split

from featx.core.errors import FeatxError, FeatxWarning

RESAMPLES = 1000
LEVEL = 0.95
BINS = 15  # reliability bins, as in Guo et al. 2017


def bootstrap_interval(
    values: np.ndarray, *, level: float = LEVEL, resamples: int = RESAMPLES, seed: int = 0
) -> tuple[float, float]:
    """Percentile interval of the mean of per-image `values` (1/0 for right/wrong, or a paired difference
    in {-1, 0, 1}) over images drawn with replacement."""
    values = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(resamples, len(values)))].mean(1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


@dataclass
class Paired:
    """Two predictors on the same images: a's accuracy minus b's, its interval, and McNemar's exact p-value."""

    difference: float
    interval: tuple[float, float]
    a_only: int  # images a gets right and b wrong
    b_only: int
    p_value: float


def paired_comparison(a_correct: np.ndarray, b_correct: np.ndarray, *, seed: int = 0) -> Paired:
    a, b = np.asarray(a_correct, dtype=bool), np.asarray(b_correct, dtype=bool)
    a_only, b_only = int((a & ~b).sum()), int((~a & b).sum())
    # McNemar's exact test: under "equally accurate" each discordant image is a fair coin
    p = binomtest(a_only, a_only + b_only, 0.5).pvalue if a_only + b_only else 1.0
    diff = a.astype(np.int8) - b.astype(np.int8)
    return Paired(float(diff.mean()), bootstrap_interval(diff, seed=seed), a_only, b_only, float(p))


# --- held-out selection ------------------------------------------------------------------------------


def parse_select(select: str) -> float | None:
    """ "holdout:F" -> F (the share of train held out for selection); "val" -> None."""
    if select == "val":
        return None
    kind, _, frac = select.partition(":")
    try:
        f = float(frac)
    except ValueError:
        f = -1.0
    if kind != "holdout" or not 0 < f < 1:
        raise FeatxError(f"--select {select}: choose holdout:F with F in (0, 1) (e.g. holdout:0.1) or val")
    return f


def holdout_rows(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Boolean mask over `labels`' rows: a class-stratified, seeded `fraction` of the labelled rows."""
    labelled = np.flatnonzero(labels >= 0)
    try:
        _, held = train_test_split(labelled, test_size=fraction, stratify=labels[labelled], random_state=seed)
    except ValueError as e:  # too few images of a class to hold one out
        raise FeatxError(
            f"--select holdout:{fraction:g}: cannot hold out a stratified share of train ({e}); "
            "raise the fraction or use --select val"
        ) from None
    mask = np.zeros(len(labels), dtype=bool)
    mask[held] = True
    return mask


# --- calibration -------------------------------------------------------------------------------------


def reliability(probs: np.ndarray, labels: np.ndarray, bins: int = BINS) -> dict[str, np.ndarray]:
    """Per equal-width confidence bin: count, mean confidence and accuracy of the top-1 prediction."""
    conf, right = probs.max(1), probs.argmax(1) == labels
    which = np.minimum((conf * bins).astype(int), bins - 1)
    count = np.bincount(which, minlength=bins)
    with np.errstate(invalid="ignore"):
        return {
            "count": count,
            "confidence": np.bincount(which, conf, bins) / count,
            "accuracy": np.bincount(which, right, bins) / count,
        }


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = BINS) -> float:
    """|accuracy - confidence| averaged over the bins, weighted by their share of the images."""
    r = reliability(probs, labels, bins)
    gap = np.abs(r["accuracy"] - r["confidence"])
    return float(np.nansum(gap * r["count"]) / r["count"].sum())


def apply_temperature(probs: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(log p / T): for a softmax output, dividing its logits by T."""
    logp = np.log(np.clip(probs, 1e-12, None)) / temperature
    e = np.exp(logp - logp.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def fit_temperature(probs: np.ndarray, labels: np.ndarray) -> float:
    """The T in [0.05, 20] that minimises the negative log-likelihood of apply_temperature(probs, T)."""
    rows = np.arange(len(labels))

    def nll(log_t: float) -> float:
        return float(-np.log(np.clip(apply_temperature(probs, np.exp(log_t))[rows, labels], 1e-12, None)).mean())

    return float(np.exp(minimize_scalar(nll, bounds=(np.log(0.05), np.log(20.0)), method="bounded").x))


MIN_PER_CLASS = 5  # fewer selection images a class than this cannot tell heads or epochs apart


def selection_holdout(
    labels: np.ndarray, fraction: float, seed: int, classes: int, *, fallback: str
) -> np.ndarray | None:
    """holdout_rows' stratified `fraction` of train to choose on, or None with one FeatxWarning ending in
    `fallback` (what the caller does instead) where it would hold under MIN_PER_CLASS images a class: at 20 images
    a class its 10% is 2 a class and every head scores 100% there; at 5 a class no stratified share exists."""
    try:
        held = holdout_rows(labels, fraction, seed)
    except FeatxError:
        held = None
    n = 0 if held is None else int(held.sum())
    if n >= MIN_PER_CLASS * classes:
        return held
    warnings.warn(
        f"--select holdout:{fraction:g} would hold out {n} images of train ({n / classes:.1f} a class, under "
        f"{MIN_PER_CLASS}), too few to choose on; {fallback}",
        FeatxWarning,
        stacklevel=2,
    )
    return None


def calibration_temperature(probs: np.ndarray, labels: np.ndarray) -> float:
    """fit_temperature's T, or 1 (with a FeatxWarning saying so) where T would worsen the calibration error on the
    split it is fitted on: on a few images the likelihood's optimum can sit at a bound and miscalibrate."""
    t = fit_temperature(probs, labels)
    before, after = (
        expected_calibration_error(probs, labels),
        expected_calibration_error(apply_temperature(probs, t), labels),
    )
    if after <= before:
        return t
    warnings.warn(
        f"temperature {t:.3g} worsens calibration on the selection split (ECE {before:.3f} → {after:.3f}); "
        "keeping T = 1",
        FeatxWarning,
        stacklevel=2,
    )
    return 1.0
