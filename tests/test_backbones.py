"""The backbone registry: every entry builds, weights load from every kind of source, mistakes are one line."""

import json
from pathlib import Path

import pytest
import torch
import torchvision
from tiers import FAMILY_SMALLEST, backbone_names

from featx.core.errors import FeatxError
from featx.nets.backbones import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    create_backbone,
    file_sha256,
    get_spec,
    input_spec,
    named_weights,
    weights_file,
)

SHARED_WEIGHTS = Path(__file__).resolve().parents[2] / "shared" / "weights"
MOBILENET = SHARED_WEIGHTS / "mobilenet_v2_imagenet_tflite.pth"


@pytest.mark.parametrize("name", backbone_names(FAMILY_SMALLEST))
def test_every_backbone_gives_pooled_features_of_its_registered_dim(name):
    size = 75 if name == "inception_v3" else 64 if name == "bastidas_vgg" else 32  # it flattens a 64x64 map
    bb = create_backbone(name, weights="none", size=size)
    bb.model.eval()
    with torch.inference_mode():
        y = bb.model(torch.randn(2, 3, size, size))
    assert y.shape == (2, get_spec(name).feature_dim) and bb.feature_dim == get_spec(name).feature_dim
    assert bb.weights_id == "none" and bb.input_size == size
    assert torch.isfinite(y).all() and y.std() > 0


def test_default_sizes_and_normalisation():
    inc = get_spec("inception_v3")
    # torchvision's Inception-v3 weights expect transform_input, i.e. inputs scaled to [-1, 1]
    assert inc.input_size == 299 and inc.mean == (0.5, 0.5, 0.5) and inc.std == (0.5, 0.5, 0.5)
    assert get_spec("resnet50").input_size == 224 and get_spec("resnet50").mean == (0.485, 0.456, 0.406)


def test_inception_features_match_torchvision_pooled_layer():
    """Our Inception-v3 (transform_input off, [-1,1] inputs) = torchvision's with transform_input on
    ImageNet-normalised inputs."""
    torch.manual_seed(0)
    ours = create_backbone("inception_v3", weights="none", size=299).model.eval()
    ref = torchvision.models.inception_v3(weights=None, aux_logits=True, transform_input=True, init_weights=False)
    ref.load_state_dict(ours.state_dict(), strict=False)
    ref.fc = torch.nn.Identity()
    ref.eval()
    raw = torch.rand(2, 3, 299, 299)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.inference_mode():
        a, b = ours((raw - 0.5) / 0.5), ref((raw - mean) / std)
    # random-init Inception has activations ~1e4, so compare relatively
    torch.testing.assert_close(a, b, atol=1e-3 * b.abs().max().item(), rtol=1e-2)


def test_unknown_backbone_lists_the_known_ones():
    with pytest.raises(FeatxError, match="resnet50.*inception_v3"):
        create_backbone("resnet9000", weights="none")


@pytest.mark.skipif(not MOBILENET.exists(), reason="shared weights absent")
def test_local_weights_load_with_a_1001_class_head_and_sidecar_json():
    bb = create_backbone("mobilenet_v2", weights=MOBILENET)
    side = json.loads(MOBILENET.with_suffix(".json").read_text())
    assert bb.weights_id == "sha256:" + side["sha256"]
    assert bb.mean == (0.5, 0.5, 0.5) and bb.std == (0.5, 0.5, 0.5) and bb.input_size == 224
    state = torch.load(MOBILENET, weights_only=True)
    torch.testing.assert_close(bb.model.features[0][0].weight, state["features.0.0.weight"])


@pytest.mark.skipif(not MOBILENET.exists(), reason="shared weights absent")
def test_weights_of_another_architecture_name_the_missing_keys():
    with pytest.raises(FeatxError, match="does not fit this backbone .*missing keys \\['conv1.weight'"):
        create_backbone("resnet18", weights=MOBILENET)


def test_pickled_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("ran code",))

    path = tmp_path / "evil.pth"
    torch.save({"x": Evil()}, path)
    with pytest.raises(FeatxError, match="not a loadable state_dict"):
        create_backbone("resnet18", weights=path)


def test_missing_weights_file(tmp_path):
    with pytest.raises(FeatxError, match="no such file"):
        create_backbone("resnet18", weights=tmp_path / "nope.pth")


def test_default_weights_come_from_torchvision_cache(tmp_path, monkeypatch):
    """The default path goes through torchvision's weights API: a file already in TORCH_HOME is used as is."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    weights = torchvision.models.ResNet18_Weights.DEFAULT
    ref = torchvision.models.resnet18()
    target = tmp_path / "hub" / "checkpoints" / Path(weights.url).name
    target.parent.mkdir(parents=True)
    torch.save(ref.state_dict(), target)
    bb = create_backbone("resnet18", weights="default")
    assert bb.weights_id == f"torchvision:{weights}"
    torch.testing.assert_close(bb.model.conv1.weight, ref.conv1.weight)


def test_default_weights_offline_name_the_file_to_place(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    target = tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    with pytest.raises(FeatxError) as e:
        create_backbone("resnet18", weights="default")
    assert str(target) in str(e.value) and "--weights PATH" in str(e.value) and "\n" not in str(e.value)


def test_vit_pretrained_size_is_fixed():
    with pytest.raises(FeatxError, match="--size 224"):
        create_backbone("vit_b_16", weights="default", size=128)


def test_file_sha256(tmp_path):
    p = tmp_path / "f"
    p.write_bytes(b"abc")
    assert file_sha256(p) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


@pytest.mark.parametrize(
    "name, weights, expect",
    [
        ("resnet50", "IMAGENET1K_V2", (IMAGENET_MEAN, IMAGENET_STD, 224)),
        ("efficientnet_b1", "IMAGENET1K_V2", (IMAGENET_MEAN, IMAGENET_STD, 240)),  # the registry's default is 224
        ("efficientnet_b3", "DEFAULT", (IMAGENET_MEAN, IMAGENET_STD, 300)),
        ("vit_b_16", "IMAGENET1K_SWAG_E2E_V1", (IMAGENET_MEAN, IMAGENET_STD, 384)),
        ("inception_v3", "IMAGENET1K_V1", ((0.5,) * 3, (0.5,) * 3, 299)),  # featx's [-1, 1] replaces transform_input
    ],
)
def test_named_weights_bring_their_transform(name, weights, expect):
    assert input_spec(name, weights) == expect


@pytest.mark.parametrize(
    "name, weights, file",
    [
        ("resnet50", "IMAGENET1K_V2", "resnet50-11ad3fa6.pth"),
        ("resnet50", "IMAGENET1K_V1", "resnet50-0676ba61.pth"),
        ("resnet50", "DEFAULT", "resnet50-11ad3fa6.pth"),
    ],
)
def test_named_weights_offline_name_the_file_to_place(name, weights, file, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    assert weights_file(named_weights(name, weights)) == tmp_path / "hub" / "checkpoints" / file
    with pytest.raises(FeatxError) as e:
        create_backbone(name, weights=weights)
    message = str(e.value)
    assert str(tmp_path / "hub" / "checkpoints" / file) in message and "\n" not in message
    assert message.startswith(f"--weights {'IMAGENET1K_V2' if weights == 'DEFAULT' else weights}: cannot download")


def test_named_weights_load_from_torchvision_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    ref = torchvision.models.resnet18()
    weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    target = weights_file(weights)
    target.parent.mkdir(parents=True)
    torch.save(ref.state_dict(), target)
    bb = create_backbone("resnet18", weights="IMAGENET1K_V1")
    assert bb.weights_id == "torchvision:ResNet18_Weights.IMAGENET1K_V1"
    torch.testing.assert_close(bb.model.conv1.weight, ref.conv1.weight)


def test_a_name_the_model_lacks_is_no_such_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FeatxError, match=r"--weights IMAGENET1K_V2: no such file.*IMAGENET1K_V1, DEFAULT"):
        create_backbone("resnet18", weights="IMAGENET1K_V2")  # resnet18 has V1 only
    with pytest.raises(FeatxError, match="no such file"):
        create_backbone("resnet18", weights="IMAGENET1K_V1.pth")
    with pytest.raises(FeatxError, match="no such file"):
        create_backbone("vgg_tiny", weights="IMAGENET1K_V1")  # no torchvision weights at all
