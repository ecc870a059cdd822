"""featx probe's 12-head sweep vs 12 scikit-learn LogisticRegression fits, on the same feature file.

    python benchmarks/probe.py --features features/r50-ten.h5    # any feature file with train and val splits
    python benchmarks/probe.py                                    # a synthetic stand-in, written once

featx trains lr {1e-4, 3e-4, 6.5e-4, 1e-3} x weight decay {0, 1e-3, 1.16e-2} with every other option at the
`featx probe` default (10 epochs, batch 100, label smoothing 0.1, one random stored view per image and
step, val softmax averaged over the views). scikit-learn fits lbfgs multinomial logistic regression (its
defaults, max_iter 100) once per C in logspace(-4, 2, 12) on the full-image view. Each side runs in its own
process, timed from reading the features to having the val accuracy of every model, and reports its peak
RSS.

Without --features the benchmark writes (once, to --cache) a stand-in with the shape of ResNet-50 features
of the shared zip: 200 classes, 20,000 train and 10,000 val images, 2 views, 2048-d, float16, made as
ReLU(latent @ A) from a 256-d Gaussian class mixture, so that they are non-negative, correlated and not
separable, like pooled CNN features. Extracting real 2048-d features of 30,000 images takes hours on 2 CPU
cores; pass them with --features where they exist.

The speedup depends on how many lbfgs iterations the features need: featx's cost is fixed (10 epochs of
every head, plus a val pass per epoch), about 15 full-data gradient evaluations per head, while each
sklearn fit costs one per lbfgs iteration. On real features lbfgs runs 40-100 iterations per fit; on the
well-conditioned stand-in it stops after 2-35, and the stand-in is no showcase for featx's speed.

    python benchmarks/probe.py --estimators --features F.h5   # featx.LinearProbeCV vs LogisticRegressionCV

The estimators' side: both fitted on the same arrays (the full-image view of train as numpy, float32), each
choosing by itself (LinearProbeCV: DEFAULT_SWEEP in one pass, chosen on a 10% holdout; LogisticRegressionCV:
its defaults, 10 Cs x 5 folds and a refit), then scored on val; time, val top-1 and peak RSS per side.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import common
import numpy as np

REPO = common.REPO
LRS = (1e-4, 3e-4, 6.5e-4, 1e-3)
WEIGHT_DECAYS = (0.0, 1e-3, 1.16e-2)
CS = tuple(float(c) for c in np.logspace(-4, 2, 12))


def run_featx(features: Path) -> dict:
    from featx.features.store import load_features
    from featx.probe.sweep import grid, train

    start = time.perf_counter()
    result = train(
        load_features(features, "train"),
        val=load_features(features, "val"),
        heads=grid(lr=LRS, weight_decay=WEIGHT_DECAYS),
        device="cpu",
    )
    best = result.best_metrics
    return {
        "seconds": time.perf_counter() - start,
        "models": len(result.configs),
        "best_val_top1": best["val_top1"],
        "best": result.configs[result.best].label(),
        "best_epoch": result.best_epoch,
    }


def run_sklearn(features: Path) -> dict:
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    from featx.features.store import load_features

    warnings.simplefilter("ignore", ConvergenceWarning)  # each fit's iteration count is in the result instead
    start = time.perf_counter()
    tr, va = load_features(features, "train", views="full"), load_features(features, "val", views="full")
    x, xv = tr.features[:, 0].astype(np.float32), va.features[:, 0].astype(np.float32)
    scores, iters = {}, {}
    for c in CS:
        model = LogisticRegression(C=c).fit(x, tr.labels)
        scores[c], iters[c] = float(model.score(xv, va.labels)), int(model.n_iter_[0])
    best = max(scores, key=scores.get)
    return {
        "seconds": time.perf_counter() - start,
        "models": len(CS),
        "best_val_top1": scores[best],
        "best": f"C={best:g}",
        "iterations": list(iters.values()),
    }


def _arrays(features: Path):
    from featx.features.store import load_features

    tr, va = load_features(features, "train", views="full"), load_features(features, "val", views="full")
    return tr.features[:, 0].astype(np.float32), tr.labels, va.features[:, 0].astype(np.float32), va.labels


def run_linear_probe_cv(features: Path) -> dict:
    from featx.probe.estimator import LinearProbeCV

    start = time.perf_counter()
    x, y, xv, yv = _arrays(features)
    clf = LinearProbeCV(device="cpu").fit(x, y)
    return {
        "seconds": time.perf_counter() - start,
        "models": len(clf.configs_),
        "best_val_top1": clf.score(xv, yv),
        "best": f"lr={clf.best_params_['lr']:g} wd={clf.best_params_['weight_decay']:g}",
    }


def run_logistic_regression_cv(features: Path) -> dict:
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegressionCV

    warnings.simplefilter("ignore", ConvergenceWarning)
    start = time.perf_counter()
    x, y, xv, yv = _arrays(features)
    clf = LogisticRegressionCV().fit(x, y)
    return {
        "seconds": time.perf_counter() - start,
        "models": len(clf.Cs_) * 5 + 1,
        "best_val_top1": float(clf.score(xv, yv)),
        "best": f"C={float(np.ravel(clf.C_)[0]):g}",
    }


PARTS = {
    "featx": run_featx,
    "sklearn": run_sklearn,
    "cv": run_linear_probe_cv,
    "sklearn-cv": run_logistic_regression_cv,
}


def compare_estimators(features: Path) -> None:
    from featx.core.env import environment

    ours, theirs = child("cv", features), child("sklearn-cv", features)
    for name, r in (("LinearProbeCV", ours), ("LogisticRegressionCV", theirs)):
        print(
            f"{name:20} {r['models']:3d} fits {r['seconds']:8.1f} s  val top-1 {r['best_val_top1']:.2%} "
            f"({r['best']})  peak RSS {r['peak_rss'] / 2**20:.0f} MiB"
        )
    cpu = environment()["cpu"]
    print(
        f"LinearProbeCV {theirs['seconds'] / ours['seconds']:.1f}x faster, val top-1 {ours['best_val_top1']:.2%} vs "
        f"{theirs['best_val_top1']:.2%} ({common.machine()}; {cpu['model']}, {' '.join(cpu['flags'])})"
    )


def sweep_gflops(shapes: dict[str, tuple[int, int, int]], classes: int, epochs: int = 10) -> float:
    """featx's matmul work: per epoch and training row a forward and a weight-gradient matmul of every
    head at once, and a forward per val row and view (what dominates its time)."""
    (n_train, _, dim), (n_val, val_views, _) = shapes["train"], shapes["val"]
    per_row = 2 * dim * len(LRS) * len(WEIGHT_DECAYS) * classes
    return epochs * (2 * n_train + n_val * val_views) * per_row / 1e9


def child(part: str, features: Path) -> dict:
    """Run one side in a fresh process, so that its time and peak RSS are its own."""
    return common.measure(__file__, ["--part", part, "--features", str(features)])


def make_features(
    path: Path,
    *,
    classes: int = 200,
    n_train: int = 20_000,
    n_val: int = 10_000,
    views: int = 2,
    dim: int = 2048,
    latent: int = 256,
    separation: float = 0.3,
) -> Path:
    """The synthetic stand-in described at the top (seeded: the same file every time)."""
    from featx.features.store import FeatureMeta, write_features

    if path.exists():
        return path
    rng = np.random.default_rng(0)
    means = separation * rng.standard_normal((classes, latent), dtype=np.float32)
    mixing = rng.standard_normal((latent, dim), dtype=np.float32) / np.sqrt(latent)

    def split(n: int):
        labels = np.arange(n) % classes
        z = means[labels] + rng.standard_normal((n, latent), dtype=np.float32)
        x = np.stack(
            [
                np.maximum((z + 0.3 * rng.standard_normal(z.shape, dtype=np.float32)) @ mixing - 0.5, 0)
                for _ in range(views)
            ],
            axis=1,
        )
        return x.astype(np.float16), labels, [f"{i}.JPEG" for i in range(n)]

    names = [f"n{k:08d}" for k in range(classes)]
    meta = FeatureMeta(
        backbone="synthetic-2048",
        weights="none",
        input_size=64,
        views=["full", "full_flip"][:views],
        crop=56,
        mean=[0.5] * 3,
        std=[0.5] * 3,
        precision="fp32",
        dtype="float16",
        dataset="synthetic",
        dataset_fingerprint=f"synthetic-{separation}",
        classes=names,
        class_names=names,
        featx_version="benchmark",
    )
    return write_features(path, meta, {"train": split(n_train), "val": split(n_val)})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--features", type=Path, help="feature file with train and val splits")
    ap.add_argument(
        "--cache",
        type=Path,
        default=REPO / "features" / "bench-synthetic-2048.h5",
        help="where the synthetic stand-in is written",
    )
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument(
        "--estimators",
        action="store_true",
        help="LinearProbeCV vs LogisticRegressionCV instead of the sweep vs single fits",
    )
    ap.add_argument("--part", choices=list(PARTS), help=argparse.SUPPRESS)
    args = ap.parse_args()
    features = args.features or make_features(args.cache)
    if args.part:
        print(json.dumps(PARTS[args.part](features)))
        return
    if args.estimators:
        compare_estimators(features)
        return

    from featx.features.store import open_split, read_meta

    meta = read_meta(features)
    shapes = {}
    for split in ("train", "val"):
        with open_split(features, split) as (ds, _, _):
            shapes[split] = ds.shape
    print(f"features: {features} ({meta.backbone}; (N, views, dim) {shapes})", flush=True)
    results = {"featx": child("featx", features), "sklearn": child("sklearn", features)}
    ours, theirs = results["featx"], results["sklearn"]
    results["speedup"] = theirs["seconds"] / ours["seconds"]
    results["val_top1_difference"] = ours["best_val_top1"] - theirs["best_val_top1"]
    for name, r in (("featx sweep", ours), ("sklearn fits", theirs)):
        print(
            f"{name:13} {r['models']:3d} models {r['seconds']:8.1f} s  best val top-1 {r['best_val_top1']:.2%} "
            f"({r['best']})  peak RSS {r['peak_rss'] / 2**20:.0f} MiB"
        )
    print(
        f"speedup {results['speedup']:.1f}x, val top-1 featx - sklearn {results['val_top1_difference']:+.2%} "
        f"({common.machine()})"
    )
    work, peak = sweep_gflops(shapes, len(meta.classes)), common.matmul_peak_gflops()
    print(
        f"work    featx's sweep is {work:.0f} GFLOP of matmuls ({work / ours['seconds']:.0f} GFLOP/s overall); at "
        f"this CPU's fp32 matmul peak of {peak:.0f} GFLOP/s they alone take {work / peak:.1f} s, which caps the "
        f"speedup at {theirs['seconds'] / (work / peak):.1f}x"
    )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
