"""The models stage 3 trains: a backbone body with a classifier head, described by a ModelSpec.

A finetune checkpoint stores its ModelSpec beside the weights, so `load_model` rebuilds the network without
knowing the options it was trained with; predict and report use that, never the training loop.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet
from torchvision.ops import StochasticDepth
from torchvision.ops.misc import FrozenBatchNorm2d

from featx.core.choices import BN_MODES
from featx.core.errors import FeatxError
from featx.nets.backbones import create_backbone
from featx.nets.lstm_head import GROUP, STAGES, LSTMNet

MODEL_FORMAT = "featx-model-1"
ACTIVATIONS = {"relu": lambda: nn.ReLU(inplace=True), "elu": lambda: nn.ELU(inplace=True)}


@dataclass
class ModelSpec:
    """Everything needed to rebuild a trained model and feed it images."""

    backbone: str
    size: int
    num_classes: int
    head: str
    mean: list[float]
    std: list[float]
    crop: int
    dropout: float = 0.0
    drop_path: float | None = None
    views: list[str] = dataclasses.field(
        default_factory=lambda: ["full"]
    )  # what evaluation feeds it (featx.nets.views)
    bn: str = "train"  # frozen, train or sync (set_batchnorm); specs written before the option trained theirs
    activation: str = "relu"  # ResNets: relu or elu, every ReLU of the body
    normalize: str = "channel"  # channel: (x - mean) / std; mean-image: the mean training image is subtracted too
    lstm_group: int = GROUP
    lstm_stages: list[str] = dataclasses.field(default_factory=lambda: list(STAGES))


class SubtractImage(nn.Module):
    """--normalize mean-image: subtracts the mean training image (3, size, size), held as a buffer so that every
    checkpoint carries it and predict applies it as training did."""

    image: torch.Tensor  # a buffer

    def __init__(self, image: torch.Tensor):
        super().__init__()
        self.register_buffer("image", image)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x - self.image


class Classifier(nn.Module):
    def __init__(self, body: nn.Module, head: nn.Module):
        super().__init__()
        self.body, self.head = body, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def build_model(
    spec: ModelSpec,
    *,
    weights: str = "none",
    init: str | None = None,
    seed: int = 0,
    mean_image: torch.Tensor | None = None,
) -> nn.Module:
    """The backbone (pretrained or not) with drop path and a fresh head; `model.body` / `model.head`.

    mean_image: with spec.normalize "mean-image", the (3, size, size) image the body subtracts first (zeros when
    absent: load_model fills it from the checkpoint)."""
    bb = create_backbone(spec.backbone, weights=weights, size=spec.size, seed=seed)
    if spec.activation != "relu":
        set_activation(bb.model, spec.activation, spec.backbone)
    if spec.drop_path is not None:
        set_drop_path(bb.model, spec.drop_path, spec.backbone)
    model: LSTMNet | Classifier
    if spec.head == "lstm":
        model = LSTMNet(
            bb.model,
            size=spec.size,
            num_classes=spec.num_classes,
            dropout=spec.dropout,
            group=spec.lstm_group,
            stages=spec.lstm_stages,
        )
    else:
        # --dropout is the only dropout before the head: none at all when it is 0. The Linear stays at head[1]
        # either way, so checkpoints and --init-head address it alike.
        drop = nn.Dropout(spec.dropout) if spec.dropout > 0 else nn.Identity()
        model = Classifier(bb.model, nn.Sequential(drop, nn.Linear(bb.feature_dim, spec.num_classes)))
    if init:
        # after the head exists, so the init study covers the new classifier too (issue 23)
        init_weights(model, init)
    if spec.normalize == "mean-image":
        image = mean_image if mean_image is not None else torch.zeros(3, spec.size, spec.size)
        model.body = nn.Sequential(SubtractImage(image), model.body)
    return model


def load_model(checkpoint: dict) -> tuple[nn.Module, ModelSpec]:
    """Rebuild the model of a finetune checkpoint (a dict from runs.load_checkpoint), in eval mode."""
    if checkpoint.get("format") != MODEL_FORMAT:
        raise FeatxError(f"checkpoint format {checkpoint.get('format')!r}: not a featx finetune model")
    spec = ModelSpec(**checkpoint["model"])
    model = build_model(spec)
    set_batchnorm(model, spec.bn)
    model.load_state_dict(checkpoint["state"])
    return model.eval(), spec


def init_weights(model: nn.Module, init: str) -> None:
    """--init kaiming|xavier|gaussian:STD for every conv and linear weight; biases start at zero."""
    kind, _, value = init.partition(":")
    std = 0.0
    if kind == "gaussian":
        try:
            std = float(value)
        except ValueError:
            raise FeatxError(f"--init {init}: write the standard deviation as gaussian:0.1") from None
    elif kind not in ("kaiming", "xavier") or value:
        raise FeatxError(f"--init {init}: choose kaiming, xavier or gaussian:STD")
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            if kind == "kaiming":
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif kind == "xavier":
                nn.init.xavier_uniform_(m.weight)
            else:
                nn.init.normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def set_activation(model: nn.Module, activation: str, name: str) -> None:
    """--activation elu: every ReLU module of a torchvision ResNet (its stem and both of each block's) becomes an
    ELU; the blocks call their one `relu` module at each place, so replacing the modules replaces every use."""
    if activation not in ACTIVATIONS:
        raise FeatxError(f"--activation {activation}: choose one of {', '.join(ACTIVATIONS)}")
    if not isinstance(model, ResNet):
        raise FeatxError(
            f"--activation {activation}: only for the ResNets (resnet18 ... resnet152), not {name}; "
            "leave --activation out"
        )
    for parent in list(model.modules()):
        for child_name, child in parent.named_children():
            if isinstance(child, nn.ReLU):
                setattr(parent, child_name, ACTIVATIONS[activation]())


def set_drop_path(model: nn.Module, p: float, name: str) -> None:
    """Stochastic depth with the final block dropped with probability p, earlier blocks linearly less.

    ConvNeXt, Swin and EfficientNet carry torchvision's StochasticDepth modules already: their rates are
    rescaled, keeping torchvision's per-block schedule. ResNet blocks get one after their last BatchNorm,
    which drops the residual branch (the identity path always stays).
    """
    native = [m for m in model.modules() if isinstance(m, StochasticDepth)]
    if native:
        top = max(m.p for m in native)
        for i, m in enumerate(native):
            m.p = p * (m.p / top if top else i / max(len(native) - 1, 1))
        return
    blocks = [m for m in model.modules() if isinstance(m, (BasicBlock, Bottleneck))]
    if not blocks:
        raise FeatxError(f"--drop-path: {name} has no residual blocks to drop; leave --drop-path out")
    for i, block in enumerate(blocks, 1):
        last = "bn3" if isinstance(block, Bottleneck) else "bn2"
        setattr(block, last, nn.Sequential(getattr(block, last), StochasticDepth(p * i / len(blocks), "row")))


def identity_batchnorm(model: nn.Module) -> bool:
    """Whether the model has BatchNorms and every one holds running mean 0 and variance 1: weights exported
    from a deployment format, with the normalisation folded into the convolutions. (Such files often store
    1 - eps, so that the division by sqrt(var + eps) is exactly 1: hence the tolerance.)"""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    return bool(norms) and all(
        m.running_mean is not None
        and m.running_var is not None
        and torch.allclose(m.running_mean, torch.zeros_like(m.running_mean), rtol=0, atol=1e-4)
        and torch.allclose(m.running_var, torch.ones_like(m.running_var), rtol=0, atol=1e-4)
        for m in norms
    )


def pick_batchnorm(mode: str, model: nn.Module, *, pretrained: bool) -> str:
    """--bn auto -> frozen for pretrained weights with identity statistics, train otherwise; other modes as given.

    Training-mode BatchNorm renormalises every channel with its batch's statistics, which erases a folded
    network's function (the weights assume identity); fresh weights hold identity statistics too, but need
    the normalisation to train.
    """
    if mode not in BN_MODES:
        raise FeatxError(f"--bn {mode}: choose one of {', '.join(BN_MODES)}")
    if mode != "auto":
        return mode
    return "frozen" if pretrained and identity_batchnorm(model) else "train"


def set_batchnorm(model: nn.Module, mode: str) -> None:
    """Convert the model's BatchNorms in place: frozen -> torchvision's FrozenBatchNorm2d (statistics and
    affine held as buffers, so `model.train()` and the optimiser leave them alone), sync -> SyncBatchNorm
    (statistics over every torchrun process), train -> as built."""
    if mode == "sync":
        nn.SyncBatchNorm.convert_sync_batchnorm(model)  # converts below the root, which is never a BatchNorm
    elif mode == "frozen":
        for name, child in model.named_children():
            if isinstance(child, nn.BatchNorm2d):
                assert child.running_mean is not None  # featx's backbones keep running statistics
                frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps).to(child.running_mean.device)
                frozen.load_state_dict(child.state_dict())
                setattr(model, name, frozen)
            else:
                set_batchnorm(child, mode)
