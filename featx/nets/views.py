"""Crop views computed on the device, as batched tensor ops.

The order of views is fixed (stored features and every later stage rely on it); view 0 is always the full
image::

    full:  full
    flip:  full, full_flip
    ten:   full, top_left, top_right, bottom_left, bottom_right,
           full_flip, top_left_flip, top_right_flip, bottom_left_flip, bottom_right_flip

`X_flip` is the mirror image of view X (so `top_left_flip` is the mirrored top-left crop). `center`, the
centred crop, is what a model trained on random crops of that size is evaluated on (featx.finetune.run).

Augmented views (`aug0`, `aug1`, ...: training images only) follow Milani's v3 training augmentation: a
random choice among the full image and the four corner crops, then a random brightness and contrast
adjustment. The draw is a function of (seed, image index, k) alone, so a resumed or sharded extraction makes
the same views as an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF

from featx.core.errors import FeatxError

_BASE = ("full", "top_left", "top_right", "bottom_left", "bottom_right")
VIEW_SETS: dict[str, tuple[str, ...]] = {
    "full": ("full",),
    "flip": ("full", "full_flip"),
    "ten": _BASE + tuple(f"{v}_flip" for v in _BASE),
}


# The report does not state its jitter magnitudes: featx's choice, the same as finetune's `--aug color`
# (factors drawn uniformly from [1 - m, 1 + m]).
AUG_BRIGHTNESS = 0.3
AUG_CONTRAST = 0.3


def aug_names(k: int) -> list[str]:
    return [f"aug{i}" for i in range(k)]


def aug_params(seed: int, index: int, k: int) -> tuple[str, float, float]:
    """Augmented view k of image `index`: (base crop, brightness factor, contrast factor)."""
    u = np.random.default_rng([seed, index, k]).random(3)
    return _BASE[int(u[0] * len(_BASE))], 1 + AUG_BRIGHTNESS * (2 * u[1] - 1), 1 + AUG_CONTRAST * (2 * u[2] - 1)


def aug_pixels(images: torch.Tensor, *, first: int, k: int, seed: int, crop: int) -> list[torch.Tensor]:
    """uint8 (B, H, W, 3), images `first`..`first`+B-1 of their split -> their augmented views 0..k-1 as float
    (3, h, w) in [0, 1] at native size, grouped by image: what the network sees before resizing."""
    x = images.permute(0, 3, 1, 2).float() / 255
    out = []
    for i in range(len(x)):
        for j in range(k):
            base, b, c = aug_params(seed, first + i, j)
            out.append(TF.adjust_contrast(TF.adjust_brightness(crop_view(x[i], base, crop), b), c))
    return out


def view_names(views: str) -> list[str]:
    if views not in VIEW_SETS:
        raise FeatxError(f"--views {views!r}: choose one of {', '.join(VIEW_SETS)}")
    return list(VIEW_SETS[views])


def check_crop(crop: int, height: int, width: int) -> None:
    if crop > min(height, width):
        raise FeatxError(
            f"--crop {crop} is larger than the {height}x{width} images; use --crop {min(height, width)} or less"
        )


def crop_view(x: torch.Tensor, name: str, crop: int) -> torch.Tensor:
    """The `name` crop (full, center, top_left, ...) of (..., H, W) images; mirrors are not applied here."""
    h, w = x.shape[-2:]
    if name == "full":
        return x
    if name == "center":
        top, left = (h - crop) // 2, (w - crop) // 2
        return x[..., top : top + crop, left : left + crop]
    top = 0 if name.startswith("top") else h - crop
    left = 0 if name.endswith("left") else w - crop
    return x[..., top : top + crop, left : left + crop]


def to_input(
    x: torch.Tensor, *, size: int, mean: Sequence[float], std: Sequence[float], dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Float images in [0, 1] (N, 3, H, W) -> the network's input: bilinear resize to size x size
    (antialiased when shrinking), normalised, channels_last. Extraction, prediction, finetune training and
    evaluation all end here, so a model sees the same pixels in every stage."""
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=size < x.shape[-1])
    m = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return ((x - m) / s).to(dtype).contiguous(memory_format=torch.channels_last)


def render_aug_views(
    images: torch.Tensor,
    *,
    first: int,
    k: int,
    seed: int,
    crop: int,
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> normalised float32 (B * k, 3, size, size) of their augmented views, grouped by
    image."""
    check_crop(crop, *images.shape[1:3])
    pixels = aug_pixels(images, first=first, k=k, seed=seed, crop=crop)
    out = torch.empty(len(pixels), 3, size, size, device=images.device)
    for shape in {p.shape for p in pixels}:  # one resize per crop size, not per view
        rows = [i for i, p in enumerate(pixels) if p.shape == shape]
        out[rows] = to_input(torch.stack([pixels[i] for i in rows]), size=size, mean=mean, std=std)
    return out.contiguous(memory_format=torch.channels_last)


def render_views(
    images: torch.Tensor,
    *,
    views: Sequence[str],
    crop: int,
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """uint8 (B, H, W, 3) on any device -> normalised float (B * V, 3, size, size), channels_last.

    Rows are grouped by image: rows [i*V, (i+1)*V) are the V views of image i. Flips are applied before
    the bilinear upsampling so that a flipped view equals the same view of the mirrored image exactly.
    """
    if any(name.removesuffix("_flip") != "full" for name in views):
        check_crop(crop, *images.shape[1:3])
    x = images.permute(0, 3, 1, 2).float() / 255
    out = []
    for name in views:
        v = crop_view(x, name.removesuffix("_flip"), crop)
        if name.endswith("_flip"):
            v = v.flip(-1)
        out.append(to_input(v, size=size, mean=mean, std=std, dtype=dtype))
    return torch.stack(out, dim=1).flatten(0, 1).contiguous(memory_format=torch.channels_last)
