"""Training augmentation throughput: featx's per-image batched pipeline against two peers, on the same batches.

    python benchmarks/augment.py [--batch 128] [--batches 20] \
        [--aug invert,brightness,noise,flip,rotate,scale,shift,shear]

- `batched`: featx.nets.augment.Augment, every image its own parameters, one grid_sample per output size.
- `groups16`: the pipeline featx had before issue 23 (kept here only, as the peer): the batch split into 16
  groups, each one torchvision.transforms.v2 call, so every 8 consecutive images of 128 shared one draw.
- `loop`: the per-image version one writes first: a Python loop calling the same v2 transforms on each image.

All three end in featx.nets.views.to_input (resize to --size, normalise). Each side runs in its own process on the
same seeded uint8 batches of --side-px images on the CPU; the first batch is a warm-up. Peak RSS is sampled
from /proc (benchmarks/common.py). Prints images/s, the ratios and the CPU's vector flags.
"""

from __future__ import annotations

import argparse
import json
import time
from functools import partial

import common

SIDES = ("batched", "groups16", "loop")


def _old_pixel_transform(items: list[str], crop: int):
    """The pre-issue-23 featx.nets.augment.pixel_transform: one v2.Compose, one random draw per call."""
    import torch
    from torchvision.transforms import v2

    from featx.nets.augment import check_augmentations
    from featx.nets.views import VIEW_SETS, crop_view

    corners = v2.RandomChoice([v2.Lambda(partial(crop_view, name=n, crop=crop)) for n in VIEW_SETS["ten"][:5]])
    make = {
        "flip": lambda p: v2.RandomHorizontalFlip(p),
        "crop": lambda _: v2.RandomCrop(crop),
        "corners": lambda _: corners,
        "color": lambda m: v2.ColorJitter(brightness=m, contrast=m),
        "brightness": lambda m: v2.ColorJitter(brightness=m),
        "rotate": lambda deg: v2.RandomRotation(deg),
        "scale": lambda m: v2.RandomAffine(0, scale=(1 - m, 1 + m)),
        "shift": lambda m: v2.RandomAffine(0, translate=(m, m)),
        "shear": lambda deg: v2.RandomAffine(0, shear=(-deg, deg)),
        "invert": lambda p: v2.RandomInvert(p=p),
        "noise": lambda sigma: v2.GaussianNoise(sigma=sigma),
    }
    augs = check_augmentations(items)
    return v2.Compose(
        [
            *(make[n](m) for n, m in augs if n != "noise"),
            v2.ToDtype(torch.float32, scale=True),
            *(make[n](m) for n, m in augs if n == "noise"),
        ]
    )


def make_side(side: str, items: list[str], *, crop: int, size: int):
    import torch

    from featx.nets.augment import Augment
    from featx.nets.views import to_input

    kw = dict(size=size, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    if side == "batched":
        aug = Augment(items, crop=crop, num_classes=200, **kw)
        return lambda images: aug(images, torch.zeros(len(images), dtype=torch.long))[0]
    pixels = _old_pixel_transform(items, crop)

    def run(images: torch.Tensor) -> torch.Tensor:
        x = images.permute(0, 3, 1, 2)
        chunks = x.tensor_split(16) if side == "groups16" else x.split(1)
        return torch.cat([to_input(pixels(c), **kw) for c in chunks])

    return run


def run_side(side: str, items: list[str], *, batch: int, batches: int, px: int, crop: int, size: int) -> dict:
    import torch

    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, 256, (batches + 1, batch, px, px, 3), generator=g, dtype=torch.uint8)
    fn = make_side(side, items, crop=crop, size=size)
    torch.manual_seed(0)
    fn(data[0])
    start = time.perf_counter()
    for b in data[1:]:
        fn(b)
    seconds = time.perf_counter() - start
    return {"images": batch * batches, "seconds": seconds, "threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--aug", default="invert,brightness,noise,flip,rotate,scale,shift,shear")
    parser.add_argument("--side-px", type=int, default=64, help="the stored images' side")
    parser.add_argument("--crop", type=int, default=56)
    parser.add_argument("--size", type=int, default=64, help="the network's input size")
    parser.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)  # internal: one side
    args = parser.parse_args()
    items = args.aug.split(",")
    kw = dict(batch=args.batch, batches=args.batches, px=args.side_px, crop=args.crop, size=args.size)
    if args.side:
        print(json.dumps(run_side(args.side, items, **kw)))
        return
    passed = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k != "side"]
    results = {side: common.measure(__file__, [*passed, f"--side={side}"]) for side in SIDES}
    for side, r in results.items():
        r["rate"] = r["images"] / r["seconds"]
        print(
            f"{side:<9} {r['images']} images in {r['seconds']:.2f} s = {r['rate']:.0f} images/s, "
            f"peak RSS {r['peak_rss'] / 2**20:.0f} MiB, {r['threads']} threads"
        )
    b = results["batched"]["rate"]
    print(
        f"ratio     batched / groups16 = {b / results['groups16']['rate']:.2f}x, "
        f"batched / loop = {b / results['loop']['rate']:.2f}x"
    )
    print(f"--aug {args.aug}, batch {args.batch}, {args.side_px} px -> {args.size} px, CPU flags: {common.machine()}")


if __name__ == "__main__":
    main()
