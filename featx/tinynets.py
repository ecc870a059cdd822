"""Small networks for native 64x64 inputs, trained from scratch (the seeds' VGG-like and reduced Inception-v3).

Both follow torchvision's ResNet layout: convolutional body, global average pooling, then a `fc` Linear
classifier, so the backbone registry can swap `fc` for Identity and read pooled features.
"""

from __future__ import annotations

from torch import nn
from torchvision.models.inception import BasicConv2d, InceptionA, InceptionB, InceptionC, InceptionD, InceptionE


class _Net(nn.Module):
    def __init__(self, body: nn.Module, dim: int, num_classes: int, dropout: float):
        super().__init__()
        self.body = body
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, x):
        return self.fc(self.dropout(self.pool(self.body(x)).flatten(1)))


def _vgg_block(cin: int, cout: int, convs: int) -> list[nn.Module]:
    layers = []
    for i in range(convs):
        layers += [nn.Conv2d(cin if i == 0 else cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                   nn.ReLU(inplace=True)]
    return layers + [nn.MaxPool2d(2)]


def vgg_tiny(*, num_classes: int = 1000, dropout: float = 0.5) -> nn.Module:
    """VGG-like: four stages of 3x3 conv + BN + ReLU (64, 128, 256, 512 channels), each halving 64 -> 4."""
    body = nn.Sequential(*_vgg_block(3, 64, 2), *_vgg_block(64, 128, 2), *_vgg_block(128, 256, 3),
                         *_vgg_block(256, 512, 3))
    return _Net(body, 512, num_classes, dropout)


def inception_tiny(*, num_classes: int = 1000, dropout: float = 0.5) -> nn.Module:
    """Inception-v3 with a stride-1 stem for 64x64 and one block of each kind (A, A, B, C, C, D, E).

    Inception-v3's own stem shrinks 299 -> 35 before the first Inception block; at 64x64 a light stem that
    only halves once keeps the 32 -> 15 -> 7 grid progression the blocks were designed around.
    """
    body = nn.Sequential(
        BasicConv2d(3, 32, kernel_size=3, padding=1), BasicConv2d(32, 64, kernel_size=3, padding=1),
        nn.MaxPool2d(2),
        InceptionA(64, pool_features=32), InceptionA(256, pool_features=64),  # 256, 288 channels
        InceptionB(288),  # 768 channels, 32 -> 15
        InceptionC(768, channels_7x7=128), InceptionC(768, channels_7x7=160),
        InceptionD(768),  # 1280 channels, 15 -> 7
        InceptionE(1280),  # 2048 channels
    )
    return _Net(body, 2048, num_classes, dropout)
