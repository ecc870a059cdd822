"""featx probe: stacked heads, sweeps in one pass, the run directory, user errors, and a real probe."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from featx.core.runs import load_checkpoint, read_run, start_run
from featx.features.store import FeatureMeta, load_features, write_features
from featx.front.cli import main
from featx.nets.heads import StackedHeads, smoothed_cross_entropy, topk_correct
from featx.probe.run import HeadConfig, StreamedSplit, grid, run_probe, train

VIEWS = ["full", "full_flip", "top_left"]


def write_synthetic(
    path: Path,
    *,
    classes: int = 4,
    dim: int = 16,
    views: int = 3,
    n_train: int = 120,
    n_val: int = 40,
    noise: float = 0.02,
    val_labels: bool = True,
    poison: float | None = None,
) -> Path:
    """A feature file of Gaussian blobs around orthogonal class centres: linearly separable at small noise."""
    rng = np.random.default_rng(0)
    centres = 2 * np.eye(classes, dim, dtype=np.float32)

    def split(n: int, labelled: bool):
        y = np.arange(n) % classes
        x = centres[y][:, None, :] + noise * rng.standard_normal((n, views, dim), dtype=np.float32)
        return x.astype(np.float16), np.where(labelled, y, -1), [f"img{i}.JPEG" for i in range(n)]

    splits = {"train": split(n_train, True), "val": split(n_val, val_labels)}
    if poison is not None:
        splits["train"][0][3, 1, 2] = poison
    names = [f"n{k:08d}" for k in range(classes)]
    meta = FeatureMeta(
        backbone="synthetic",
        weights="none",
        input_size=64,
        views=VIEWS[:views],
        crop=56,
        mean=[0.5] * 3,
        std=[0.5] * 3,
        precision="fp32",
        dtype="float16",
        dataset="synthetic",
        dataset_fingerprint="synthetic-0",
        classes=names,
        class_names=names,
        featx_version="test",
    )
    return write_features(path, meta, splits)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    return write_synthetic(tmp_path_factory.mktemp("probe") / "synthetic.h5")


def _splits(path: Path):
    return load_features(path, "train"), load_features(path, "val")


def probe_cli(capsys, monkeypatch, *args: str) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["featx", "probe", *args])
    with pytest.raises(SystemExit) as exit:
        main()
    out, err = capsys.readouterr()
    return exit.value.code, out, err


# --- training --------------------------------------------------------------------------------------


def test_separable_features_reach_100_percent_and_the_smoothed_optimum(synthetic):
    eps, classes = 0.2, 4
    tr, va = _splits(synthetic)
    result = train(
        tr,
        val=va,
        heads=[HeadConfig(lr=0.05, weight_decay=0.0, label_smoothing=eps, lr_decay=0.9)],
        epochs=20,
        batch_size=20,
        device="cpu",
    )
    assert result.best_metrics["val_top1"] == 1.0
    # with smoothed targets q the loss is bounded below by the entropy H(q), which a linear head reaches
    q = np.array([1 - eps + eps / classes] + [eps / classes] * (classes - 1))
    entropy = float(-(q * np.log(q)).sum())
    x = torch.from_numpy(tr.features[:, 0]).float()
    loss = smoothed_cross_entropy(result.heads(x), torch.from_numpy(tr.labels), torch.tensor([eps]))
    assert loss.item() == pytest.approx(entropy, abs=1e-3)
    assert result.history[0][-1]["train_loss"] == pytest.approx(entropy, abs=1e-3)


@pytest.mark.parametrize("head", ["linear", "mlp"])
def test_a_sweep_gives_each_head_what_it_gets_alone(synthetic, head):
    tr, va = _splits(synthetic)
    configs = grid(lr=[1e-3, 1e-2, 3e-2], weight_decay=[0.0, 0.05], label_smoothing=[0.1], dropout=[0.0, 0.3])
    assert len(configs) == 12
    # exact in fp32; bf16's matmul kernels may round a stack of 12 heads differently from one head
    common = dict(head=head, hidden=32, epochs=2, batch_size=16, seed=3, device="cpu", precision="fp32")
    sweep = train(tr, val=va, heads=configs, **common)
    for h, config in enumerate(configs):
        alone = train(tr, val=va, heads=[config], **common)
        for stacked, single in zip(sweep.heads.head_state(h).values(), alone.heads.head_state(0).values()):
            torch.testing.assert_close(stacked, single, rtol=1e-5, atol=1e-6)
        for a, b in zip(sweep.history[h], alone.history[0]):
            assert a == pytest.approx(b, rel=1e-5, abs=1e-6)


def test_top_k_counts_agree_with_topk_and_ties_count_against_the_label():
    g = torch.Generator().manual_seed(0)
    scores, labels = torch.rand(3, 50, 20, generator=g), torch.randint(20, (50,), generator=g)
    for k in (1, 5):
        want = (scores.topk(k, dim=-1).indices == labels.view(1, -1, 1)).any(-1).sum(1)
        assert topk_correct(scores, labels, k).tolist() == want.tolist()
    # a head that outputs the same score for every class has found nothing
    assert topk_correct(torch.ones(1, 50, 20), labels, 5).tolist() == [0]


def test_a_diverging_head_is_stopped_and_the_others_go_on(synthetic):
    tr, va = _splits(synthetic)
    result = train(tr, val=va, heads=grid(lr=[0.05, 1e38], weight_decay=[0.0]), epochs=3, batch_size=20, device="cpu")
    assert result.status[0] == "ok" and result.status[1].startswith("stopped in epoch 1")
    assert all(math.isnan(r["val_top1"]) for r in result.history[1])
    assert result.best == 0 and result.best_metrics["val_top1"] == 1.0


def test_streaming_from_hdf5_trains_as_well(synthetic):
    result = train(
        StreamedSplit(synthetic, "train"),
        val=StreamedSplit(synthetic, "val", "full"),
        heads=[HeadConfig(lr=0.05)],
        epochs=5,
        batch_size=20,
        normalize="standard",
        device="cpu",
    )
    assert result.best_metrics["val_top1"] == 1.0


def test_different_extractions_are_refused(synthetic, tmp_path):
    other = write_synthetic(tmp_path / "other.h5", dim=16, views=2)
    with h5py.File(other, "r+") as f:  # the same split layout from another extraction
        meta = json.loads(f.attrs["meta"])
        meta["backbone"] = "another"
        f.attrs["meta"] = json.dumps(meta)
    with pytest.raises(Exception, match="another extraction"):
        train(load_features(synthetic, "train"), val=load_features(other, "val"), device="cpu")


# --- the command line and the run directory ----------------------------------------------------------


def test_cli_writes_the_run_directory(synthetic, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    code, stdout, _ = probe_cli(
        capsys,
        monkeypatch,
        "--features",
        str(synthetic),
        "--out",
        str(out),
        "--lr",
        "1e-3,3e-2",
        "--weight-decay",
        "0,1e-3",
        "--epochs",
        "3",
        "--batch-size",
        "20",
        "--keep",
        "2",
        "--save",
        "all",
        "--device",
        "cpu",
    )
    assert code == 0
    table, summary = stdout.strip().splitlines()[:-1], stdout.strip().splitlines()[-1]
    assert len(table) == 5 and sum(line.startswith("*") for line in table) == 1
    assert summary.startswith("probe: best lr=") and "val top-1 100.00%" in summary

    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["heads"]) == 4
    for head in metrics["heads"]:
        assert set(head["config"]) == {"lr", "weight_decay", "label_smoothing", "dropout", "lr_decay"}
        assert [r["epoch"] for r in head["epochs"]] == [1, 2, 3]
        for row in head["epochs"]:
            assert set(row) == {"epoch", "train_loss", "train_top1", "val_loss", "val_top1", "val_top5"}
            assert all(0 <= row[k] <= 1 for k in ("train_top1", "val_top1", "val_top5"))
    best = metrics["best"]
    assert best["val_top1"] == 1.0 and set(best["config"]) == {
        "lr",
        "weight_decay",
        "label_smoothing",
        "dropout",
        "lr_decay",
    }
    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 12 and {"head", "lr", "epoch", "val_top1"} <= set(rows[0])
    assert (out / "curves.png").stat().st_size > 1000

    run = read_run(out)
    assert run.kind == "probe" and run.config["epochs"] == 3 and len(run.checkpoints) == 8
    assert run.checkpoints[0].file == best["checkpoint"]
    # any checkpoint scores raw stored features on its own, as `featx predict` does
    ckpt = load_checkpoint(out / best["checkpoint"])
    assert ckpt["format"] == "featx-head-1" and ckpt["features"]["identity"] == read_run(out).features["identity"]
    assert ckpt["config"]["lr"] == best["config"]["lr"] and ckpt["config"]["optimizer"] == "adam"
    heads = StackedHeads.from_state(ckpt["state"], normalize=ckpt["normalize"])
    val = load_features(synthetic, "val")
    probs = heads.predict_proba(torch.from_numpy(val.features))
    assert (probs[0].argmax(-1).numpy() == val.labels).mean() == ckpt["val_top1"] == 1.0


def test_save_best_keeps_only_the_best_heads_snapshots(synthetic, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    code, _, _ = probe_cli(
        capsys,
        monkeypatch,
        "--features",
        str(synthetic),
        "--out",
        str(out),
        "--lr",
        "1e-4,3e-2",
        "--epochs",
        "2",
        "--head",
        "mlp",
        "--hidden",
        "8",
        "--stream",
        "--device",
        "cpu",
    )
    assert code == 0
    run = read_run(out)
    assert {c.key for c in run.checkpoints} == {run.best["head"]} and len(run.checkpoints) == 2
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == sorted(Path(c.file).name for c in run.checkpoints)


@pytest.mark.parametrize(
    "case, message",
    [
        ("unfinished", "extraction unfinished"),
        ("nan", "NaN/inf"),
        ("unlabelled", "no labels to validate on"),
        ("bad-lr", "--lr 1e-3,fast: give comma-separated numbers (e.g. 1e-4,3e-4)"),
        ("no-val", "--select val: "),
        ("finetune-run", "holds a `featx finetune` run"),
        ("unknown-view", "split 'train' has no view top_middle"),
        ("aug-eval", "has no view aug0 (augmented views are for training only)"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(case, message, tmp_path, capsys, monkeypatch):
    path = tmp_path / "f.h5"
    args = ["--features", str(path), "--out", str(tmp_path / "run"), "--device", "cpu"]
    if case == "unfinished":
        write_synthetic(path)
        with h5py.File(path, "r+") as f:
            f.attrs["complete"] = False
    elif case == "nan":
        write_synthetic(path, poison=float("nan"))
    elif case == "unlabelled":
        write_synthetic(path, val_labels=False)
    elif case == "bad-lr":
        write_synthetic(path)
        args += ["--lr", "1e-3,fast"]
    elif case == "no-val":
        write_synthetic(path)
        with h5py.File(path, "r+") as f:
            del f["val"]
        args += ["--select", "val"]  # without val the default selects on a holdout of train (test_trust)
    elif case == "finetune-run":
        write_synthetic(path)
        start_run(tmp_path / "run", kind="finetune", config={}, features={})
    elif case == "unknown-view":
        write_synthetic(path)
        args += ["--train-views", "full,top_middle"]
    elif case == "aug-eval":
        write_synthetic(path)
        args += ["--eval-views", "aug0"]
    code, stdout, stderr = probe_cli(capsys, monkeypatch, *args)
    assert code == 2 and stdout == ""
    assert len(stderr.strip().splitlines()) == 1 and message in stderr and stderr.startswith("featx: error:")


def _only_views(src: Path, dst: Path, names: list[str]) -> Path:
    """A copy of src's train and val holding only the named views, as an extraction of just those would."""
    splits = {s: load_features(src, s, views=names) for s in ("train", "val")}
    meta = dataclasses.replace(splits["train"].meta, views=names)
    return write_features(dst, meta, {s: (f.features, f.labels, f.ids) for s, f in splits.items()})


def _heads(run: Path) -> list[dict]:
    return [load_checkpoint(run / s.file)["state"] for s in read_run(run).checkpoints]


@pytest.mark.parametrize("names", ["full", "top_left,full"])
def test_views_by_name_train_as_a_file_of_only_those_views(names, tmp_path, capsys, monkeypatch):
    path = write_synthetic(tmp_path / "f.h5", noise=1.0)
    alone = _only_views(path, tmp_path / "alone.h5", names.split(","))
    common = ["--device", "cpu", "--epochs", "2", "--keep", "2"]
    assert (
        probe_cli(
            capsys,
            monkeypatch,
            "--features",
            str(path),
            "--out",
            str(tmp_path / "named"),
            "--train-views",
            names,
            "--eval-views",
            names,
            *common,
        )[0]
        == 0
    )
    assert (
        probe_cli(
            capsys,
            monkeypatch,
            "--features",
            str(alone),
            "--out",
            str(tmp_path / "alone"),
            "--train-views",
            "all",
            "--eval-views",
            "all",
            *common,
        )[0]
        == 0
    )
    named, by_file = read_run(tmp_path / "named"), read_run(tmp_path / "alone")
    assert [(s.epoch, s.val_top1, s.val_top5) for s in named.checkpoints] == [
        (s.epoch, s.val_top1, s.val_top5) for s in by_file.checkpoints
    ]
    for a, b in zip(_heads(tmp_path / "named"), _heads(tmp_path / "alone")):
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_snapshots_every_n_steps_keep_the_best_across_steps(tmp_path):
    path = write_synthetic(tmp_path / "f.h5", noise=1.5)
    # select="val": every training row is trained on, so an epoch is 12 steps of 10
    common = dict(
        features=path, heads=[HeadConfig()], epochs=3, batch_size=10, snapshot_every=5, select="val", device="cpu"
    )
    run_probe(out=tmp_path / "all", keep=100, **common)
    run_probe(out=tmp_path / "best3", keep=3, **common)
    every = read_run(tmp_path / "all").checkpoints
    # 12 steps an epoch: validated at steps 5 and 10 within each epoch and at its end
    assert sorted(s.step for s in every) == [5, 10, 12, 15, 20, 24, 25, 30, 35, 36]
    assert sorted((s.epoch, s.step) for s in every)[:3] == [(1, 5), (1, 10), (1, 12)]
    assert len({s.file for s in every}) == 10 and all((tmp_path / "all" / s.file).exists() for s in every)
    best3 = read_run(tmp_path / "best3")
    assert [(s.step, s.val_top1) for s in best3.checkpoints] == [(s.step, s.val_top1) for s in every[:3]]
    assert sorted(p.name for p in (tmp_path / "best3" / "checkpoints").glob("*.pt")) == sorted(
        Path(s.file).name for s in best3.checkpoints
    )
    assert best3.best["step"] == every[0].step and best3.best["select_top1"] == every[0].val_top1
    assert len({s.val_top1 for s in every}) > 1  # noisy enough that the ranking means something


# --- real features --------------------------------------------------------------------------------


@pytest.mark.slow
def test_real_linear_probe_matches_logistic_regression(mobilenet_features_20, tmp_path):
    from sklearn.linear_model import LogisticRegression

    tr, va = _splits(mobilenet_features_20)
    result = train(tr, val=va, heads=grid(lr=[3e-4, 6.5e-4, 1e-3, 3e-3]), device="cpu")
    ours = result.best_metrics["val_top1"]

    x, xv = tr.features[:, 0].astype(np.float32), va.features[:, 0].astype(np.float32)
    sklearn_best = max(
        LogisticRegression(C=c, max_iter=1000).fit(x, tr.labels).score(xv, va.labels)
        for c in (0.01, 0.1, 1.0, 10.0, 100.0)
    )
    print(f"probe val top-1 {ours:.4f}, sklearn best {sklearn_best:.4f}")
    assert ours >= 0.75
    assert ours >= sklearn_best - 0.01


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_trains_the_same_heads_as_cpu(synthetic):
    tr, va = _splits(synthetic)
    runs = [
        train(tr, val=va, heads=grid(lr=[1e-3, 1e-2], weight_decay=[0.0, 0.05]), epochs=2, batch_size=16, device=device)
        for device in ("cpu", "cuda")
    ]
    for a, b in zip(runs[0].heads.state_dict().values(), runs[1].heads.state_dict().values()):
        torch.testing.assert_close(a, b.cpu(), rtol=1e-4, atol=1e-5)
