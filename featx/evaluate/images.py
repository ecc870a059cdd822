"""Predictions on new image files: JPEG/PNG of any size, decoded and scaled as the training images were."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from featx.core.choices import (
    Combine,
    CompileMode,
    Device,
    ViewSelection,
)
from featx.core.configs import PredictConfig
from featx.core.errors import FeatxError
from featx.data.sources import IMAGE_EXTS, decode_batch, skip_or_stop
from featx.evaluate.metrics import Prediction, Scored
from featx.evaluate.scoring import choose_members, merge_runs, open_runs

# compute_features is extraction's own "render the views, run the model" step: reusing it keeps predictions on new
# images computed exactly as the stored features were.


def read_images(paths: Sequence[str | Path], *, size: int, skip_bad: bool = False) -> tuple[np.ndarray, list[str]]:
    """uint8 (N, size, size, 3) of the files and folders' images (JPEG/PNG, any size, scaled and
    centre-cropped as the dataset's were), and their paths."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.is_file() and f.name.lower().endswith(IMAGE_EXTS))
        elif p.is_file():
            files.append(p)
        else:
            raise FeatxError(f"--images {p}: no such file or folder")
    images, bad = decode_batch("", False, [str(f) for f in files], size)
    skip_or_stop([(str(files[i]), reason) for i, reason in bad], skip_bad=skip_bad, fix="remove it")
    keep = np.ones(len(files), bool)
    keep[[i for i, _ in bad]] = False
    if not keep.any():
        raise FeatxError(f"--images {' '.join(map(str, paths))}: no readable JPEG or PNG images there")
    return images[keep], [str(f) for f, k in zip(files, keep) if k]


def predict_images(
    *,
    runs: Sequence[str | Path],
    images: Sequence[str | Path],
    eval_views: ViewSelection = PredictConfig.eval_views,
    ensemble: str = PredictConfig.ensemble,
    skip_bad: bool = PredictConfig.skip_bad,
    image_size: int = PredictConfig.image_size,
    weights: str | Path | None = None,
    data: str | Path | None = None,
    device: Device = PredictConfig.device,
    combine: Combine = PredictConfig.combine,
    compile: CompileMode = PredictConfig.compile,
) -> Prediction:
    """Classify image files: each is scaled to `image_size` (the dataset's, 64 for Tiny ImageNet), then goes
    through each run's backbone, views and heads. `weights`: the backbone's weights file, where a probe run's
    features were extracted with weights from a file. `compile`: as extract's (featx.core.compiled), per model run."""
    opened = open_runs(runs, data=data, device=device, combine=combine)
    for run in opened:
        run.view_names(eval_views)
    x, ids = read_images(images, size=image_size, skip_bad=skip_bad)
    scored, picks = [], []
    for run in opened:
        p, _ = choose_members(run, eval_views, ensemble)
        picks.append(p)
        scored.append(
            Scored(ids, np.full(len(ids), -1), run.score_images(x, eval_views, p, weights=weights, compile=compile))
        )
    return merge_runs(opened, scored, picks, "images")
