"""`featx compare`: several backbones on one dataset, one leaderboard.

    from featx.front.compare import compare
    board = compare(data="tiny-imagenet-200.zip", backbones=["resnet50", "mobilenet_v2"], out="compare")
    print(format_leaderboard(board))

Per backbone, through the extract and probe stages' own code (a config each): extract (a feature
file named by its settings under out/features, reused when it exists), probe with the default sweep
(featx.core.configs.DEFAULT_SWEEP, chosen on a holdout of train), score val once. The leaderboard gives top-1
and top-5 with 95% bootstrap intervals, the paired test against the best
(featx.core.stats.paired_comparison), feature dimension, parameters, extraction images/s here and the feature
file's size; it is written as out/leaderboard.txt, out/results.json and out/report/ (featx.evaluate.report's page
over all the runs).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from featx.core.atomic import make_dirs, one_writer, replacing, size_text
from featx.core.choices import Device, FrozenPrecision, ViewSelection, ViewSet
from featx.core.configs import DEFAULT_SWEEP, CompareConfig, ExtractConfig, ProbeConfig, show
from featx.core.env import environment
from featx.core.errors import FeatxError
from featx.core.runs import write_json
from featx.core.stats import paired_comparison
from featx.data.cache import prepare_cache
from featx.evaluate.report import write_report
from featx.evaluate.scoring import predict
from featx.features.extract import extract
from featx.features.store import open_split, read_meta
from featx.nets.backbones import create_backbone
from featx.probe.run import probe


@dataclass
class Entry:
    """One backbone's line of the leaderboard."""

    backbone: str
    weights: str
    features: str  # the feature file
    run: str  # the probe run
    feature_dim: int
    parameters: int  # of the backbone without its classifier
    images_per_second: float  # the extraction's own rate (every view of an image counts once), as the file records
    feature_bytes: int
    chosen: str  # the head the probe chose
    selected_on: str  # where it was chosen: the holdout of train, or val where the holdout was too small
    top1: float
    top1_interval: tuple[float, float]
    top5: float
    top5_interval: tuple[float, float]
    # against the best line: top-1 difference (this minus best), its interval, McNemar's p; None for the best
    vs_best: dict | None = None


def _label(backbone: str, weights: str) -> str:
    """A file-name-safe name for a backbone and its weights."""
    w = "" if weights == "default" else "-" + Path(weights).stem
    return re.sub(r"[^A-Za-z0-9_.+-]", "_", backbone + w)


def _parameters(backbones: Sequence[str], weights: Sequence[str], size: int | None) -> list[int]:
    """Each backbone's parameters without its classifier; building them all first checks every name and weights
    file before the first extraction starts."""
    counts = []
    for backbone, w in zip(backbones, weights):
        model = create_backbone(backbone, weights=w, size=size).model
        counts.append(sum(p.numel() for p in model.parameters()))
    return counts


def _feature_dim(path: Path) -> int:
    with open_split(path, "val") as (ds, _, _):
        return int(ds.shape[-1])


def compare(
    *,
    data: str | Path | None,
    backbones: Sequence[str],
    out: str | Path,
    weights: Sequence[str] | None = None,
    classes: int | None = None,
    per_class: int | None = None,
    size: int | None = None,
    views: ViewSet = CompareConfig.views,
    crop: int = CompareConfig.crop,
    eval_views: ViewSelection = CompareConfig.eval_views,
    select: str = CompareConfig.select,
    epochs: int = CompareConfig.epochs,
    seed: int = CompareConfig.seed,
    device: Device = CompareConfig.device,
    precision: FrozenPrecision = CompareConfig.precision,
    calibration: int = CompareConfig.calibration,
    progress: bool = True,
) -> list[Entry]:
    """`leaderboard` with its options as keywords."""
    config = CompareConfig(
        backbones=tuple(backbones),
        data=None if data is None else str(data),
        weights=None if weights is None else tuple(weights),
        classes=classes,
        per_class=per_class,
        size=size,
        views=views,
        crop=crop,
        eval_views=show(eval_views),
        select=select,
        epochs=epochs,
        seed=seed,
        device=device,
        precision=precision,
        calibration=calibration,
    )
    return leaderboard(config, out=out, progress=progress)


def _entry(backbone: str, weights: str, parameters: int, cache: Path, config: CompareConfig, out: Path, progress: bool):
    """Extract, probe and score one backbone: its Entry (without the comparison to the best) and Prediction."""
    label = _label(backbone, weights)
    settings = f"{config.views}-s{config.size or 'auto'}-c{config.classes or 'all'}-n{config.per_class or 'all'}"
    settings += f"-int8c{config.calibration}" if config.precision == "int8" else ""  # beside the float features
    extraction = ExtractConfig(
        backbone=backbone,
        data=str(cache),
        weights=weights,
        size=config.size,
        views=config.views,
        crop=config.crop,
        splits=("train", "val"),
        classes=config.classes,
        per_class=config.per_class,
        device=config.device,
        precision=config.precision,
        calibration=config.calibration,
    )
    feature_file = extract(extraction, out=out / "features" / f"{label}-{settings}.h5", progress=progress)
    run_dir = out / "runs" / label
    probing = ProbeConfig(
        features=str(feature_file),
        select=config.select,
        epochs=config.epochs,
        eval_views=config.eval_views,
        seed=config.seed,
        device=config.device,
    )  # no hyperparameter given: the default sweep
    result = probe(probing, out=run_dir, progress=progress)
    pred = predict(runs=[run_dir], split="val", eval_views=config.eval_views, device=config.device)
    entry = Entry(
        backbone,
        weights,
        str(feature_file),
        str(run_dir),
        _feature_dim(feature_file),
        parameters,
        read_meta(feature_file).images_per_second,
        feature_file.stat().st_size,
        result.names[result.best],
        result.selected_on or "",
        pred.top_k(1),
        pred.interval(1),
        pred.top_k(5),
        pred.interval(5),
    )
    return entry, pred


@one_writer("out")
def leaderboard(config: CompareConfig, *, out: str | Path, progress: bool = True) -> list[Entry]:
    """Extract, probe (DEFAULT_SWEEP, chosen on `select`) and score val for each backbone; returns the
    leaderboard, best top-1 first, and writes out/results.json, out/leaderboard.txt and out/report/.

    `weights`: one per backbone ("default", a torchvision weights name, "none" or a state_dict path); default:
    "default" for every one. `classes`, `per_class`, `size`, `views`, `crop`: as `featx extract`; the feature
    file's name carries them, so a second compare with the same settings reuses it."""
    backbones = config.backbones
    weights = list(config.weights) if config.weights else ["default"] * len(backbones)
    if not backbones or len(weights) != len(backbones):
        raise FeatxError(f"--weights: give one per --backbone ({len(backbones)}), or none for 'default' everywhere")
    labels = [_label(b, w) for b, w in zip(backbones, weights)]
    if len(set(labels)) < len(labels):
        raise FeatxError(f"--backbone/--weights: {', '.join(labels)} names one pairing twice; compare each once")
    parameters = _parameters(backbones, weights, config.size)
    out = Path(out)
    make_dirs(out, option="--out", path=out)
    cache = prepare_cache(config.data, classes=config.classes, per_class=config.per_class, progress=progress)
    found = [
        _entry(backbone, w, params, cache, config, out, progress)
        for backbone, w, params in zip(backbones, weights, parameters)
    ]
    found.sort(key=lambda e: -e[0].top1)
    best = found[0][1]
    for entry, pred in found[1:]:
        c = paired_comparison(pred.correct(1), best.correct(1))
        entry.vs_best = {"difference": c.difference, "interval": c.interval, "p_value": c.p_value}
    board = [e for e, _ in found]
    write_json(
        out / "results.json",
        {
            "settings": {
                "data": str(config.data),
                "classes": config.classes,
                "per_class": config.per_class,
                "size": config.size,
                "views": config.views,
                "eval_views": config.eval_views,
                "select": config.select,
                "grid": DEFAULT_SWEEP,
            },
            "environment": environment(),
            "leaderboard": [asdict(e) for e in board],
        },
    )
    with replacing(out / "leaderboard.txt") as tmp:
        tmp.write_text(format_leaderboard(board) + "\n")
    write_report(
        run=[e.run for e in board],
        out=out / "report",
        split="val",
        eval_views=config.eval_views,
        data=cache,
        device=config.device,
        force=True,  # the page of this comparison's own runs: rebuilt whenever they change
    )
    return board


def format_leaderboard(board: Sequence[Entry]) -> str:
    """One line per backbone, best top-1 first: accuracy with intervals, the paired test against the best,
    and the costs."""
    names = [e.backbone + ("" if e.weights == "default" else f" ({Path(e.weights).name})") for e in board]
    width = max(len("backbone"), *map(len, names))
    lines = [
        f"{'backbone':<{width}} {'top-1 [95% CI]':<24} {'top-5 [95% CI]':<24} {'vs best (top-1, McNemar p)':<30} "
        f"{'chosen on':<12} {'dim':>5} {'params':>8} {'img/s':>7} {'features':>9}"
    ]
    for name, e in zip(names, board):
        acc = [
            f"{v:.2%} [{100 * lo:.2f}, {100 * hi:.2f}]"
            for v, (lo, hi) in ((e.top1, e.top1_interval), (e.top5, e.top5_interval))
        ]
        if e.vs_best is None:
            vs = "best"
        else:
            lo, hi = e.vs_best["interval"]
            vs = f"{100 * e.vs_best['difference']:+.2f} [{100 * lo:+.2f}, {100 * hi:+.2f}] p={e.vs_best['p_value']:.2g}"
        lines.append(
            f"{name:<{width}} {acc[0]:<24} {acc[1]:<24} {vs:<30} {e.selected_on:<12} {e.feature_dim:>5} "
            f"{e.parameters / 1e6:>7.2f}M {e.images_per_second:>7.1f} {size_text(e.feature_bytes):>9}"
        )
    return "\n".join(lines)
