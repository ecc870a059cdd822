"""Views are exact: flips mirror, corners are the explicit crops, normalisation is the registered one."""

import pytest
import torch
import torchvision.transforms.v2.functional as TF

from featx.core.errors import FeatxError
from featx.nets.views import VIEW_SETS, render_views, view_names

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@pytest.fixture
def images():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (3, 64, 64, 3), dtype=torch.uint8, generator=g)


def _render(x, views, size=96):
    out = render_views(x, views=views, crop=56, size=size, mean=MEAN, std=STD)
    return out.reshape(len(x), len(views), 3, size, size)


def test_view_order_is_fixed_and_full_first():
    assert VIEW_SETS["ten"][0] == "full" and VIEW_SETS["flip"] == ("full", "full_flip")
    assert VIEW_SETS["ten"] == (
        "full",
        "top_left",
        "top_right",
        "bottom_left",
        "bottom_right",
        "full_flip",
        "top_left_flip",
        "top_right_flip",
        "bottom_left_flip",
        "bottom_right_flip",
    )
    with pytest.raises(FeatxError, match="--views"):
        view_names("twelve")


def test_flip_view_equals_full_view_of_mirrored_image(images):
    flipped = _render(images, ["full_flip"])
    mirrored = _render(images.flip(2), ["full"])  # NHWC: dim 2 is width
    assert torch.equal(flipped, mirrored)


def test_corner_views_equal_explicit_crops_resized_and_normalised(images):
    views = [*view_names("ten"), "center", "center_flip"]  # center: what crop-trained finetune models see
    got = _render(images, views)
    nchw = images.permute(0, 3, 1, 2)
    corners = {"top_left": (0, 0), "top_right": (0, 8), "bottom_left": (8, 0), "bottom_right": (8, 8), "center": (4, 4)}
    for i, name in enumerate(views):
        base = name.removesuffix("_flip")
        x = nchw if base == "full" else TF.crop(nchw, *corners[base], 56, 56)
        if name.endswith("_flip"):
            x = TF.horizontal_flip(x)
        x = TF.resize(x.float(), [96, 96], interpolation=TF.InterpolationMode.BILINEAR, antialias=False)
        want = TF.normalize(x / 255.0, MEAN, STD)
        torch.testing.assert_close(got[:, i], want, atol=1e-4, rtol=1e-4)


def test_views_are_channels_last_and_grouped_by_image(images):
    out = render_views(images, views=["full", "full_flip"], crop=56, size=64, mean=MEAN, std=STD)
    assert out.shape == (6, 3, 64, 64) and out.is_contiguous(memory_format=torch.channels_last)
    # rows [2i, 2i+2) belong to image i: un-normalised, the full view at native size is the image itself
    raw = out * torch.tensor(STD).view(1, 3, 1, 1) * 255 + torch.tensor(MEAN).view(1, 3, 1, 1) * 255
    torch.testing.assert_close(raw[2], images[1].permute(2, 0, 1).float(), atol=1e-3, rtol=0)


def test_crop_larger_than_image_is_a_user_error(images):
    with pytest.raises(FeatxError, match="--crop 80"):
        render_views(images, views=["top_left"], crop=80, size=64, mean=MEAN, std=STD)
    assert render_views(images, views=["full"], crop=80, size=64, mean=MEAN, std=STD).shape == (3, 3, 64, 64)
