"""The two views: loading, ROI crops, letterbox, masks, augmentation alignment, dataset."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from kdtoolkit.data.affine import letterbox_matrix, transform_points
from kdtoolkit.data.augment import random_affine, transform_roi
from kdtoolkit.data.dataset import KdDataset
from kdtoolkit.data.geometry import roi_corners
from kdtoolkit.data.imageio import load_image
from kdtoolkit.data.manifest import Sample
from kdtoolkit.data.mask import roi_mask
from kdtoolkit.data.view import ViewConfig, crop_roi, normalise, student_view, view_config
from kdtoolkit.data.warp import warp
from kdtoolkit.errors import KdError

# Plain pixels: no normalisation, so tensors read as [0, 1] intensities.
PLAIN = {"channels": 1, "mean": (0.0,), "std": (1.0,)}
NO_AUG = {"flip_p": 0.0, "degrees": 0.0, "scale": (1.0, 1.0), "translate": 0.0}
NO_JITTER = {"brightness": 0.0, "contrast": 0.0, "gamma": 0.0, "noise": 0.0}


def _frame_coords(shape: tuple[int, int], box, angle: float) -> tuple[np.ndarray, np.ndarray]:
    """ROI-frame offsets (dx along the ROI's width, dy along its height) of pixel centres,
    inverting the kdtoolkit.data.geometry convention."""
    h, w = shape
    x0, y0, x1, y1 = box
    ox = np.arange(w)[None, :] + 0.5 - (x0 + x1) / 2
    oy = np.arange(h)[:, None] + 0.5 - (y0 + y1) / 2
    c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    return ox * c - oy * s, ox * s + oy * c


def _bar(shape, box, angle, left=1.0, right=0.5) -> np.ndarray:
    """A rotated bar at the ROI: its left half (in the ROI's frame) ``left``, right half
    ``right``, background 0."""
    dx, dy = _frame_coords(shape, box, angle)
    hw, hh = (box[2] - box[0]) / 2, (box[3] - box[1]) / 2
    inside = (np.abs(dx) <= hw) & (np.abs(dy) <= hh)
    return np.where(inside, np.where(dx < 0, left, right), 0.0).astype(np.float32)


def _sample(image: Path, box=None, angle=0.0, crop=None, index=0, label=1) -> Sample:
    with Image.open(image) as im:
        width, height = im.size
    return Sample(index, index + 2, image, label, box, angle, crop, None, None, width, height)


# --------------------------------------------------------------------------- loading


def test_load_16bit_grey_png_and_tiff(tmp_path: Path) -> None:
    data = (np.arange(12 * 20).reshape(12, 20) * 250).astype(np.uint16)
    for name in ("g16.png", "g16.tif"):
        Image.fromarray(data).save(tmp_path / name)
        grey = load_image(tmp_path / name, 1)
        assert grey.shape == (12, 20, 1) and grey.dtype == np.float32
        np.testing.assert_allclose(grey[..., 0], data / 65535.0, atol=1e-6)
        rgb = load_image(tmp_path / name, 3)
        assert rgb.shape == (12, 20, 3)
        np.testing.assert_array_equal(rgb[..., 0], rgb[..., 2])


def test_load_rgb_and_grey_8bit(tmp_path: Path) -> None:
    rgb = np.zeros((6, 8, 3), np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 255, 100, 0
    Image.fromarray(rgb).save(tmp_path / "c.png")
    Image.fromarray(np.dstack([rgb, np.full((6, 8), 7, np.uint8)])).save(tmp_path / "a.png")
    three = load_image(tmp_path / "c.png", 3)
    np.testing.assert_allclose(three[0, 0], [1.0, 100 / 255, 0.0], atol=1e-6)
    one = load_image(tmp_path / "c.png", 1)
    assert one.shape == (6, 8, 1)
    np.testing.assert_allclose(one[0, 0, 0], 0.299 + 0.587 * 100 / 255, atol=1e-6)
    np.testing.assert_array_equal(load_image(tmp_path / "a.png", 3), three)  # alpha dropped
    Image.fromarray(np.full((5, 4), 128, np.uint8)).save(tmp_path / "g.jpg")
    grey = load_image(tmp_path / "g.jpg", 3)
    assert grey.shape == (5, 4, 3) and abs(grey.mean() - 128 / 255) < 0.01


def test_unreadable_image_is_a_kd_error(tmp_path: Path) -> None:
    (tmp_path / "x.png").write_text("nope")
    with pytest.raises(KdError, match="unreadable image"):
        load_image(tmp_path / "x.png", 1)


# --------------------------------------------------------------------------- teacher crop


@pytest.mark.parametrize("angle", [0.0, 30.0, -65.0, 120.0])
def test_rotated_crop_is_the_bar_axis_aligned(angle: float) -> None:
    box = (110.0, 90.0, 190.0, 130.0)  # 80 × 40, a 2:1 ROI
    image = _bar((220, 300), box, angle)[..., None]
    crop = crop_roi(image, box, angle, (20, 40))[..., 0]
    assert crop.shape == (20, 40)
    # left half bright, right half medium, away from the rasterised edges
    np.testing.assert_allclose(crop[2:-2, 2:18], 1.0, atol=0.05)
    np.testing.assert_allclose(crop[2:-2, 22:-2], 0.5, atol=0.05)
    # the opposite rotation does not give the bar
    wrong = crop_roi(image, box, -angle + 90.0, (20, 40))[..., 0]
    assert np.abs(wrong - crop).mean() > 0.2


def test_crop_with_margin_shows_background() -> None:
    box = (40.0, 40.0, 80.0, 60.0)
    image = _bar((100, 120), box, 0.0, 1.0, 1.0)[..., None]
    crop = crop_roi(image, (30.0, 30.0, 90.0, 70.0), 0.0, (40, 60))[..., 0]  # 1 px per px
    np.testing.assert_allclose(crop[10:30, 10:50], 1.0, atol=1e-4)
    assert crop[:9].max() == 0 and crop[:, :9].max() == 0


# --------------------------------------------------------------------------- letterbox


def test_letterbox_round_trip_and_content() -> None:
    image = np.zeros((100, 200, 1), np.float32)
    image[40:50, 120:130] = 1.0  # a block centred at (125, 45)
    matrix, scale, pad = letterbox_matrix(image.shape[:2], (128, 128))
    out = warp(image, matrix, (128, 128))
    assert out.shape == (128, 128, 1)
    assert scale == pytest.approx(0.64) and pad == pytest.approx((0.0, 32.0))
    points = np.array([[0.0, 0.0], [200.0, 100.0], [125.0, 45.0], [3.3, 77.7]])
    mapped = transform_points(points, matrix)
    np.testing.assert_allclose(mapped[:2], [[0, 32], [128, 96]])
    np.testing.assert_allclose(transform_points(mapped, np.linalg.inv(matrix)), points)
    ys, xs = np.nonzero(out[..., 0] > 0.5)
    assert abs(xs.mean() + 0.5 - mapped[2, 0]) < 1 and abs(ys.mean() + 0.5 - mapped[2, 1]) < 1
    assert out[:31].max() == 0 and out[97:].max() == 0  # padding


# --------------------------------------------------------------------------- masks


def test_roi_masks() -> None:
    box, angle = (20.0, 30.0, 80.0, 50.0), 25.0
    hard = roi_mask(box, (100, 100), "box", angle)
    assert hard.dtype == np.float32 and set(np.unique(hard)) == {0.0, 1.0}
    assert abs(hard.sum() - 60 * 20) < 40
    np.testing.assert_array_equal(hard, roi_mask(roi_corners(box, angle), (100, 100)))
    np.testing.assert_array_equal(hard, _bar((100, 100), box, angle, 1.0, 1.0))
    soft = roi_mask((40.5, 40.5, 60.5, 50.5), (100, 100), "gaussian")  # centre on pixel (50, 45)
    assert soft[45, 50] == pytest.approx(1.0) and soft.max() == soft[45, 50]
    assert soft[45, 60] == pytest.approx(math.exp(-2), abs=1e-6)  # edge: u = 1 = 2σ
    assert soft[50, 50] == pytest.approx(math.exp(-2), abs=1e-6)  # σ = half-extent / 2
    assert soft[0, 0] < 1e-6
    with pytest.raises(KdError):
        roi_mask(box, (10, 10), "disc")


# --------------------------------------------------------------------------- augmentation


def test_transform_roi_flip_mirrors_angle() -> None:
    flip = random_affine(np.random.default_rng(0), (100, 200), flip_p=1.0)
    np.testing.assert_allclose(flip, [[-1, 0, 200], [0, 1, 0]])
    box, angle = transform_roi((10.0, 20.0, 50.0, 40.0), 20.0, flip)
    assert angle == pytest.approx(-20.0)
    np.testing.assert_allclose(box, (150, 20, 190, 40), atol=1e-9)


def test_transform_roi_matches_transformed_corners() -> None:
    rng = np.random.default_rng(3)
    for _ in range(20):
        matrix = random_affine(rng, (120, 160), 0.5, 40.0, (0.7, 1.3), 0.2)
        box, angle = (30.0, 40.0, 90.0, 70.0), float(rng.uniform(-90, 90))
        new_box, new_angle = transform_roi(box, angle, matrix)
        moved = transform_points(roi_corners(box, angle), matrix)
        if np.linalg.det(matrix[:, :2]) < 0:
            moved = moved[[1, 0, 3, 2]]
        np.testing.assert_allclose(roi_corners(new_box, new_angle), moved, atol=1e-9)


def _bright_rect_dataset(tmp_path: Path, **cfg) -> tuple[KdDataset, np.ndarray]:
    box, angle = (60.0, 50.0, 120.0, 80.0), 20.0
    pixels = _bar((150, 200), box, angle, 1.0, 1.0)
    Image.fromarray((pixels * 255).astype(np.uint8)).save(tmp_path / "rect.png")
    sample = _sample(tmp_path / "rect.png", box, angle)
    view = ViewConfig(image_size=(96, 128), crop_size=(16, 32), **{**PLAIN, **NO_JITTER, **cfg})
    return KdDataset([sample], [0], view, train=True, seed=7), pixels


@pytest.mark.parametrize(
    "aug",
    [
        {"flip_p": 1.0, "degrees": 0.0, "scale": (1.0, 1.0), "translate": 0.0},
        {"flip_p": 0.0, "degrees": 35.0, "scale": (0.7, 1.2), "translate": 0.15},
        {"flip_p": 0.5, "degrees": 35.0, "scale": (0.7, 1.2), "translate": 0.15},
    ],
)
def test_augmentation_keeps_image_mask_and_box_aligned(tmp_path: Path, aug) -> None:
    dataset, _ = _bright_rect_dataset(tmp_path, **aug)
    for epoch in range(6):
        dataset.set_epoch(epoch)
        item = dataset[0]
        image, mask, box = item["image"][0].numpy(), item["mask"][0].numpy(), item["box"].numpy()
        bright = image > 0.9
        assert bright.sum() > 100
        assert mask[bright].mean() > 0.99  # the mask covers the bright pixels
        assert image[mask > 0].mean() > 0.85  # and little else
        ys, xs = np.nonzero(bright)
        assert box[0] <= xs.min() + 0.5 and xs.max() + 0.5 <= box[2]  # the box encloses them
        assert box[1] <= ys.min() + 0.5 and ys.max() + 0.5 <= box[3]
        ys, xs = np.nonzero(image > 0.5)  # the rectangle's extent at half height
        assert box[2] - box[0] < xs.max() - xs.min() + 4  # tight, not the whole image
        assert box[3] - box[1] < ys.max() - ys.min() + 4


def test_teacher_crop_is_cut_from_the_same_augmented_image(tmp_path: Path) -> None:
    box, angle = (60.0, 50.0, 120.0, 80.0), 20.0
    pixels = _bar((150, 200), box, angle)  # left half 1, right half 0.5: not mirror-symmetric
    Image.fromarray((pixels * 255).astype(np.uint8)).save(tmp_path / "bar.png")
    sample = _sample(tmp_path / "bar.png", box, angle)
    base = {**PLAIN, **NO_JITTER, "crop_size": (16, 32)}
    plain = KdDataset([sample], [0], ViewConfig(**base, **NO_AUG), train=False, seed=0)[0]["crop"]
    aug = {"degrees": 30.0, "scale": (0.8, 1.2), "translate": 0.1}
    for flip_p in (0.0, 1.0):
        ds = KdDataset([sample], [0], ViewConfig(**base, **aug, flip_p=flip_p), True, seed=1)
        crop = ds[0]["crop"]
        expected = plain.flip(-1) if flip_p else plain  # similarity cancels, a flip mirrors
        assert (crop - expected).abs().mean() < 0.05
        assert (crop - (plain if flip_p else plain.flip(-1))).abs().mean() > 0.2


def test_intensity_jitter_is_pixels_only(tmp_path: Path) -> None:
    dataset, _ = _bright_rect_dataset(
        tmp_path, brightness=0.2, contrast=0.3, gamma=0.3, noise=0.05, **NO_AUG
    )
    plain = KdDataset(dataset.samples, [0], dataset.cfg, train=False, seed=0)[0]
    item = dataset[0]
    assert not torch.equal(item["image"], plain["image"])
    torch.testing.assert_close(item["mask"], plain["mask"])
    torch.testing.assert_close(item["box"], plain["box"])


def test_augmentation_is_deterministic_per_seed_and_epoch(tmp_path: Path) -> None:
    dataset, _ = _bright_rect_dataset(tmp_path, noise=0.02, brightness=0.1)
    again = KdDataset(dataset.samples, [0], dataset.cfg, train=True, seed=7)
    other = KdDataset(dataset.samples, [0], dataset.cfg, train=True, seed=8)
    first = dataset[0]
    for key in ("image", "crop", "mask", "box"):
        torch.testing.assert_close(first[key], again[0][key], rtol=0, atol=0)
    assert not torch.equal(first["image"], other[0]["image"])
    dataset.set_epoch(1)
    assert not torch.equal(first["image"], dataset[0]["image"])
    dataset.set_epoch(0)
    torch.testing.assert_close(first["image"], dataset[0]["image"], rtol=0, atol=0)


# --------------------------------------------------------------------------- dataset


@pytest.mark.parametrize(
    ("kind", "channels", "boxed"),
    [("grey8", 3, True), ("rgb", 1, False), ("rgb", 3, True), ("grey16", 1, False)],
)
def test_student_and_crop_views_equal_evaluation_items(
    tmp_path: Path, kind: str, channels: int, boxed: bool
) -> None:
    rng = np.random.default_rng(0)
    if kind == "rgb":
        data = rng.integers(0, 256, (90, 140, 3), dtype=np.uint8)
    elif kind == "grey16":
        data = rng.integers(0, 65536, (90, 140), dtype=np.uint16)
    else:
        data = rng.integers(0, 256, (90, 140), dtype=np.uint8)
    path = tmp_path / "img.png"
    Image.fromarray(data).save(path)
    box, angle = (30.0, 20.0, 90.0, 50.0), 15.0
    cfg = ViewConfig(image_size=(64, 80), crop_size=(24, 48), channels=channels, letterbox=boxed)
    item = KdDataset([_sample(path, box, angle)], [0], cfg, train=False, seed=3)[0]
    assert item["image"].shape == (channels, 64, 80) and item["crop"].shape == (channels, 24, 48)
    for source in (path, load_image(path, channels)):
        torch.testing.assert_close(student_view(source, cfg), item["image"], rtol=0, atol=0)
    crop = crop_roi(load_image(path, channels), box, angle, cfg.crop_size)  # the two-stage path
    torch.testing.assert_close(normalise(crop, cfg), item["crop"], rtol=0, atol=0)


def test_mask_rois_override_the_expert_roi(tmp_path: Path) -> None:
    Image.fromarray(np.zeros((100, 100), np.uint8)).save(tmp_path / "z.png")
    sample = _sample(tmp_path / "z.png", (10.0, 10.0, 30.0, 20.0), 0.0, index=0)
    cfg = ViewConfig(image_size=(100, 100), **PLAIN)
    detected = {0: ((50.0, 60.0, 90.0, 80.0), 0.0)}
    item = KdDataset([sample], [0], cfg, False, 0, mask_rois=detected)[0]
    torch.testing.assert_close(item["box"], torch.tensor([50.0, 60.0, 90.0, 80.0]))
    assert item["mask"][0, 60:80, 50:90].min() == 1 and item["mask"].sum() == 40 * 20
    expert = KdDataset([sample], [0], cfg, False, 0)[0]
    torch.testing.assert_close(expert["box"], torch.tensor([10.0, 10.0, 30.0, 20.0]))


def test_sample_without_box_and_expert_crop_file(tmp_path: Path) -> None:
    Image.fromarray(np.zeros((60, 80), np.uint8)).save(tmp_path / "full.png")
    crop_pixels = np.zeros((10, 20), np.uint8)
    crop_pixels[:, :10] = 255  # left half bright
    Image.fromarray(crop_pixels).save(tmp_path / "crop.png")
    cfg = ViewConfig(image_size=(32, 48), crop_size=(10, 20), **PLAIN, **NO_JITTER)
    bare = _sample(tmp_path / "full.png")
    item = KdDataset([bare], [0], cfg, train=True, seed=0)[0]
    assert item["mask"].min() == 1 and item["mask"].shape == (1, 32, 48)
    torch.testing.assert_close(item["box"], torch.tensor([0.0, 0.0, 48.0, 32.0]))
    assert item["crop"].shape == (1, 10, 20)

    with_crop = _sample(tmp_path / "full.png", (10.0, 10.0, 50.0, 30.0), crop=tmp_path / "crop.png")
    for flip_p, bright_left in ((0.0, True), (1.0, False)):
        view = ViewConfig(**{**cfg.__dict__, "flip_p": flip_p})
        crop = KdDataset([with_crop], [0], view, train=True, seed=0)[0]["crop"][0]
        left, right = crop[:, :9].mean(), crop[:, 11:].mean()
        assert (left > 0.9 and right < 0.1) if bright_left else (right > 0.9 and left < 0.1)


def test_dataloader_batches_and_views(tmp_path: Path) -> None:
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(np.full((40, 60), 40 * i, np.uint8)).save(paths[-1])
    samples = [_sample(p, (5.0, 5.0, 25.0, 15.0), 0.0, index=i) for i, p in enumerate(paths)]
    cfg = ViewConfig(image_size=(32, 32), crop_size=(8, 16))
    dataset = KdDataset(samples, [2, 0], cfg, train=True, seed=0)
    dataset.preload()
    assert len(dataset.cache) == 2 and list(dataset.labels) == [1, 1]
    batch = next(iter(DataLoader(dataset, batch_size=2)))
    assert batch["image"].shape == (2, 3, 32, 32) and batch["crop"].shape == (2, 3, 8, 16)
    assert batch["mask"].shape == (2, 1, 32, 32) and batch["box"].shape == (2, 4)
    assert batch["index"].tolist() == [2, 0] and batch["label"].dtype == torch.long
    teacher = KdDataset(samples, [0], cfg, train=False, seed=0, views=("crop",))
    assert set(teacher[0]) == {"crop", "label", "index"}


def test_view_config_reports_every_problem() -> None:
    with pytest.raises(KdError) as info:
        ViewConfig(image_size=(0, 10), channels=2, mask="disc", flip_p=2.0)
    assert len(str(info.value).splitlines()) >= 4
    with pytest.raises(KdError, match="mean needs 1 value for 1 channels"):
        ViewConfig(channels=1, mean=(0.1, 0.2, 0.3))
    assert ViewConfig(channels=1).mean == (0.449,) and len(ViewConfig().std) == 3


# --------------------------------------------------------------------------- recipe


def _recipe(*overrides: str):
    from kdtoolkit.config.recipe import load_recipe

    return load_recipe({"data": {"manifest": "m.csv"}, "loss": [{"name": "ce"}]}, list(overrides))


def test_view_config_takes_every_augment_key_with_unchanged_defaults() -> None:
    cfg = view_config(_recipe())
    defaults = ViewConfig(channels=1)
    for name in ("flip_p", "degrees", "scale", "translate", "brightness", "contrast"):
        assert getattr(cfg, name) == pytest.approx(getattr(defaults, name))
    assert (cfg.gamma, cfg.noise) == (defaults.gamma, defaults.noise) == (0.1, 0.01)
    cfg = view_config(_recipe("augment.gamma=0.3", "augment.noise=0"))
    assert (cfg.gamma, cfg.noise) == (0.3, 0.0)
    assert cfg.crop_size == cfg.image_size == (224, 224)  # neutral: tasks set their own


def test_augment_keys_enter_the_digest_and_data_loading_does_not() -> None:
    base = _recipe().digest()
    assert _recipe("augment.gamma=0").digest() != base
    assert _recipe("augment.noise=0").digest() != base
    assert _recipe("data.workers=3", "data.loader=workers").digest() == base


def test_sos_task_sets_its_crop_shape() -> None:
    from kdtoolkit.config.recipe import load_recipe

    recipe = load_recipe({"task": {"name": "sos"}})
    assert recipe.size("crop") == (112, 224) and recipe.data.channels == 1


def test_zero_gamma_and_noise_turn_them_off(tmp_path: Path) -> None:
    dataset, _ = _bright_rect_dataset(tmp_path, **NO_AUG)  # no jitter at all
    plain = KdDataset(dataset.samples, [0], dataset.cfg, train=False, seed=0)[0]
    for key in ("image", "crop"):  # exponent 1, gain 1, bias 0: equal up to rounding
        torch.testing.assert_close(dataset[0][key], plain[key], rtol=0, atol=1e-6)
    for on in ({"gamma": 0.3}, {"noise": 0.05}):
        view = ViewConfig(**{**dataset.cfg.__dict__, **on})
        item = KdDataset(dataset.samples, [0], view, train=True, seed=7)[0]
        assert not torch.equal(item["image"], plain["image"])
