"""Each augmentation on a real batch, checked for its defining property; every image draws its own parameters,
each from the distribution its magnitude states."""

import pytest
import torch
from scipy import stats

from featx.core.errors import FeatxError
from featx.nets.augment import AUGMENTATIONS, Augment, apply_draws, check_augmentations, draw
from featx.nets.views import crop_view, to_input


def blobs(n: int = 8, size: int = 32, at: tuple[int, int] = (8, 16)) -> torch.Tensor:
    """uint8 (n, 3, size, size): a bright 5x5 square at (row, col) on a dark noisy background."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 20, (n, 3, size, size), generator=g, dtype=torch.uint8)
    r, c = at
    x[:, :, r - 2 : r + 3, c - 2 : c + 3] = 250
    return x


def apply(name: str, x: torch.Tensor, *, crop: int | None = None, size: int | None = None) -> torch.Tensor:
    """The single augmentation on the whole batch (one draw per image), resized to `size` as training does, back
    to uint8 values (as floats)."""
    torch.manual_seed(0)
    crop = crop or x.shape[-1]
    groups = apply_draws(x, draw([name], n=len(x), height=x.shape[-2], width=x.shape[-1], crop=crop), crop=crop)
    out = [torch.empty(0)] * len(x)
    for rows, images in groups:
        if size:
            images = to_input(images, size=size, mean=(0.0,) * 3, std=(1.0,) * 3)
        for row, image in zip(rows.tolist(), images):
            out[row] = image
    return (torch.stack(out) * 255).round()


def centroid(x: torch.Tensor) -> torch.Tensor:
    """(n, 3, H, W) -> (n, 2) row/col centre of mass of the bright pixels."""
    m = (x.float().mean(1) > 128).float()
    rows, cols = torch.meshgrid(torch.arange(m.shape[1]).float(), torch.arange(m.shape[2]).float(), indexing="ij")
    total = m.sum((1, 2))
    return torch.stack([(m * rows).sum((1, 2)) / total, (m * cols).sum((1, 2)) / total], 1)


def test_flip_mirrors():
    x = blobs(16)
    y = apply("flip", x)
    mirrored = [bool(torch.equal(a, b.flip(-1).float())) for a, b in zip(y, x)]
    same = [bool(torch.equal(a, b.float())) for a, b in zip(y, x)]
    assert all(m or s for m, s in zip(mirrored, same)) and any(mirrored) and any(same)


def test_crop_is_a_window_of_the_image():
    x = blobs(4, 16)
    y = apply("crop", x, crop=12)
    for a, b in zip(y, x):
        windows = [b[:, i : i + 12, j : j + 12].float() for i in range(5) for j in range(5)]
        assert any(torch.equal(a, w) for w in windows)


def test_corners_are_stage1_views():
    x = blobs(12, 16)
    y = apply("corners", x, crop=12, size=16)
    for a, b in zip(y, x):
        views = [
            torch.nn.functional.interpolate(
                crop_view(b[None].float(), name=n, crop=12), size=(16, 16), mode="bilinear"
            )[0]
            for n in ("full", "top_left", "top_right", "bottom_left", "bottom_right")
        ]
        assert min((a - v).abs().max() for v in views) <= 0.5


def test_color_is_monotone_per_image():
    # brightness and contrast are increasing affine maps of the intensities: pixel order is kept
    x = blobs(8)
    x[:, :, :4] = torch.arange(128, 256, 8, dtype=torch.uint8)[None, None, :, None].expand(8, 3, 16, 32)[:, :, :4]
    y = apply("color", x)
    changed = 0
    for a, b in zip(y, x):
        order = b.flatten().argsort(stable=True)
        assert (a.flatten()[order].diff() >= -1e-3).all()
        changed += not torch.equal(a, b.float())
    assert changed


def test_rotate_keeps_distance_to_centre():
    x = blobs(8, 32, at=(16, 26))  # 10 px right of the centre (15.5, 15.5)
    y = apply("rotate", x)
    c = centroid(y) - 15.5
    before = centroid(x) - 15.5
    assert torch.allclose(c.norm(dim=1), before.norm(dim=1), atol=1.0)
    assert (c[:, 0] - before[:, 0]).abs().max() > 0.5  # moved along the circle for some draw


def angles(name: str, n: int = 64) -> torch.Tensor:
    """|rotation| in degrees that `name` gave each of n images of a blob 10 px right of the centre."""
    x = blobs(n, 32, at=(16, 26))
    c, before = centroid(apply(name, x)) - 15.5, centroid(x) - 15.5
    return (torch.atan2(c[:, 0], c[:, 1]) - torch.atan2(before[:, 0], before[:, 1])).abs().rad2deg()


def test_magnitudes_set_the_range():
    default, wide = angles("rotate"), angles("rotate:45")  # featx's default 15 degrees, Bastidas's 45
    assert default.max() <= 17 and 30 < wide.max() <= 47
    x = blobs(32, 32, at=(16, 16))
    moved = lambda name: (centroid(apply(name, x)) - centroid(x)).abs().max()  # noqa: E731
    assert moved("shift") <= 4.5 < moved("shift:0.25") <= 8.5  # 1/8 and 1/4 of 32 px
    assert torch.equal(apply("flip:0", x), x.float()) and torch.equal(apply("invert:1", x), 255 - x.float())
    d = (apply("noise:0.1", torch.full((4, 3, 32, 32), 128, dtype=torch.uint8)) - 128) / 255
    assert 0.09 < float(d.std()) < 0.11


@pytest.mark.parametrize(
    "item, message",
    [
        ("rotate:lots", "--aug rotate:lots: write the magnitude as a number, e.g. rotate:15"),
        ("shift:2", "--aug shift:2: the shift magnitude (fraction of the side) must be between 0 and 1"),
        ("crop:48", "--aug crop:48: crop takes no magnitude (its window is --crop); write crop"),
        ("spin:3", "--aug spin:3: unknown"),
    ],
)
def test_bad_magnitudes_are_one_line_user_errors(item, message):
    with pytest.raises(FeatxError) as e:
        check_augmentations(["flip", item])
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_scale_moves_along_the_ray():
    x = blobs(8, 32, at=(16, 26))
    ratio = (centroid(apply("scale", x)) - 15.5).norm(dim=1) / (centroid(x) - 15.5).norm(dim=1)
    assert ((ratio > 0.8) & (ratio < 1.2)).all() and ratio.std() > 0.01


def test_shift_translates_content():
    x = blobs(8, 32, at=(16, 16))
    y = apply("shift", x)
    for a, b in zip(y, x):
        found = False
        for dy in range(-4, 5):
            for dx in range(-4, 5):
                rolled = b.roll((dy, dx), dims=(1, 2)).float()
                if torch.equal(a[:, 6:26, 6:26], rolled[:, 6:26, 6:26]):
                    found = True
        assert found


def test_shear_keeps_rows():
    # shear along x moves each row sideways: the brightness of every row is unchanged
    x = torch.zeros(8, 3, 32, 32, dtype=torch.uint8)
    x[:, :, 8:24, 14:18] = 200  # a vertical bar in the middle
    y = apply("shear", x)
    assert torch.allclose(y.sum((1, 3)), x.float().sum((1, 3)))
    top, bottom = centroid(y[:, :, :12]), centroid(y[:, :, 20:])
    assert (top[:, 1] - bottom[:, 1]).abs().max() > 0.5  # slanted for some draw


def test_invert_maps_x_to_255_minus_x():
    x = blobs(32)
    y = apply("invert", x)
    inverted = [torch.equal(a, 255 - b.float()) for a, b in zip(y, x)]
    assert all(i or torch.equal(a, b.float()) for i, a, b in zip(inverted, y, x)) and any(inverted)


def test_noise_is_zero_mean_gaussian():
    x = torch.full((4, 3, 32, 32), 128, dtype=torch.uint8)
    d = (apply("noise", x) - 128) / 255
    assert abs(float(d.mean())) < 0.005 and 0.02 < float(d.std()) < 0.04


def test_augment_output_and_mixup_targets():
    x = blobs(8, 16).permute(0, 2, 3, 1).contiguous()
    labels = torch.arange(8) % 4
    aug = Augment([], crop=16, size=24, mean=(0.5,) * 3, std=(0.5,) * 3, num_classes=4, mixup=1.0)
    torch.manual_seed(0)
    y, target = aug(x, labels)
    assert y.shape == (8, 3, 24, 24) and y.is_contiguous(memory_format=torch.channels_last)
    assert target.shape == (8, 4) and torch.allclose(target.sum(1), torch.ones(8))
    # MixUp blends each image with its predecessor in the batch by the label weight
    plain, _ = Augment([], crop=16, size=24, mean=(0.5,) * 3, std=(0.5,) * 3, num_classes=4)(x, labels)
    lam = target[0, labels[0]]
    assert torch.allclose(y, lam * plain + (1 - lam) * plain.roll(1, 0), atol=1e-5)


def test_cutmix_pastes_a_box():
    x = blobs(8, 16).permute(0, 2, 3, 1).contiguous()
    labels = torch.arange(8) % 4
    kw = dict(crop=16, size=16, mean=(0.0,) * 3, std=(1.0,) * 3, num_classes=4)
    plain, _ = Augment([], **kw)(x, labels)
    torch.manual_seed(1)
    y, target = Augment([], cutmix=1.0, **kw)(x, labels)
    from_other = ~torch.isclose(y, plain).all(1) & torch.isclose(y, plain.roll(1, 0)).all(1)
    area = from_other[0].float().mean()
    assert torch.isclose(target[0, labels[0]], 1 - area, atol=1e-5)


def test_unknown_augmentation_is_a_user_error():
    with pytest.raises(FeatxError, match="--aug"):
        check_augmentations(["flip", "twirl"])
    assert set(AUGMENTATIONS) >= {
        "flip",
        "crop",
        "color",
        "brightness",
        "rotate",
        "scale",
        "shift",
        "shear",
        "noise",
        "invert",
    }


def test_without_augmentation_training_sees_what_evaluation_sees():
    # Both end in views.to_input: finetune trains and evaluates on the same pixels (augment used to resize with
    # v2.Resize and normalise with v2.Normalize, render_views with its own interpolate and arithmetic).
    from featx.nets.views import render_views

    images = blobs(4, 32).permute(0, 2, 3, 1).contiguous()  # (B, H, W, 3) uint8, as the cache stores them
    kw = dict(size=48, mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.3))
    trained, _ = Augment([], crop=32, num_classes=4, **kw)(images, torch.zeros(4, dtype=torch.long))
    evaluated = render_views(images, views=["full"], crop=32, **kw)
    assert torch.allclose(trained, evaluated, atol=1e-6)


ALL = [
    "flip",
    "corners",
    "crop",
    "rotate:30",
    "scale:0.2",
    "shift:0.25",
    "shear:10",
    "color:0.4",
    "brightness:0.3",
    "invert:0.2",
    "noise",
]


def drawn(n: int = 4096) -> dict:
    torch.manual_seed(0)
    return {d.name: d.value for d in draw(ALL, n=n, height=64, width=64, crop=56)}


def uniform_fits(values: torch.Tensor, low: float, high: float) -> bool:
    """Kolmogorov-Smirnov against uniform(low, high), fixed seed: p > 0.01."""
    return stats.kstest(values.double().numpy(), "uniform", args=(low, high - low)).pvalue > 0.01


def test_each_image_draws_its_own_parameters():
    # the 16-group pipeline gave every 8 consecutive images of a batch of 128 one draw: now runs of 8 equal
    # flips are as rare as chance makes them (2 / 2^8), and no two angles, scales or shears coincide
    d = drawn(128)
    runs_of_8 = d["flip"].view(16, 8)
    assert (runs_of_8.all(1) | ~runs_of_8.any(1)).sum() <= 1
    for name in ("rotate", "scale", "shear", "brightness"):
        assert len(torch.unique(d[name])) == 128
    assert len(torch.unique(d["crop"][d["corners"] == 0], dim=0)) > 10 and len(torch.unique(d["shift"], dim=0)) > 100


def test_every_marginal_matches_its_magnitude():
    d, n = drawn(), 4096
    tol = lambda p: 4 * (p * (1 - p) / n) ** 0.5  # noqa: E731  four standard errors of a rate
    assert abs(float(d["flip"].float().mean()) - 0.5) < tol(0.5)
    assert abs(float(d["invert"].float().mean()) - 0.2) < tol(0.2)
    assert abs(float(d["color"][:, 2].mean()) - 0.5) < tol(0.5)  # brightness first or contrast first
    assert uniform_fits(d["rotate"], -30, 30) and d["rotate"].abs().max() <= 30
    assert uniform_fits(d["scale"], 0.8, 1.2) and uniform_fits(d["shear"], -10, 10)
    assert uniform_fits(d["color"][:, 0], 0.6, 1.4) and uniform_fits(d["color"][:, 1], 0.6, 1.4)
    assert uniform_fits(d["brightness"], 0.7, 1.3)
    # crop: whole-pixel offsets, each of the 9 windows of 56 in 64 (after corners: of 56 in 56 for most images)
    # as likely; shift: whole pixels within a quarter of the 56-pixel side of the crop before it
    full = d["corners"] == 0
    counts = torch.bincount(d["crop"][full].long().flatten(), minlength=9)
    assert stats.chisquare(counts.numpy()).pvalue > 0.01 and d["crop"][~full].abs().max() == 0
    assert stats.chisquare(torch.bincount(d["corners"], minlength=5).numpy()).pvalue > 0.01
    assert d["shift"].abs().max() == 14 and torch.equal(d["shift"], d["shift"].round())
    assert abs(float(d["shift"].mean())) < 4 * (28**2 / 3 / (2 * n)) ** 0.5


def test_a_batch_of_one_image_comes_out_in_many_versions():
    x = blobs(1, 32, at=(16, 26)).expand(64, -1, -1, -1).permute(0, 2, 3, 1).contiguous()
    torch.manual_seed(0)
    y, _ = Augment(["flip", "rotate", "color"], crop=32, size=32, mean=(0.0,) * 3, std=(1.0,) * 3, num_classes=2)(
        x, torch.zeros(64, dtype=torch.long)
    )
    assert len(torch.unique(y.flatten(1), dim=0)) == 64
    flipped = centroid(y[:8] * 255)[:, 1] < 15.5  # the blob right of the centre, mirrored to the left
    assert flipped.any() and not flipped.all()
