"""The SOS phantom as scans: each slice becomes a small sagittal volume (DICOM series or NIfTI).

Scan ``i`` holds ``slices`` (odd) sagittal slices ``thickness`` mm apart; its central one (the
``mid`` slice, patient right → left) is the PNG slice, pixel for pixel, in the display
convention of :mod:`kdtoolkit.data.volume` (rows superior → inferior, columns anterior →
posterior); the others are the PNG dimmed and noised (seeded). Values are stored as 8-bit
unsigned integers without rescale, so a scan is read exactly like its PNG. Pixel spacing is
``FIELD_MM / size``. The manifest repeats the PNG one with the scan as ``image`` and
``slice = mid``; the PNGs stay in ``png/``. No patient information is written.
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from kd_sos.phantom import ensure_phantom, preset
from kdtoolkit.errors import KdError

FORMATS = ("png", "dicom", "nifti")
FIELD_MM = 200.0  # field of view of every slice
SLICES = 7
THICKNESS_MM = 2.0
PARAMS_FILE = "volumes.json"


def neighbours(image: np.ndarray, slices: int, seed: int, index: int) -> np.ndarray:
    """``slices`` × H × W uint8: ``image`` in the middle, dimmed and noised copies around it."""
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(index, 7)))
    mid = slices // 2
    out = np.empty((slices, *image.shape), dtype=np.uint8)
    for k in range(slices):
        d = abs(k - mid)
        if d == 0:
            out[k] = image
            continue
        noisy = image * (1.0 - 0.05 * d) + rng.normal(0.0, 4.0 * d, image.shape)
        out[k] = np.clip(np.rint(noisy), 0, 255).astype(np.uint8)
    return out


def write_dicom_series(folder: Path, stack: np.ndarray, pixel_mm: float, uid_seed: str) -> None:
    """``stack[k]`` (sagittal, index k toward patient left) as one DICOM file per slice."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    n, rows, cols = stack.shape
    study = generate_uid(entropy_srcs=[uid_seed, "study"])
    series = generate_uid(entropy_srcs=[uid_seed, "series"])
    for k in range(n):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[uid_seed, str(k)])
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.Modality = "MR"
        ds.InstanceNumber = k + 1
        ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]  # rows toward P, columns toward I
        left = (k - n // 2) * THICKNESS_MM
        ds.ImagePositionPatient = [left, -cols * pixel_mm / 2, rows * pixel_mm / 2]
        ds.PixelSpacing = [pixel_mm, pixel_mm]
        ds.SliceThickness = THICKNESS_MM
        ds.Rows, ds.Columns = rows, cols
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        ds.PixelData = np.ascontiguousarray(stack[k]).tobytes()
        ds.save_as(folder / f"slice_{k:03d}.dcm", enforce_file_format=True)


def write_nifti(path: Path, stack: np.ndarray, pixel_mm: float) -> None:
    """``stack`` (as for :func:`write_dicom_series`) as a NIfTI file stored in RAS+ order."""
    import nibabel as nib

    n, rows, cols = stack.shape
    lps = np.transpose(stack[:, ::-1, :], (0, 2, 1))  # [left, posterior, superior]
    data = np.ascontiguousarray(lps[::-1, ::-1, :])  # [right, anterior, superior]
    affine = np.diag([THICKNESS_MM, pixel_mm, pixel_mm, 1.0])
    affine[:3, 3] = [-(n // 2) * THICKNESS_MM, -cols * pixel_mm / 2, -rows * pixel_mm / 2]
    image = nib.Nifti1Image(data, affine)
    image.set_data_dtype(np.uint8)
    image.header.set_xyzt_units("mm")
    nib.save(image, str(path))


def ensure_volumes(
    out_dir: Path,
    fmt: str,
    n: int = 723,
    seed: int = 0,
    size: int = 256,
    crops: bool = False,
    slices: int = SLICES,
    progress: Callable[[int, int], None] | None = None,
    difficulty: str = "paper",
) -> Path:
    """The manifest of the phantom as ``fmt`` scans in ``out_dir`` (PNG phantom in ``png/``),
    reused when ``volumes.json`` matches; returns the manifest path. ``difficulty``: a name of
    :data:`kd_sos.phantom.PRESETS`."""
    if fmt not in FORMATS[1:]:
        raise KdError(f"phantom: format '{fmt}' — use one of: {', '.join(FORMATS)}")
    if slices < 1 or slices % 2 == 0:
        raise KdError(f"phantom: slices must be odd and >= 1, got {slices}")
    out_dir = Path(out_dir)
    png_manifest = ensure_phantom(
        out_dir / "png", n, seed, size, crops, preset(difficulty), progress=progress
    )
    params = {"format": fmt, "n": n, "seed": seed, "size": size, "crops": crops, "slices": slices}
    if difficulty != "paper":  # folders written before the option existed stay reusable
        params["difficulty"] = difficulty
    manifest, params_file = out_dir / "manifest.csv", out_dir / PARAMS_FILE
    if manifest.exists():
        try:
            same = params_file.exists() and json.loads(params_file.read_text()) == params
        except (OSError, ValueError):
            same = False  # damaged: the scans are written again
        if same:
            return manifest
        if not params_file.exists():
            raise KdError(f"{manifest} exists and was not written by the phantom — use a new OUT")
    with png_manifest.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    pixel_mm = FIELD_MM / size
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    for i, row in enumerate(rows):
        image = np.asarray(Image.open(png_manifest.parent / row["image"]).convert("L"))
        stack = neighbours(image, slices, seed, i)
        stem = Path(row["image"]).stem
        if fmt == "dicom":
            name = f"images/{stem}"
            write_dicom_series(out_dir / name, stack, pixel_mm, f"kd-sos-{seed}-{size}-{stem}")
        else:
            name = f"images/{stem}.nii.gz"
            write_nifti(out_dir / name, stack, pixel_mm)
        row["image"], row["slice"] = name, "mid"
        if row.get("crop"):
            row["crop"] = f"png/{row['crop']}"
        if progress is not None:
            progress(i + 1, len(rows))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    _write_text(params_file, json.dumps(params, indent=1))
    _write_text(manifest, buf.getvalue())
    return manifest


def _write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.replace(tmp, path)
