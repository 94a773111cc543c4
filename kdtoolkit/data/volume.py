"""Read scans (DICOM file, DICOM series folder, NIfTI) and cut 2D slices along anatomical axes.

Voxels are in physical units: the DICOM modality LUT (rescale slope/intercept, so HU for CT) is
applied and MONOCHROME1 images are mirrored within the rescaled range of the stored bits (higher =
brighter); NIfTI scaling (``scl_slope``/``scl_inter``) is applied by nibabel. DICOM reading is in
:mod:`kdtoolkit.data.dicom`.

Orientation comes from the file (DICOM ImageOrientationPatient + ImagePositionPatient, NIfTI
affine), never from array order; an oblique scan is snapped to its nearest anatomical axes
(no resampling). Returned slices use the radiological display convention:

=========  ===========================  ============================  =========================
axis       rows (top → bottom)          columns (left → right)        index 0 … n-1 runs
=========  ===========================  ============================  =========================
sagittal   superior → inferior          anterior → posterior          patient right → left
coronal    superior → inferior          patient right → left          anterior → posterior
axial      anterior → posterior         patient right → left          inferior → superior
=========  ===========================  ============================  =========================

From DICOM headers only the pixel data and its format, spacing, orientation/position and rescale
values are used (SeriesInstanceUID is compared to refuse mixed folders, never kept); nothing else
is kept, logged or returned, and pydicom's warnings are silenced while reading.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from kdtoolkit.data.dicom import read_dicom, read_dicom_folder
from kdtoolkit.errors import KdError, suggestion

AXES = ("sagittal", "coronal", "axial")
PROJECTIONS = ("max", "mean", "min")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")
#: Decoded volumes kept per process (bytes); the least recently used are dropped beyond this.
CACHE_BYTES = 2 * 1024**3

Axis = Literal["sagittal", "coronal", "axial"]
Index = int | Literal["mid"]


@dataclass(frozen=True, eq=False)
class Volume:
    """A decoded scan: voxels as stored, with their geometry."""

    array: np.ndarray  # float32 (a, b, c), physical units, array order as stored
    affine: np.ndarray | None  # 4x4 voxel index -> RAS+ mm; None: a plain 2D DICOM image
    spacing: tuple[float, float, float]  # mm per voxel along each array axis
    source: str  # the file or folder read
    #: physical values shown black and white without a window: the range unsigned stored
    #: integers can hold (like an 8- or 16-bit PNG), else the scan's own min and max
    value_range: tuple[float, float] = (0.0, 1.0)


@dataclass(frozen=True, eq=False)
class Slice:
    """A 2D image cut from a scan, in the display convention of this module."""

    array: np.ndarray  # float32 (rows, cols), physical units
    spacing: tuple[float, float]  # mm per pixel (row, col)
    source: str  # e.g. "scan.nii.gz[sagittal 12]" or "series[axial 10:13 max]"


def is_volume_path(path: str | Path) -> bool:
    """True for a folder, a NIfTI or DICOM file name, or a file that starts like DICOM."""
    path = Path(path)
    name = path.name.lower()
    if path.is_dir() or name.endswith(NIFTI_SUFFIXES + DICOM_SUFFIXES):
        return True
    try:
        with path.open("rb") as handle:
            return handle.read(132)[128:] == b"DICM"
    except OSError:
        return False


def read_slice(
    path: str | Path,
    axis: Axis | None = None,
    index: Index = "mid",
    slab: int = 1,
    projection: str = "max",
) -> Slice:
    """Load ``path`` (cached, see :func:`load_volume`) and cut one slice; see :func:`cut`."""
    return cut(load_volume(path), axis, index, slab, projection)


def cut(
    volume: Volume,
    axis: Axis | None = None,
    index: Index = "mid",
    slab: int = 1,
    projection: str = "max",
) -> Slice:
    """The slice ``index`` (0-based or ``"mid"`` = n // 2) along the anatomical ``axis``.

    ``slab`` > 1 projects that many neighbouring slices centred on ``index`` (clipped at the
    volume's ends) with ``projection`` (``max``, ``mean`` or ``min``). ``axis=None`` is for a
    single slice: a plain 2D DICOM image comes back as stored, an oriented one along the axis it
    is thin in.
    """
    if slab < 1:
        raise KdError(f"{volume.source}: slab {slab} — give a number of slices >= 1")
    if projection not in PROJECTIONS:
        raise KdError(
            f"{volume.source}: unknown projection '{projection}'"
            f"{suggestion(projection, PROJECTIONS)} — use one of: {', '.join(PROJECTIONS)}"
        )
    if volume.affine is None:
        if axis is not None:
            raise KdError(
                f"{volume.source}: a 2D image without ImageOrientationPatient has no anatomical "
                f"axis '{axis}' — leave the axis out"
            )
        return Slice(volume.array[0].copy(), volume.spacing[1:], volume.source)
    canon, spacing = canonical(volume)
    if axis is None:
        thin = [d for d in range(3) if canon.shape[d] == 1]
        if len(thin) != 1:
            raise KdError(
                f"{volume.source}: volume of {'x'.join(map(str, canon.shape))} voxels — give an "
                f"axis: {', '.join(AXES)}"
            )
        axis = AXES[thin[0]]
    if axis not in AXES:
        raise KdError(
            f"{volume.source}: unknown axis '{axis}'{suggestion(str(axis), AXES)} — use one of: "
            f"{', '.join(AXES)}"
        )
    dim = AXES.index(axis)
    n = canon.shape[dim]
    flat = [AXES[d] for d in range(3) if canon.shape[d] == 1 and d != dim]
    if flat:
        raise KdError(
            f"{volume.source}: a single {flat[0]} slice has no {axis} view — ask for "
            f"'{flat[0]}' or give the whole series"
        )
    if index == "mid":
        index = n // 2
    if isinstance(index, bool) or not isinstance(index, int | np.integer) or not 0 <= index < n:
        raise KdError(
            f"{volume.source}: {axis} slice {index!r} out of range — give 0..{n - 1} or 'mid'"
        )
    lo = max(0, int(index) - (slab - 1) // 2)
    hi = min(n, int(index) - (slab - 1) // 2 + slab)
    block = np.take(canon, range(lo, hi), axis=dim)
    plane = getattr(np, projection)(block, axis=dim)
    sx, sy, sz = spacing
    if axis == "axial":  # plane (L, P) -> rows A->P, cols R->L
        image, pixel = plane.T, (sy, sx)
    else:  # sagittal (P, S) / coronal (L, S) -> rows S->I
        image, pixel = plane.T[::-1, :], (sz, sy if axis == "sagittal" else sx)
    where = f"{axis} {index}" if slab == 1 else f"{axis} {lo}:{hi} {projection}"
    return Slice(np.ascontiguousarray(image, dtype=np.float32), pixel, f"{volume.source}[{where}]")


def canonical(volume: Volume) -> tuple[np.ndarray, tuple[float, float, float]]:
    """The voxels as a view indexed ``[x, y, z]`` increasing toward patient Left, Posterior,
    Superior (DICOM LPS order), and the spacing (mm) along those axes."""
    from nibabel.orientations import (
        apply_orientation,
        axcodes2ornt,
        io_orientation,
        ornt_transform,
    )

    if volume.affine is None:
        raise KdError(f"{volume.source}: no orientation in the file — it is a plain 2D image")
    start = io_orientation(volume.affine)
    if np.isnan(start).any():
        raise KdError(f"{volume.source}: degenerate orientation (affine) — fix the file header")
    transform = ornt_transform(start, axcodes2ornt(("L", "P", "S")))
    spacing = [0.0, 0.0, 0.0]
    for axis_in, (axis_out, _) in enumerate(transform):
        spacing[int(axis_out)] = volume.spacing[axis_in]
    return apply_orientation(volume.array, transform), (spacing[0], spacing[1], spacing[2])


# -- loading and the per-process cache ------------------------------------------------------

_cache: OrderedDict[tuple[str, int], Volume] = OrderedDict()
_cache_lock = threading.Lock()


def load_volume(path: str | Path) -> Volume:
    """Decode a DICOM file, a DICOM series folder or a NIfTI file (``.nii``, ``.nii.gz``).

    Decoded volumes are cached per path (and modification time) within the process, up to
    :data:`CACHE_BYTES`. Raises ``KdError`` (one line, naming the file) on any problem.
    """
    path = Path(path).expanduser().resolve()
    try:
        key = (str(path), path.stat().st_mtime_ns)
    except OSError:
        raise KdError(f"{path}: scan not found — check the path") from None
    with _cache_lock:
        if key in _cache:
            _cache.move_to_end(key)
            return _cache[key]
    if path.name.lower().endswith(NIFTI_SUFFIXES) and not path.is_dir():
        volume = _read_nifti(path)
    else:
        array, affine, spacing, stored = (
            read_dicom_folder(path) if path.is_dir() else read_dicom([path], path)
        )
        volume = Volume(array, affine, spacing, str(path), stored or min_max(array))
    with _cache_lock:
        _cache[key] = volume
        while len(_cache) > 1 and sum(v.array.nbytes for v in _cache.values()) > CACHE_BYTES:
            _cache.popitem(last=False)
    return volume


def clear_cache() -> None:
    """Forget every decoded volume."""
    with _cache_lock:
        _cache.clear()


def _read_nifti(path: Path) -> Volume:
    import nibabel as nib

    try:
        image = nib.load(str(path))
        data = np.asarray(image.get_fdata(dtype=np.float32))
    except (nib.filebasedimages.ImageFileError, OSError, EOFError, ValueError) as exc:
        raise KdError(f"{path}: unreadable NIfTI ({_first_line(exc)}) — re-export it") from None
    if data.ndim == 2:
        data = data[:, :, None]
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise KdError(
            f"{path}: {data.ndim}D NIfTI of shape {data.shape} — give a single 3D volume "
            "(split time series or channels into separate files)"
        )
    affine = np.asarray(image.affine, dtype=np.float64)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    value_range = min_max(data)
    stored = image.get_data_dtype()
    if stored.kind == "u":
        slope, inter = image.dataobj.slope, image.dataobj.inter
        ends = np.array([0.0, float(np.iinfo(stored).max)]) * slope + inter
        value_range = (float(ends.min()), float(ends.max()))
    return Volume(data, affine, _triple(spacing), str(path), value_range)


def min_max(array: np.ndarray) -> tuple[float, float]:
    """The lowest and highest value of ``array`` (0, 1 when empty)."""
    if not array.size:
        return 0.0, 1.0
    return float(np.min(array)), float(np.max(array))


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _triple(values: Sequence[float]) -> tuple[float, float, float]:
    return float(values[0]), float(values[1]), float(values[2])
