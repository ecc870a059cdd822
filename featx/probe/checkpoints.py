"""A probe run's checkpoints read back as modules: what prediction, calibration and `finetune --init-head` take
from a probe run, without its training loop.

A checkpoint holds one head: a trained head (featx.core.runs.HEAD_FORMAT, a 1-head StackedHeads state), a k-NN head
or an NCM head (featx.probe.neighbors), with the config and feature set it was trained with.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from featx.core.errors import FeatxError
from featx.core.runs import HEAD_FORMAT, load_checkpoint, read_run
from featx.features.store import ALL, FeatureMeta, feature_set_columns
from featx.nets.heads import FeatureSetHeads, StackedHeads
from featx.probe.neighbors import KNN_FORMAT, NCM_FORMAT, KNNHeads, NCMHead


def heads_from_checkpoints(ckpts: Sequence[dict]) -> nn.Module:
    """The checkpoints of one run (one format) as one module whose predict_proba gives a head per checkpoint."""
    fmt = ckpts[0]["format"]
    if fmt == KNN_FORMAT:  # a run's k-NN checkpoints share their bank and differ in k
        state = ckpts[0]["state"]
        return KNNHeads(
            state["bank"],
            state["labels"],
            num_classes=len(ckpts[0]["classes"]),
            ks=[c["k"] for c in ckpts],
            temperature=ckpts[0]["temperature"],
        )
    if fmt == NCM_FORMAT:  # an NCM run has one checkpoint
        return NCMHead(ckpts[0]["state"]["means"], temperature=ckpts[0]["temperature"])
    if fmt != HEAD_FORMAT:
        raise ValueError(f"unknown checkpoint format {fmt!r}")
    # snapshots of one run share the architecture and normalisation, so they stack into one StackedHeads
    state = {
        k: v if k.startswith("norm_") else torch.cat([c["state"][k] for c in ckpts])
        for k, v in ckpts[0]["state"].items()
    }
    return StackedHeads.from_state(state, normalize=ckpts[0]["normalize"])


def probe_heads(ckpts: Sequence[dict], meta: FeatureMeta, *, path: str | Path) -> FeatureSetHeads:
    """A run's checkpoints as one module giving a head per checkpoint, in order: checkpoints of one feature set
    stacked (heads_from_checkpoints), each stack reading its set's columns."""
    sets = [c.get("config", {}).get("feature_set", ALL) for c in ckpts]
    names = list(dict.fromkeys(sets))
    groups = [[i for i, s in enumerate(sets) if s == name] for name in names]
    stacked = [i for g in groups for i in g]
    return FeatureSetHeads(
        [heads_from_checkpoints([ckpts[i] for i in g]) for g in groups],
        [feature_set_columns(meta, name, path=path) for name in names],
        order=None if len(groups) == 1 else [stacked.index(i) for i in range(len(ckpts))],
    )


def init_from_probe(run_dir: str, *, backbone: str, classes: list[str], head: nn.Module) -> None:
    """Start a network's linear head (head[-1]) from the best head of a `featx probe` run on the same backbone's
    features."""
    run = read_run(run_dir)
    if run.kind != "probe" or not run.checkpoints or run.features is None:
        raise FeatxError(f"--init-head {run_dir}: not a probe run with a saved head; run `featx probe` first")
    if run.features.get("backbone") != backbone:
        raise FeatxError(f"--init-head {run_dir}: trained on {run.features.get('backbone')} features, not {backbone}")
    linear = head[-1] if isinstance(head, nn.Sequential) else head
    assert isinstance(linear, nn.Linear)  # every featx network ends in one (featx.nets.models)
    ckpt = load_checkpoint(Path(run_dir) / run.checkpoints[0].file)
    if ckpt["classes"] != classes:
        raise FeatxError(f"--init-head {run_dir}: its classes differ from the data's; probe with the same --classes")
    state, normalize = ckpt["state"], ckpt["config"].get("normalize", "none")
    if "weights.1" in state or normalize == "l2":
        raise FeatxError(
            f"--init-head {run_dir}: only a linear probe head without l2 normalisation fits; "
            "probe with --hidden 0 --normalize none|standard"
        )
    w, b = state["weights.0"][0].T, state["biases.0"][0, 0]  # (C, D), (C,)
    if w.shape != linear.weight.shape:  # a head on several depths (probe --feature-set) reads other features
        raise FeatxError(
            f"--init-head {run_dir}: its head reads {w.shape[1]} features "
            f"({ckpt['config'].get('feature_set', 'all')}), this network's head {linear.in_features}; "
            "probe the pooled vector (--feature-set all, or last1 of a CNN's --layers file)"
        )
    if normalize == "standard":  # fold (x - mean) / std into the linear layer
        w = w / state["norm_std"]
        b = b - w @ state["norm_mean"]
    with torch.no_grad():
        linear.weight.copy_(w)
        linear.bias.copy_(b)
