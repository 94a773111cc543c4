"""Scan reading (DICOM file/series, NIfTI), anatomical slicing, intensity and resampling."""

from __future__ import annotations

import math
import random
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from kdtoolkit.data.geometry import roi_corners
from kdtoolkit.data.intensity import percentile_clip, resample, scale_roi, window
from kdtoolkit.data.volume import Slice, clear_cache, is_volume_path, load_volume, read_slice
from kdtoolkit.errors import KdError

# The test volume V[x, y, z], indexed toward patient Left, Posterior, Superior (LPS).
NX, NY, NZ = 5, 6, 7
SX, SY, SZ = 0.8, 0.9, 2.5
ORIGIN = np.array([-20.0, -30.0, 40.0])  # LPS mm of voxel (0, 0, 0)
SLOPE, INTERCEPT = 2.0, -100.0


def shipped(name: str) -> str:
    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"{name} is not shipped with this pydicom")
    return path


@pytest.fixture(autouse=True)
def _fresh_cache():
    clear_cache()
    yield
    clear_cache()


@pytest.fixture(scope="module")
def stored() -> np.ndarray:
    """Stored (pre-rescale) integers of V: all distinct, so any mix-up shows."""
    return np.arange(NX * NY * NZ, dtype=np.int16).reshape(NX, NY, NZ) * 3 - 50


def physical(stored: np.ndarray) -> np.ndarray:
    return stored.astype(np.float64) * SLOPE + INTERCEPT


def write_coronal_series(folder: Path, stored: np.ndarray) -> None:
    """V as coronal DICOM slices (rows run toward Inferior, columns toward Left), files shuffled."""
    folder.mkdir()
    series = generate_uid()
    order = list(range(NY))
    random.Random(3).shuffle(order)
    for n, j in enumerate(order):
        # pixel (r, c) of slice j is V[c, j, NZ-1-r]
        pixels = stored[:, j, ::-1].T.copy()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.SeriesInstanceUID = series
        ds.Modality = "CT"
        ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
        top = ORIGIN + [0.0, j * SY, (NZ - 1) * SZ]
        ds.ImagePositionPatient = [float(v) for v in top]
        ds.PixelSpacing = [SZ, SX]
        ds.SliceThickness = SY
        ds.RescaleSlope, ds.RescaleIntercept = SLOPE, INTERCEPT
        ds.Rows, ds.Columns = pixels.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.PixelData = pixels.astype("<i2").tobytes()
        ds.save_as(
            folder / f"{n:03d}_{random.Random(n).randint(0, 9999)}", enforce_file_format=True
        )
    (folder / "notes.txt").write_text("not a DICOM file")


def write_nifti(path: Path, stored: np.ndarray) -> None:
    """V as NIfTI with permuted, flipped axes: array [i, j, k] toward Inferior, Right, Anterior."""
    data = np.transpose(physical(stored)[::-1, ::-1, ::-1], (2, 0, 1)).astype(np.float32)
    far = ORIGIN + [(NX - 1) * SX, (NY - 1) * SY, (NZ - 1) * SZ]  # LPS of voxel V[-1, -1, -1]
    affine = np.array(
        [
            [0.0, SX, 0.0, -far[0]],  # RAS x = -L
            [0.0, 0.0, SY, -far[1]],  # RAS y = -P
            [-SZ, 0.0, 0.0, far[2]],
            [0.0, 0.0, 0.0, 1.0],
        ]
    )
    assert nib.aff2axcodes(affine) == ("I", "R", "A")
    nib.save(nib.Nifti1Image(data, affine), str(path))


@pytest.fixture
def scans(tmp_path: Path, stored: np.ndarray) -> tuple[Path, Path]:
    series, nifti = tmp_path / "series", tmp_path / "scan.nii.gz"
    write_coronal_series(series, stored)
    write_nifti(nifti, stored)
    return series, nifti


def expected(volume: np.ndarray, axis: str, index: int) -> np.ndarray:
    """The documented display convention, written out by hand from V[x, y, z]."""
    if axis == "sagittal":  # rows S->I, cols A->P
        return volume[index, :, :].T[::-1, :]
    if axis == "coronal":  # rows S->I, cols R->L
        return volume[:, index, :].T[::-1, :]
    return volume[:, :, index].T  # axial: rows A->P, cols R->L


# -- DICOM files shipped with pydicom ------------------------------------------------------


def test_ct_rescale_gives_hounsfield_units():
    path = shipped("CT_small.dcm")
    ds = pydicom.dcmread(path)
    hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    image = read_slice(path)
    assert image.array.dtype == np.float32 and image.array.shape == (128, 128)
    np.testing.assert_array_equal(image.array, hu)
    assert image.spacing == pytest.approx((0.661468, 0.661468))
    # axial acquisition (rows toward P, columns toward L): the axial slice is the stored image
    np.testing.assert_array_equal(read_slice(path, "axial").array, hu)


def test_mr_without_rescale_keeps_stored_values():
    path = shipped("MR_small.dcm")
    ds = pydicom.dcmread(path)
    image = read_slice(path, "axial", 0)
    np.testing.assert_array_equal(image.array, ds.pixel_array.astype(np.float32))
    assert image.spacing == pytest.approx((0.3125, 0.3125))


def test_monochrome1_is_inverted(tmp_path: Path):
    ds = pydicom.dcmread(shipped("CT_small.dcm"))
    hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.save_as(tmp_path / "mono1.dcm")
    # signed 16-bit stored range -32768..32767 through the rescale, mirrored
    low = -32768 * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    high = 32767 * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    np.testing.assert_array_equal(read_slice(tmp_path / "mono1.dcm").array, low + high - hu)


def test_ct_window_maps_level_and_width_to_unit_range():
    hu = read_slice(shipped("CT_small.dcm")).array
    out = window(hu, level=40, width=400)  # [-160, 240] HU -> [0, 1]
    np.testing.assert_allclose(out, np.clip((hu + 160) / 400, 0, 1), atol=1e-6)
    assert window(np.array([-160.0, 40.0, 240.0, 1000.0]), 40, 400).tolist() == [0, 0.5, 1, 1]
    with pytest.raises(KdError, match="positive width"):
        window(hu, 40, 0)


def test_percentile_clip():
    values = np.arange(101, dtype=np.float32)
    clipped = percentile_clip(values, 10, 90)
    np.testing.assert_allclose(clipped[[0, 10, 50, 90, 100]], [0, 0, 0.5, 1, 1], atol=1e-6)
    assert not percentile_clip(np.full((3, 3), 7.0)).any()


def test_missing_decoder_is_one_line_naming_file_and_package():
    path = shipped("MR_small_jpeg_ls_lossless.dcm")
    from pydicom.pixels import get_decoder

    ds = pydicom.dcmread(path, stop_before_pixels=True)
    if get_decoder(ds.file_meta.TransferSyntaxUID).is_available:
        pytest.skip("a JPEG-LS decoder is installed")
    with pytest.raises(KdError) as info:
        read_slice(path)
    message = str(info.value)
    assert "\n" not in message and "MR_small_jpeg_ls_lossless.dcm" in message
    assert "JPEG-LS" in message and "pip install" in message and "pylibjpeg" in message


def test_colour_and_unreadable_files_are_kd_errors(tmp_path: Path):
    with pytest.raises(KdError, match="colour DICOM"):
        read_slice(shipped("ExplVR_BigEnd.dcm"))  # RGB
    bad = tmp_path / "bad.dcm"
    bad.write_text("hello")
    with pytest.raises(KdError, match="not a readable DICOM file"):
        read_slice(bad)
    with pytest.raises(KdError, match="not found"):
        read_slice(tmp_path / "nothing.nii.gz")
    with pytest.raises(KdError, match="no anatomical axis"):
        read_slice(shipped("liver_1frame.dcm"), "sagittal")


# -- series and NIfTI of the same volume ---------------------------------------------------


@pytest.mark.parametrize("axis", ["sagittal", "coronal", "axial"])
def test_series_and_nifti_agree_with_the_convention(scans, stored, axis):
    series, nifti = scans
    volume = physical(stored)
    index = {"sagittal": NX, "coronal": NY, "axial": NZ}[axis] // 2
    want = expected(volume, axis, index)
    spacing = {"sagittal": (SZ, SY), "coronal": (SZ, SX), "axial": (SY, SX)}[axis]
    for path in (series, nifti):
        image = read_slice(path, axis, "mid")
        assert image.array.dtype == np.float32
        np.testing.assert_array_equal(image.array, want)
        assert image.spacing == pytest.approx(spacing)
        assert image.source.endswith(f"[{axis} {index}]")


def test_sagittal_mid_by_hand(scans, stored):
    """One case spelled out: x = 2 (mid of 5), top row = most superior z, first column = y 0."""
    series, nifti = scans
    volume = physical(stored)
    for path in (series, nifti):
        image = read_slice(path, "sagittal", "mid").array
        assert image.shape == (NZ, NY)
        assert image[0, 0] == volume[2, 0, NZ - 1] and image[-1, -1] == volume[2, NY - 1, 0]


def test_slab_projections(scans, stored):
    series, nifti = scans
    volume = physical(stored)
    sagittal = [expected(volume, "sagittal", x) for x in range(NX)]
    for path in (series, nifti):
        np.testing.assert_array_equal(
            read_slice(path, "sagittal", 2, slab=3, projection="max").array,
            np.max(sagittal[1:4], axis=0),
        )
        np.testing.assert_allclose(
            read_slice(path, "sagittal", 2, slab=3, projection="mean").array,
            np.mean(sagittal[1:4], axis=0),
            rtol=1e-6,
        )
        # clipped at the volume's end: slices 3 and 4 only
        np.testing.assert_array_equal(
            read_slice(path, "sagittal", 4, slab=3, projection="min").array,
            np.min(sagittal[3:5], axis=0),
        )


def test_bad_axis_index_and_projection(scans):
    series, _ = scans
    with pytest.raises(KdError, match="did you mean 'sagittal'"):
        read_slice(series, "sagital")
    with pytest.raises(KdError, match=r"out of range — give 0..4"):
        read_slice(series, "sagittal", 5)
    with pytest.raises(KdError, match="unknown projection"):
        read_slice(series, "axial", slab=2, projection="median")
    with pytest.raises(KdError, match="give an axis"):
        read_slice(series)


def test_series_problems_name_the_file(scans, tmp_path):
    series, _ = scans
    files = sorted(f for f in series.iterdir() if f.name != "notes.txt")
    gap = tmp_path / "gap"
    gap.mkdir()
    for f in files:
        ds = pydicom.dcmread(f)
        if float(ds.ImagePositionPatient[1]) != ORIGIN[1] + 2 * SY:  # drop one middle slice
            ds.save_as(gap / f.name)
    with pytest.raises(KdError, match="uneven slice spacing"):
        load_volume(gap)
    other = pydicom.dcmread(files[0])
    other.SeriesInstanceUID = generate_uid()
    other.save_as(series / "other.dcm")
    with pytest.raises(KdError, match="2 DICOM series — put one series per folder"):
        load_volume(series)


def test_volume_is_decoded_once_per_path(scans):
    series, nifti = scans
    assert load_volume(series) is load_volume(series)
    assert load_volume(nifti) is load_volume(str(nifti))
    clear_cache()
    assert load_volume(nifti) is not None
    assert is_volume_path(series) and is_volume_path(nifti)
    assert is_volume_path(shipped("MR_small.dcm"))


def test_single_oriented_slice_without_axis_uses_its_plane(scans):
    series, _ = scans
    one = next(f for f in series.iterdir() if f.name != "notes.txt")
    image = read_slice(one)
    assert image.source.endswith("]") and "coronal 0" in image.source
    assert image.array.shape == (NZ, NX)
    with pytest.raises(KdError, match="a single coronal slice has no sagittal view"):
        read_slice(one, "sagittal")


# -- resampling and box mapping --------------------------------------------------------------


def test_resample_scale_and_box_mapping():
    image = Slice(np.arange(40 * 60, dtype=np.float32).reshape(40, 60), (0.5, 0.25), "s")
    out, (sx, sy) = resample(image, 1.0)
    assert out.array.shape == (20, 15) and (sx, sy) == (0.25, 0.5)
    assert out.spacing == pytest.approx((1.0, 1.0))
    # isotropic scaling keeps the angle and scales the corners
    box, angle = scale_roi((10, 20, 30, 30), 30.0, (2.0, 2.0))
    np.testing.assert_allclose(roi_corners(box, angle), roi_corners((10, 20, 30, 30), 30.0) * 2)
    assert angle == 30.0
    # anisotropic, axis-aligned: exact
    assert scale_roi((10, 20, 30, 30), 0.0, (sx, sy)) == ((2.5, 10.0, 7.5, 15.0), 0.0)
    # anisotropic, rotated: centre, top edge and area are kept
    box, angle = scale_roi((10, 20, 30, 30), 30.0, (0.5, 2.0))
    src = roi_corners((10, 20, 30, 30), 30.0) * [0.5, 2.0]
    got = roi_corners(box, angle)
    np.testing.assert_allclose(got.mean(axis=0), src.mean(axis=0))
    np.testing.assert_allclose(got[1] - got[0], src[1] - src[0], atol=1e-9)  # top edge
    assert (box[2] - box[0]) * (box[3] - box[1]) == pytest.approx(200 * 0.5 * 2.0)
    # and back
    back, angle_back = scale_roi(*scale_roi((10, 20, 30, 30), 30.0, (2, 2)), (0.5, 0.5))
    np.testing.assert_allclose(back, (10, 20, 30, 30))
    assert math.isclose(angle_back, 30.0)
