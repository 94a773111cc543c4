"""The crop-box jitter (``augment.roi_shift/roi_scale/roi_degrees``): the two-stage classifier
trained on boxes moved as a detector's may be, against hand-computed geometry; the teacher
always on exact crops."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from kdtoolkit.config.recipe import DataConfig, load_recipe
from kdtoolkit.data.augment import jitter_roi
from kdtoolkit.data.dataset import KdDataset
from kdtoolkit.data.geometry import roi_corners
from kdtoolkit.data.imageio import load_image
from kdtoolkit.data.manifest import Sample
from kdtoolkit.data.view import ViewConfig, crop_roi, normalise, view_config
from kdtoolkit.engine.folder import check_run_folder
from kdtoolkit.engine.loaders import Loaders
from kdtoolkit.engine.plan import teacher_spec
from kdtoolkit.engine.stage import reusable
from kdtoolkit.errors import KdError
from kdtoolkit.testing import run_tiny_recipe

PLAIN = {"channels": 1, "mean": (0.0,), "std": (1.0,), "image_size": (96, 128)}
STILL = {"flip_p": 0.0, "degrees": 0.0, "scale": (1.0, 1.0), "translate": 0.0}
QUIET = {"brightness": 0.0, "contrast": 0.0, "gamma": 0.0, "noise": 0.0}
BOX, ANGLE = (60.0, 50.0, 120.0, 80.0), 30.0


class FixedDraws:
    """A generator whose ``random(n)`` returns chosen variates."""

    def __init__(self, values: list[float]) -> None:
        self.values = np.array(values)

    def random(self, n: int) -> np.ndarray:
        assert n == len(self.values)
        return self.values


def _axes(box, angle) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Centre and unit vectors along the ROI's width and height, read off its corners."""
    c = roi_corners(box, angle)
    along, across = c[1] - c[0], c[3] - c[0]
    return c.mean(axis=0), along / np.linalg.norm(along), across / np.linalg.norm(across)


def test_jitter_moves_the_box_along_its_own_axes() -> None:
    # variates 0.75, 0.25, 1, 0, 0.5 are u = +0.5, −0.5, +1, −1, 0 on [−1, 1]
    new_box, new_angle = jitter_roi(
        FixedDraws([0.75, 0.25, 1.0, 0.0, 0.5]), BOX, ANGLE, (0.2, 0.1), 0.1, 8
    )
    centre, along, across = _axes(BOX, ANGLE)
    width, height = 60.0, 30.0
    expected = centre + along * (0.5 * 0.2 * width) + across * (-0.5 * 0.1 * height)
    np.testing.assert_allclose(roi_corners(new_box, new_angle).mean(axis=0), expected, atol=1e-9)
    assert new_box[2] - new_box[0] == pytest.approx(width * 1.1)
    assert new_box[3] - new_box[1] == pytest.approx(height * 0.9)
    assert new_angle == pytest.approx(ANGLE)
    _, turned = jitter_roi(FixedDraws([0.5, 0.5, 0.5, 0.5, 1.0]), BOX, ANGLE, (0.2, 0.1), 0.1, 8)
    assert turned == pytest.approx(ANGLE + 8)


def test_jitter_spans_its_range_and_no_more() -> None:
    rng = np.random.default_rng(0)
    centre, along, across = _axes(BOX, ANGLE)
    moves, sizes, turns = [], [], []
    for _ in range(2000):
        box, angle = jitter_roi(rng, BOX, ANGLE, (0.25, 0.1), 0.2, 5.0)
        offset = roi_corners(box, angle).mean(axis=0) - centre
        moves.append((offset @ along / 60.0, offset @ across / 30.0))
        sizes.append(((box[2] - box[0]) / 60.0, (box[3] - box[1]) / 30.0))
        turns.append(angle - ANGLE)
    moves, sizes, turns = np.abs(moves), np.array(sizes), np.abs(turns)
    assert 0.24 < moves[:, 0].max() <= 0.25 + 1e-9  # along: a quarter of the width
    assert 0.09 < moves[:, 1].max() <= 0.1 + 1e-9  # across: a tenth of the height
    assert sizes.min() >= 0.8 - 1e-9 and sizes.max() <= 1.2 + 1e-9
    assert sizes.min() < 0.81 and sizes.max() > 1.19
    assert 4.9 < turns.max() <= 5.0


def _write_bar(tmp_path: Path) -> Path:
    """A textured image (so any shift of the crop shows) with an ROI at ``BOX``/``ANGLE``."""
    pixels = np.random.default_rng(1).integers(0, 256, (150, 200), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "bar.png")
    return tmp_path / "bar.png"


def _sample(path: Path, index: int = 0) -> Sample:
    return Sample(index, index + 2, path, 1, BOX, ANGLE, None, None, None, 200, 150)


def test_training_crop_is_the_jittered_box_and_only_the_crop_moves(tmp_path: Path) -> None:
    path = _write_bar(tmp_path)
    jitter = {"roi_shift": (0.3, 0.1), "roi_scale": 0.2, "roi_degrees": 10.0}
    cfg = ViewConfig(crop_size=(16, 32), **PLAIN, **STILL, **QUIET, **jitter)
    train = KdDataset([_sample(path)], [0], cfg, train=True, seed=5)[0]
    plain = KdDataset([_sample(path)], [0], cfg, train=False, seed=5)[0]
    for key in ("image", "mask", "box"):  # the student's views: no crop-box jitter
        torch.testing.assert_close(train[key], plain[key], rtol=0, atol=1e-6)
    assert (train["crop"] - plain["crop"]).abs().mean() > 0.05
    rng = np.random.default_rng([5, 0, 0])  # the sample's draws: affine 5, intensity 3, box 5
    rng.random(8)
    box, angle = jitter_roi(rng, BOX, ANGLE, (0.3, 0.1), 0.2, 10.0)
    expected = normalise(crop_roi(load_image(path, 1), box, angle, (16, 32)), cfg)
    torch.testing.assert_close(train["crop"], expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("loader", ["workers", "device"])
def test_only_the_two_stage_classifier_sees_jittered_boxes(tmp_path: Path, loader: str) -> None:
    path = _write_bar(tmp_path)
    samples = [_sample(path, i) for i in range(4)]
    jitter = {"roi_shift": 0.3, "roi_scale": 0.3, "roi_degrees": 20.0}
    cfg = ViewConfig(crop_size=(16, 32), **PLAIN, **STILL, **QUIET, **jitter)
    loaders = Loaders(samples, cfg, torch.device("cpu"), DataConfig(loader=loader), print)
    exact = normalise(crop_roi(load_image(path, 1), BOX, ANGLE, (16, 32)), cfg).expand(
        4, -1, -1, -1
    )
    for views in (("crop",), ("image", "crop")):  # the teacher's, a student's teacher's
        batch = next(iter(loaders(np.arange(4), True, 4, seed=0, views=views)))
        torch.testing.assert_close(batch["crop"], exact, rtol=0, atol=1e-5)
    classifier = next(iter(loaders(np.arange(4), True, 4, seed=0, views=("crop",), jitter=True)))
    assert all((crop - exact[0]).abs().mean() > 0.05 for crop in classifier["crop"])
    for key in ("roi_shift", "roi_scale", "roi_degrees"):  # each alone: the classifier's only
        alone = ViewConfig(crop_size=(16, 32), **PLAIN, **STILL, **QUIET, **{key: jitter[key]})
        loaders = Loaders(samples, alone, torch.device("cpu"), DataConfig(loader=loader), print)
        for views in (("crop",), ("image", "crop")):
            batch = next(iter(loaders(np.arange(4), True, 4, seed=0, views=views)))
            torch.testing.assert_close(batch["crop"], exact, rtol=0, atol=1e-5)
        moved = next(iter(loaders(np.arange(4), True, 4, seed=0, views=("crop",), jitter=True)))
        assert (moved["crop"] - exact).abs().mean() > 0.01, key


@pytest.mark.parametrize("loader", ["workers", "device"])
def test_a_jitter_recipe_trains_its_teacher_on_the_crops_of_a_recipe_without(
    tmp_path: Path, loader: str
) -> None:
    """With every augmentation on, the teacher's training batches under a jitter recipe are
    those of the same recipe without the jitter, draw for draw."""
    path = _write_bar(tmp_path)
    samples = [_sample(path, i) for i in range(4)]
    jitter = {"roi_shift": (0.25, 0.05), "roi_scale": 0.1, "roi_degrees": 5.0}
    keys = ("augment.roi_shift=[0.25, 0.05]", "augment.roi_scale=0.1", "augment.roi_degrees=5")
    teacher = teacher_spec(_recipe(*keys))
    assert not teacher.jitter
    batches = []
    for extra in (jitter, {}):
        cfg = ViewConfig(crop_size=(16, 32), **PLAIN, **extra)
        loaders = Loaders(samples, cfg, torch.device("cpu"), DataConfig(loader=loader), print)
        made = loaders(np.arange(4), True, 4, seed=7, views=("crop",), jitter=teacher.jitter)
        batches.append(next(iter(made))["crop"])
    torch.testing.assert_close(batches[0], batches[1], rtol=0, atol=0)


def test_off_it_draws_nothing_so_earlier_runs_repeat(tmp_path: Path) -> None:
    """Jitter off, the sample's generator goes from the intensity draws straight to the pixel
    noise, as before the jitter existed: replaying that order gives the same pixels."""
    path = _write_bar(tmp_path)
    cfg = ViewConfig(crop_size=(16, 32), **PLAIN, **STILL, **{**QUIET, "noise": 0.05})
    item = KdDataset([_sample(path)], [0], cfg, train=True, seed=3)[0]
    rng = np.random.default_rng([3, 0, 0])
    rng.random(8)  # affine 5, intensity 3; no crop-box variates
    image = load_image(path, 1)
    for key, clean in (
        ("image", KdDataset([_sample(path)], [0], cfg, train=False, seed=3)[0]["image"]),
        ("crop", normalise(crop_roi(image, BOX, ANGLE, (16, 32)), cfg)),
    ):
        noise = rng.standard_normal(tuple(clean.shape), dtype=np.float32) * np.float32(0.05)
        expected = (clean + torch.from_numpy(noise)).clamp(0, 1)
        torch.testing.assert_close(item[key], expected, rtol=0, atol=1e-6)


def _recipe(*overrides: str):
    raw = {"data": {"manifest": "/data/m.csv"}, "loss": [{"name": "ce"}]}
    return load_recipe(raw, list(overrides))


def test_recipe_keys_are_off_by_default_and_out_of_the_digest_when_off() -> None:
    base = _recipe()
    assert (base.augment.roi_shift, base.augment.roi_scale, base.augment.roi_degrees) == (0, 0, 0)
    unpaired = _recipe("experiment.paired=false")  # how runs were made before these keys
    # this recipe's digest before the keys existed (since select_by's default became "last")
    assert unpaired.digest() == "fc9417f4f952e38e"
    assert base.digest() != unpaired.digest()  # paired rows compute something else
    off = "augment.roi_shift=0", "augment.roi_scale=0.0", "augment.roi_degrees=0"
    assert _recipe(*off).digest() == base.digest()
    assert _recipe("augment.roi_shift=[0, 0.0]").digest() == base.digest()
    assert _recipe("augment.roi_shift=0.2").digest() != base.digest()
    one = _recipe("augment.roi_shift=0.2").digest()
    assert _recipe("augment.roi_shift=[0.2, 0.2]").digest() == one  # the same run
    assert _recipe("augment.roi_shift=[0.2, 0.1]").digest() != one
    assert _recipe("augment.roi_degrees=4").digest() != _recipe("augment.roi_degrees=5").digest()


def test_a_jitter_recipe_no_longer_reuses_a_teacher_trained_on_jittered_crops(
    tmp_path: Path,
) -> None:
    """Its teacher now trains on exact crops: its digest is not the one a run folder made
    when the jitter applied to the teacher carries, so neither that folder nor its teacher
    checkpoint is taken for this run's; a recipe without the jitter keeps its digest."""
    recipe = _recipe("augment.roi_shift=0.2")
    assert recipe.augment.crop_jitter and not _recipe().augment.crop_jitter
    assert recipe.digest() != "99e5b75484576348"  # its digest with the teacher jittered
    assert _recipe("experiment.paired=false").digest() == "fc9417f4f952e38e"
    recipe.experiment.output = str(tmp_path / "run")
    recipe.output_dir.mkdir()
    stamp = {"digest": "99e5b75484576348", "recipe": recipe.to_dict()}
    (recipe.output_dir / "recipe.resolved.json").write_text(json.dumps(stamp))
    with pytest.raises(KdError, match="belongs to a different recipe"):
        check_run_folder(recipe, force=False)
    ctx = SimpleNamespace(force=False, log=print)
    with pytest.raises(KdError, match="made by another recipe"):
        reusable(
            ctx,
            "fold 0 teacher",
            tmp_path / "model.safetensors",
            "99e5b75484576348",
            recipe.digest(),
        )


def test_out_of_range_jitter_is_a_one_line_error_naming_the_key() -> None:
    with pytest.raises(KdError, match=r"augment\.roi_scale") as info:
        _recipe("augment.roi_scale=1.0")
    assert "augment.roi_scale" in str(info.value)
    with pytest.raises(KdError, match=r"augment\.roi_shift: expected one fraction or \[along"):
        _recipe("augment.roi_shift=[0.1, 0.2, 0.3]")
    with pytest.raises(KdError, match=r"augment\.roi_shift: must be <= 1, got 1\.5"):
        _recipe("augment.roi_shift=[0.1, 1.5]")
    with pytest.raises(KdError, match=r"roi_shift must be \(along, across\) >= 0"):
        ViewConfig(roi_shift=(0.1, -0.1))
    assert ViewConfig(roi_shift=0.2).roi_shift == (0.2, 0.2)
    assert view_config(_recipe("augment.roi_shift=0.25")).roi_shift == (0.25, 0.25)
    assert view_config(_recipe("augment.roi_shift=[0.25, 0.05]")).roi_shift == (0.25, 0.05)


@pytest.mark.slow
def test_with_the_manual_provider_the_jitter_changes_nothing_but_says_so(
    tmp_path: Path, monkeypatch
) -> None:
    """No two-stage row, so no classifier for the jitter: the teacher trains on exact crops,
    no extra stage runs, and the log says why the keys did nothing."""
    calls = []
    made = Loaders.__call__

    def spy(self, indices, train, *args, **kwargs):
        calls.append((train, kwargs.get("jitter", args[5] if len(args) > 5 else False)))
        return made(self, indices, train, *args, **kwargs)

    monkeypatch.setattr(Loaders, "__call__", spy)
    jitter = {"augment.roi_shift": 0.3, "augment.roi_scale": 0.2, "augment.roi_degrees": 10}
    result = run_tiny_recipe(tmp_path, **jitter)
    run = result.output
    assert not (run / "fold_0" / "two_stage_classifier").exists()
    assert [train for train, _ in calls].count(True) == 2  # teacher and student
    assert not any(jittered for _, jittered in calls)
    meta = json.loads((run / "fold_0" / "teacher" / "model.json").read_text())
    assert (meta["crops"], meta["crop_jitter"]) == ("expert", False)
    log = (run / "run.log").read_text()
    note = "augment.roi_shift/roi_scale/roi_degrees apply to the two-stage classifier only; "
    assert note + "the manual provider has none (the teacher trains on exact crops)" in log
    assert result.results["models"]["teacher_crop"] == "resnet10t on exact expert crops"
