"""Training-free probes on cosine similarity: weighted k-NN (as DINO's eval_knn) and nearest class mean.

Both score like StackedHeads: `predict_proba((B, V, D) features) -> (H, B, C)`, the view-averaged class
probabilities, so predict stacks and ensembles them as it does trained heads. k-NN takes the K most similar
training images (cosine similarity s of L2-normalised features), each voting exp(s / T) for its class, T = 0.07;
one head per k of a sweep, all from one top-k search. NCM scores the cosine similarity to each class's mean of
normalised training features, turned into probabilities by softmax(s / T).

`fit_neighbors` fits either on a feature file's training rows; featx.probe.checkpoints rebuilds them from their
checkpoints.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from featx.features.store import ALL, Features, feature_set_columns
from featx.nets.heads import FeatureSetHeads

KNN_FORMAT = "featx-knn-1"  # a k-NN probe checkpoint: the training features and labels, and k
NCM_FORMAT = "featx-ncm-1"  # a nearest-class-mean checkpoint: the class means
TEMPERATURE = 0.07


class KNNHeads(nn.Module):
    """One head per k over a bank of (N, D) training features; the bank is stored normalised, in float16."""

    bank: torch.Tensor  # buffers
    labels: torch.Tensor

    def __init__(
        self,
        bank: torch.Tensor,
        labels: torch.Tensor,
        *,
        num_classes: int,
        ks: Sequence[int],
        temperature: float = TEMPERATURE,
    ):
        super().__init__()
        self.register_buffer("bank", F.normalize(bank.float(), dim=-1).half())
        self.register_buffer("labels", labels.long())
        self.num_classes, self.ks, self.temperature = num_classes, list(ks), temperature

    @property
    def num_heads(self) -> int:
        return len(self.ks)

    @torch.no_grad()
    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        b, v, d = x.shape
        q = F.normalize(x.reshape(b * v, d).float(), dim=-1)
        sim, idx = (q @ self.bank.float().T).topk(min(max(self.ks), len(self.labels)), dim=1)
        weight, votes_for = (sim / self.temperature).exp(), self.labels[idx]
        out = []
        for k in self.ks:
            votes = torch.zeros(b * v, self.num_classes, device=x.device).scatter_add_(
                1, votes_for[:, :k], weight[:, :k]
            )
            out.append(votes / votes.sum(1, keepdim=True))
        return torch.stack(out).view(len(self.ks), b, v, -1).mean(2)

    def state(self) -> dict[str, torch.Tensor]:
        return {"bank": self.bank.cpu(), "labels": self.labels.cpu()}

    def checkpoint(self, h: int) -> dict:
        """What the checkpoint of head h (its k) holds besides the run's common entries."""
        return {"format": KNN_FORMAT, "state": self.state(), "k": self.ks[h], "temperature": self.temperature}


class NCMHead(nn.Module):
    """Nearest class mean: cosine similarity to each class's mean of normalised training features."""

    means: torch.Tensor  # a buffer

    def __init__(self, means: torch.Tensor, *, temperature: float = TEMPERATURE):
        super().__init__()
        self.register_buffer("means", F.normalize(means.float(), dim=-1))
        self.temperature = temperature
        self.num_heads = 1

    @classmethod
    def fit(cls, x: torch.Tensor, labels: torch.Tensor, num_classes: int) -> NCMHead:
        """x: (N, D) training features, labels (N,) in [0, num_classes)."""
        x = F.normalize(x.float(), dim=-1)
        sums = torch.zeros(num_classes, x.shape[1], device=x.device).index_add_(0, labels.long(), x)
        return cls(sums / torch.bincount(labels.long(), minlength=num_classes).clamp_min(1)[:, None])

    @torch.no_grad()
    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        b, v, d = x.shape
        sim = F.normalize(x.reshape(b * v, d).float(), dim=-1) @ self.means.T
        return (sim / self.temperature).softmax(-1).view(1, b, v, -1).mean(2)

    def state(self) -> dict[str, torch.Tensor]:
        return {"means": self.means.cpu()}

    def checkpoint(self, h: int) -> dict:
        return {"format": NCM_FORMAT, "state": self.state(), "temperature": self.temperature}


def fit_neighbors(
    bank: Features, *, head: str, ks: Sequence[int], device: torch.device, feature_set: str = ALL
) -> FeatureSetHeads:
    """k-NN (a head per k) or NCM on the labelled rows of `bank` (its first view), on `feature_set`'s columns."""
    rows = bank.labels >= 0
    columns = feature_set_columns(bank.meta, feature_set, path=bank.path)
    x = torch.from_numpy(bank.features[rows, 0][:, columns]).to(device)
    y = torch.from_numpy(bank.labels[rows]).to(device)
    n_classes = len(bank.meta.classes)
    return FeatureSetHeads(
        [KNNHeads(x, y, num_classes=n_classes, ks=ks) if head == "knn" else NCMHead.fit(x, y, n_classes)], [columns]
    )
