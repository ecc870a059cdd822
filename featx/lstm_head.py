"""The LSTM head over a ResNet's last two stages (the seed's design).

Each feature map (B, C, H, W) is cut into groups of 64 channels; a group is read as a sequence of 64 steps
whose input is one channel's flattened H*W map, by its own LSTM with hidden size H*W. The last hidden
states of all groups of both maps are concatenated and a linear layer maps them to the classes.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor

from featx.errors import FeatxError

GROUP = 64
STAGES = ("layer3", "layer4")  # the last two stages of torchvision's ResNets


class LSTMHead(nn.Module):
    def __init__(self, maps: list[tuple[int, int]], num_classes: int, dropout: float = 0.0):
        """maps: (channels, H*W) of each feature map."""
        super().__init__()
        self.lstms = nn.ModuleList()
        for channels, hw in maps:
            self.lstms.extend(nn.LSTM(hw, hw, batch_first=True) for _ in range(channels // GROUP))
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(sum(hw * (c // GROUP) for c, hw in maps), num_classes)

    def forward(self, maps: list[torch.Tensor]) -> torch.Tensor:
        # (B, C, H, W) -> (B, C, H*W) -> groups of (B, 64, H*W): 64 steps of H*W inputs each.
        groups = [g for m in maps for g in m.flatten(2).split(GROUP, dim=1)]
        last = [lstm(g.contiguous())[1][0][-1] for lstm, g in zip(self.lstms, groups)]
        return self.fc(self.dropout(torch.cat(last, dim=1)))


class LSTMNet(nn.Module):
    """A ResNet body (classifier removed) whose last two stages feed an LSTMHead."""

    def __init__(self, body: nn.Module, *, size: int, num_classes: int, dropout: float = 0.0):
        super().__init__()
        if not all(hasattr(body, s) for s in STAGES):
            raise FeatxError("--head lstm: needs a ResNet backbone (resnet18 ... resnet152); use --head linear")
        self.body = create_feature_extractor(body, {s: s for s in STAGES})
        # Probe the map shapes in eval mode: training mode would move BatchNorm's running statistics.
        training = self.body.training
        with torch.no_grad():
            shapes = [m.shape for m in self.body.eval()(torch.zeros(1, 3, size, size)).values()]
        self.body.train(training)
        self.head = LSTMHead([(s[1], s[2] * s[3]) for s in shapes], num_classes, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(list(self.body(x).values()))
