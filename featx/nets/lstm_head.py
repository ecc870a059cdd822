"""The LSTM head over ResNet stages (Inan's design).

Each feature map (B, C, H, W) is cut into groups of `group` channels (64 in the report; 128 its variant); a
group is read as a sequence of `group` steps whose input is one channel's flattened H*W map, by its own LSTM
with hidden size H*W. The last hidden states of all groups of all maps are concatenated and a linear layer
maps them to the classes. `stages` picks the maps: the last two stages by default, earlier ones for the
report's "LSTM's to the earlier layers".
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor

from featx.core.configs import FinetuneConfig
from featx.core.errors import FeatxError

GROUP = FinetuneConfig.lstm_group
STAGES = FinetuneConfig.lstm_stages  # the default: the last two stages of torchvision's ResNets
ALL_STAGES = ("layer1", "layer2", "layer3", "layer4")


class LSTMHead(nn.Module):
    def __init__(self, maps: list[tuple[int, int]], num_classes: int, dropout: float = 0.0, group: int = GROUP):
        """maps: (channels, H*W) of each feature map."""
        super().__init__()
        self.group = group
        self.lstms = nn.ModuleList()
        for channels, hw in maps:
            self.lstms.extend(nn.LSTM(hw, hw, batch_first=True) for _ in range(channels // group))
        # --dropout is the only dropout before the fc: none at all when it is 0
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc = nn.Linear(sum(hw * (c // group) for c, hw in maps), num_classes)

    def forward(self, maps: list[torch.Tensor]) -> torch.Tensor:
        # (B, C, H, W) -> (B, C, H*W) -> groups of (B, group, H*W): `group` steps of H*W inputs each.
        groups = [g for m in maps for g in m.flatten(2).split(self.group, dim=1)]
        last = [lstm(g.contiguous())[1][0][-1] for lstm, g in zip(self.lstms, groups)]
        return self.fc(self.dropout(torch.cat(last, dim=1)))


class LSTMNet(nn.Module):
    """A ResNet body (classifier removed) whose `stages` feed an LSTMHead."""

    def __init__(
        self,
        body: nn.Module,
        *,
        size: int,
        num_classes: int,
        dropout: float = 0.0,
        group: int = GROUP,
        stages: tuple[str, ...] | list[str] = STAGES,
    ):
        super().__init__()
        if not all(hasattr(body, s) for s in ALL_STAGES):
            raise FeatxError("--head lstm: needs a ResNet backbone (resnet18 ... resnet152); use --head linear")
        unknown = [s for s in stages if s not in ALL_STAGES]
        if unknown or not stages or len(set(stages)) != len(stages):
            raise FeatxError(f"--lstm-stages {','.join(stages)}: name distinct stages of {','.join(ALL_STAGES)}")
        self.body = create_feature_extractor(body, {s: s for s in stages})
        # Probe the map shapes in eval mode: training mode would move BatchNorm's running statistics.
        training = self.body.training
        with torch.no_grad():
            shapes = {k: m.shape for k, m in self.body.eval()(torch.zeros(1, 3, size, size)).items()}
        self.body.train(training)
        for stage, s in shapes.items():
            if s[1] % group:
                raise FeatxError(
                    f"--lstm-group {group}: {stage} has {s[1]} channels, not a multiple of it; "
                    f"use a divisor of {s[1]} such as 64"
                )
        self.head = LSTMHead([(s[1], s[2] * s[3]) for s in shapes.values()], num_classes, dropout, group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(list(self.body(x).values()))
