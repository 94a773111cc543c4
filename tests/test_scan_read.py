"""Scans in the manifest: the slice column, recipe read keys, windowing and spacing with boxes
mapped to the engine's pixels."""

from __future__ import annotations

import csv
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from kdtoolkit.config.recipe import RecipeError, load_recipe
from kdtoolkit.data.dataset import KdDataset
from kdtoolkit.data.geometry import roi_corners
from kdtoolkit.data.imageio import load_image, read_native
from kdtoolkit.data.manifest import ManifestError, read_manifest
from kdtoolkit.data.scan import ReadSpec, read_spec
from kdtoolkit.data.view import ViewConfig
from kdtoolkit.data.volume import clear_cache

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
H, W, N = 40, 60, 5  # sagittal slice rows (S->I), cols (A->P), slices (R->L)
ROW_MM, COL_MM = 0.5, 1.0


def sagittal_scan(path: Path, values: np.ndarray, dtype=np.int16) -> None:
    """``values[k]`` (H×W, display convention) as sagittal slice k of a NIfTI in RAS+ order."""
    lps = np.transpose(values[:, ::-1, :], (0, 2, 1))  # [left, posterior, superior]
    data = np.ascontiguousarray(lps[::-1, ::-1, :]).astype(dtype)
    affine = np.diag([2.0, COL_MM, ROW_MM, 1.0])
    image = nib.Nifti1Image(data, affine)
    image.set_data_dtype(dtype)
    nib.save(image, str(path))


@pytest.fixture(autouse=True)
def _fresh():
    clear_cache()
    yield
    clear_cache()


@pytest.fixture
def scan_dir(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    values = rng.integers(-1000, 1000, (N, H, W)).astype(np.float64)
    values[2, 10:20, 20:40] = 900  # the ROI of the mid slice
    sagittal_scan(tmp_path / "ct.nii.gz", values)
    Image.fromarray(np.zeros((H, W), np.uint8)).save(tmp_path / "flat.png")
    np.save(tmp_path / "values.npy", values)
    return tmp_path


def write(folder: Path, rows: list[list[object]]) -> Path:
    path = folder / "manifest.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "label", "x0", "y0", "x1", "y1", "angle", "slice"])
        writer.writerows(rows)
    return path


def test_window_slice_and_default_scaling(scan_dir):
    values = np.load(scan_dir / "values.npy")
    manifest = write(scan_dir, [["ct.nii.gz", "a", 20, 10, 40, 20, 0, ""],
                                ["ct.nii.gz", "b", 20, 10, 40, 20, 0, 4]])  # fmt: skip
    spec = ReadSpec(window=(0.0, 2000.0))
    first, last = read_manifest(manifest, read=spec).samples
    assert (first.slice, last.slice, first.width, first.height) == ("mid", 4, W, H)
    expected = np.clip((values[2] + 1000) / 2000, 0, 1)
    np.testing.assert_allclose(load_image(first, 1)[:, :, 0], expected, atol=1e-6)
    np.testing.assert_allclose(read_native(last)[:, :, 0], np.clip((values[4] + 1000) / 2000, 0, 1))
    plain = read_manifest(manifest).samples[0]  # signed data, no window: the scan's min-max
    lo, hi = values.min(), values.max()
    np.testing.assert_allclose(load_image(plain, 1)[:, :, 0], (values[2] - lo) / (hi - lo), 1e-5)


def test_spacing_resamples_and_maps_boxes(scan_dir):
    manifest = write(scan_dir, [["ct.nii.gz", "a", 20, 10, 40, 20, 30, ""]])
    (s,) = read_manifest(manifest, read=ReadSpec(spacing_mm=0.5, window=(0, 2000))).samples
    assert (s.width, s.height) == (2 * W, H) and s.scale == (2.0, 1.0)
    assert s.spacing == (0.5, 0.5)
    image = load_image(s, 1)
    assert image.shape == (H, 2 * W, 1)
    corners = roi_corners(s.box, s.angle)
    original = roi_corners((20, 10, 40, 20), 30) * [2.0, 1.0]
    assert np.allclose(corners.mean(0), original.mean(0))
    assert np.isclose(np.hypot(*(corners[1] - corners[0])), np.hypot(*(original[1] - original[0])))
    cfg = ViewConfig(image_size=(32, 64), crop_size=(10, 20), channels=1)
    item = KdDataset([s], [0], cfg, train=False, seed=0)[0]
    assert item["image"].shape == (1, 32, 64)
    assert item["mask"].sum() > 0


def test_row_problems_name_rows_and_fixes(scan_dir):
    manifest = write(scan_dir, [["ct.nii.gz", "a", 20, 10, 40, 20, 0, 7],
                                ["flat.png", "a", 1, 1, 5, 5, 0, 1],
                                ["ct.nii.gz", "a", 20, 10, 40, 20, 0, "x"],
                                ["ct.nii.gz", "a", 20, 10, 90, 20, 0, ""]])  # fmt: skip
    with pytest.raises(ManifestError) as err:
        read_manifest(manifest)
    problems = err.value.problems
    assert len(problems) == 4
    assert ":2:" in problems[0] and "out of range" in problems[0] and "0..4" in problems[0]
    assert ":3:" in problems[1] and "2D image" in problems[1]
    assert ":4:" in problems[2] and "slice 'x'" in problems[2]
    assert ":5:" in problems[3] and "outside the image" in problems[3]


def test_recipe_keys_validate_and_enter_the_digest():
    recipe = RECIPES / "sos-quick.toml"
    base = load_recipe(recipe)
    assert read_spec(base) == ReadSpec()
    with pytest.raises(RecipeError) as err:
        load_recipe(recipe, ["data.axis='axail'", "data.slice=-2", "data.slab=0",
                             "data.window=[40, -1]", "data.percentiles=[0.5, 99.5]",
                             "data.spacing_mm=-1", "data.projection='median'"])  # fmt: skip
    text = str(err.value)
    for key in ("axis", "slice", "slab", "window", "percentiles", "spacing_mm", "projection"):
        assert f"data.{key}:" in text
    changed = load_recipe(recipe, ["data.window=[40, 400]", "data.slice=3", "data.spacing_mm=0.5"])
    assert read_spec(changed) == ReadSpec(slice=3, window=(40.0, 400.0), spacing_mm=0.5)
    assert changed.digest() != base.digest()
    same = load_recipe(recipe, ["data.axis='sagittal'", "data.slab=1"])
    assert same.digest() == base.digest()  # defaults stay out of the digest
