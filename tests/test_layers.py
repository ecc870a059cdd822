"""Multi-layer features (`extract --layers`, `probe --feature-set`): the stored parts are what timm and torchvision
themselves return for those depths, the last one is today's single vector, a probe on `last1` is the probe on that
vector, a sweep over feature sets trains each set's heads as if alone, and predict reads the columns a head saw."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torchvision
from test_predict import assert_one_line_error, featx_cli
from torchvision.models.feature_extraction import create_feature_extractor

from featx.core.errors import FeatxError
from featx.core.runs import load_checkpoint, read_run
from featx.data.cache import read_split
from featx.evaluate.scoring import predict
from featx.features.extract import extract_features
from featx.features.store import FeatureMeta, feature_set_columns, load_features, read_meta, write_features
from featx.finetune.run import FinetuneConfig, finetune
from featx.nets.views import render_views
from featx.probe.run import HeadConfig, run_probe


def _inputs(cache, meta: FeatureMeta) -> torch.Tensor:
    """The val split's views exactly as extraction preprocessed them."""
    val = read_split(cache, "val")
    return render_views(
        torch.from_numpy(val.read_images()),
        views=meta.views,
        crop=meta.crop,
        size=meta.input_size,
        mean=meta.mean,
        std=meta.std,
    )


@pytest.fixture(scope="module")
def resnet_files(synth_cache, tmp_path_factory) -> dict[str, object]:
    """Random-init ResNet-18 features of the synthetic data: one vector per view, and its last 2 stages."""
    root = tmp_path_factory.mktemp("layers")
    common = dict(
        data=synth_cache,
        backbone="resnet18",
        weights="none",
        size=64,
        views="flip",
        dtype="float32",
        precision="fp32",
        progress=False,
    )  # compared with torchvision's fp32 forward
    return {
        "single": extract_features(**common, out=root / "single.h5"),
        "last2": extract_features(**common, layers="last2", out=root / "last2.h5"),
    }


@pytest.mark.numerics
def test_cnn_stages_are_torchvisions_pooled_stage_outputs(resnet_files, synth_cache):
    meta = read_meta(resnet_files["last2"])
    assert meta.layers == "last2" and meta.parts == [["layer3", 256], ["layer4", 512]]
    torch.manual_seed(0)  # featx's seeded --weights none
    model = torchvision.models.resnet18().eval()
    with torch.inference_mode():
        stages = create_feature_extractor(model, return_nodes=["layer3", "layer4"])(_inputs(synth_cache, meta))
    want = torch.cat([f.mean((2, 3)) for f in stages.values()], 1).reshape(-1, 2, 768).numpy()
    got = load_features(resnet_files["last2"], "val").features
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    # the last stage is the vector featx stores without --layers: readers of old files see the same values
    single = load_features(resnet_files["single"], "val").features
    np.testing.assert_allclose(got[..., feature_set_columns(meta, "last1", path="f")], single, rtol=1e-5, atol=1e-5)
    assert read_meta(resnet_files["single"]).identity() != meta.identity()


@pytest.mark.numerics
def test_vit_class_tokens_are_timms_intermediate_layers(synth_cache, tmp_path):
    timm = pytest.importorskip("timm")
    out = extract_features(
        data=synth_cache,
        backbone="timm:vit_tiny_patch16_224",
        weights="none",
        size=64,
        views="flip",
        dtype="float32",
        precision="fp32",
        layers="last3+avg",
        out=tmp_path / "vit.h5",
        progress=False,
    )  # compared with timm's fp32 forward
    meta = read_meta(out)
    assert meta.parts == [["block9", 192], ["block10", 192], ["block11", 192], ["avgpool", 192]]
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", num_classes=0).eval()
    model.set_input_size(img_size=64)
    x = _inputs(synth_cache, meta)
    with torch.inference_mode():
        blocks = model.get_intermediate_layers(x, n=3, return_prefix_tokens=True, norm=True)
        pre_logits = model.forward_head(model.forward_features(x), pre_logits=True)
    # DINOv2's linear input: the class tokens of the last blocks, then the mean patch token of the last
    want = torch.cat([prefix[:, 0] for _, prefix in blocks] + [blocks[-1][0].mean(1)], 1).reshape(-1, 2, 768)
    got = load_features(out, "val").features
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-4, atol=1e-4 * want.abs().max().item())
    last1 = got[..., feature_set_columns(meta, "last1", path=out)]
    np.testing.assert_allclose(last1, pre_logits.reshape(-1, 2, 192).numpy(), rtol=1e-4, atol=1e-4)
    assert feature_set_columns(meta, "last2+avg", path=out) == slice(192, 768)


@pytest.fixture(scope="module")
def padded(resnet_files, tmp_path_factory) -> object:
    """The single-vector file with other columns in front of it, laid out as a --layers last2 file."""
    single = {s: load_features(resnet_files["single"], s) for s in ("train", "val")}
    rng = np.random.default_rng(0)
    meta = dataclasses.replace(single["train"].meta, layers="last2", parts=[["layer3", 7], ["layer4", 512]])
    return write_features(
        tmp_path_factory.mktemp("padded") / "padded.h5",
        meta,
        {
            s: (
                np.concatenate([rng.normal(size=(*f.features.shape[:2], 7)).astype(np.float32), f.features], 2),
                f.labels,
                f.ids,
            )
            for s, f in single.items()
        },
    )


@pytest.mark.parametrize("normalize, dropout", [("standard", 0.0), ("l2", 0.3)])
def test_probe_on_last1_is_the_single_vector_probe(resnet_files, padded, tmp_path, normalize, dropout):
    common = dict(
        heads=[HeadConfig(lr=3e-3, dropout=dropout), HeadConfig(lr=1e-2, dropout=dropout)],
        epochs=3,
        batch_size=8,
        normalize=normalize,
        device="cpu",
        save="all",
        keep=3,
    )
    alone = run_probe(features=resnet_files["single"], out=tmp_path / "single", **common)
    swept = run_probe(features=padded, out=tmp_path / "sets", feature_sets=["last2", "last1"], **common)
    assert swept.feature_sets == ["last2", "last2", "last1", "last1"]
    for h in range(2):  # the last1 heads of a sweep are the single-vector heads, epoch by epoch
        for a, b in zip(alone.history[h], swept.history[2 + h]):
            assert a.keys() == b.keys()
            np.testing.assert_allclose(list(a.values()), list(b.values()), rtol=1e-5, atol=1e-6)
    run = read_run(tmp_path / "sets")
    assert run.config["feature_sets"] == ["last2", "last1"] and run.best["feature_set"] in ("last1", "last2")
    # predict slices each checkpoint's own columns: its scores reproduce what the probe measured on val
    for name, result in (("single", alone), ("sets", swept)):
        p = predict(runs=[tmp_path / name], split="val", ensemble="best", device="cpu")
        assert p.top_k(1) == pytest.approx(result.val["val_top1"])
    assert {load_checkpoint(tmp_path / "sets" / c.file)["config"]["feature_set"] for c in run.checkpoints} == {
        "last1",
        "last2",
    }
    p = predict(runs=[tmp_path / "sets"], split="val", ensemble="all", device="cpu")  # both sets in one ensemble
    assert len(p.members) == len(run.checkpoints)
    np.testing.assert_allclose(p.probs.sum(1), 1, atol=1e-5)


def test_feature_set_and_layers_mistakes_are_one_line(resnet_files, padded, synth_cache, tmp_path, capsys, monkeypatch):
    probe = ["probe", "--out", str(tmp_path / "p"), "--epochs", "1", "--device", "cpu", "--features"]
    code, _, err = featx_cli(capsys, monkeypatch, *probe, str(resnet_files["last2"]), "--feature-set", "last1,last3")
    assert_one_line_error(code, err, "--feature-set last3: not in")
    assert "choose from all, last1, last2" in err
    code, _, err = featx_cli(capsys, monkeypatch, *probe, str(resnet_files["last2"]), "--feature-set", "last2+avg")
    assert_one_line_error(code, err, "--feature-set last2+avg: not in")
    code, _, err = featx_cli(capsys, monkeypatch, *probe, str(resnet_files["last2"]), "--feature-set", "top2")
    assert_one_line_error(code, err, "--feature-set top2: write lastN or lastN+avg")
    code, _, err = featx_cli(capsys, monkeypatch, *probe, str(resnet_files["single"]), "--feature-set", "last1")
    assert_one_line_error(code, err, "stores one vector per view")
    code, _, err = featx_cli(
        capsys, monkeypatch, *probe, str(resnet_files["last2"]), "--head", "knn", "--feature-set", "last1,last2"
    )
    assert_one_line_error(code, err, "--head knn takes exactly one feature set")
    extract = [
        "extract",
        "--data",
        str(synth_cache),
        "--weights",
        "none",
        "--size",
        "32",
        "--views",
        "full",
        "--out",
        str(tmp_path / "x.h5"),
        "--device",
        "cpu",
        "--backbone",
    ]
    for backbone, layers, message in [
        ("resnet18", "last5", "resnet18 has 4 stages"),
        ("resnet18", "last1+avg", "+avg averages a ViT's patch tokens"),
        ("vit_b_16", "last1", "featx lists no stages for vit_b_16"),
    ]:
        code, _, err = featx_cli(capsys, monkeypatch, *extract, backbone, "--layers", layers)
        assert_one_line_error(code, err, message)
    assert not (tmp_path / "p").exists() and not (tmp_path / "x.h5").exists()
    # a head on two stages cannot start a fine-tuned network's head, which reads the pooled vector
    run_probe(
        features=padded, out=tmp_path / "two", heads=[HeadConfig()], feature_sets=["last2"], epochs=1, device="cpu"
    )
    with pytest.raises(FeatxError, match="its head reads 519 features \\(last2\\), this network's head 512"):
        finetune(
            FinetuneConfig(
                data=synth_cache,
                backbone="resnet18",
                weights="none",
                size=32,
                epochs=1,
                batch_size=8,
                init_head=str(tmp_path / "two"),
                device="cpu",
            ),
            out=tmp_path / "ft",
            progress=False,
        )
