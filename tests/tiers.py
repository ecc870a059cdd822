"""Which backbone parametrizations the fast tier (`pytest -m "not slow"`) keeps; the full run (CI) takes all."""

from __future__ import annotations

from collections.abc import Collection

import pytest

from featx.nets.backbones import list_backbones

# Building and running a network at random init costs with its size: each family's smallest member stays fast.
FAMILY_SMALLEST = {
    "resnet18",
    "mobilenet_v2",
    "efficientnet_b0",
    "convnext_tiny",
    "vit_b_16",
    "swin_t",
    "inception_v3",
    "vgg_tiny",
    "inception_tiny",
    "bastidas_vgg",
    "bastidas_inception",
    "milani_inception",
}
# Training steps through a full-size torchvision network cost up to minutes on 2 cores (EfficientNet and
# MobileNet's depthwise convolutions most): resnet18 stands for them in the fast tier, with the small nets.
TRAINED_FAST = {"resnet18", "vgg_tiny", "inception_tiny", "bastidas_vgg", "bastidas_inception", "milani_inception"}


def backbone_names(fast: Collection[str]) -> list:
    """Every registered backbone as a parameter; those outside `fast` marked slow."""
    return [s.name if s.name in fast else pytest.param(s.name, marks=pytest.mark.slow) for s in list_backbones()]
