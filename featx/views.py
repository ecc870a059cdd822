"""Crop views computed on the device, as batched tensor ops.

The order of views is fixed (stored features and every later stage rely on it); view 0 is always the full
image::

    full:  full
    flip:  full, full_flip
    ten:   full, top_left, top_right, bottom_left, bottom_right,
           full_flip, top_left_flip, top_right_flip, bottom_left_flip, bottom_right_flip

`X_flip` is the mirror image of view X (so `top_left_flip` is the mirrored top-left crop). `center`, the
centred crop, is what a model trained on random crops of that size is evaluated on (featx.finetune).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from featx.errors import FeatxError

_BASE = ("full", "top_left", "top_right", "bottom_left", "bottom_right")
VIEW_SETS: dict[str, tuple[str, ...]] = {
    "full": ("full",),
    "flip": ("full", "full_flip"),
    "ten": _BASE + tuple(f"{v}_flip" for v in _BASE),
}


def view_names(views: str) -> list[str]:
    if views not in VIEW_SETS:
        raise FeatxError(f"--views {views!r}: choose one of {', '.join(VIEW_SETS)}")
    return list(VIEW_SETS[views])


def check_crop(crop: int, height: int, width: int) -> None:
    if crop > min(height, width):
        raise FeatxError(f"--crop {crop} is larger than the {height}x{width} images; use --crop {min(height, width)} or less")


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


def to_input(x: torch.Tensor, *, size: int, mean: Sequence[float], std: Sequence[float],
             dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Float images in [0, 1] (N, 3, H, W) -> the network's input: bilinear resize to size x size
    (antialiased when shrinking), normalised, channels_last. Extraction, prediction, finetune training and
    evaluation all end here, so a model sees the same pixels in every stage."""
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=size < x.shape[-1])
    m = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return ((x - m) / s).to(dtype).contiguous(memory_format=torch.channels_last)


def render_views(images: torch.Tensor, *, views: Sequence[str], crop: int, size: int,
                 mean: Sequence[float], std: Sequence[float], dtype: torch.dtype = torch.float32) -> torch.Tensor:
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
