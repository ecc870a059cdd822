"""Stacked classifier heads: H independent heads trained and evaluated as one batched matmul.

A sweep over learning rates, weight decays, label smoothings and dropouts costs little more than one head
because every head sees the same minibatch: the logits of all heads come from one `matmul` of the (B, D)
features with weights of shape (H, D, C) (or two, for the MLP head).

Each head's result does not depend on which other heads share the stack:
- every head starts from the same initial weights (drawn once from the random seed);
- dropout masks come from one uniform draw per step shared by all heads (head h keeps a unit where
  u >= p_h), so a head sees the same masks whether trained alone or in a sweep;
- the optimizer has one param group per head whose params alias that head's slice of the stacked
  tensors, so per-head lr and weight decay are ordinary group settings and torch's fused kernels apply.

Weight decay is L2 in the transfer-learning report's sense for adam and sgd (the gradient gains wd * W, i.e.
wd/2 * ||W||^2 is added to the loss) and decoupled for adamw; it applies to weights, not biases.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Protocol, cast

import torch
import torch.nn.functional as F
from torch import nn

from featx.core.choices import NORMALIZE, Normalize, Optimizer
from featx.nets.optim import make_optimizer


class StackedHeads(nn.Module):
    """H heads on D-dim features with C classes: linear (hidden=0) or one-hidden-layer ReLU MLP.

    forward((B, D) raw features) -> (H, B, C) logits. Feature normalisation is part of the module (its
    statistics are buffers), so a checkpoint scores raw stored features on its own.
    """

    dropout: torch.Tensor  # buffers
    norm_mean: torch.Tensor
    norm_std: torch.Tensor

    def __init__(
        self,
        *,
        heads: int,
        in_dim: int,
        num_classes: int,
        hidden: int = 0,
        dropout: Sequence[float] = (),
        normalize: Normalize = "none",
        seed: int = 0,
    ):
        super().__init__()
        if normalize not in NORMALIZE:
            raise ValueError(f"normalize must be one of {NORMALIZE}, got {normalize!r}")
        self.normalize, self.hidden = normalize, hidden
        dropout = list(dropout) or [0.0] * heads
        self.register_buffer("dropout", torch.tensor(dropout, dtype=torch.float32).view(heads, 1, 1))
        self.register_buffer("norm_mean", torch.zeros(in_dim))
        self.register_buffer("norm_std", torch.ones(in_dim))
        g = torch.Generator().manual_seed(seed)
        dims = [in_dim, hidden, num_classes] if hidden else [in_dim, num_classes]
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for fan_in, fan_out in zip(dims[:-1], dims[1:]):
            # nn.Linear's init for the MLP; zeros for the linear head (a convex problem, and the usual probe start)
            bound = 1 / math.sqrt(fan_in) if hidden else 0.0
            w = (torch.rand(fan_in, fan_out, generator=g) * 2 - 1) * bound
            b = (torch.rand(1, fan_out, generator=g) * 2 - 1) * bound
            self.weights.append(nn.Parameter(w.expand(heads, -1, -1).clone()))
            self.biases.append(nn.Parameter(b.expand(heads, -1, -1).clone()))

    @property
    def num_heads(self) -> int:
        return self.weights[0].shape[0]

    def finite_heads(self) -> torch.Tensor:
        """(H,) bool: whether every weight and bias of each head is finite."""
        return torch.stack([p.detach().isfinite().flatten(1).all(1) for p in (*self.weights, *self.biases)]).all(0)

    def set_standardization(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        self.norm_mean.copy_(mean)
        self.norm_std.copy_(std.clamp_min(1e-6))

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """Raw features (any float dtype) -> float32 normalised features."""
        x = x.float()
        if self.normalize == "l2":
            return F.normalize(x, dim=-1)
        if self.normalize == "standard":
            return (x - self.norm_mean) / self.norm_std
        return x

    def forward(self, x: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """(B, D) -> (H, B, C). `noise`: uniform (B, D) shared by all heads, to apply dropout (training)."""
        h = self.prepare(x)
        if noise is not None:
            h = h * noise.ge(self.dropout) / (1 - self.dropout)  # (H, B, D); p = 0 keeps every unit
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            if i:
                h = torch.relu(h)
            h = torch.baddbmm(b, h, w) if h.dim() == 3 else torch.matmul(h, w) + b
        return h

    @torch.no_grad()
    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        """(B, V, D) features of V views per image -> (H, B, C) softmax averaged over the views."""
        b, v, d = x.shape
        return self(x.reshape(b * v, d)).softmax(-1).view(self.num_heads, b, v, -1).mean(2)

    def head_state(self, h: int) -> dict[str, torch.Tensor]:
        """The state dict of head h alone, as a 1-head stack (what a checkpoint stores)."""
        return {
            k: (t if k.startswith("norm_") else t[h : h + 1]).detach().cpu().clone()
            for k, t in self.state_dict().items()
        }

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor], *, normalize: Normalize) -> StackedHeads:
        """Rebuild from a state dict (of head_state or state_dict)."""
        n_layers = sum(k.startswith("weights.") for k in state)
        w0, wl = state["weights.0"], state[f"weights.{n_layers - 1}"]
        heads = cls(
            heads=w0.shape[0],
            in_dim=w0.shape[1],
            num_classes=wl.shape[2],
            hidden=w0.shape[2] if n_layers == 2 else 0,
            normalize=normalize,
        )
        heads.load_state_dict(state)
        return heads


class HeadStack(Protocol):
    """What FeatureSetHeads asks of each stack: StackedHeads, or featx.probe.neighbors' k-NN and NCM heads."""

    @property
    def num_heads(self) -> int: ...

    def __call__(self, x: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor: ...

    def predict_proba(self, x: torch.Tensor) -> torch.Tensor: ...

    def head_state(self, h: int) -> dict[str, torch.Tensor]: ...


class FeatureSetHeads(nn.Module):
    """Stacks of heads, each on its own columns of the same features (a feature set of a --layers file):
    a sweep over feature sets in one pass. Heads are numbered stack by stack, then reordered by `order`
    (position i holds head order[i]) when the caller's numbering differs."""

    def __init__(self, stacks: Sequence[nn.Module], columns: Sequence[slice], order: Sequence[int] | None = None):
        super().__init__()
        self.stacks, self.columns = nn.ModuleList(stacks), list(columns)
        self.order = None if order is None else list(order)

    def _stacks(self) -> list[HeadStack]:
        return cast("list[HeadStack]", list(self.stacks))  # a ModuleList yields them as plain Modules

    @property
    def num_heads(self) -> int:
        return sum(s.num_heads for s in self._stacks())

    def _joined(self, outputs: list[torch.Tensor]) -> torch.Tensor:
        out = outputs[0] if len(outputs) == 1 else torch.cat(outputs)
        return out if self.order is None else out[self.order]

    def forward(self, x: torch.Tensor, noise: Sequence[torch.Tensor | None] | None = None) -> torch.Tensor:
        """(B, D) -> (H, B, C); `noise`: one uniform (B, d) per stack, for its dropout (training)."""
        noise = noise or [None] * len(self.stacks)
        return self._joined([s(x[:, c], n) for s, c, n in zip(self._stacks(), self.columns, noise)])

    @torch.no_grad()
    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        return self._joined([s.predict_proba(x[..., c]) for s, c in zip(self._stacks(), self.columns)])

    def head_state(self, h: int) -> dict[str, torch.Tensor]:
        h = h if self.order is None else self.order[h]
        for s in self._stacks():
            if h < s.num_heads:
                return s.head_state(h)
            h -= s.num_heads
        raise IndexError(h)


class HeadOptimizer:
    """One torch optimizer over a stack, with a param group per head (weights) and per head (biases).

    The group params alias slices of the stacked tensors; after each backward the stacked gradients are
    handed to them as views, so nothing is copied and torch's fused per-element kernels do the update.
    """

    def __init__(self, heads: StackedHeads, *, kind: Optimizer, lr: Sequence[float], weight_decay: Sequence[float]):
        self.stacked = [*heads.weights, *heads.biases]
        n_weights = len(heads.weights)
        self.aliases = [[nn.Parameter(p.detach()[h]) for p in self.stacked] for h in range(heads.num_heads)]
        groups = []
        for h, params in enumerate(self.aliases):
            groups.append({"params": params[:n_weights], "lr": lr[h], "weight_decay": weight_decay[h]})
            groups.append({"params": params[n_weights:], "lr": lr[h], "weight_decay": 0.0})
        self.opt = make_optimizer(kind, groups, fused=True)
        self.active = [True] * heads.num_heads

    def stop(self, h: int) -> None:
        """Freeze head h (its loss turned NaN): it takes no further steps."""
        self.active[h] = False

    def step(self) -> None:
        for h, params in enumerate(self.aliases):
            for alias, p in zip(params, self.stacked):
                alias.grad = p.grad[h] if self.active[h] else None  # the optimizer skips params without grad
        self.opt.step()
        for p in self.stacked:
            p.grad = None


def smoothed_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, smoothing: torch.Tensor) -> torch.Tensor:
    """(H, B, C) logits, (B,) labels, (H,) smoothing -> (H,) mean loss per head.

    The target puts 1 - eps + eps/C on the true class and eps/C elsewhere, as in F.cross_entropy.
    """
    logp = logits.log_softmax(-1)
    nll = -logp.gather(-1, labels.view(1, -1, 1).expand(logp.shape[0], -1, 1)).squeeze(-1)
    uniform = -logp.mean(-1)
    eps = smoothing.view(-1, 1)
    return ((1 - eps) * nll + eps * uniform).mean(1)


def label_rank(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(H, B, C) scores, (B,) labels -> (H, B) rank of each row's label, 1 = highest; ties rank against the
    label, so a constant output is never right; a row with NaN/inf is never right either (NaN compares false,
    which would rank its label first). One compare pass: several times faster than topk on CPU."""
    true = scores.gather(-1, labels.view(1, -1, 1).expand(scores.shape[0], -1, 1))
    return (scores >= true).sum(-1).masked_fill_(~scores.isfinite().all(-1), scores.shape[-1] + 1)


def topk_correct(scores: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """(H, B, C), (B,) -> (H,) number of rows whose label is among the top k."""
    return (label_rank(scores, labels) <= k).sum(1)
