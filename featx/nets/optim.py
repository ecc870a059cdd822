"""The optimizers and learning-rate schedules of both training loops (probe heads and finetune).

Schedules are multipliers of the base lr as a function of the optimizer step, for torch's LambdaLR, which is
stepped once per batch: the same curve whether a loop trains 12 stacked heads or a whole network.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch.optim.lr_scheduler import LambdaLR

from featx.core.choices import FINETUNE_SCHEDULES as SCHEDULES
from featx.core.choices import OPTIMIZERS, FinetuneSchedule, Optimizer

WARMUP_START = 0.01  # the first warmup step's share of the base lr


def make_optimizer(
    kind: Optimizer, groups: Iterable[dict], *, lr: float = 1e-3, momentum: float = 0.9, fused: bool | None = None
) -> torch.optim.Optimizer:
    """adam, adamw, or sgd with Nesterov momentum, over param groups (each may set its own lr and weight_decay).

    Weight decay is L2 for adam and sgd (the gradient gains wd * W) and decoupled for adamw."""
    if kind not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {kind!r}")
    if kind == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=True, fused=fused)
    return (torch.optim.Adam if kind == "adam" else torch.optim.AdamW)(groups, lr=lr, fused=fused)


def lr_factor(
    kind: FinetuneSchedule,
    *,
    steps_per_epoch: int,
    epochs: int,
    decay: float | None = None,
    step_epochs: int | None = None,
    warmup_steps: int = 0,
) -> Callable[[int], float]:
    """step -> multiplier of the base lr: a linear warmup, then

    cosine       half a cosine from 1 to 0 over the remaining steps;
    exponential  `decay` (default 0.9) per epoch, applied smoothly at every step;
    step         `decay` (default 0.1) every `step_epochs` (default epochs / 3).
    """
    if kind not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {kind!r}")
    total = max(epochs * steps_per_epoch - warmup_steps, 1)
    every = (step_epochs or max(epochs // 3, 1)) * steps_per_epoch

    def factor(step: int) -> float:
        if step < warmup_steps:
            return WARMUP_START + (1 - WARMUP_START) * step / warmup_steps
        t = step - warmup_steps
        if kind == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(t / total, 1.0)))
        if kind == "exponential":
            return (0.9 if decay is None else decay) ** (t / steps_per_epoch)
        return (0.1 if decay is None else decay) ** (t // every)

    return factor


def make_scheduler(opt: torch.optim.Optimizer, kind: FinetuneSchedule, **schedule) -> LambdaLR:
    """A LambdaLR over `opt` following lr_factor(kind, **schedule); call .step() after every optimizer step."""
    return LambdaLR(opt, lr_factor(kind, **schedule))
