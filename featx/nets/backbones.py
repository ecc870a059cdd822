"""Backbones: one registry from name to constructor, input size, feature dim, normalisation and head.

`create_backbone(name, weights=...)` returns a model that maps normalised (B, 3, S, S) images to pooled
features (B, D): the classifier layer named by `head` is replaced by Identity, so features come from the
network's own pooling layer. With `layers="lastN"` (or `"lastN+avg"`) the model returns features of several
depths concatenated instead (see `LayerFeatures`); `Backbone.parts` names them. Weights come from torchvision's
weights API ("default", or a name such as "IMAGENET1K_V2"), a local state_dict (PATH, loaded with weights_only=True)
or seeded random init ("none"). `timm:<name>` uses timm when installed: its pretrained config, its loader and its
pre-logits features.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
import urllib.error
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor

from featx.core.errors import FeatxError
from featx.core.progress import bars_shown

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# TF-style normalisation to [-1, 1]: what torchvision's Inception-v3 weights expect (transform_input=True
# performs exactly this conversion internally; we normalise this way directly and switch it off).
HALF = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    constructor: Callable[..., nn.Module]
    input_size: int
    feature_dim: int
    head: str  # dotted path of the classifier layer that pooled features feed
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    kwargs: dict = field(default_factory=dict)  # constructor arguments the weights need
    torchvision: bool = True  # default weights from torchvision's weights API
    # graph nodes ending each resolution stage, shallowest first: `--layers lastN` pools the last N
    stages: tuple[str, ...] = ()


@dataclass
class Backbone:
    name: str
    model: nn.Module  # normalised images (B, 3, S, S) -> pooled features (B, D)
    feature_dim: int
    input_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    weights_id: str  # torchvision weights name, "sha256:<hex>" of a file, or "none"
    parts: list[tuple[str, int]] = field(default_factory=list)  # name and dim of each layer; [] = one vector


REGISTRY: dict[str, BackboneSpec] = {}


def register_backbone(spec: BackboneSpec) -> BackboneSpec:
    REGISTRY[spec.name] = spec
    return spec


def _tv(name: str) -> Callable[..., nn.Module]:
    return lambda **kw: torchvision.models.get_model(name, weights=None, **kw)


# The stage ends at strides 4, 8, 16 and 32; the last is the node the network's own pooling reads, so
# `--layers last1` stores the usual pooled vector (ConvNeXt's head norm aside).
_RESNET_STAGES = ("layer1", "layer2", "layer3", "layer4")
_MOBILE_STAGES = ("features.3", "features.6", "features.13", "features.18")
_EFFICIENT_STAGES = ("features.2", "features.3", "features.5", "features.8")
_CONVNEXT_STAGES = ("features.1", "features.3", "features.5", "features.7")
for _name, _dim in [("resnet18", 512), ("resnet34", 512), ("resnet50", 2048), ("resnet101", 2048), ("resnet152", 2048)]:
    register_backbone(BackboneSpec(_name, _tv(_name), 224, _dim, "fc", stages=_RESNET_STAGES))
register_backbone(BackboneSpec("mobilenet_v2", _tv("mobilenet_v2"), 224, 1280, "classifier", stages=_MOBILE_STAGES))
for _name, _dim in [
    ("efficientnet_b0", 1280),
    ("efficientnet_b1", 1280),
    ("efficientnet_b2", 1408),
    ("efficientnet_b3", 1536),
]:
    register_backbone(BackboneSpec(_name, _tv(_name), 224, _dim, "classifier", stages=_EFFICIENT_STAGES))
for _name, _dim in [("convnext_tiny", 768), ("convnext_small", 768), ("convnext_base", 1024)]:
    register_backbone(BackboneSpec(_name, _tv(_name), 224, _dim, "classifier.2", stages=_CONVNEXT_STAGES))
register_backbone(BackboneSpec("vit_b_16", _tv("vit_b_16"), 224, 768, "heads"))
for _name, _dim in [("swin_t", 768), ("swin_s", 768), ("swin_b", 1024)]:
    register_backbone(BackboneSpec(_name, _tv(_name), 224, _dim, "head"))
register_backbone(
    BackboneSpec(
        "inception_v3",
        _tv("inception_v3"),
        299,
        2048,
        "fc",
        mean=HALF,
        std=HALF,
        # init_weights=False because loaded weights overwrite them and its truncated-normal init is slow.
        kwargs={"aux_logits": True, "transform_input": False, "init_weights": False},
    )
)


def list_backbones() -> list[BackboneSpec]:
    return list(REGISTRY.values())


def get_spec(name: str) -> BackboneSpec:
    if name not in REGISTRY:
        close = difflib.get_close_matches(name, REGISTRY, n=1)
        hint = f"did you mean `{close[0]}`? " if close else ""
        raise FeatxError(
            f"--backbone {name!r}: unknown; {hint}known: {', '.join(REGISTRY)}, or timm:<name> with timm installed"
        )
    return REGISTRY[name]


def _set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, attr = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, module)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state_dict from .pth/.pt (never unpickling code) or .safetensors; unwraps {"state_dict": ...}."""
    if not path.is_file():
        raise FeatxError(
            f"--weights {path}: no such file; pass a state_dict .pth/.pt/.safetensors, 'default' or 'none'"
        )
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise FeatxError(f"--weights {path}: reading .safetensors needs `pip install safetensors`") from None
        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise FeatxError(
            f"--weights {path}: not a loadable state_dict ({type(e).__name__}); "
            "save one with torch.save(model.state_dict(), ...)"
        ) from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise FeatxError(f"--weights {path}: holds a {type(state).__name__}, not a state_dict")
    return state


def read_sidecar(path: Path) -> dict:
    """mean/std/input_size from a JSON beside a weights file (same stem), if there is one."""
    side = path.with_suffix(".json")
    if not side.is_file():
        return {}
    try:
        return json.loads(side.read_text())
    except json.JSONDecodeError as e:
        raise FeatxError(f"{side}: not valid JSON ({e.msg} at line {e.lineno}); fix or remove it") from None


def _load_state(model: nn.Module, head: str, state: dict[str, torch.Tensor], source: str) -> None:
    # The classifier is replaced by Identity and Inception's aux branch is dropped, so their weights (a head
    # of any size: 1000, 1001 or 200 classes) are ignored.
    skip = (head + ".", "AuxLogits.")
    state = {k: v for k, v in state.items() if not k.startswith(skip)}
    own = model.state_dict()
    wrong = [k for k, v in state.items() if k in own and v.shape != own[k].shape]
    if wrong:
        raise FeatxError(
            f"{source}: does not fit this backbone ({wrong[0]} has shape {list(state[wrong[0]].shape)}, "
            f"the backbone's is {list(own[wrong[0]].shape)}); pick the matching --backbone"
        )
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith(skip)]
    if missing or unexpected:
        keys = missing or unexpected
        what = f"{'missing' if missing else 'unexpected'} keys {keys[:4]}{', ...' if len(keys) > 4 else ''}"
        raise FeatxError(f"{source}: does not fit this backbone ({what}); pick the matching --backbone")


def named_weights(name: str, weights: str | Path) -> torchvision.models.WeightsEnum | None:
    """The torchvision weights that `weights` names for registered backbone `name`: "default" (the registry's
    choice, torchvision's DEFAULT) or a member of its enum ("IMAGENET1K_V1", "IMAGENET1K_V2", "DEFAULT", ...).
    None for "none" and for an existing file, which wins over a name; anything else is no such file."""
    spec, weights = get_spec(name), str(weights)
    if weights == "default" and not spec.torchvision:
        raise FeatxError(f"--backbone {name} has no pretrained weights; use --weights none or PATH")
    if weights == "none" or (weights != "default" and Path(weights).exists()) or not spec.torchvision:
        return None
    members = torchvision.models.get_model_weights(spec.name).__members__
    if weights == "default":
        return members["DEFAULT"]
    if weights not in members and "/" not in weights and Path(weights).suffix == "":
        raise FeatxError(
            f"--weights {weights}: no such file, nor torchvision weights of {name}; name one of "
            f"{', '.join(members)}, a state_dict file, 'default' or 'none'",
            option="weights",
        )
    return members.get(weights)


def weights_file(weights: torchvision.models.WeightsEnum) -> Path:
    """Where torchvision looks for these weights before downloading them (the URL's file name)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name


def _load_torchvision(model: nn.Module, spec: BackboneSpec, weights: torchvision.models.WeightsEnum) -> str:
    try:
        state = weights.get_state_dict(progress=bars_shown(), check_hash=True)
    except (urllib.error.URLError, OSError) as e:
        target = weights_file(weights)
        raise FeatxError(
            f"--weights {weights.name}: cannot download {weights.url} ({getattr(e, 'reason', e)}); "
            f"save that file as {target} or pass --weights PATH",
            option="weights",
        ) from None
    _load_state(model, spec.head, state, str(weights))
    return f"torchvision:{weights}"


class TimmFeatures(nn.Module):
    """A timm model's pre-logits features: its own pooling (class token, average or attention pool) and
    head norm, up to but not including the classifier, the same path for every timm family."""

    model: Any  # a timm model: forward_head and forward_features are timm's, not nn.Module's

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self.model.forward_features(x), pre_logits=True)


LAYERS_SPEC = re.compile(r"last([1-9][0-9]*)(\+avg)?")
AVGPOOL = "avgpool"  # the part holding a ViT's average-pooled patch tokens


def parse_layers(spec: str, option: str) -> tuple[int, bool]:
    """`lastN` or `lastN+avg` -> (N, avg); `option` names the flag in the error."""
    m = LAYERS_SPEC.fullmatch(spec)
    if not m:
        raise FeatxError(f"{option} {spec}: write lastN or lastN+avg, e.g. last2 or last4+avg")
    return int(m[1]), m[2] is not None


class LayerFeatures(nn.Module):
    """Features of several depths, concatenated in `names` order: `parts(x)` gives them one by one."""

    names: list[str]

    def parts(self, x: torch.Tensor) -> list[torch.Tensor]:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat(self.parts(x), 1)

    def layout(self, size: int) -> list[tuple[str, int]]:
        """(name, dim) of each part, from one blank image."""
        was_training = self.training
        with torch.inference_mode():
            dims = [p.shape[1] for p in self.eval().parts(torch.zeros(1, 3, size, size))]
        self.train(was_training)
        return list(zip(self.names, dims))


class StageFeatures(LayerFeatures):
    """Globally average-pooled outputs of a torchvision model's stage nodes (torchvision's feature extractor)."""

    def __init__(self, model: nn.Module, nodes: Sequence[str]):
        super().__init__()
        self.names = list(nodes)
        dual = create_feature_extractor(model, return_nodes=self.names).eval()
        # Its eval graph as a plain GraphModule: frozen features never train, and the deepcopy that BatchNorm
        # folding makes of a train/eval DualGraphModule comes back in train mode, which refuses folding.
        self.extractor = torch.fx.GraphModule(dual, dual.graph)

    def parts(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [f.mean((2, 3)) for f in self.extractor(x).values()]


class TimmLayers(LayerFeatures):
    """A timm model's last n blocks through its `forward_intermediates`: for a model with a class token (ViT,
    EVA, DINOv2) the normed class token of each block and, with `avg`, the last block's mean patch token, as
    DINOv2's linear evaluation takes them; for the others (CNNs, Swin) each stage's average-pooled output."""

    model: Any  # a timm model: blocks, feature_info and forward_intermediates are timm's

    def __init__(self, model: nn.Module, name: str, n: int, avg: bool):
        super().__init__()
        self.model, self.n, self.avg = model, n, avg
        self.tokens = getattr(model, "cls_token", None) is not None
        if self.tokens:
            depth = len(self.model.blocks)
            self.names = [f"block{i}" for i in range(depth - n, depth)] + ([AVGPOOL] if avg else [])
        else:
            if avg:
                raise FeatxError(
                    f"--layers last{n}+avg: timm:{name} has no class token and patch tokens; use --layers last{n}"
                )
            depth = len(self.model.feature_info)
            self.names = [info["module"] for info in self.model.feature_info[-n:]]
        if n > depth:
            raise FeatxError(f"--layers last{n}: timm:{name} has {depth} blocks or stages; ask for at most {depth}")

    def parts(self, x: torch.Tensor) -> list[torch.Tensor]:
        if not self.tokens:
            return [
                f.mean((2, 3)) for f in self.model.forward_intermediates(x, indices=self.n, intermediates_only=True)
            ]
        blocks = self.model.forward_intermediates(
            x, indices=self.n, return_prefix_tokens=True, norm=True, output_fmt="NLC", intermediates_only=True
        )
        return [prefix[:, 0] for _, prefix in blocks] + ([blocks[-1][0].mean(1)] if self.avg else [])


def _stage_features(model: nn.Module, spec: BackboneSpec, layers: str) -> StageFeatures:
    n, avg = parse_layers(layers, "--layers")
    if not spec.stages:
        raise FeatxError(
            f"--layers {layers}: featx lists no stages for {spec.name}; drop --layers or pick a "
            "backbone that has them (ResNets, MobileNetV2, EfficientNets, ConvNeXts, timm:<name>)"
        )
    if avg:
        raise FeatxError(
            f"--layers {layers}: +avg averages a ViT's patch tokens; {spec.name} is a CNN, use --layers last{n}"
        )
    if n > len(spec.stages):
        raise FeatxError(
            f"--layers {layers}: {spec.name} has {len(spec.stages)} stages; ask for at most last{len(spec.stages)}"
        )
    return StageFeatures(model, spec.stages[-n:])


def _timm_download_hint(cfg) -> str:
    """Where the default weights of a timm pretrained config come from, as the fix for an offline machine."""
    if cfg.hf_hub_id:
        url = f"https://huggingface.co/{cfg.hf_hub_id}/resolve/main/{cfg.hf_hub_filename or 'model.safetensors'}"
        return f"download {url} and pass that file with --weights PATH"
    target = Path(torch.hub.get_dir()) / "checkpoints" / Path(cfg.url).name
    return f"place {cfg.url} at {target} or pass --weights PATH"


def _create_timm(name: str, weights: str, *, size: int | None, seed: int, layers: str | None) -> Backbone:
    """A timm model through timm's own loader (its checkpoint filters adapt official checkpoints), with
    mean, std and input size from its pretrained config, or from a JSON beside a weights file."""
    try:
        import timm
    except ImportError:
        raise FeatxError(f"--backbone timm:{name}: timm is not installed; `pip install featx[timm]`") from None
    if not timm.is_model(name):
        raise FeatxError(f"--backbone timm:{name}: timm knows no such model; see timm.list_models()")
    cfg = timm.models.get_pretrained_cfg(name)
    overlay = {}
    if weights == "default" and not (cfg and cfg.has_weights):
        raise FeatxError(
            f"--backbone timm:{name}: timm has no pretrained weights for it; name a tag from "
            f"timm.list_pretrained('{name.split('.')[0]}*') or use --weights none or PATH"
        )
    if weights not in ("default", "none"):
        # The classifier is dropped (features stop before it), so a head of any size fits; with the
        # overlay's num_classes equal to the model's, timm then loads every other key strictly.
        classifier = cfg.classifier if cfg else None
        heads = (classifier,) if isinstance(classifier, str) else tuple(classifier or ())
        drop = {f"{h}.{p}" for h in heads for p in ("weight", "bias")}
        overlay = {
            "state_dict": {k: v for k, v in read_state_dict(Path(weights)).items() if k not in drop},
            "num_classes": 0,
        }
    # Seeded like the registry's backbones: "none" names one set of weights on every rank and resume.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            model: Any = timm.create_model(  # its pretrained_cfg, set_input_size, num_features are timm's
                name, pretrained=weights != "none", num_classes=0, pretrained_cfg_overlay=overlay
            )
        except Exception as e:
            if weights == "default":
                raise FeatxError(
                    f"--backbone timm:{name}: cannot download its weights ({type(e).__name__}); "
                    f"{_timm_download_hint(cfg)}"
                ) from None
            if weights == "none":
                raise
            problem = str(e).strip().splitlines()[-1].strip()[:160]
            raise FeatxError(
                f"--weights {weights}: does not fit timm:{name} ({problem}); pick the matching --backbone"
            ) from None
    model.pretrained_cfg["state_dict"] = None  # timm keeps the overlay; the loaded weights live in the model
    data = timm.data.resolve_model_data_config(model)
    mean, std, input_size = data["mean"], data["std"], data["input_size"][-1]
    if weights == "default":
        assert cfg is not None  # checked above: default weights come with a pretrained config
        weights_id = "timm:" + ".".join(filter(None, (cfg.architecture, cfg.tag)))
    elif weights == "none":
        weights_id = _seeded_id(seed)
    else:
        side = read_sidecar(Path(weights))
        mean, std, input_size = side.get("mean", mean), side.get("std", std), side.get("input_size", input_size)
        weights_id = "sha256:" + file_sha256(Path(weights))
    if size and size != input_size and hasattr(model, "set_input_size"):
        model.set_input_size(img_size=size)  # models with a fixed grid (ViT, Swin, EVA) resample it
    input_size = size or input_size
    if layers:
        features = TimmLayers(model, name, *parse_layers(layers, "--layers"))
        parts = features.layout(input_size)
        return Backbone(
            f"timm:{name}", features, sum(d for _, d in parts), input_size, tuple(mean), tuple(std), weights_id, parts
        )
    return Backbone(
        f"timm:{name}",
        TimmFeatures(model),
        getattr(model, "head_hidden_size", model.num_features),
        input_size,
        tuple(mean),
        tuple(std),
        weights_id,
    )


def _seeded_id(seed: int) -> str:
    return "none" if seed == 0 else f"none:seed{seed}"


def input_spec(name: str, weights: str | Path = "default") -> tuple[tuple[float, ...], tuple[float, ...], int]:
    """(mean, std, input size) that the weights expect: the registry's for "default" and "none", torchvision's
    transform for named weights (its crop size), or the JSON beside a weights file."""
    spec = get_spec(name)
    if str(weights) in ("default", "none"):
        return spec.mean, spec.std, spec.input_size
    named = named_weights(name, weights)
    if named is not None:
        t = named.transforms()
        # Inception's registry normalisation replaces torchvision's transform_input, which featx switches off
        own = spec.kwargs.get("transform_input") is False
        mean, std = (spec.mean, spec.std) if own else (tuple(t.mean), tuple(t.std))
        return mean, std, t.crop_size[0]
    side = read_sidecar(Path(weights))
    return tuple(side.get("mean", spec.mean)), tuple(side.get("std", spec.std)), side.get("input_size", spec.input_size)


def create_backbone(
    name: str, *, weights: str | Path = "default", size: int | None = None, seed: int = 0, layers: str | None = None
) -> Backbone:
    """The frozen-feature model of a registered backbone with its normalisation and input size.

    weights: "default" (torchvision's ImageNet weights), a torchvision weights name of the model
    ("IMAGENET1K_V2", with that recipe's normalisation and crop size), "none" (random init from `seed`) or a
    state_dict path; a JSON beside the path may give mean, std and input_size. `size` overrides the input size.
    `layers` ("lastN", "lastN+avg"): features of the last N stages or blocks, concatenated (see parse_layers).
    """
    weights = str(weights)
    if name.startswith("timm:"):
        return _create_timm(name.removeprefix("timm:"), weights, size=size, seed=seed, layers=layers)
    spec = get_spec(name)
    kwargs = dict(spec.kwargs)
    mean, std, trained_size = input_spec(name, weights)
    input_size = size or trained_size
    if name == "vit_b_16" and input_size != 224:  # its position embeddings fix the input size
        if weights != "none" and input_size != trained_size:
            raise FeatxError(
                f"--size {input_size}: these vit_b_16 weights are for {trained_size} only; use --size {trained_size}",
                option="size",
            )
        kwargs["image_size"] = input_size
    if weights == "none" and "init_weights" in kwargs:
        kwargs["init_weights"] = True
    # Seeded so that "none" names one set of weights: a resumed or multi-process extraction computes the
    # same features as a single uninterrupted one.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = spec.constructor(**kwargs)
    if isinstance(model, torchvision.models.Inception3) and model.AuxLogits is not None:
        model.AuxLogits = None  # only used in training mode; frozen features never need it
        model.aux_logits = False
    named = named_weights(name, weights)
    if named is not None:
        weights_id = _load_torchvision(model, spec, named)
    elif weights == "none":
        weights_id = _seeded_id(seed)
    else:
        _load_state(model, spec.head, read_state_dict(Path(weights)), f"--weights {weights}")
        weights_id = "sha256:" + file_sha256(Path(weights))
    if layers:
        features = _stage_features(model, spec, layers)
        parts = features.layout(input_size)
        return Backbone(
            name, features, sum(d for _, d in parts), input_size, tuple(mean), tuple(std), weights_id, parts
        )
    _set_module(model, spec.head, nn.Identity())
    return Backbone(name, model, spec.feature_dim, input_size, tuple(mean), tuple(std), weights_id)


# Small nets trained from scratch at 64x64 (featx.nets.tinynets imports only torch and featx.core.errors: no cycle).
from featx.nets import tinynets  # noqa: E402

register_backbone(BackboneSpec("vgg_tiny", tinynets.vgg_tiny, 64, 512, "fc", torchvision=False))
register_backbone(BackboneSpec("inception_tiny", tinynets.inception_tiny, 64, 2048, "fc", torchvision=False))
register_backbone(BackboneSpec("bastidas_vgg", tinynets.bastidas_vgg, 64, 32 * 9 * 8, "fc", torchvision=False))
register_backbone(BackboneSpec("bastidas_inception", tinynets.bastidas_inception, 64, 256, "fc", torchvision=False))
register_backbone(BackboneSpec("milani_inception", tinynets.milani_inception, 64, 576, "fc", torchvision=False))
