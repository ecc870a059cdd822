"""Decode throughput: `featx data prepare` (zip read in place, worker processes, HDF5) against a plain loop.

    python benchmarks/decode.py [--zip PATH] [--repeat 2]

The loop is what one writes first: extract the zip (outside the timing), then PIL.Image.open every file,
convert to RGB (grayscale images would not stack otherwise), np.asarray, np.stack. Each side runs in its own
process, `--repeat` times alternately; the best time counts. Peak RSS is the largest sum over the side's
process tree (featx's workers included), sampled from /proc every 10 ms, and so is the CPU time of that tree
(start-up included): on a machine shared with other jobs the CPU time per image is the steadier number.
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


def run_featx(zip_path: str, cache: str) -> dict:
    from featx.data.cache import cache_info, prepare_cache

    start = time.perf_counter()
    prepare_cache(zip_path, cache=cache, progress=False)
    seconds = time.perf_counter() - start
    info = cache_info(cache)
    return {"seconds": seconds, "images": sum(info["splits"].values()), "bytes": info["size_bytes"]}


def run_loop(folder: str) -> dict:
    import numpy as np
    from PIL import Image

    start = time.perf_counter()
    files = sorted(Path(folder).rglob("*.JPEG"))
    images = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])
    return {"seconds": time.perf_counter() - start, "images": len(images), "bytes": images.nbytes}


def measure(args: list[str]) -> dict:
    result = common.measure(__file__, args)
    return {**result, "rate": result["images"] / result["seconds"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--zip", type=Path, default=SHARED_ZIP)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--side", choices=["featx", "loop"], help=argparse.SUPPRESS)  # internal: one side
    parser.add_argument("--target", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        print(json.dumps(run_featx(str(args.zip), args.target) if args.side == "featx" else run_loop(args.target)))
        return

    with tempfile.TemporaryDirectory() as tmp:
        with zipfile.ZipFile(args.zip) as z:
            z.extractall(tmp)
        runs: dict[str, list[dict]] = {"featx": [], "loop": []}
        for i in range(args.repeat):
            cache = f"{tmp}/cache-{i}.h5"  # a fresh path each time: no reuse of an earlier run's cache
            runs["featx"].append(measure(["--side", "featx", "--zip", str(args.zip), "--target", cache]))
            runs["loop"].append(measure(["--side", "loop", "--target", tmp]))
    best = {side: max(r, key=lambda x: x["rate"]) for side, r in runs.items()}
    f, loop = best["featx"], best["loop"]
    assert f["images"] == loop["images"], (f["images"], loop["images"])
    for side, r in best.items():
        rates = ", ".join(f"{x['rate']:.0f}" for x in runs[side])
        cpu_ms = 1000 * min(x["cpu"] for x in runs[side]) / r["images"]
        print(
            f"{side:<6} {r['images']} images in {r['seconds']:.2f} s = {r['rate']:.0f} images/s "
            f"(runs: {rates}), peak RSS {max(x['peak_rss'] for x in runs[side]) / 2**20:.0f} MiB, "
            f"CPU {cpu_ms:.3f} ms/image"
        )
    print(f"ratio  featx / loop = {f['rate'] / loop['rate']:.2f}x (target >= 2x) on {common.machine()}")
    print(
        f"cache  {f['bytes'] / 2**20:.1f} MiB vs raw uint8 pixels {loop['bytes'] / 2**20:.1f} MiB "
        f"= {100 * (f['bytes'] / loop['bytes'] - 1):+.2f}% (target <= +5%)"
    )


if __name__ == "__main__":
    main()
