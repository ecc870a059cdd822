"""Extraction throughput: `featx extract` against the pipeline one writes first, on the same images.

    python benchmarks/extract.py [--backbone inception_v3] [--classes 20 --per-class 10] [--views full]

The naive pipeline: a torchvision DataLoader over the JPEG files (extracted from the zip outside the timing),
PIL `Resize` to the input size, `ToTensor`, `Normalize`, the fp32 NCHW model under torch.no_grad. featx reads
the decoded cache (made outside the timing; benchmarks/decode.py measures decoding) and does everything
else: uint8 to the device, views, upsampling and normalisation there, channels_last, folded BatchNorm,
autocast where the hardware has it, HDF5 output. Both sides use the same weights (`--weights none` is
seeded) and run in their own process. Throughput counts every view; the cosine similarity compares the
two pipelines' features of the full view, image by image.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import zipfile
from pathlib import Path

import common
from common import SHARED_ZIP


def run_featx(args) -> dict:
    from featx import extract_features

    start = time.perf_counter()
    extract_features(data=args.cache, backbone=args.backbone, weights=args.weights, size=args.size,
                     views=args.views, splits=["train"],
                     dtype="float32", batch_size=args.batch_size, device=args.device, out=args.out,
                     progress=False)
    seconds = time.perf_counter() - start
    from featx.features import load_features

    f = load_features(args.out, "train")
    return {"seconds": seconds, "images": len(f.ids), "views": f.features.shape[1]}


def run_naive(args) -> dict:
    import numpy as np
    import torch
    from PIL import Image
    from torch.utils.data import DataLoader
    from torchvision import transforms

    from featx.backbones import create_backbone

    start = time.perf_counter()
    bb = create_backbone(args.backbone, weights=args.weights, size=args.size)
    model = bb.model.eval().to(args.device)
    tf = transforms.Compose([transforms.Resize((bb.input_size, bb.input_size)), transforms.ToTensor(),
                             transforms.Normalize(bb.mean, bb.std)])
    files = Path(args.files).read_text().split("\n")
    loader = DataLoader([(f, tf) for f in files], batch_size=args.batch_size or 32, num_workers=2,
                        collate_fn=lambda batch: torch.stack([t(Image.open(f).convert("RGB")) for f, t in batch]))
    feats = []
    with torch.no_grad():
        for x in loader:
            feats.append(model(x.to(args.device)).cpu().numpy())
    seconds = time.perf_counter() - start
    np.save(args.out, np.concatenate(feats))
    return {"seconds": seconds, "images": len(files), "views": 1}


def view_gflops(args) -> float:
    """Convolution and matmul work of the backbone on one view, counted by torch's FlopCounterMode."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from featx.backbones import create_backbone

    bb = create_backbone(args.backbone, weights="none", size=args.size)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        bb.model.eval()(torch.zeros(1, 3, bb.input_size, bb.input_size))
    return counter.get_total_flops() / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--zip", type=Path, default=SHARED_ZIP)
    ap.add_argument("--backbone", default="inception_v3")
    ap.add_argument("--weights", default="none")
    ap.add_argument("--size", type=int)
    ap.add_argument("--views", default="full", choices=["full", "flip", "ten"])
    ap.add_argument("--classes", type=int, default=20)
    ap.add_argument("--per-class", type=int, default=10)
    ap.add_argument("--batch-size", type=int,
                    help="images per batch on both sides [default: featx's own default; 32 for the naive loader]")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--side", choices=["featx", "naive"], help=argparse.SUPPRESS)
    ap.add_argument("--cache", help=argparse.SUPPRESS)
    ap.add_argument("--files", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.side:
        print(json.dumps(run_featx(args) if args.side == "featx" else run_naive(args)))
        return

    import numpy as np

    from featx.data import prepare_cache, read_split
    from featx.features import load_features

    common_args = ["--backbone", args.backbone, "--weights", args.weights, "--device", args.device,
                   *(["--size", str(args.size)] if args.size else []),
                   *(["--batch-size", str(args.batch_size)] if args.batch_size else [])]
    with tempfile.TemporaryDirectory() as tmp:
        cache = prepare_cache(args.zip, cache=f"{tmp}/cache.h5", classes=args.classes, per_class=args.per_class,
                              progress=False)
        split = read_split(cache, "train")
        with zipfile.ZipFile(args.zip) as z:
            members = {Path(n).name: n for n in z.namelist() if "/train/" in n}
            files = [z.extract(members[i], tmp) for i in split.ids]
        Path(f"{tmp}/files.txt").write_text("\n".join(files))
        featx = common.measure(__file__, ["--side", "featx", "--cache", str(cache), "--views", args.views,
                                          "--out", f"{tmp}/featx.h5", *common_args])
        naive = common.measure(__file__, ["--side", "naive", "--files", f"{tmp}/files.txt",
                                          "--out", f"{tmp}/naive.npy", *common_args])
        a = load_features(f"{tmp}/featx.h5", "train").features[:, 0].astype(np.float64)
        b = np.load(f"{tmp}/naive.npy").astype(np.float64)
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    rates = {}
    for name, r in (("featx", featx), ("naive", naive)):
        rates[name] = r["images"] * r["views"] / r["seconds"]
        print(f"{name:<6} {r['images']} images x {r['views']} views in {r['seconds']:.1f} s = "
              f"{rates[name]:.1f} views/s, peak RSS {r['peak_rss'] / 2**20:.0f} MiB")
    print(f"ratio  featx / naive = {rates['featx'] / rates['naive']:.2f}x ({args.backbone} at "
          f"{args.size or 'its default size'}, {args.device}, {common.machine()})")
    if args.device == "cpu":
        flops, peak = view_gflops(args), common.matmul_peak_gflops()
        print(f"work   {flops:.2f} GFLOP per view: featx {rates['featx'] * flops:.0f} GFLOP/s, naive "
              f"{rates['naive'] * flops:.0f} GFLOP/s; this CPU's fp32 matmul peak {peak:.0f} GFLOP/s caps the "
              f"ratio at {peak / (rates['naive'] * flops):.2f}x")
    print(f"cosine(featx full view, naive) over {len(cos)} images: min {cos.min():.4f}, mean {cos.mean():.4f}")


if __name__ == "__main__":
    main()
