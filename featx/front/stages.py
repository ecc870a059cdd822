"""Each stage's entry point takes its typed config (featx.core.configs) and the stage's output::

    from featx.core.configs import ExtractConfig, ProbeConfig
    from featx.front.stages import extract, probe
    features = extract(ExtractConfig(backbone="resnet50", views="flip"), out="features/r50.h5")
    result = probe(ProbeConfig(features=str(features), lr=(3e-4, 1e-3)), out="runs/r50")

The command line and the recipes call these, so a config means the same in all three. `run_stage` picks the
entry point by the config's type. The stages' keyword functions (featx.features.extract.extract_features, ...) stay for
convenience; these translate a config into them, and the configs' defaults are the only defaults that count.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from featx.core.configs import (
    DEFAULT_SWEEP,
    CompareConfig,
    ExtractConfig,
    FinetuneConfig,
    HeadConfig,
    PredictConfig,
    PrepareConfig,
    ProbeConfig,
    ReportConfig,
    to_dict,
    validate,
)
from featx.core.device import resolve_device
from featx.core.runs import read_run, update_run

HYPERPARAMETERS = ("lr", "weight_decay", "label_smoothing", "dropout")


def prepare(config: PrepareConfig, *, cache: str | Path | None = None, progress: bool = True) -> Path:
    """Decode the dataset into the cache; returns the cache path (reused while the source is unchanged)."""
    from featx.data.cache import prepare_cache

    validate(config)
    return prepare_cache(
        config.data,
        cache=cache,
        image_size=config.image_size,
        classes=config.classes,
        per_class=config.per_class,
        skip_bad=config.skip_bad,
        n_jobs=config.jobs,
        progress=progress,
    )


def extract(config: ExtractConfig, *, out: str | Path, force: bool = False, progress: bool = True) -> Path:
    """Extract the transfer values; returns the finished feature file."""
    from featx.features.extract import extract_features

    validate(config)
    options = dataclasses.asdict(config)
    options["splits"] = list(config.splits) if config.splits else None
    return extract_features(**options, out=out, force=force, progress=progress)


def probe_heads(config: ProbeConfig) -> list:
    """The sweep a probe config trains: the default sweep when it gives no hyperparameter; else every
    combination of those it gives, the others at the seed's values (featx.core.configs.HeadConfig)."""
    from featx.probe.sweep import grid

    given = {h: getattr(config, h) for h in HYPERPARAMETERS if getattr(config, h) is not None}
    seed = HeadConfig()
    sweep = given or DEFAULT_SWEEP
    return grid(**{h: sweep.get(h, (getattr(seed, h),)) for h in HYPERPARAMETERS})


def probe(config: ProbeConfig, *, out: str | Path, force: bool = False, progress: bool = False):
    """Train the config's heads on its feature file; run.json records the config as given and what it resolved
    to on this machine. Returns the ProbeResult."""
    from featx.probe.run import run_probe

    validate(config)
    options = {k: v for k, v in dataclasses.asdict(config).items() if k not in HYPERPARAMETERS}
    options["k"], options["feature_sets"] = list(options["k"]), list(options.pop("feature_set"))
    heads = probe_heads(config)
    result = run_probe(**options, heads=heads, out=out, force=force, progress=progress)
    recorded = read_run(out).config
    resolved = {
        "device": str(resolve_device(config.device)),
        "stream": recorded.get("stream", config.stream),
        "heads": [dataclasses.asdict(h) for h in heads],
    }
    update_run(out, config={**recorded, "options": to_dict(config), "resolved": resolved})
    return result


def finetune(
    config: FinetuneConfig, *, out: str | Path, resume: bool = False, force: bool = False, progress: bool = True
):
    """Train end to end; returns the FinetuneResult."""
    from featx.finetune.run import finetune as train

    validate(config)
    return train(config, out=out, resume=resume, force=force, progress=progress)


def predict(config: PredictConfig):
    """Score the runs on a split, or on image files when the config names some; returns the Prediction."""
    from featx.evaluate.images import predict_images
    from featx.evaluate.scoring import predict as predict_split

    validate(config)
    if config.images:
        return predict_images(
            runs=config.runs,
            images=config.images,
            eval_views=config.eval_views,
            ensemble=config.ensemble,
            skip_bad=config.skip_bad,
            image_size=config.image_size,
            weights=config.weights,
            data=config.data,
            device=config.device,
            combine=config.combine,
            compile=config.compile,
        )
    return predict_split(
        runs=config.runs,
        split=config.split,
        eval_views=config.eval_views,
        ensemble=config.ensemble,
        curve=config.split == "val",
        data=config.data,
        device=config.device,
        combine=config.combine,
    )


def report(config: ReportConfig, *, out: str | Path = "report", force: bool = False) -> Path:
    """Write the report page (featx.core.outputs' contract: up to date, refused or, with force, replaced);
    returns its path."""
    from featx.evaluate.report import write_report

    validate(config)
    return write_report(
        run=list(config.runs),
        out=out,
        split=config.split,
        eval_views=config.eval_views,
        ensemble=config.ensemble,
        tsne_classes=config.tsne_classes,
        data=config.data,
        device=config.device,
        combine=config.combine,
        force=force,
    )


def compare(config: CompareConfig, *, out: str | Path = "compare", progress: bool = True) -> list:
    """Compare the backbones; returns the leaderboard (featx.front.compare.Entry), best first."""
    from featx.front.compare import compare as compare_backbones

    validate(config)
    return compare_backbones(**dataclasses.asdict(config), out=out, progress=progress)


ENTRY_POINTS = {
    PrepareConfig: prepare,
    ExtractConfig: extract,
    ProbeConfig: probe,
    FinetuneConfig: finetune,
    PredictConfig: predict,
    ReportConfig: report,
    CompareConfig: compare,
}


def run_stage(config, **control):
    """Run the stage whose config this is: `run_stage(ExtractConfig(backbone="resnet18"), out="f.h5")`."""
    return ENTRY_POINTS[type(config)](config, **control)
