"""Read DICOM images and series for :mod:`kdtoolkit.data.volume`.

A series folder holds one file per slice (other files are skipped); the slices are ordered by
ImagePositionPatient along the slice normal of ImageOrientationPatient. Voxels come back in
physical units: the modality LUT (rescale slope/intercept) is applied and MONOCHROME1 is
inverted. Only pixel data, spacing, orientation and rescale values are used; pydicom's warnings
and log records (which may quote header values) are silenced while reading.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from kdtoolkit.errors import KdError

#: (voxels (slices, rows, cols) float32, affine voxel -> RAS+ mm or None, spacing mm per axis,
#: the physical range unsigned stored integers can hold, or None for signed data)
DicomVolume = tuple[
    np.ndarray, "np.ndarray | None", tuple[float, float, float], "tuple[float, float] | None"
]


def read_dicom_folder(folder: Path) -> DicomVolume:
    """Read the series in ``folder`` (one series per folder)."""
    files = sorted(f for f in folder.iterdir() if f.is_file() and not f.name.startswith("."))
    return read_dicom(files, folder)


def read_dicom(files: Sequence[Path], source: Path) -> DicomVolume:
    """Read ``files`` (one file, or the slices of one series) named ``source`` in messages."""
    with _quiet():
        return _read_dicom_quietly(files, source)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence pydicom's warnings and log records: they may quote header values."""
    logger = logging.getLogger("pydicom")
    disabled, logger.disabled = logger.disabled, True
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.disabled = disabled


def _read_dicom_quietly(files: Sequence[Path], source: Path) -> DicomVolume:
    import pydicom
    from pydicom.errors import InvalidDicomError

    single = len(files) == 1 and files[0] == source
    slices: list[tuple[Path, object]] = []
    series: set[str] = set()
    for file in files:
        try:
            ds = pydicom.dcmread(file)
            "PixelData" in ds  # noqa: B015  (a damaged header fails here, not later)
        except (InvalidDicomError, OSError, EOFError, ValueError, KeyError, TypeError) as exc:
            if single:
                raise KdError(
                    f"{file}: not a readable DICOM file ({_first_line(exc)}) — give a DICOM "
                    "file, a series folder or a .nii/.nii.gz file"
                ) from None
            continue  # other files in a series folder (notes, DICOMDIR without pixels, ...)
        if "PixelData" not in ds:
            continue
        if "Rows" not in ds or "Columns" not in ds:
            raise KdError(f"{file}: pixel data without Rows/Columns — re-export the file")
        series.add(str(ds.get("SeriesInstanceUID", "")))
        slices.append((file, ds))
    if not slices and single:
        raise KdError(
            f"{source}: a DICOM file without an image (no pixel data) — give a DICOM image "
            "file, a series folder or a .nii/.nii.gz file"
        )
    if not slices:
        raise KdError(f"{source}: no DICOM image in the folder — give a folder of DICOM slices")
    if len(series) > 1:
        raise KdError(
            f"{source}: the folder holds {len(series)} DICOM series — put one series per folder"
        )
    if len(slices) == 1:
        return _single(*slices[0])
    return _stack(slices, source)


def _single(file: Path, ds) -> DicomVolume:
    pixels, value_range = _pixels(file, ds)
    row_spacing, col_spacing = _pixel_spacing(ds)
    geometry = _plane(ds)
    if geometry is None:
        return pixels[None], None, (1.0, row_spacing, col_spacing), value_range
    row_cos, col_cos, position = geometry
    thickness = float(ds.get("SliceThickness") or 1.0)
    step = np.cross(row_cos, col_cos) * thickness
    affine = _affine(step, col_cos * row_spacing, row_cos * col_spacing, position)
    return pixels[None], affine, (thickness, row_spacing, col_spacing), value_range


def _stack(slices: list[tuple[Path, object]], source: Path) -> DicomVolume:
    first_file, first = slices[0]
    geometry = _plane(first)
    if geometry is None:
        raise KdError(
            f"{first_file}: no ImageOrientationPatient/ImagePositionPatient — the slices of "
            "the folder cannot be ordered; give single files instead"
        )
    row_cos, col_cos, _ = geometry
    normal = np.cross(row_cos, col_cos)
    spacing = _pixel_spacing(first)
    shape = (int(first.Rows), int(first.Columns))
    placed: list[tuple[float, Path, object, np.ndarray]] = []
    for file, ds in slices:
        plane = _plane(ds)
        if (
            plane is None
            or not np.allclose(plane[0], row_cos, atol=1e-4)
            or not np.allclose(plane[1], col_cos, atol=1e-4)
        ):
            raise KdError(
                f"{file}: slice orientation differs from {first_file.name} — the folder must "
                "hold one series"
            )
        if (int(ds.Rows), int(ds.Columns)) != shape or not np.allclose(
            _pixel_spacing(ds), spacing, rtol=1e-4
        ):
            raise KdError(
                f"{file}: slice size or pixel spacing differs from {first_file.name} — the "
                "folder must hold one series"
            )
        placed.append((float(plane[2] @ normal), file, ds, plane[2]))
    placed.sort(key=lambda item: item[0])
    gaps = np.diff([item[0] for item in placed])
    for i, gap in enumerate(gaps):
        if gap < 1e-3:
            raise KdError(
                f"{placed[i + 1][1]}: same slice position as {placed[i][1].name} — remove "
                "duplicate slices or split the series"
            )
    if gaps.max() - gaps.min() > max(0.01, 0.01 * gaps.mean()):
        worst = int(np.argmax(np.abs(gaps - np.median(gaps))))
        raise KdError(
            f"{placed[worst + 1][1]}: uneven slice spacing ({gaps.min():.3g} to {gaps.max():.3g}"
            " mm) — a slice is missing or the folder mixes series"
        )
    decoded = [_pixels(file, ds) for _, file, ds, _ in placed]
    volume = np.stack([pixels for pixels, _ in decoded])
    ranges = [r for _, r in decoded]
    value_range = None
    if all(r is not None for r in ranges):
        value_range = (min(r[0] for r in ranges), max(r[1] for r in ranges))
    step = (placed[-1][3] - placed[0][3]) / (len(placed) - 1)
    affine = _affine(step, col_cos * spacing[0], row_cos * spacing[1], placed[0][3])
    return volume, affine, (float(np.linalg.norm(step)), *spacing), value_range


def _affine(
    along_slices: np.ndarray, along_rows: np.ndarray, along_cols: np.ndarray, origin: np.ndarray
) -> np.ndarray:
    """Voxel (slice, row, col) -> RAS+ mm from DICOM (LPS) vectors."""
    affine = np.eye(4)
    affine[:3, 0], affine[:3, 1], affine[:3, 2] = along_slices, along_rows, along_cols
    affine[:3, 3] = origin
    affine[:2] *= -1  # LPS -> RAS
    return affine


def _plane(ds) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(row direction, column direction, position of the first pixel) in LPS mm, or None."""
    orientation, position = ds.get("ImageOrientationPatient"), ds.get("ImagePositionPatient")
    if orientation is None or position is None or len(orientation) != 6 or len(position) != 3:
        return None
    values = np.array([float(v) for v in orientation])
    return values[:3], values[3:], np.array([float(v) for v in position])


def _pixel_spacing(ds) -> tuple[float, float]:
    spacing = ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing")
    if spacing is None or len(spacing) != 2:
        return 1.0, 1.0
    return float(spacing[0]), float(spacing[1])


def _pixels(file: Path, ds) -> tuple[np.ndarray, tuple[float, float] | None]:
    """One frame in physical units (modality LUT applied, MONOCHROME1 inverted), float32, and
    the physical range its stored bits can hold (None when they are signed)."""
    from pydicom.pixels import apply_modality_lut

    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    try:
        frames, samples = int(ds.get("NumberOfFrames") or 1), int(ds.get("SamplesPerPixel", 1))
    except (TypeError, ValueError):
        raise KdError(f"{file}: bad NumberOfFrames/SamplesPerPixel — re-export the file") from None
    if samples != 1 or not photometric.startswith("MONOCHROME"):
        raise KdError(
            f"{file}: colour DICOM ({photometric}) — scans must be greyscale; export it grey"
        )
    if frames != 1:
        raise KdError(
            f"{file}: multi-frame DICOM ({frames} frames) is not supported yet — export one "
            "file per slice"
        )
    try:
        stored = ds.pixel_array
    except (RuntimeError, NotImplementedError) as exc:
        raise KdError(_decoder_message(file, ds, exc)) from None
    except (ValueError, AttributeError, KeyError, TypeError) as exc:
        raise KdError(
            f"{file}: damaged pixel data ({_first_line(exc)}) — re-export the file"
        ) from None
    values = np.asarray(apply_modality_lut(stored, ds), dtype=np.float64)
    bits = int(ds.get("BitsStored") or stored.dtype.itemsize * 8)
    signed = int(ds.get("PixelRepresentation") or 0) == 1
    low, high = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    ends = np.asarray(apply_modality_lut(np.array([low, high]), ds), dtype=np.float64)
    if photometric == "MONOCHROME1":
        values = ends.min() + ends.max() - values
    value_range = None if signed else (float(ends.min()), float(ends.max()))
    return values.astype(np.float32), value_range


def _decoder_message(file: Path, ds, exc: Exception) -> str:
    """One line: what could not be decoded and which package to install."""
    from pydicom.pixels import get_decoder

    uid = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    name = getattr(uid, "name", None) or str(uid or "unknown")
    try:
        decoder = get_decoder(uid) if uid else None
    except (NotImplementedError, ValueError):
        decoder = None
    missing = list(decoder.missing_dependencies) if decoder is not None else []
    if decoder is not None and not decoder.is_available:
        reason = "no decoder installed"
    else:  # a decoder is installed but failed: pydicom lists each plugin's error on its own line
        lines = [line.strip() for line in str(exc).splitlines()[1:] if line.strip()]
        reason = "; ".join(lines) or _first_line(exc)
    options = []
    for entry in missing:  # "pylibjpeg - requires pylibjpeg>=2.0 and pylibjpeg-libjpeg>=2.1"
        needs = entry.partition("requires")[2].split(" and ")
        packages = [n.strip() for n in needs if n.strip() and n.strip() != "numpy"]
        packages = ["python-" + p if p.startswith("gdcm") else p for p in packages]
        if packages:
            options.append(" ".join(f"'{p}'" for p in packages))
    options.sort(key=lambda option: "pylibjpeg" not in option)
    if not options:
        fix = "convert it to an uncompressed transfer syntax (e.g. gdcmconv --raw)"
    else:
        others = f" (or: {'; '.join(options[1:])})" if len(options) > 1 else ""
        fix = f"install a decoder: pip install {options[0]}{others}"
    return f"{file}: cannot decode the {name} pixel data ({reason}) — {fix}"


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
