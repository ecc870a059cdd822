"""featx probe's 12-head sweep vs 12 scikit-learn LogisticRegression fits, on the same feature file.

    python benchmarks/probe.py --features features/r50.h5          # a file with train and val splits
    python benchmarks/probe.py                                      # extracts one first (see --data)

featx trains lr {1e-4, 3e-4, 6.5e-4, 1e-3} x weight decay {0, 1e-3, 1.16e-2} with every other option at the
`featx probe` default (10 epochs, batch 100, label smoothing 0.1, one random stored view per image and
step, val softmax averaged over the views). scikit-learn fits lbfgs multinomial logistic regression (its
defaults, max_iter 100) once per C in logspace(-4, 2, 12) on the full-image view. Each side runs in its own
process, timed from reading the features to having the val accuracy of every model, and reports its peak
RSS. Without --features, ResNet-50 features (seeded random init, 64 px, views full+flip: 2048-d) of the
shared zip's train and val splits are extracted once into --cache.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED_ZIP = REPO.parent / "shared" / "data" / "tiny-imagenet-200-train100.zip"
LRS = (1e-4, 3e-4, 6.5e-4, 1e-3)
WEIGHT_DECAYS = (0.0, 1e-3, 1.16e-2)
CS = tuple(float(c) for c in np.logspace(-4, 2, 12))


def run_featx(features: Path) -> dict:
    from featx.features import load_features
    from featx.probe import grid, train

    start = time.perf_counter()
    result = train(load_features(features, "train"), val=load_features(features, "val"),
                   heads=grid(lr=LRS, weight_decay=WEIGHT_DECAYS), device="cpu")
    best = result.best_metrics
    return {"seconds": time.perf_counter() - start, "models": len(result.configs), "best_val_top1": best["val_top1"],
            "best": result.configs[result.best].label(), "best_epoch": result.best_epoch}


def run_sklearn(features: Path) -> dict:
    from sklearn.linear_model import LogisticRegression

    from featx.features import load_features

    start = time.perf_counter()
    tr, va = load_features(features, "train", views="full"), load_features(features, "val", views="full")
    x, xv = tr.features[:, 0].astype(np.float32), va.features[:, 0].astype(np.float32)
    scores, iters = {}, {}
    for c in CS:
        model = LogisticRegression(C=c).fit(x, tr.labels)
        scores[c], iters[c] = float(model.score(xv, va.labels)), int(model.n_iter_[0])
    best = max(scores, key=scores.get)
    return {"seconds": time.perf_counter() - start, "models": len(CS), "best_val_top1": scores[best],
            "best": f"C={best:g}", "iterations": list(iters.values())}


def child(part: str, features: Path) -> dict:
    """Run one side in a fresh process, so that its time and peak RSS are its own."""
    out = subprocess.run([sys.executable, __file__, "--part", part, "--features", str(features)],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def make_features(cache: Path, data: Path) -> Path:
    from featx import extract_features

    return extract_features(data=data, backbone="resnet50", weights="none", size=64, views="flip",
                            splits=["train", "val"], out=cache, progress=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--features", type=Path, help="feature file with train and val splits")
    ap.add_argument("--data", type=Path, default=SHARED_ZIP, help="dataset to extract from without --features")
    ap.add_argument("--cache", type=Path, default=REPO / "benchmarks" / ".cache" / "resnet50-random-64-flip.h5")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--part", choices=["featx", "sklearn"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    features = args.features or make_features(args.cache, args.data)
    if args.part:
        result = (run_featx if args.part == "featx" else run_sklearn)(features)
        result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(result))
        return

    from featx.features import read_meta
    meta = read_meta(features)
    print(f"features: {features} ({meta.backbone}, weights {meta.weights}, views {meta.views})", flush=True)
    results = {"featx": child("featx", features), "sklearn": child("sklearn", features)}
    ours, theirs = results["featx"], results["sklearn"]
    results["speedup"] = theirs["seconds"] / ours["seconds"]
    results["val_top1_difference"] = ours["best_val_top1"] - theirs["best_val_top1"]
    for name, r in (("featx sweep", ours), ("sklearn fits", theirs)):
        print(f"{name:13} {r['models']:3d} models {r['seconds']:8.1f} s  best val top-1 {r['best_val_top1']:.2%} "
              f"({r['best']})  peak RSS {r['peak_rss_mib']:.0f} MiB")
    print(f"speedup {results['speedup']:.1f}x, val top-1 featx - sklearn {results['val_top1_difference']:+.2%}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
