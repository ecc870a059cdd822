"""The probe as scikit-learn estimators, for features one already has as arrays.

    from featx import LinearProbeCV
    clf = LinearProbeCV().fit(X_train, y_train)      # the whole grid in one pass, chosen on 10% of train
    clf.score(X_val, y_val), clf.best_params_

X is numpy or torch, (n, dim) or (n, views, dim): training draws one view per image and step (views as free
augmentation), prediction averages the softmax over the views, exactly as `featx probe` does with a feature
file. Both estimators train through `featx.probe.sweep.train` on `Features` built from the arrays (`as_features`):
the same minibatches, optimizer, schedule and stacked heads as the CLI.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.preprocessing import LabelEncoder
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_array, check_is_fitted, validate_data

from featx import __version__
from featx.core.choices import Device, Normalize, Optimizer, ProbeSchedule
from featx.core.configs import DEFAULT_SWEEP, HYPERPARAMETERS, HeadConfig, ProbeConfig
from featx.core.device import resolve_device
from featx.core.errors import FeatxError, FeatxWarning
from featx.core.stats import MIN_PER_CLASS, holdout_rows
from featx.features.store import FeatureMeta, Features
from featx.nets.heads import StackedHeads
from featx.probe.sweep import ProbeResult, fit, grid

# `LinearProbeCV`'s grid is `featx probe`'s default sweep (featx.core.configs.DEFAULT_SWEEP): lr x L2 weight decay
# around the transfer-learning report's head (lr 6.5e-4, wd 0.0116), with Adam, label smoothing 0.1 and 10 epochs
# of exponential decay. On MobileNetV2 features of the full Tiny ImageNet that report's single head scores 60.49%
# val and this grid, chosen on the holdout, 63.50% (issue 24), for one pass over the data.

ARRAYS = Path("<arrays>")  # the `path` of Features built from arrays, as error messages name it


def as_features(x: np.ndarray, y: np.ndarray, *, n_classes: int, split: str = "train") -> Features:
    """(n, views, dim) features and encoded labels (-1: unlabelled) as the probe's in-memory split."""
    meta = FeatureMeta(
        backbone="arrays",
        weights="",
        input_size=0,
        views=[f"view{i}" for i in range(x.shape[1])],
        crop=0,
        mean=[],
        std=[],
        precision="",
        dtype=str(x.dtype),
        dataset="arrays",
        dataset_fingerprint="",
        classes=[str(c) for c in range(n_classes)],
        class_names=[str(c) for c in range(n_classes)],
        featx_version=__version__,
    )
    return Features(split=split, features=x, labels=np.asarray(y, dtype=np.int64), ids=[], meta=meta, path=ARRAYS)


def _numpy(a):
    return a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else a


class _Probe(ClassifierMixin, BaseEstimator):
    """What both estimators share: input checks, label encoding, training and view-averaged prediction."""

    _DTYPES = (np.float32, np.float16)  # float16 stays float16 (the feature files' dtype); the heads cast
    n_features_in_: int  # set by fit (scikit-learn's name)

    def _x(self, X, *, y="no_validation", reset: bool):
        """X as a contiguous (n, views, dim) array, and y checked when fitting (y=None then says it is missing)."""
        X = _numpy(X)
        if getattr(X, "ndim", 0) == 3 and not reset:
            X = check_array(X, allow_nd=True, dtype=self._DTYPES)
            if X.shape[-1] != self.n_features_in_:
                raise ValueError(
                    f"X has {X.shape[-1]} features, but {type(self).__name__} is expecting "
                    f"{self.n_features_in_} features as input."
                )
        elif reset:
            X, y = validate_data(self, X, _numpy(y), allow_nd=True, dtype=self._DTYPES)
        else:
            X = validate_data(self, X, reset=False, allow_nd=True, dtype=self._DTYPES)
        if X.ndim > 3:
            raise ValueError(f"X has {X.ndim} dimensions; give (n, dim) or (n, views, dim) features")
        if reset:
            self.n_features_in_ = X.shape[-1]
        X = np.ascontiguousarray(X if X.ndim == 3 else X[:, None, :])
        return (X, y) if reset else X

    def _encode(self, y) -> np.ndarray:
        check_classification_targets(y)
        self._encoder = LabelEncoder().fit(y)
        self.classes_ = self._encoder.classes_
        return self._encoder.transform(y)

    def _config(self) -> ProbeConfig:
        """The probe options among the estimator's parameters (scikit-learn's get_params), as a ProbeConfig;
        its hyperparameters and lr decay are the heads' (`_heads`)."""
        options = {
            k: v
            for k, v in self.get_params().items()
            if hasattr(ProbeConfig, k) and k not in (*HYPERPARAMETERS, "lr_decay")
        }
        return ProbeConfig(features=str(ARRAYS), **options)

    def _train(self, fit_on: Features, val: Features) -> ProbeResult:
        """Train every head (`_heads`) in one pass; keep, per head, its weights at the epoch that scored best on
        `val` (ordered as the probe orders heads: top-1, then top-5, the earliest epoch on ties)."""
        kept: dict[int, tuple[float, float, dict]] = {}

        def on_eval(epoch, step, model, top1, top5) -> None:
            for h in range(len(top1)):
                if math.isfinite(top1[h]) and (h not in kept or (top1[h], top5[h]) > kept[h][:2]):
                    kept[h] = (top1[h], top5[h], model.head_state(h))

        try:
            result = fit(fit_on, val=val, config=self._config(), heads=self._heads(), on_eval=on_eval)
        except FeatxError as e:  # scikit-learn's convention for bad input and parameters
            raise ValueError(e.message) from None
        self.head_ = StackedHeads.from_state(kept[result.best][2], normalize=self.normalize).eval()
        self.history_ = result.history
        return result

    def predict_proba(self, X) -> np.ndarray:
        """(n, n_classes): the softmax averaged over each sample's views."""
        check_is_fitted(self)
        x = torch.from_numpy(self._x(X, reset=False))
        dev = resolve_device(self.device)
        head = self.head_.to(dev)
        rows = max(1, 2048 // x.shape[1])  # as the probe's evaluation: ~2048 view-rows per matmul
        return torch.cat([head.predict_proba(p.to(dev))[0].cpu() for p in x.split(rows)]).double().numpy()

    def predict(self, X) -> np.ndarray:
        best = self.predict_proba(X).argmax(1)
        return self.classes_[best]

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.allow_nan = False
        return tags


class LinearProbe(_Probe):
    """One linear softmax head trained as `featx probe` trains it (Adam with L2 weight decay, label smoothing,
    minibatches of `batch_size`, `epochs` epochs with exponential lr decay), from zero weights. The defaults
    are the transfer-learning report's head; `LinearProbeCV` sweeps a grid and chooses. Fitted: `classes_`, `head_` (the
    featx.nets.heads.StackedHeads), `history_` (per epoch, scored on the training data itself)."""

    def __init__(
        self,
        *,
        lr: float = HeadConfig.lr,
        weight_decay: float = HeadConfig.weight_decay,
        label_smoothing: float = HeadConfig.label_smoothing,
        dropout: float = HeadConfig.dropout,
        epochs: int = ProbeConfig.epochs,
        batch_size: int = ProbeConfig.batch_size,
        optimizer: Optimizer = ProbeConfig.optimizer,
        lr_decay: float = HeadConfig.lr_decay,
        schedule: ProbeSchedule = ProbeConfig.schedule,
        normalize: Normalize = ProbeConfig.normalize,
        seed: int = ProbeConfig.seed,
        device: Device = ProbeConfig.device,
    ):
        self.lr, self.weight_decay, self.label_smoothing, self.dropout = lr, weight_decay, label_smoothing, dropout
        self.epochs, self.batch_size, self.optimizer, self.lr_decay = epochs, batch_size, optimizer, lr_decay
        self.schedule, self.normalize, self.seed, self.device = schedule, normalize, seed, device

    def _heads(self) -> list[HeadConfig]:
        return [HeadConfig(self.lr, self.weight_decay, self.label_smoothing, self.dropout, self.lr_decay)]

    def fit(self, X, y) -> LinearProbe:
        X, y = self._x(X, y=y, reset=True)
        data = as_features(X, self._encode(y), n_classes=len(self.classes_))
        result = self._train(data, data)
        assert result.heads is not None  # trained just now
        # the final weights, not the best epoch on the training data
        self.head_ = StackedHeads.from_state(result.heads.head_state(0), normalize=self.normalize).eval()
        return self


class LinearProbeCV(_Probe):
    """Every combination of `lr` x `weight_decay` x `label_smoothing` x `dropout` (default: DEFAULT_SWEEP) x `lr_decay`
    trained in one pass over the same minibatches, as `featx probe` sweeps; the head and epoch with the best
    top-1 on a class-stratified `holdout` share of the training data (or on `X_val`, `y_val` given to fit) are
    kept. Unlike LogisticRegressionCV there is no refit: the chosen head is the one trained without the
    holdout, as `featx probe` keeps it. Fitted: `classes_`, `best_params_`, `best_epoch_`, `best_score_`
    (its holdout top-1), `scores_` (each config's best holdout top-1), `configs_`, `head_`, `history_`."""

    # scikit-learn reads an estimator's parameters from its own __init__: LinearProbe's are spelled out again
    def __init__(
        self,
        *,
        lr: Sequence[float] = DEFAULT_SWEEP["lr"],
        holdout: float = 0.1,
        weight_decay: Sequence[float] = DEFAULT_SWEEP["weight_decay"],
        label_smoothing: Sequence[float] = (HeadConfig.label_smoothing,),
        dropout: Sequence[float] = (HeadConfig.dropout,),
        epochs: int = ProbeConfig.epochs,
        batch_size: int = ProbeConfig.batch_size,
        optimizer: Optimizer = ProbeConfig.optimizer,
        lr_decay: float | Sequence[float] = ProbeConfig.lr_decay,
        schedule: ProbeSchedule = ProbeConfig.schedule,
        normalize: Normalize = ProbeConfig.normalize,
        seed: int = ProbeConfig.seed,
        device: Device = ProbeConfig.device,
    ):
        self.lr, self.weight_decay, self.label_smoothing, self.dropout = lr, weight_decay, label_smoothing, dropout
        self.holdout, self.epochs, self.batch_size, self.optimizer = holdout, epochs, batch_size, optimizer
        self.lr_decay, self.schedule, self.normalize, self.seed, self.device = (
            lr_decay,
            schedule,
            normalize,
            seed,
            device,
        )

    def fit(self, X, y, X_val=None, y_val=None) -> LinearProbeCV:
        X, y = self._x(X, y=y, reset=True)
        labels = self._encode(y)
        data = as_features(X, labels, n_classes=len(self.classes_))
        if (X_val is None) != (y_val is None):
            raise ValueError("give both X_val and y_val, or neither (to choose on a holdout of the training data)")
        if X_val is not None:
            x_val = self._x(X_val, reset=False).astype(X.dtype, copy=False)  # one dtype, as one file
            y_val = _numpy(y_val)
            unknown = sorted(set(np.unique(y_val)) - set(self.classes_))
            if unknown:
                raise ValueError(f"y_val has labels not in y: {unknown[:5]}")
            fit_on, val = (
                data,
                as_features(x_val, self._encoder.transform(y_val), n_classes=len(self.classes_), split="val"),
            )
        else:
            held = self._held_out(labels)
            fit_on = dataclasses.replace(data, labels=np.where(held, -1, labels))
            val = dataclasses.replace(data, labels=np.where(held, labels, -1), split="val")
        result = self._train(fit_on, val)
        configs = self._heads()
        self.configs_ = configs
        self.best_params_ = dataclasses.asdict(configs[result.best])
        self.best_epoch_ = result.best_epoch
        self.best_score_ = result.best_metrics["val_top1"]
        self.scores_ = np.array(
            [max((r["val_top1"] for r in h if math.isfinite(r["val_top1"])), default=math.nan) for h in result.history]
        )
        return self

    def _heads(self) -> list[HeadConfig]:
        return grid(
            lr=self.lr,
            weight_decay=self.weight_decay,
            label_smoothing=self.label_smoothing,
            dropout=self.dropout,
            lr_decay=np.atleast_1d(self.lr_decay).tolist(),  # one number (as before the axis) or a list
        )

    def _held_out(self, labels: np.ndarray) -> np.ndarray:
        """The probe's class-stratified holdout (`featx.core.stats.holdout_rows`, so the same rows `featx probe`
        holds out); a plain seeded random share where some class has too few samples to stratify."""
        if not 0 < self.holdout < 1:
            raise ValueError(f"holdout={self.holdout}: give a share of the training data in (0, 1)")
        if len(labels) < 2:
            raise ValueError(
                f"LinearProbeCV needs 2 samples or more to hold some out, got {len(labels)} sample; "
                "pass X_val and y_val"
            )
        try:
            held = holdout_rows(labels, self.holdout, self.seed)
        except FeatxError:
            rows = np.random.default_rng(self.seed).permutation(len(labels))[
                : max(1, round(self.holdout * len(labels)))
            ]
            held = np.zeros(len(labels), dtype=bool)
            held[rows] = True
        n, classes = int(held.sum()), len(self.classes_)
        if n < MIN_PER_CLASS * classes:  # as featx probe warns; here the caller may pass X_val instead
            warnings.warn(
                f"LinearProbeCV chooses on a holdout of {n} samples ({n / classes:.1f} a class, under "
                f"{MIN_PER_CLASS}), too few to tell the grid's settings apart; pass X_val and y_val or more data",
                FeatxWarning,
                stacklevel=3,
            )
        return held
