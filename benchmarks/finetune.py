"""Training throughput of `featx finetune` vs a plain torchvision loop, same backbone, same images, same run.

    python benchmarks/finetune.py                                        # resnet18 at 112 px on CPU
    python benchmarks/finetune.py --backbone resnet50 --size 224 --classes 200 --per-class 100 --batch-size 256

featx: the decoded uint8 cache in memory, random crop + flip + upsampling + normalisation on the device,
channels_last, --precision (auto: bf16 where the hardware has it, on CPUs with AVX-512 BF16 or AMX too) and
--compile (auto: when the steps repay compiling) as given; each prints what ran. Plain loop: torchvision
ImageFolder over the same JPEG files extracted from the zip to a temp dir, PIL RandomCrop + flip + Resize +
ToTensor + Normalize on DataLoader workers, fp32, eager. Both train the backbone from random init with Adam;
images/s is measured over the last training epoch (validation excluded; steady state, after any compilation),
each side in its own process with its peak RSS (workers included). The first epoch's excess over the last is the
one-off cost (compilation, warm-up); the line after the ratio includes it, over every epoch.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from common import SHARED_ZIP, machine, measure


def run_featx(args) -> dict:
    from featx.core import runs
    from featx.finetune.run import FinetuneConfig, finetune

    with tempfile.TemporaryDirectory() as out:
        config = FinetuneConfig(
            data=args.cache,
            backbone=args.backbone,
            weights="none",
            size=args.size,
            epochs=args.epochs,
            batch_size=args.batch_size,
            aug=["crop", "flip"],
            crop=56,
            device=args.device,
            precision=args.precision,
            compile=args.compile,
        )
        result = finetune(config, out=Path(out) / "run", progress=False)
        resolved = runs.read_run(Path(out) / "run").resolved
    return {
        "images_per_s": result.epochs[-1]["train_images_per_s"],
        "epoch_seconds": [r["seconds"] for r in result.epochs],
        **resolved,
    }


def run_plain(args) -> dict:
    import torch
    import torchvision
    from torchvision import transforms as T

    device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
    tf = T.Compose(
        [
            T.RandomCrop(56),
            T.RandomHorizontalFlip(),
            T.Resize(args.size),
            T.ToTensor(),
            T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
        ]
    )
    data = torchvision.datasets.ImageFolder(args.jpegs, transform=tf)
    loader = torch.utils.data.DataLoader(
        data,
        batch_size=args.batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=args.workers,
        pin_memory=device.type == "cuda",
        persistent_workers=args.workers > 0,
    )
    model = torchvision.models.get_model(args.backbone, num_classes=len(data.classes)).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    epoch_seconds = []
    for _ in range(args.epochs):
        start, seen = time.perf_counter(), 0
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            seen += len(y)
        if device.type == "cuda":
            torch.cuda.synchronize()
        epoch_seconds.append(time.perf_counter() - start)
    return {
        "images_per_s": seen / epoch_seconds[-1],
        "epoch_seconds": epoch_seconds,
        "precision": "fp32",
        "compile": "off",
    }


def extract_jpegs(zip_path: Path, cache: Path, classes: int, per_class: int, root: Path) -> Path:
    """The cache's train images as JPEG files in an ImageFolder layout (root/<wnid>/<file>)."""
    from featx.data.cache import dataset_info, read_split

    wnids = dataset_info(cache).wnids
    split = read_split(cache, "train", classes=classes, per_class=per_class)
    with zipfile.ZipFile(zip_path) as z:
        members = {Path(n).name: n for n in z.namelist() if "/train/" in n and n.endswith(".JPEG")}
        for name, label in zip(split.ids, split.labels):
            target = root / wnids[label] / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(z.read(members[name]))
    return root


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--zip", type=Path, default=SHARED_ZIP)
    ap.add_argument("--backbone", default="resnet18")
    ap.add_argument("--size", type=int, default=112)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--per-class", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=2, help="throughput is that of the last (the first warms up)")
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers of the plain loop")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"], help="featx's")
    ap.add_argument("--compile", default="auto", choices=["auto", "on", "off"], help="featx's")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--part", choices=["featx", "plain"], help=argparse.SUPPRESS)
    ap.add_argument("--cache", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--jpegs", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.part:
        print(json.dumps((run_featx if args.part == "featx" else run_plain)(args)))
        return

    from featx.data.cache import prepare_cache

    with tempfile.TemporaryDirectory() as tmp:
        cache = prepare_cache(
            args.zip, cache=Path(tmp) / "cache.h5", classes=args.classes, per_class=args.per_class, progress=False
        )
        jpegs = extract_jpegs(args.zip, cache, args.classes, args.per_class, Path(tmp) / "jpegs")
        common = [a for a in sys.argv[1:] if a != "--json"] + ["--cache", str(cache), "--jpegs", str(jpegs)]
        if args.json:  # its value too
            common.remove(str(args.json))
        results = {side: measure(__file__, [*common, "--part", side]) for side in ("featx", "plain")}
    ratio = results["featx"]["images_per_s"] / results["plain"]["images_per_s"]
    images = args.epochs * (args.classes * args.per_class // args.batch_size) * args.batch_size
    overall = {side: images / sum(r["epoch_seconds"]) for side, r in results.items()}
    images_in_run = args.classes * args.per_class
    print(f"{args.backbone} at {args.size} px, batch {args.batch_size}, {images_in_run} images; {machine()}")
    for side, r in results.items():
        print(
            f"{side:6} {r['images_per_s']:8.1f} images/s  {r['precision']}, compile {r['compile']}, "
            f"peak RSS {r['peak_rss'] / 2**20:6.0f} MiB"
        )
    print(f"featx / plain: {ratio:.2f}x steady state (last epoch; compilation excluded)")
    one_off = {side: max(0.0, r["epoch_seconds"][0] - r["epoch_seconds"][-1]) for side, r in results.items()}
    print(
        f"with the one-off cost (first epoch over last: featx {one_off['featx']:.1f} s, plain "
        f"{one_off['plain']:.1f} s), over all {args.epochs} epochs: featx / plain = "
        f"{overall['featx'] / overall['plain']:.2f}x"
    )
    if args.json:
        args.json.write_text(
            json.dumps({**results, "ratio": ratio, "args": {k: str(v) for k, v in vars(args).items()}}, indent=2) + "\n"
        )


if __name__ == "__main__":
    main()
