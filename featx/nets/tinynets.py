"""Small networks for native 64x64 inputs, trained from scratch.

Each follows torchvision's ResNet layout: convolutional body, pooling (global average, or a flatten where the
report says so), then a `fc` Linear classifier, so the backbone registry can swap `fc` for Identity and read
the features. None carries a dropout layer: the finetune head's `--dropout` is the only one before the head.

- vgg_tiny, inception_tiny: featx's own VGG-like net and Inception-v3 behind a light stem.
- bastidas_vgg, bastidas_inception: the VGG-like and InceptionV3-like nets of Bastidas's report
  (../shared/reports/003_71edc84977f1dd14.txt).
- milani_inception: the reduced Inception-v3 Milani trained from scratch (004_367cbcd3953dba97.txt, section 3).

Every convolution of the report nets is torchvision's BasicConv2d: conv (no bias) -> BatchNorm -> ReLU.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models.inception import BasicConv2d, InceptionA, InceptionB, InceptionC, InceptionD, InceptionE

from featx.core.errors import FeatxError


class _Net(nn.Module):
    def __init__(self, body: nn.Module, dim: int, num_classes: int, *, flatten_size: int | None = None):
        """flatten_size: the input side the body's map is flattened for (no global pooling), else None."""
        super().__init__()
        self.body = body
        self.pool = nn.Identity() if flatten_size else nn.AdaptiveAvgPool2d(1)
        self.flatten_size = flatten_size
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, x):
        if self.flatten_size and x.shape[-2:] != (self.flatten_size, self.flatten_size):
            raise FeatxError(
                f"--size {x.shape[-1]}: this network flattens the map of a {self.flatten_size}x"
                f"{self.flatten_size} input; use --size {self.flatten_size}"
            )
        return self.fc(self.pool(self.body(x)).flatten(1))


def _vgg_block(cin: int, cout: int, convs: int) -> list[nn.Module]:
    layers = []
    for i in range(convs):
        layers += [
            nn.Conv2d(cin if i == 0 else cout, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
        ]
    return layers + [nn.MaxPool2d(2)]


def vgg_tiny(*, num_classes: int = 1000) -> nn.Module:
    """VGG-like: four stages of 3x3 conv + BN + ReLU (64, 128, 256, 512 channels), each halving 64 -> 4."""
    body = nn.Sequential(
        *_vgg_block(3, 64, 2), *_vgg_block(64, 128, 2), *_vgg_block(128, 256, 3), *_vgg_block(256, 512, 3)
    )
    return _Net(body, 512, num_classes)


def inception_tiny(*, num_classes: int = 1000) -> nn.Module:
    """Inception-v3 with a stride-1 stem for 64x64 and one block of each kind (A, A, B, C, C, D, E).

    Inception-v3's own stem shrinks 299 -> 35 before the first Inception block; at 64x64 a light stem that
    only halves once keeps the 32 -> 15 -> 7 grid progression the blocks were designed around.
    """
    body = nn.Sequential(
        BasicConv2d(3, 32, kernel_size=3, padding=1),
        BasicConv2d(32, 64, kernel_size=3, padding=1),
        nn.MaxPool2d(2),
        InceptionA(64, pool_features=32),
        InceptionA(256, pool_features=64),  # 256, 288 channels
        InceptionB(288),  # 768 channels, 32 -> 15
        InceptionC(768, channels_7x7=128),
        InceptionC(768, channels_7x7=160),
        InceptionD(768),  # 1280 channels, 15 -> 7
        InceptionE(1280),  # 2048 channels
    )
    return _Net(body, 2048, num_classes)


# --- Inception-v3's modules (Szegedy et al. 2015, "Rethinking the Inception Architecture") with a width ----
# torchvision's InceptionA..E fix their widths at Inception-v3's (and InceptionA keeps a 5x5 branch that the
# paper's Fig. 5 replaces by two 3x3): the reports' nets are narrower, so they are built here from the
# paper's figures, every convolution of a module `width` channels wide.


class _Concat(nn.ModuleList):
    """Branches applied to the same input, outputs concatenated along channels."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([branch(x) for branch in self], dim=1)


def _same(cin: int, cout: int, kernel: int | tuple[int, int]) -> nn.Module:
    """A stride-1 convolution that keeps the map's size."""
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    if kh % 2 and kw % 2:
        return BasicConv2d(cin, cout, kernel_size=kernel, padding="same")
    # Even kernels pad one side more; padding="same" would copy the input to do so, at every call.
    pad = ((kw - 1) // 2, kw // 2, (kh - 1) // 2, kh // 2)
    return nn.Sequential(nn.ZeroPad2d(pad), BasicConv2d(cin, cout, kernel_size=kernel))


def _chain(cin: int, width: int, kernels) -> nn.Sequential:
    """A 1x1 reduction to `width`, then one stride-1 'same' convolution per kernel size."""
    return nn.Sequential(BasicConv2d(cin, width, kernel_size=1), *(_same(width, width, k) for k in kernels))


def _pool_projection(cin: int, width: int) -> nn.Sequential:
    return nn.Sequential(nn.AvgPool2d(3, stride=1, padding=1), BasicConv2d(cin, width, kernel_size=1))


def fig5(cin: int, width: int, k: int = 3) -> _Concat:
    """Fig. 5: 1x1 | 1x1 -> kxk | 1x1 -> kxk -> kxk | pool -> 1x1; 4 * width channels out."""
    return _Concat(
        [
            BasicConv2d(cin, width, kernel_size=1),
            _chain(cin, width, [k]),
            _chain(cin, width, [k, k]),
            _pool_projection(cin, width),
        ]
    )


def fig6(cin: int, width: int, n: int) -> _Concat:
    """Fig. 6: 1x1 | 1x1 -> 1xn -> nx1 | 1x1 -> (1xn -> nx1) x 2 | pool -> 1x1; 4 * width channels out."""
    factor = [(1, n), (n, 1)]
    return _Concat(
        [
            BasicConv2d(cin, width, kernel_size=1),
            _chain(cin, width, factor),
            _chain(cin, width, factor * 2),
            _pool_projection(cin, width),
        ]
    )


def fig7(cin: int, width: int) -> _Concat:
    """Fig. 7 (expanded filter bank): 1x1 | 1x1 -> {1x3, 3x1} | 1x1 -> 3x3 -> {1x3, 3x1} | pool -> 1x1;
    6 * width channels out."""

    def split() -> _Concat:
        return _Concat([_same(width, width, (1, 3)), _same(width, width, (3, 1))])

    return _Concat(
        [
            BasicConv2d(cin, width, kernel_size=1),
            nn.Sequential(_chain(cin, width, []), split()),
            nn.Sequential(_chain(cin, width, [3]), split()),
            _pool_projection(cin, width),
        ]
    )


def fig10(cin: int, width: int) -> _Concat:
    """Fig. 10 (grid reduction): 1x1 -> 3x3/2 | 1x1 -> 3x3 -> 3x3/2 | maxpool/2; cin + 2 * width channels out.

    Padded, so an even side halves exactly (16 -> 8 -> 4)."""

    def down() -> BasicConv2d:
        return BasicConv2d(width, width, kernel_size=3, stride=2, padding=1)

    return _Concat(
        [
            nn.Sequential(_chain(cin, width, []), down()),
            nn.Sequential(_chain(cin, width, [3]), down()),
            nn.MaxPool2d(3, stride=2, padding=1),
        ]
    )


def bastidas_vgg(*, num_classes: int = 1000) -> nn.Module:
    """Bastidas's VGG-like net (003_71edc84977f1dd14.txt, "Model Architectures", VGG-Like layer list).

    Layers, all from the report's list (each conv -> BN -> ReLU; "Adding Batch Normalization instead of
    DropOut", "Metrics & Results"): conv 32 2x2/2; conv 32 1x2, 2x1, 1x2, 2x1, 1x2 (stride 1); maxpool 2x2/2;
    conv 64 2x2, 64 2x2; maxpool 2x2/1; conv 32 3x3; maxpool 2x2/1; flatten; the 200-way softmax layer.
    Read through the conversion's losses: the fifth conv's "2 2x1" is 32 2x1 (the list alternates 1x2 and
    2x1 at 32 filters) and the last conv's "2,3x3" is 32 3x3 (the surviving digit ends 32, not 64).
    featx's choices, where the report is silent: no padding (the list gives none; a 64x64 input leaves a
    32x9x8 map, 2304 features); nothing between the flatten and the classifier (that line of the list
    survives only as "1"); a dropout there only if --dropout asks.
    """
    c = BasicConv2d
    body = nn.Sequential(
        c(3, 32, kernel_size=2, stride=2),
        c(32, 32, kernel_size=(1, 2)),
        c(32, 32, kernel_size=(2, 1)),
        c(32, 32, kernel_size=(1, 2)),
        c(32, 32, kernel_size=(2, 1)),
        c(32, 32, kernel_size=(1, 2)),
        nn.MaxPool2d(2, stride=2),
        c(32, 64, kernel_size=2),
        c(64, 64, kernel_size=2),
        nn.MaxPool2d(2, stride=1),
        c(64, 32, kernel_size=3),
        nn.MaxPool2d(2, stride=1),
    )
    return _Net(body, 32 * 9 * 8, num_classes, flatten_size=64)


def bastidas_inception(*, num_classes: int = 1000) -> nn.Module:
    """Bastidas's InceptionV3-like net (003_71edc84977f1dd14.txt, "Model Architectures", InceptionV3-Like list).

    From the report's list: conv 32 2x2/2, conv 32 2x2, conv 64 2x2, maxpool 2x2/2, conv 80 2x2/2 (each
    conv -> BN -> ReLU), two InceptionV3-Fig5 modules, three InceptionV3-Fig6 modules with N=2 (1x2 and 2x1
    convolutions), global average pool, the 200-way softmax layer. "all filters were reduced" (as in the
    VGG-like net, to 2x2): the Fig. 5 modules' 3x3 convolutions are 2x2 here.
    featx's choices, where the report is silent: the module widths, 32 per branch in the Fig. 5 modules
    (128 channels out) and 64 in the Fig. 6 modules (256 out), within the 32-80 filters of its stem; no
    padding in the stem, as in the VGG-like net (64 -> 32 -> 31 -> 30 -> 15 -> 7) and 'same' padding inside
    the modules, whose branches must agree in size to be concatenated; Inception-v3's 3x3 average pool in
    the pool branches.
    """
    c = BasicConv2d
    body = nn.Sequential(
        c(3, 32, kernel_size=2, stride=2),
        c(32, 32, kernel_size=2),
        c(32, 64, kernel_size=2),
        nn.MaxPool2d(2, stride=2),
        c(64, 80, kernel_size=2, stride=2),
        fig5(80, 32, k=2),
        fig5(128, 32, k=2),
        fig6(128, 64, n=2),
        fig6(256, 64, n=2),
        fig6(256, 64, n=2),
    )
    return _Net(body, 256, num_classes)


def milani_inception(*, num_classes: int = 1000) -> nn.Module:
    """Milani's reduced Inception-v3 for 64x64, trained from scratch (004_367cbcd3953dba97.txt, section 3.1).

    From the report: "the same inception layers as Inception-v3" (Fig. 4: type-1 = Inception-v3's Fig. 5,
    type-2 = Fig. 6 with n=7, type-3 = Fig. 7, "inception dim" = Fig. 10), "shallower and narrower" than
    Inception-v3's 6 convolutions and 12 inception layers, channels growing as the grid shrinks, a 64x64
    input (3.1); a ReLU after every convolution (3.1) with batch normalisation before every ReLU (3.2); no
    side classifier (3.1); no dropout layer in the baseline (3.2), the regularised variant's dropout being
    the finetune head's --dropout.
    featx's choices, since Fig. 3(b) itself did not survive the conversion: three stem convolutions (32
    3x3/2, 32 3x3, 64 3x3, padded) and a 3x3/2 max pool (64 -> 16), then type-1 x 2 (width 32, 128
    channels at 16x16), dim (width 64, 256 at 8x8), type-2 x 2 (width 64, n=7, 256), dim (width 128, 512 at
    4x4), type-3 x 1 (width 96, 576), global average pool: 7 inception layers.
    """
    c = BasicConv2d
    body = nn.Sequential(
        c(3, 32, kernel_size=3, stride=2, padding=1),
        c(32, 32, kernel_size=3, padding=1),
        c(32, 64, kernel_size=3, padding=1),
        nn.MaxPool2d(3, stride=2, padding=1),
        fig5(64, 32),
        fig5(128, 32),
        fig10(128, 64),
        fig6(256, 64, n=7),
        fig6(256, 64, n=7),
        fig10(256, 128),
        fig7(512, 96),
    )
    return _Net(body, 576, num_classes)
