"""Extraction throughput: `featx extract` against the pipeline one writes first, on the same images.

    python benchmarks/extract.py [--backbone inception_v3] [--classes 20 --per-class 10] [--views full]
                                 [--precision auto|fp32|bf16|int8] [--compile auto|on|off]

The naive pipeline: a torchvision DataLoader over the JPEG files (extracted from the zip outside the timing),
PIL `Resize` to the input size, `ToTensor`, `Normalize`, the fp32 NCHW model under torch.no_grad. featx reads
the decoded cache (made outside the timing; benchmarks/decode.py measures decoding) and does everything
else: uint8 to the device, views, upsampling and normalisation there, channels_last, folded BatchNorm,
autocast where the hardware has it, HDF5 output. Both sides use the same weights (`--weights none` is
seeded) and run in their own process. Throughput counts every view; the cosine similarity compares the
two pipelines' features of the full view, image by image. The ratio is steady state: featx's one-off
compilation (the first forward pass's excess over the typical one, with --compile on) is excluded there and
included in the line after; with --precision int8 the one-off is the quantization (calibration on 128 train
images, then compilation). The naive side is fp32 and eager whatever featx's --precision and --compile.
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
    import statistics

    import featx.features.extract
    from featx import extract_features
    from featx.features.store import load_features, read_meta

    # Time every forward pass: the first one's excess over the typical pass is the one-off compilation.
    forward, passes = featx.features.extract._forward_views, []

    def timed(*a, **kw):
        t = time.perf_counter()
        y = forward(*a, **kw)
        passes.append(time.perf_counter() - t)
        return y

    featx.features.extract._forward_views = timed
    # int8: calibrating and compiling the quantized model happen before the first pass
    quantize, quantizing = featx.features.extract._int8_frozen, []

    def timed_quantize(*a, **kw):
        t = time.perf_counter()
        out = quantize(*a, **kw)
        quantizing.append(time.perf_counter() - t)
        return out

    featx.features.extract._int8_frozen = timed_quantize
    start = time.perf_counter()
    extract_features(
        data=args.cache,
        backbone=args.backbone,
        weights=args.weights,
        size=args.size,
        views=args.views,
        splits=["train"],
        precision=args.precision,
        compile=args.compile,
        dtype="float32",
        batch_size=args.batch_size,
        device=args.device,
        out=args.out,
        progress=False,
    )
    seconds = time.perf_counter() - start
    f = load_features(args.out, "train")
    meta = read_meta(args.out)
    compiled = meta.compile == "on" and len(passes) > 1  # an eager first pass's excess is warm-up, in both sides
    one_off = max(0.0, passes[0] - statistics.median(passes[1:])) if compiled else 0.0
    one_off += sum(quantizing)
    return {
        "seconds": seconds,
        "one_off": one_off,
        "images": len(f.ids),
        "views": f.features.shape[1],
        "precision": meta.precision,
        "compile": meta.compile,
    }


def run_naive(args) -> dict:
    import numpy as np
    import torch
    from PIL import Image
    from torch.utils.data import DataLoader
    from torchvision import transforms

    from featx.nets.backbones import create_backbone

    start = time.perf_counter()
    bb = create_backbone(args.backbone, weights=args.weights, size=args.size)
    model = bb.model.eval().to(args.device)
    tf = transforms.Compose(
        [
            transforms.Resize((bb.input_size, bb.input_size)),
            transforms.ToTensor(),
            transforms.Normalize(bb.mean, bb.std),
        ]
    )
    files = Path(args.files).read_text().split("\n")
    loader = DataLoader(
        [(f, tf) for f in files],
        batch_size=args.batch_size or 32,
        num_workers=2,
        collate_fn=lambda batch: torch.stack([t(Image.open(f).convert("RGB")) for f, t in batch]),
    )
    feats = []
    with torch.no_grad():
        for x in loader:
            feats.append(model(x.to(args.device)).cpu().numpy())
    seconds = time.perf_counter() - start
    np.save(args.out, np.concatenate(feats))
    return {"seconds": seconds, "one_off": 0.0, "images": len(files), "views": 1, "precision": "fp32", "compile": "off"}


def view_gflops(args) -> float:
    """Convolution and matmul work of the backbone on one view, counted by torch's FlopCounterMode."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from featx.nets.backbones import create_backbone

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
    ap.add_argument(
        "--batch-size",
        type=int,
        help="images per batch on both sides [default: featx's own default; 32 for the naive loader]",
    )
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16", "int8"], help="featx's")
    ap.add_argument("--compile", default="auto", choices=["auto", "on", "off"], help="featx's")
    ap.add_argument("--side", choices=["featx", "naive"], help=argparse.SUPPRESS)
    ap.add_argument("--cache", help=argparse.SUPPRESS)
    ap.add_argument("--files", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.side:
        print(json.dumps(run_featx(args) if args.side == "featx" else run_naive(args)))
        return

    import numpy as np

    from featx.data.cache import prepare_cache, read_split
    from featx.features.store import load_features

    common_args = [
        "--backbone",
        args.backbone,
        "--weights",
        args.weights,
        "--device",
        args.device,
        "--precision",
        args.precision,
        "--compile",
        args.compile,
        *(["--size", str(args.size)] if args.size else []),
        *(["--batch-size", str(args.batch_size)] if args.batch_size else []),
    ]
    with tempfile.TemporaryDirectory() as tmp:
        cache = prepare_cache(
            args.zip, cache=f"{tmp}/cache.h5", classes=args.classes, per_class=args.per_class, progress=False
        )
        split = read_split(cache, "train")
        with zipfile.ZipFile(args.zip) as z:
            members = {Path(n).name: n for n in z.namelist() if "/train/" in n}
            files = [z.extract(members[i], tmp) for i in split.ids]
        Path(f"{tmp}/files.txt").write_text("\n".join(files))
        featx = common.measure(
            __file__,
            ["--side", "featx", "--cache", str(cache), "--views", args.views, "--out", f"{tmp}/featx.h5", *common_args],
        )
        naive = common.measure(
            __file__, ["--side", "naive", "--files", f"{tmp}/files.txt", "--out", f"{tmp}/naive.npy", *common_args]
        )
        a = load_features(f"{tmp}/featx.h5", "train").features[:, 0].astype(np.float64)
        b = np.load(f"{tmp}/naive.npy").astype(np.float64)
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    rates, steady = {}, {}
    for name, r in (("featx", featx), ("naive", naive)):
        rates[name] = r["images"] * r["views"] / r["seconds"]
        steady[name] = r["images"] * r["views"] / (r["seconds"] - r["one_off"])
        print(
            f"{name:<6} {r['images']} images x {r['views']} views in {r['seconds']:.1f} s = "
            f"{rates[name]:.1f} views/s ({steady[name]:.1f} steady), {r['precision']}, compile "
            f"{r['compile']}, peak RSS {r['peak_rss'] / 2**20:.0f} MiB"
        )
    print(
        f"ratio  featx / naive = {steady['featx'] / steady['naive']:.2f}x steady state, featx's one-off "
        f"compilation excluded ({args.backbone} at {args.size or 'its default size'}, {args.device}, "
        f"{common.machine()})"
    )
    print(
        f"       with it: {featx['one_off']:.1f} s compiling (int8: quantizing), "
        f"featx / naive = {rates['featx'] / rates['naive']:.2f}x"
    )
    if args.device == "cpu":
        flops, peaks = view_gflops(args), common.matmul_peaks()
        print(
            f"work   {flops:.2f} GFLOP per view: featx {steady['featx'] * flops:.0f} GFLOP/s steady "
            f"({featx['precision']}), naive {steady['naive'] * flops:.0f} GFLOP/s (fp32); this CPU's matmul "
            "peak " + ", ".join(f"{p} {g:.0f} GFLOP/s" for p, g in peaks.items())
        )
    print(f"cosine(featx full view, naive) over {len(cos)} images: min {cos.min():.4f}, mean {cos.mean():.4f}")


if __name__ == "__main__":
    main()
