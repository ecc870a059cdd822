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
    python benchmarks/probe.py --default-sweep                 # `featx probe`'s default sweep, fp32 and bf16

The estimators' side: both fitted on the same arrays (the full-image view of train as numpy, float32), each
choosing by itself (LinearProbeCV: DEFAULT_SWEEP in one pass, chosen on a 10% holdout; LogisticRegressionCV:
its defaults, 10 Cs x 5 folds and a refit), then scored on val; time, val top-1 and peak RSS per side.

--default-sweep times what `featx probe` trains with every option at its default (DEFAULT_SWEEP: 9 heads x 10
epochs, batch 100) on a synthetic stand-in for the full-view MobileNetV2 features of the full Tiny ImageNet: 90,000
x 1280 training rows (train less the 10% holdout) and 10,000 holdout rows, 200 classes (--rows scales both). It runs
in fp32 and, where the CPU has bf16 (FEATX_CPU_BF16=1 forces it; emulated bf16 is ~10x slower), in bf16, each in
its own process, and reports per precision: the sweep's time, its matmuls' work as README counts it (per step a
forward and a weight gradient of every head, the features need none; per epoch the holdout's forward), the same
matmuls timed alone at the same shapes and precision in the same process (their GFLOP/s), the rest of the time
(optimizer, loss, casts, batching: the non-matmul time), the chosen head and the peak RSS.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
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


def sweep_matmul_seconds(shapes: dict[str, tuple[int, int, int]], heads: int, classes: int, dtype: str) -> float:
    """The default sweep's matmuls alone, at its shapes: per step the forward (B, D) @ (H, D, C) and the weight
    gradient (H, D, B) @ (H, B, C) in `dtype`, per epoch the holdout's forward in fp32 (scoring stays fp32).
    One epoch is timed and counted ProbeConfig.epochs times."""
    import torch

    from featx.core.configs import ProbeConfig

    (n_train, _, dim), (n_val, val_views, _) = shapes["train"], shapes["val"]
    batch, t = ProbeConfig.batch_size, {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    x, w, g = (
        torch.randn(batch, dim, dtype=t),
        torch.randn(heads, dim, classes, dtype=t),
        torch.randn(heads, batch, classes, dtype=t),
    )
    scored, piece = torch.randn(4096, dim), torch.randn(heads, dim, classes)
    start = time.perf_counter()
    for _ in range(math.ceil(n_train / batch)):
        torch.matmul(x, w), torch.matmul(x.t(), g)
    for first in range(0, n_val * val_views, len(scored)):
        torch.matmul(scored[: n_val * val_views - first], piece)
    return (time.perf_counter() - start) * ProbeConfig.epochs


def run_default_sweep(features: Path, precision: str) -> dict:
    from featx.core.configs import ProbeConfig
    from featx.features.store import load_features
    from featx.probe.sweep import fit, head_grid

    config = ProbeConfig(features=str(features), precision=precision, device="cpu")  # type: ignore[arg-type]
    heads = head_grid(config)
    train, val = load_features(features, "train"), load_features(features, "val")
    start = time.perf_counter()
    result = fit(train, val=val, config=config, heads=heads)
    seconds = time.perf_counter() - start
    shapes = {"train": train.features.shape, "val": val.features.shape}
    return {
        "seconds": seconds,
        "matmul_seconds": sweep_matmul_seconds(shapes, len(heads), len(train.meta.classes), precision),
        "models": len(heads),
        "best_val_top1": result.best_metrics["val_top1"],
        "best": result.configs[result.best].label(),
        "best_epoch": result.best_epoch,
    }


PARTS = {
    "featx": run_featx,
    "sklearn": run_sklearn,
    "cv": run_linear_probe_cv,
    "sklearn-cv": run_logistic_regression_cv,
    "default-fp32": functools.partial(run_default_sweep, precision="fp32"),
    "default-bf16": functools.partial(run_default_sweep, precision="bf16"),
}


def compare_default_sweep(rows: int, cache: Path) -> None:
    from featx.core.configs import DEFAULT_SWEEP
    from featx.core.device import cpu_has_bf16

    features = make_features(cache, n_train=rows, n_val=rows // 9, views=1, dim=1280)
    shapes = {"train": (rows, 1, 1280), "val": (rows // 9, 1, 1280)}
    heads = math.prod(len(v) for v in DEFAULT_SWEEP.values())
    work = sweep_gflops(shapes, 200, heads=heads)
    print(
        f"default sweep: {heads} heads x 10 epochs, (N, views, dim) {shapes}, 200 classes: {work:.0f} GFLOP of matmuls"
    )
    results = {p: child(f"default-{p}", features) for p in ("fp32", *(("bf16",) if cpu_has_bf16() else ()))}
    for p, r in results.items():
        print(
            f"{p}  {r['seconds']:7.1f} s ({work / r['seconds']:.0f} GFLOP/s overall)  matmuls alone "
            f"{r['matmul_seconds']:.1f} s ({work / r['matmul_seconds']:.0f} GFLOP/s)  the rest "
            f"{r['seconds'] - r['matmul_seconds']:.1f} s  best {r['best']} epoch {r['best_epoch']} val top-1 "
            f"{r['best_val_top1']:.2%}  peak RSS {r['peak_rss'] / 2**20:.0f} MiB"
        )
    if "bf16" in results:
        fp32, bf16 = results["fp32"], results["bf16"]
        print(
            f"bf16 / fp32 time {bf16['seconds'] / fp32['seconds']:.2f}; same head: "
            f"{'yes' if (bf16['best'], bf16['best_epoch']) == (fp32['best'], fp32['best_epoch']) else 'no'}"
        )
    print(f"({common.machine()}; {common.cpu_flags()})")


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


def sweep_gflops(
    shapes: dict[str, tuple[int, int, int]], classes: int, epochs: int = 10, heads: int = len(LRS) * len(WEIGHT_DECAYS)
) -> float:
    """featx's matmul work: per epoch and training row a forward and a weight-gradient matmul of every
    head at once, and a forward per val row and view (what dominates its time)."""
    (n_train, _, dim), (n_val, val_views, _) = shapes["train"], shapes["val"]
    per_row = 2 * dim * heads * classes
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
    ap.add_argument(
        "--default-sweep",
        action="store_true",
        help="time `featx probe`'s default sweep on 1280-d synthetic features, fp32 and bf16 (see above)",
    )
    ap.add_argument("--rows", type=int, default=90_000, help="--default-sweep: training rows (holdout: a ninth)")
    ap.add_argument("--part", choices=list(PARTS), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.default_sweep:
        compare_default_sweep(args.rows, args.features or REPO / "features" / f"bench-synthetic-1280-{args.rows}.h5")
        return
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
