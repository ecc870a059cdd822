"""What predict computes from class probabilities: top-k, the ensemble's greedy and ranked picks and its
size curve, and the Prediction it returns."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from featx.core.choices import (
    ENSEMBLES,
    Combine,
)
from featx.core.errors import FeatxError
from featx.core.stats import (
    apply_temperature,
    bootstrap_interval,
)

# compute_features is extraction's own "render the views, run the model" step: reusing it keeps predictions on new
# images computed exactly as the stored features were.
from featx.nets.heads import label_rank


def top_k(probs: np.ndarray, labels: np.ndarray, k: int = 1) -> float:
    """Top-k accuracy of (N, C) probabilities over the rows with a label (>= 0); there must be some."""
    return float(correct_k(probs, labels, k).mean())


def correct_k(probs: np.ndarray, labels: np.ndarray, k: int = 1) -> np.ndarray:
    """Per row with a label (>= 0): whether it is among the top k, counted as training counts it
    (heads.label_rank: a tie with the label counts against it)."""
    keep = labels >= 0
    rank = label_rank(torch.from_numpy(probs[keep])[None], torch.from_numpy(labels[keep]).long())[0]
    return (rank <= k).numpy()


def calibrated(probs: np.ndarray, checkpoint: dict) -> np.ndarray:
    """A checkpoint's probabilities at the temperature fitted on its run's selection split (if it has one)."""
    t = checkpoint.get("calibration", {}).get("temperature")
    return probs if t is None else apply_temperature(probs, t)


def ranked_picks(ensemble: str, n: int) -> list[int]:
    """The checkpoints (indices into a run's best-first list of n) that best, top:K and all select."""
    if ensemble == "best":
        return [0]
    if ensemble == "all":
        return list(range(n))
    kind, _, k = ensemble.partition(":")
    if kind == "top" and k.isdigit() and int(k) >= 1:
        return list(range(min(int(k), n)))
    raise FeatxError(f"--ensemble {ensemble}: choose one of {', '.join(ENSEMBLES)}")


def pool(probs: np.ndarray | Sequence[np.ndarray], combine: Combine = "raw") -> np.ndarray:
    """(K, N, C) members' probabilities -> (N, C) the ensemble's: their mean, or with `logits` the softmax of
    their mean log-probability, which is the softmax of their mean logits (a member's log-softmax differs from its
    logits by one constant per row); exact until a probability underflows to 0."""
    probs = np.asarray(probs)
    if combine != "logits":
        return probs.mean(0)
    logp = np.log(np.maximum(probs, np.finfo(probs.dtype).tiny)).mean(0)
    return torch.from_numpy(logp).softmax(-1).numpy()


def greedy(probs: np.ndarray, labels: np.ndarray, combine: Combine = "raw") -> list[int]:
    """Add checkpoints in best-first order while the ensemble's val top-1 improves; stop at the first that
    does not. probs: (K, N, C) val softmaxes of the K checkpoints, best first."""
    picked = [0]
    best = top_k(probs[0], labels)
    for i in range(1, len(probs)):
        acc = top_k(pool(probs[[*picked, i]], combine), labels)
        if acc <= best:
            break
        picked.append(i)
        best = acc
    return picked


def ensemble_curve(scored: Sequence[Scored], combine: Combine = "raw") -> list[float]:
    """Val top-1 of top:N for N = 1..K (K: the most checkpoints of any run), as predict's top:N averages: each
    run's best min(N, its count) checkpoints, then the runs with equal weight. scored: every checkpoint's val
    softmaxes of each run, best first."""
    return [
        top_k(pool([pool(s.probs[:n], combine) for s in scored], combine), scored[0].labels)
        for n in range(1, max(len(s.probs) for s in scored) + 1)
    ]


def best_size(probs: np.ndarray, labels: np.ndarray, combine: Combine = "raw") -> list[int]:
    """The best K checkpoints for the K whose ensemble scores best (the smallest such K): the argmax of the
    ensemble-size curve. probs: (K, N, C) softmaxes of the K checkpoints, best first."""
    curve = ensemble_curve([Scored([], labels, probs)], combine)
    return list(range(int(np.argmax(curve)) + 1))


@dataclass
class Scored:
    """One run's selected checkpoints on one set of images."""

    ids: list[str]
    labels: np.ndarray  # -1 where unknown
    probs: np.ndarray  # (K, N, C): per checkpoint, softmax averaged over the views

    def take(self, picks: list[int]) -> Scored:
        return Scored(self.ids, self.labels, self.probs[picks])


@dataclass
class Prediction:
    split: str  # "val", "test", "train", or "images"
    ids: list[str]
    labels: np.ndarray  # int64 class indices, -1 where unknown
    probs: np.ndarray  # (N, C) the ensemble's
    single: np.ndarray  # (N, C) the single best checkpoint's (highest recorded val top-1 of all runs)
    classes: list[str]
    class_names: list[str]
    members: list[str]  # the checkpoint files averaged
    selection: list[str] = dataclasses.field(default_factory=list)  # per run: where it chose its checkpoints
    curve: list[float] | None = None  # val top-1 of top:N for N = 1, 2, ... (ensemble_curve), when asked for
    views: list[str] = dataclasses.field(default_factory=list)  # the views each probability averages

    @property
    def best_size(self) -> int:
        """The N of the curve's highest val top-1 (the smallest such N)."""
        assert self.curve is not None, "a Prediction made without curve=True has no ensemble-size curve"
        return int(np.argmax(self.curve)) + 1

    @property
    def has_labels(self) -> bool:
        return bool((self.labels >= 0).any())

    def require_labels(self) -> None:
        if not self.has_labels:
            raise FeatxError(f"split {self.split!r} has no labels to measure accuracy on; use --split val or train")

    def top_k(self, k: int = 1) -> float:
        self.require_labels()
        return top_k(self.probs, self.labels, k)

    def correct(self, k: int = 1) -> np.ndarray:
        """Per labelled image: right within the top k."""
        self.require_labels()
        return correct_k(self.probs, self.labels, k)

    def interval(self, k: int = 1) -> tuple[float, float]:
        """95% bootstrap interval of top-k over the labelled images."""
        return bootstrap_interval(self.correct(k))

    def accuracy_text(self, k: int = 1) -> str:
        """ "top-1 71.20% [70.31, 72.09]": the accuracy and its 95% bootstrap interval."""
        lo, hi = self.interval(k)
        return f"top-{k} {self.top_k(k):.2%} [{100 * lo:.2f}, {100 * hi:.2f}]"

    @property
    def optimistic(self) -> bool:
        """Scored on val by a run that chose its head, epoch or ensemble on val."""
        return self.split == "val" and "val" in self.selection

    def gain(self) -> float:
        """The ensemble's top-1 minus the single best checkpoint's."""
        return self.top_k(1) - top_k(self.single, self.labels, 1)

    def top(self, k: int) -> np.ndarray:
        """(N, min(k, C)) class indices, most probable first."""
        return np.argsort(-self.probs, axis=1, kind="stable")[:, :k]
