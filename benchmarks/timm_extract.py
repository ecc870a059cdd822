"""timm backbones: `featx extract` against timm's own plain loop, on the same images, model and weights.

    python benchmarks/timm_extract.py [--backbones timm:vit_small_patch16_224,timm:resnet50] [--size 224]
                                      [--classes 10 --per-class 10]

timm's loop is what its documentation shows: `timm.create_model`, the eval transform from
`resolve_data_config` (PIL bicubic resize, centre crop at crop_pct 1.0 so both sides see the whole image,
ToTensor, Normalize) in a DataLoader over the JPEG files, `forward_head(forward_features(x),
pre_logits=True)` under torch.no_grad. featx side: as in benchmarks/extract.py (decoded cache, uint8 to the
device, bilinear upsampling there, BatchNorm folded, channels_last, HDF5 output). Both use `--weights none`
seeded with 0, each in its own process; the cosine compares their features image by image (bicubic vs
bilinear upsampling keeps it a little under 1).
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
from extract import run_featx, view_gflops


def run_timm(args) -> dict:
    import numpy as np
    import timm
    import torch
    from PIL import Image
    from torch.utils.data import DataLoader

    start = time.perf_counter()
    torch.manual_seed(0)
    model = timm.create_model(args.backbone.removeprefix("timm:"), num_classes=0).eval()
    if args.size and hasattr(model, "set_input_size"):
        model.set_input_size(img_size=args.size)
    config = timm.data.resolve_data_config(model=model)
    if args.size:
        config["input_size"] = (3, args.size, args.size)
    tf = timm.data.create_transform(**{**config, "crop_pct": 1.0})
    files = Path(args.files).read_text().split("\n")
    loader = DataLoader(
        files,
        batch_size=args.batch_size or 32,
        num_workers=2,
        collate_fn=lambda batch: torch.stack([tf(Image.open(f).convert("RGB")) for f in batch]),
    )
    feats = []
    with torch.no_grad():
        for x in loader:
            feats.append(model.forward_head(model.forward_features(x), pre_logits=True).numpy())
    seconds = time.perf_counter() - start
    np.save(args.out, np.concatenate(feats))
    return {"seconds": seconds, "images": len(files), "views": 1}


def compare(args, backbone: str, cache: Path, files: Path, tmp: str) -> None:
    import numpy as np

    from featx.features.store import load_features

    side = [
        "--backbone",
        backbone,
        "--weights",
        "none",
        "--device",
        "cpu",
        *(["--size", str(args.size)] if args.size else []),
        *(["--batch-size", str(args.batch_size)] if args.batch_size else []),
    ]
    featx = common.measure(
        __file__, ["--side", "featx", "--cache", str(cache), "--views", "full", "--out", f"{tmp}/featx.h5", *side]
    )
    plain = common.measure(__file__, ["--side", "timm", "--files", str(files), "--out", f"{tmp}/timm.npy", *side])
    a = load_features(f"{tmp}/featx.h5", "train").features[:, 0].astype(np.float64)
    b = np.load(f"{tmp}/timm.npy").astype(np.float64)
    Path(f"{tmp}/featx.h5").unlink()
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    rates = {}
    for name, r in (("featx", featx), ("timm", plain)):
        rates[name] = r["images"] / r["seconds"]
        print(
            f"{backbone:<30} {name:<6} {r['images']} images in {r['seconds']:.1f} s = {rates[name]:.1f} img/s, "
            f"peak RSS {r['peak_rss'] / 2**20:.0f} MiB, CPU {r['cpu']:.0f} s"
        )
    args.backbone = backbone
    print(
        f"{backbone:<30} ratio featx / timm = {rates['featx'] / rates['timm']:.2f}x at "
        f"{args.size or 'its default size'}, {view_gflops(args):.2f} GFLOP per image; cosine min "
        f"{cos.min():.4f}, mean {cos.mean():.4f}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--zip", type=Path, default=SHARED_ZIP)
    ap.add_argument("--backbones", default="timm:vit_small_patch16_224,timm:resnet50")
    ap.add_argument("--size", type=int)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--per-class", type=int, default=10)
    ap.add_argument(
        "--batch-size",
        type=int,
        help="images per batch on both sides [default: featx's own default; 32 for timm's loader]",
    )
    ap.add_argument("--side", choices=["featx", "timm"], help=argparse.SUPPRESS)
    for hidden in ("--backbone", "--weights", "--device", "--views", "--cache", "--files", "--out"):
        ap.add_argument(hidden, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.side:
        print(json.dumps(run_featx(args) if args.side == "featx" else run_timm(args)))
        return

    from featx.data.cache import prepare_cache, read_split

    with tempfile.TemporaryDirectory() as tmp:
        cache = prepare_cache(
            args.zip, cache=f"{tmp}/cache.h5", classes=args.classes, per_class=args.per_class, progress=False
        )
        with zipfile.ZipFile(args.zip) as z:
            members = {Path(n).name: n for n in z.namelist() if "/train/" in n}
            files = [z.extract(members[i], tmp) for i in read_split(cache, "train").ids]
        Path(f"{tmp}/files.txt").write_text("\n".join(files))
        print(
            f"{len(files)} images, CPU, {common.machine()}, fp32 matmul peak {common.matmul_peak_gflops():.0f} GFLOP/s"
        )
        for backbone in args.backbones.split(","):
            compare(args, backbone, cache, Path(f"{tmp}/files.txt"), tmp)


if __name__ == "__main__":
    main()
