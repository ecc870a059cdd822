"""Training augmentation on the device: uint8 batches in, normalised float batches out.

Everything is torchvision.transforms.v2 on batched tensors. v2 draws one set of random parameters per call,
so a batch is split into `groups` chunks that each get their own draw: per-image variety at a bounded
number of kernel launches. Geometry and colour act on the native uint8 images (cheap at 64x64), before the
upsampling to the network's input size. `--aug rotate:45,shift:0.1` sets an augmentation's magnitude; a bare
name takes the default in AUGMENTATIONS.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import NamedTuple

import torch
from torchvision.transforms import v2

from featx.errors import FeatxError
from featx.views import VIEW_SETS, crop_view, to_input


def _corner_crop(crop: int) -> v2.Transform:
    # One of stage 1's five crop positions (full image or a corner), so training sees what 10-crop tests.
    return v2.RandomChoice([v2.Lambda(partial(crop_view, name=n, crop=crop)) for n in VIEW_SETS["ten"][:5]])


class Aug(NamedTuple):
    """An augmentation: its magnitude's default and allowed range (what `--aug name:VALUE` sets), and the factory
    taking the crop size and the magnitude."""

    default: float | None  # None: takes no magnitude
    low: float
    high: float
    unit: str
    make: Callable[[int, float], v2.Transform]


# All but noise act on uint8.
AUGMENTATIONS = {
    "flip": Aug(0.5, 0, 1, "probability", lambda crop, p: v2.RandomHorizontalFlip(p)),
    "crop": Aug(None, 0, 0, "", lambda crop, _: v2.RandomCrop(crop)),
    "corners": Aug(None, 0, 0, "", lambda crop, _: _corner_crop(crop)),
    "color": Aug(0.3, 0, 1, "brightness and contrast factor range 1 +- m",
                 lambda crop, m: v2.ColorJitter(brightness=m, contrast=m)),
    "rotate": Aug(15, 0, 180, "degrees", lambda crop, deg: v2.RandomRotation(deg)),
    "scale": Aug(0.15, 0, 0.99, "zoom range 1 +- m", lambda crop, m: v2.RandomAffine(0, scale=(1 - m, 1 + m))),
    "shift": Aug(0.125, 0, 1, "fraction of the side", lambda crop, m: v2.RandomAffine(0, translate=(m, m))),
    "shear": Aug(10, 0, 89, "degrees", lambda crop, deg: v2.RandomAffine(0, shear=(-deg, deg))),
    "invert": Aug(0.2, 0, 1, "probability", lambda crop, p: v2.RandomInvert(p=p)),
    "noise": Aug(0.03, 0, 1, "sigma, images in [0, 1]", lambda crop, sigma: v2.GaussianNoise(sigma=sigma)),
}


def parse_augmentation(item: str) -> tuple[str, float | None]:
    """`name` or `name:VALUE` -> (name, magnitude), the default magnitude when none is given."""
    name, colon, value = item.partition(":")
    if name not in AUGMENTATIONS:
        raise FeatxError(f"--aug {item}: unknown; choose from {','.join(AUGMENTATIONS)}")
    aug = AUGMENTATIONS[name]
    if not colon:
        return name, aug.default
    if aug.default is None:
        raise FeatxError(f"--aug {item}: {name} takes no magnitude (its window is --crop); write {name}")
    try:
        magnitude = float(value)
    except ValueError:
        raise FeatxError(f"--aug {item}: write the magnitude as a number, e.g. {name}:{aug.default:g}") from None
    if not aug.low <= magnitude <= aug.high:
        raise FeatxError(f"--aug {item}: the {name} magnitude ({aug.unit}) must be between {aug.low:g} and "
                         f"{aug.high:g}")
    return name, magnitude


def check_augmentations(items: Sequence[str]) -> list[tuple[str, float | None]]:
    """Every `name[:VALUE]` item parsed and checked, in order."""
    return [parse_augmentation(item) for item in items]


def pixel_transform(items: Sequence[str], *, crop: int) -> v2.Compose:
    """uint8 (N, 3, H, W) -> augmented float in [0, 1] at its native size; one random draw per call."""
    augs = check_augmentations(items)
    on_uint8 = [AUGMENTATIONS[n].make(crop, m) for n, m in augs if n != "noise"]
    on_float = [AUGMENTATIONS[n].make(crop, m) for n, m in augs if n == "noise"]
    return v2.Compose([*on_uint8, v2.ToDtype(torch.float32, scale=True), *on_float])


class Augment:
    """The training input pipeline: augment, upsample, normalise, then MixUp/CutMix on the whole batch.

    Called with uint8 images (B, H, W, 3) and int64 labels on the device; returns channels_last float images
    and targets: the labels, or (B, num_classes) soft labels when mixup or cutmix is on.
    """

    def __init__(self, items: Sequence[str], *, crop: int, size: int, mean: Sequence[float],
                 std: Sequence[float], num_classes: int, mixup: float = 0.0, cutmix: float = 0.0,
                 groups: int = 16):
        self.pixels = pixel_transform(items, crop=crop)
        self.groups = groups if items else 1
        self.size, self.mean, self.std = size, list(mean), list(std)
        mixers = ([v2.MixUp(alpha=mixup, num_classes=num_classes)] if mixup > 0 else []) + \
                 ([v2.CutMix(alpha=cutmix, num_classes=num_classes)] if cutmix > 0 else [])
        self.mix = v2.RandomChoice(mixers) if mixers else None

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = images.permute(0, 3, 1, 2)
        # chunks may differ in size (crop vs corners of another size), so each is brought to the input size alone
        x = torch.cat([to_input(self.pixels(chunk), size=self.size, mean=self.mean, std=self.std)
                       for chunk in x.tensor_split(min(self.groups, len(x)))])
        if self.mix is not None:
            x, labels = self.mix(x, labels)
        return x.contiguous(memory_format=torch.channels_last), labels
