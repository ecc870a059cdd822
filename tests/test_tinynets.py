"""The small from-scratch networks: the report nets' sizes counted from their layer lists, their feature maps,
that they learn on real images, and that --dropout is the only dropout before the head."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision.models.inception import BasicConv2d

from featx.core.errors import FeatxError
from featx.data.cache import read_split
from featx.nets.augment import Augment
from featx.nets.backbones import create_backbone, get_spec
from featx.nets.models import ModelSpec, build_model

NEW = ["bastidas_vgg", "bastidas_inception", "milani_inception"]
ALL = ["vgg_tiny", "inception_tiny", *NEW]


def conv(cin: int, cout: int, kh: int, kw: int | None = None) -> int:
    """Parameters of conv (no bias) -> BatchNorm (scale and shift)."""
    return cout * (cin * kh * (kh if kw is None else kw) + 2)


def fig5(cin: int, w: int, k: int) -> int:  # four 1x1 (three reductions and the pool projection), three kxk
    return 4 * conv(cin, w, 1) + 3 * conv(w, w, k)


def fig6(cin: int, w: int, n: int) -> int:  # four 1x1, three 1xn and three nx1
    return 4 * conv(cin, w, 1) + 6 * conv(w, w, 1, n)


def fig7(cin: int, w: int) -> int:  # four 1x1, two 1x3 and two 3x1, one 3x3
    return 4 * conv(cin, w, 1) + 4 * conv(w, w, 1, 3) + conv(w, w, 3)


def fig10(cin: int, w: int) -> int:  # two 1x1, three 3x3 (the max pool has none)
    return 2 * conv(cin, w, 1) + 3 * conv(w, w, 3)


# Counted from each net's layer list (featx/tinynets.py docstrings), the 200-way head included.
BODY = {
    "bastidas_vgg": conv(3, 32, 2) + 5 * conv(32, 32, 1, 2) + conv(32, 64, 2) + conv(64, 64, 2) + conv(64, 32, 3),
    "bastidas_inception": conv(3, 32, 2)
    + conv(32, 32, 2)
    + conv(32, 64, 2)
    + conv(64, 80, 2)
    + fig5(80, 32, 2)
    + fig5(128, 32, 2)
    + fig6(128, 64, 2)
    + 2 * fig6(256, 64, 2),
    "milani_inception": conv(3, 32, 3)
    + conv(32, 32, 3)
    + conv(32, 64, 3)
    + fig5(64, 32, 3)
    + fig5(128, 32, 3)
    + fig10(128, 64)
    + 2 * fig6(256, 64, 7)
    + fig10(256, 128)
    + fig7(512, 96),
}
FEATURES = {"bastidas_vgg": 32 * 9 * 8, "bastidas_inception": 256, "milani_inception": 576}
# The body's last map for a 64x64 input: (channels, H, W).
MAP = {"bastidas_vgg": (32, 9, 8), "bastidas_inception": (256, 7, 7), "milani_inception": (576, 4, 4)}


def model(name: str, *, dropout: float = 0.0, classes: int = 200) -> nn.Module:
    spec = get_spec(name)
    return build_model(ModelSpec(name, 64, classes, "linear", list(spec.mean), list(spec.std), 56, dropout))


@pytest.mark.parametrize("name", NEW)
def test_parameter_count_is_the_layer_lists(name):
    # The sums above, worked out: a change to a net moves both its count and this pin.
    assert BODY[name] == {"bastidas_vgg": 54_336, "bastidas_inception": 400_800, "milani_inception": 1_615_904}[name]
    head = FEATURES[name] * 200 + 200
    assert sum(p.numel() for p in model(name).parameters()) == BODY[name] + head


@pytest.mark.parametrize("name", NEW)
def test_feature_map_and_output_shapes(name):
    bb = create_backbone(name, weights="none")
    assert (bb.feature_dim, bb.input_size) == (FEATURES[name], 64)
    x = torch.rand(3, 3, 64, 64)
    with torch.no_grad():
        assert bb.model.body.eval()(x).shape == (3, *MAP[name])
        assert bb.model(x).shape == (3, FEATURES[name])
        assert model(name).eval()(x).shape == (3, 200)


@pytest.mark.parametrize("name", NEW)
def test_every_convolution_is_followed_by_batch_norm_and_relu(name):
    # Bastidas: "Batch Normalization instead of DropOut"; Milani 3.2: BN before every single ReLU.
    net = model(name)
    inside = {id(m.conv) for m in net.modules() if isinstance(m, BasicConv2d)}
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(id(c) in inside for c in convs)


def test_bastidas_vgg_refuses_another_size_in_one_line():
    net = model("bastidas_vgg")
    with pytest.raises(FeatxError) as e:
        net(torch.rand(1, 3, 56, 56))
    assert e.value.message == "--size 56: this network flattens the map of a 64x64 input; use --size 64"


@pytest.mark.parametrize("name", ALL)
def test_dropout_is_only_the_heads(name):
    assert not [m for m in model(name, dropout=0.0).modules() if isinstance(m, nn.Dropout)]
    net = model(name, dropout=0.3)
    dropouts = [(n, m.p) for n, m in net.named_modules() if isinstance(m, nn.Dropout)]
    assert dropouts == [("head.0", 0.3)]


@pytest.mark.parametrize("name", NEW)
def test_it_learns_a_real_batch(name, real_cache):
    train = read_split(real_cache, "train", classes=8, per_class=4)
    images = torch.from_numpy(train.read_images())
    labels = torch.from_numpy(train.labels)
    spec = get_spec(name)
    x, y = Augment([], crop=56, size=64, mean=spec.mean, std=spec.std, num_classes=8)(images, labels)
    torch.manual_seed(0)
    net = model(name, classes=8).train()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    losses = []
    for _ in range(15):
        loss = nn.functional.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    # 32 real images of 8 classes: chance is ln 8 = 2.08; memorising them drives the loss well below it.
    assert losses[0] > 1.5 and losses[-1] < 0.5 * losses[0], losses
