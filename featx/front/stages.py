"""Each stage's entry point takes its typed config (featx.core.configs) and the stage's control values (its
output, force, progress)::

    from featx.core.configs import ExtractConfig, ProbeConfig
    from featx.front.stages import extract, probe
    features = extract(ExtractConfig(backbone="resnet50", views="flip"), out="features/r50.h5")
    result = probe(ProbeConfig(features=str(features), lr=(3e-4, 1e-3)), out="runs/r50")

The command line and the recipes call these, so a config means the same in all three. `STAGES` is the one list
of the stages: each one's name, command, config, entry point, output and control options; the CLI
(featx.front.cli), the recipes (featx.front.recipes) and `run_stage`, which picks the entry point by the config's
type, read it. The stages' keyword functions (featx.features.extract.extract_features, ...) stay for convenience:
they build the config and call the same code, and the configs' defaults are the only defaults that count.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from featx.core.configs import (
    CompareConfig,
    ExtractConfig,
    FinetuneConfig,
    PredictConfig,
    PrepareConfig,
    ProbeConfig,
    ReportConfig,
    to_dict,
)


def prepare(config: PrepareConfig, *, cache: str | Path | None = None, progress: bool = True) -> Path:
    """Decode the dataset into the cache; returns the cache path (reused while the source is unchanged)."""
    from featx.data.cache import prepare_cache

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
    from featx.features.extract import extract as run_extract

    return run_extract(config, out=out, force=force, progress=progress)


def probe(config: ProbeConfig, *, out: str | Path, force: bool = False, progress: bool = False):
    """Train the config's heads on its feature file; run.json records the config as given and what it resolved
    to on this machine. Returns the ProbeResult."""
    from featx.core.device import precision_name, resolve_device
    from featx.core.runs import read_run, update_run
    from featx.probe.run import probe as run_probe
    from featx.probe.sweep import training_dtype

    result = run_probe(config, out=out, force=force, progress=progress)
    recorded = read_run(out).config
    device = resolve_device(config.device)
    resolved = {
        "device": str(device),
        "precision": precision_name(training_dtype(config.precision, device)),
        "stream": recorded.get("stream", config.stream),
        "heads": recorded["heads"],
    }
    update_run(out, config={**recorded, "options": to_dict(config), "resolved": resolved})
    return result


def finetune(
    config: FinetuneConfig, *, out: str | Path, resume: bool = False, force: bool = False, progress: bool = True
):
    """Train end to end; returns the FinetuneResult."""
    from featx.finetune.run import finetune as train

    return train(config, out=out, resume=resume, force=force, progress=progress)


def predict(config: PredictConfig):
    """Score the runs on a split, or on image files when the config names some; returns the Prediction."""
    from featx.evaluate.images import predict_images
    from featx.evaluate.scoring import predict as predict_split

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
    from featx.front.compare import leaderboard

    return leaderboard(config, out=out, progress=progress)


@dataclass(frozen=True)
class StageSpec:
    """One stage: `name` (a recipe's table and the command's last word), `command` (the words after `featx`),
    its config class, its entry point, `output` (the control option naming its output) and `control` (the
    command's options besides the config that a recipe may set, each a `path` or a `flag`)."""

    name: str
    command: tuple[str, ...]
    config: type
    run: Callable
    output: str = "out"
    control: tuple[tuple[str, str], ...] = (("out", "path"),)

    @property
    def flags(self) -> set[str]:
        return {name for name, kind in self.control if kind == "flag"}


FORCE = ("force", "flag")
STAGES = {
    s.name: s
    for s in (
        StageSpec("prepare", ("data", "prepare"), PrepareConfig, prepare, "cache", (("cache", "path"),)),
        StageSpec("extract", ("extract",), ExtractConfig, extract, control=(("out", "path"), FORCE)),
        StageSpec("probe", ("probe",), ProbeConfig, probe, control=(("out", "path"), FORCE)),
        StageSpec("finetune", ("finetune",), FinetuneConfig, finetune, control=(("out", "path"), FORCE)),
        StageSpec("predict", ("predict",), PredictConfig, predict),
        StageSpec("report", ("report",), ReportConfig, report),
        StageSpec("compare", ("compare",), CompareConfig, compare),
    )
}


def stage_of(config_class: type) -> StageSpec:
    """The stage a config class belongs to."""
    return next(s for s in STAGES.values() if s.config is config_class)


def run_stage(config, **control):
    """Run the stage whose config this is: `run_stage(ExtractConfig(backbone="resnet18"), out="f.h5")`."""
    return stage_of(type(config)).run(config, **control)
