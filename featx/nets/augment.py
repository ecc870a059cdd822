"""Training augmentation on the device: uint8 batches in, normalised float batches out.

Every image draws its own parameters (the reports augment each image on its own: "each image was randomly
flipped", Milani), and a batch costs a bounded number of kernel launches whatever its size:

- the geometric augmentations (flip, crop, corners, rotate, scale, shift, shear) compose one 3x3 matrix per
  image, in the order given, applied by one `grid_sample` per output size (crop and corners make at most two)
  with zero fill. Bilinear, where torchvision's v2 defaults to nearest on uint8: on the CPU it is the faster
  grid_sample kernel and it is smoother under rotation; whole-pixel crops, flips and shifts land on pixel
  centres, so they still copy pixels;
- the colour ones (color, brightness, invert, noise) are per-image factor tensors. Those listed before the last
  geometric one act before the resampling, the others after it (what decides the colour of the zero fill);
  noise always comes last, on the float image.

Each draw keeps torchvision v2's distribution for the same magnitude (angles, scales and shears uniform in
+-m, shifts rounded to whole pixels, colour factors uniform in [1 - m, 1 + m], brightness and contrast of
`color` in random order), drawn from torch's generator on the images' device. `--aug rotate:45,shift:0.1`
sets an augmentation's magnitude; a bare name takes the default in AUGMENTATIONS.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torchvision.transforms import v2

from featx.core.errors import FeatxError
from featx.nets.views import to_input


class Aug(NamedTuple):
    """An augmentation: its magnitude's default and allowed range (what `--aug name:VALUE` sets); geometric ones
    move pixels, the others change their values."""

    default: float | None  # None: takes no magnitude
    low: float
    high: float
    unit: str
    geometric: bool


AUGMENTATIONS = {
    "flip": Aug(0.5, 0, 1, "probability", True),
    "crop": Aug(None, 0, 0, "", True),
    "corners": Aug(None, 0, 0, "", True),  # the full image or one of its four corner crops (stage 1's views)
    "color": Aug(0.3, 0, 1, "brightness and contrast factor range 1 +- m", False),
    "brightness": Aug(0.3, 0, 1, "brightness factor range 1 +- m", False),
    "rotate": Aug(15, 0, 180, "degrees", True),
    "scale": Aug(0.15, 0, 0.99, "zoom range 1 +- m", True),
    "shift": Aug(0.125, 0, 1, "fraction of the side", True),
    "shear": Aug(10, 0, 89, "degrees", True),
    "invert": Aug(0.2, 0, 1, "probability", False),
    "noise": Aug(0.03, 0, 1, "sigma, images in [0, 1]", False),
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
        raise FeatxError(
            f"--aug {item}: the {name} magnitude ({aug.unit}) must be between {aug.low:g} and {aug.high:g}"
        )
    return name, magnitude


def check_augmentations(items: Sequence[str]) -> list[tuple[str, float | None]]:
    """Every `name[:VALUE]` item parsed and checked, in order."""
    return [parse_augmentation(item) for item in items]


class Draw(NamedTuple):
    """One augmentation's per-image parameters for a batch: tensors of length N (flip, invert: bool; crop, shift:
    (N, 2) whole pixels (x, y); corners: 0 = full, 1..4 = top_left, top_right, bottom_left, bottom_right; color:
    (N, 3) brightness, contrast, brightness-first; the rest one float each)."""

    name: str
    magnitude: float | None
    value: torch.Tensor | None


def _uniform(n: int, m: float, device: torch.device | str, cols: int = 1) -> torch.Tensor:
    return ((torch.rand(n, cols, device=device, dtype=torch.float64) * 2 - 1) * m).squeeze(1)


def draw(
    items: Sequence[str], *, n: int, height: int, width: int, crop: int, device: torch.device | str = "cpu"
) -> list[Draw]:
    """Every augmentation's parameters for n images of height x width, one draw per image."""
    out = []
    h, w = (
        torch.full((n,), float(height), device=device, dtype=torch.float64),
        torch.full((n,), float(width), device=device, dtype=torch.float64),
    )
    for name, magnitude in check_augmentations(items):
        m = 0.0 if magnitude is None else magnitude  # None: crop and corners, which do not read it
        if name in ("flip", "invert"):
            value = torch.rand(n, device=device) < m
        elif name == "crop":
            # whole-pixel offsets uniform over the windows that fit (RandomCrop); after corners the side varies
            u = torch.rand(n, 2, device=device, dtype=torch.float64)
            value = (u * (torch.stack([w, h], 1) - crop + 1)).floor()
            h, w = torch.full_like(h, crop), torch.full_like(w, crop)
        elif name == "corners":
            value = torch.randint(0, 5, (n,), device=device)
            h, w = torch.where(value > 0, crop, h), torch.where(value > 0, crop, w)
        elif name == "shift":
            value = (_uniform(n, m, device, 2) * torch.stack([w, h], 1)).round()
        elif name == "color":
            value = torch.cat(
                [1 + _uniform(n, m, device, 2).view(n, 2), (torch.rand(n, 1, device=device) < 0.5).double()], 1
            )
        elif name == "noise":
            value = None  # per pixel, drawn where it is added
        else:  # rotate, shear (degrees), scale, brightness (factor around 1)
            value = _uniform(n, m, device) + (1 if name in ("scale", "brightness") else 0)
        out.append(Draw(name, magnitude, value))
    return out


def _about(centre: torch.Tensor, linear: torch.Tensor) -> torch.Tensor:
    """(N, 2) centres, (N, 2, 2) linear maps -> (N, 3, 3) affine maps fixing the centres."""
    a = torch.eye(3, dtype=linear.dtype, device=linear.device).repeat(len(linear), 1, 1)
    a[:, :2, :2] = linear
    a[:, :2, 2] = centre - (linear @ centre.unsqueeze(-1)).squeeze(-1)
    return a


def _translation(t: torch.Tensor) -> torch.Tensor:
    a = torch.eye(3, dtype=t.dtype, device=t.device).repeat(len(t), 1, 1)
    a[:, :2, 2] = t
    return a


def _geometry(
    draws: Sequence[Draw], *, n: int, height: int, width: int, crop: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward map of each image (N, 3, 3), input pixel coordinates (pixel i spans [i, i+1)) to output ones,
    and each output's (width, height) (N, 2)."""
    size = torch.tensor([float(width), float(height)], device=device, dtype=torch.float64).repeat(n, 1)
    forward = torch.eye(3, device=device, dtype=torch.float64).repeat(n, 1, 1)
    for d in draws:
        if not AUGMENTATIONS[d.name].geometric:
            continue
        assert d.value is not None  # only noise, not geometric, draws no value
        centre = size / 2
        if d.name == "flip":
            step = _about(
                centre, torch.diag_embed(torch.stack([1 - 2 * d.value.double(), torch.ones_like(centre[:, 0])], 1))
            )
        elif d.name == "crop":
            step, size = _translation(-d.value), torch.full_like(size, crop)
        elif d.name == "corners":
            right, bottom = d.value.remainder(2) == 0, d.value >= 3  # 2 top_right, 3 bottom_left, 4 bottom_right
            offset = torch.stack(
                [
                    torch.where(right & (d.value > 0), size[:, 0] - crop, 0.0),
                    torch.where(bottom, size[:, 1] - crop, 0.0),
                ],
                1,
            )
            step, size = _translation(-offset), torch.where((d.value > 0).unsqueeze(1), float(crop), size)
        elif d.name == "shift":
            step = _translation(d.value)
        else:
            v = d.value.double()
            if d.name == "rotate":
                c, s = torch.cos(torch.deg2rad(v)), torch.sin(torch.deg2rad(v))
                linear = torch.stack([torch.stack([c, s], 1), torch.stack([-s, c], 1)], 1)
            elif d.name == "scale":
                linear = torch.diag_embed(torch.stack([v, v], 1))
            else:  # shear along x
                linear = torch.eye(2, dtype=v.dtype, device=device).repeat(n, 1, 1)
                linear[:, 0, 1] = torch.tan(torch.deg2rad(v))
            step = _about(centre, linear)
        forward = step @ forward
    return forward, size


def _resample(x: torch.Tensor, forward: torch.Tensor, size: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Float (N, 3, H, W) through each image's forward map, one grid_sample per distinct output size ->
    [(row indices, images of that size)]."""
    h, w = x.shape[-2:]
    to_norm_in = torch.tensor([[2 / w, 0, -1], [0, 2 / h, -1], [0, 0, 1]], dtype=torch.float64, device=x.device)
    out = []
    for wh in torch.unique(size, dim=0):
        rows = (size == wh).all(1).nonzero().squeeze(1)
        ow, oh = int(wh[0]), int(wh[1])
        from_norm_out = torch.tensor(
            [[ow / 2, 0, ow / 2], [0, oh / 2, oh / 2], [0, 0, 1]], dtype=torch.float64, device=x.device
        )
        theta = (to_norm_in @ torch.linalg.inv(forward[rows]) @ from_norm_out)[:, :2].to(x.dtype)
        grid = F.affine_grid(theta, [len(rows), x.shape[1], oh, ow], align_corners=False)
        out.append((rows, F.grid_sample(x[rows], grid, mode="bilinear", padding_mode="zeros", align_corners=False)))
    return out


def _contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    # as torchvision: a blend with the mean of the grayscale image
    gray = (x * torch.tensor([0.2989, 0.587, 0.114], device=x.device, dtype=x.dtype).view(1, 3, 1, 1)).sum(1)
    mean = gray.mean((1, 2)).view(-1, 1, 1, 1)
    return (factor * x + (1 - factor) * mean).clamp(0, 1)


def _colour(x: torch.Tensor, d: Draw) -> torch.Tensor:
    """One colour augmentation on float images in [0, 1]; d.value holds these images' rows."""
    per_image = lambda v: v.to(x.dtype).view(-1, 1, 1, 1)  # noqa: E731
    if d.name == "noise":
        assert d.magnitude is not None  # noise always has one (AUGMENTATIONS' default)
        return (x + d.magnitude * torch.randn_like(x)).clamp(0, 1)
    assert d.value is not None  # every colour augmentation but noise draws one value per image
    if d.name == "invert":
        return torch.where(per_image(d.value) > 0, 1 - x, x)
    if d.name == "brightness":
        return (x * per_image(d.value)).clamp(0, 1)
    b, c, first = (per_image(d.value[:, i]) for i in range(3))
    return torch.where(first > 0, _contrast((x * b).clamp(0, 1), c), (_contrast(x, c) * b).clamp(0, 1))


def apply_draws(images: torch.Tensor, draws: Sequence[Draw], *, crop: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """uint8 (N, 3, H, W) and their draws -> [(row indices, augmented float images in [0, 1])], one entry per
    output size (two at most: crop or corners)."""
    x = images.float() / 255
    n, rows = len(x), torch.arange(len(x), device=x.device)
    geometric = [i for i, d in enumerate(draws) if AUGMENTATIONS[d.name].geometric]
    last = geometric[-1] if geometric else -1
    before = [d for i, d in enumerate(draws) if i < last and not AUGMENTATIONS[d.name].geometric and d.name != "noise"]
    after = [d for i, d in enumerate(draws) if i > last and d.name != "noise"] + [d for d in draws if d.name == "noise"]
    for d in before:
        x = _colour(x, d)
    if geometric:
        forward, size = _geometry(draws, n=n, height=x.shape[-2], width=x.shape[-1], crop=crop, device=x.device)
        groups = _resample(x, forward, size)
    else:
        groups = [(rows, x)]
    return [(r, _finish(g, r, after)) for r, g in groups]


def _finish(x: torch.Tensor, rows: torch.Tensor, draws: Sequence[Draw]) -> torch.Tensor:
    for d in draws:
        x = _colour(x, d._replace(value=None if d.value is None else d.value[rows]))
    return x


class Augment:
    """The training input pipeline: augment, upsample, normalise, then MixUp/CutMix on the whole batch.

    Called with uint8 images (B, H, W, 3) and int64 labels on the device; returns channels_last float images
    and targets: the labels, or (B, num_classes) soft labels when mixup or cutmix is on.
    """

    def __init__(
        self,
        items: Sequence[str],
        *,
        crop: int,
        size: int,
        mean: Sequence[float],
        std: Sequence[float],
        num_classes: int,
        mixup: float = 0.0,
        cutmix: float = 0.0,
    ):
        check_augmentations(items)
        self.items, self.crop = list(items), crop
        self.size, self.mean, self.std = size, list(mean), list(std)
        mixers = ([v2.MixUp(alpha=mixup, num_classes=num_classes)] if mixup > 0 else []) + (
            [v2.CutMix(alpha=cutmix, num_classes=num_classes)] if cutmix > 0 else []
        )
        self.mix = v2.RandomChoice(mixers) if mixers else None

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = images.permute(0, 3, 1, 2)
        n, _, h, w = x.shape
        draws = draw(self.items, n=n, height=h, width=w, crop=self.crop, device=x.device)
        groups = apply_draws(x, draws, crop=self.crop)
        normalise = partial(to_input, size=self.size, mean=self.mean, std=self.std)
        if len(groups) == 1:
            x = normalise(groups[0][1])
        else:
            x = torch.empty(n, 3, self.size, self.size, device=images.device)
            for rows, g in groups:
                x[rows] = normalise(g)
        if self.mix is not None:
            x, labels = self.mix(x, labels)
        return x.contiguous(memory_format=torch.channels_last), labels
