"""Training augmentation on the device: uint8 batches in, normalised float batches out.

Everything is torchvision.transforms.v2 on batched tensors. v2 draws one set of random parameters per call,
so a batch is split into `groups` chunks that each get their own draw: per-image variety at a bounded
number of kernel launches. Geometry and colour act on the native uint8 images (cheap at 64x64), before the
upsampling to the network's input size.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch
from torchvision.transforms import v2

from featx.errors import FeatxError
from featx.views import VIEW_SETS, crop_view, to_input


def _corner_crop(crop: int) -> v2.Transform:
    # One of stage 1's five crop positions (full image or a corner), so training sees what 10-crop tests.
    return v2.RandomChoice([v2.Lambda(partial(crop_view, name=n, crop=crop)) for n in VIEW_SETS["ten"][:5]])


# name -> transform factory taking the crop size; all but noise act on uint8.
AUGMENTATIONS = {
    "flip": lambda crop: v2.RandomHorizontalFlip(),
    "crop": lambda crop: v2.RandomCrop(crop),
    "corners": _corner_crop,
    "color": lambda crop: v2.ColorJitter(brightness=0.3, contrast=0.3),
    "rotate": lambda crop: v2.RandomRotation(15),
    "scale": lambda crop: v2.RandomAffine(0, scale=(0.85, 1.15)),
    "shift": lambda crop: v2.RandomAffine(0, translate=(0.125, 0.125)),
    "shear": lambda crop: v2.RandomAffine(0, shear=(-10, 10)),
    "invert": lambda crop: v2.RandomInvert(p=0.2),
    "noise": lambda crop: v2.GaussianNoise(sigma=0.03),
}


def check_augmentations(names: Sequence[str]) -> list[str]:
    unknown = [n for n in names if n not in AUGMENTATIONS]
    if unknown:
        raise FeatxError(f"--aug {','.join(unknown)}: unknown; choose from {','.join(AUGMENTATIONS)}")
    return list(names)


def pixel_transform(names: Sequence[str], *, crop: int) -> v2.Compose:
    """uint8 (N, 3, H, W) -> augmented float in [0, 1] at its native size; one random draw per call."""
    names = check_augmentations(names)
    on_uint8 = [AUGMENTATIONS[n](crop) for n in names if n != "noise"]
    on_float = [AUGMENTATIONS["noise"](crop)] if "noise" in names else []
    return v2.Compose([*on_uint8, v2.ToDtype(torch.float32, scale=True), *on_float])


class Augment:
    """The training input pipeline: augment, upsample, normalise, then MixUp/CutMix on the whole batch.

    Called with uint8 images (B, H, W, 3) and int64 labels on the device; returns channels_last float images
    and targets: the labels, or (B, num_classes) soft labels when mixup or cutmix is on.
    """

    def __init__(self, names: Sequence[str], *, crop: int, size: int, mean: Sequence[float],
                 std: Sequence[float], num_classes: int, mixup: float = 0.0, cutmix: float = 0.0,
                 groups: int = 16):
        self.pixels = pixel_transform(names, crop=crop)
        self.groups = groups if names else 1
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
