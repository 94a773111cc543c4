"""How a scan (DICOM file or series, NIfTI) becomes the 2D [0, 1] image the engine sees.

A :class:`ReadSpec` says which slice to cut (:func:`kdtoolkit.data.volume.cut`), how to map its
physical values to [0, 1] and at which pixel size; it comes from the recipe's ``[data]`` keys
(:func:`read_spec`) and each manifest row's ``slice``. Order: cut (slab projection) → intensity
(``window``, else ``percentiles``, else the scan's value range, see
:attr:`~kdtoolkit.data.volume.Volume.value_range`) → resampling to ``spacing_mm``.
A single DICOM image (or any one-slice scan) is taken in its own plane; ``axis`` is ignored.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from kdtoolkit.data.intensity import percentile_clip, resample, window
from kdtoolkit.data.volume import AXES, PROJECTIONS, Index, Slice, Volume, cut, load_volume
from kdtoolkit.errors import KdError

if TYPE_CHECKING:
    from kdtoolkit.config.recipe import Recipe


@dataclass(frozen=True)
class ReadSpec:
    """Reading options of scans; ``slice`` is the recipe default or a row's own."""

    axis: str = "sagittal"
    slice: Index = "mid"
    slab: int = 1
    projection: str = "max"
    window: tuple[float, float] | None = None  # (level, width), physical units (HU for CT)
    percentiles: tuple[float, float] | None = None  # (low, high), 0..100
    spacing_mm: float = 0.0  # mm per pixel after resampling; 0: as scanned

    def __post_init__(self) -> None:
        problems = []
        if self.axis not in AXES:
            problems.append(f"axis '{self.axis}' — use one of: {', '.join(AXES)}")
        if self.slice != "mid" and not (
            isinstance(self.slice, int) and not isinstance(self.slice, bool) and self.slice >= 0
        ):
            problems.append(f"slice {self.slice!r} — give a 0-based index or 'mid'")
        if not isinstance(self.slab, int) or self.slab < 1:
            problems.append(f"slab {self.slab!r} — give a number of slices >= 1")
        if self.projection not in PROJECTIONS:
            problems.append(f"projection '{self.projection}' — use {', '.join(PROJECTIONS)}")
        if self.window is not None and not (len(self.window) == 2 and self.window[1] > 0):
            problems.append(f"window {self.window} — give (level, width) with width > 0")
        if self.percentiles is not None and not (
            len(self.percentiles) == 2 and 0 <= self.percentiles[0] < self.percentiles[1] <= 100
        ):
            problems.append(f"percentiles {self.percentiles} — give 0 <= low < high <= 100")
        if self.window is not None and self.percentiles is not None:
            problems.append("window and percentiles both set — keep one")
        if not self.spacing_mm >= 0:
            problems.append(f"spacing_mm {self.spacing_mm} — give mm per pixel, or 0 for off")
        if problems:
            raise KdError("read spec: " + "; ".join(problems))


@dataclass(frozen=True, eq=False)
class ScanImage:
    """A slice as the engine sees it: ``array`` H×W float32 in [0, 1]; ``scale`` = (sx, sy) new
    pixels per slice pixel (boxes map with :func:`~kdtoolkit.data.intensity.scale_roi`);
    ``size`` = (W, H) of the slice before resampling; ``spacing`` mm per pixel (row, col) after."""

    array: np.ndarray
    scale: tuple[float, float]
    size: tuple[int, int]
    spacing: tuple[float, float]


def read_spec(recipe: Recipe) -> ReadSpec:
    """The :class:`ReadSpec` of a recipe's ``[data]`` keys (axis, slice, slab, projection, window,
    percentiles, spacing_mm)."""
    return spec_of(recipe.data)


def spec_of(data: Any) -> ReadSpec:
    """The :class:`ReadSpec` of a ``[data]`` section (an object with its keys as attributes)."""
    win, pct = getattr(data, "window", None), getattr(data, "percentiles", None)
    return ReadSpec(
        axis=getattr(data, "axis", "sagittal"),
        slice=getattr(data, "slice", "mid"),
        slab=getattr(data, "slab", 1),
        projection=getattr(data, "projection", "max"),
        window=(float(win[0]), float(win[1])) if win else None,
        percentiles=(float(pct[0]), float(pct[1])) if pct else None,
        spacing_mm=float(getattr(data, "spacing_mm", 0.0)),
    )


def cut_slice(volume: Volume, spec: ReadSpec) -> Slice:
    """The slice ``spec`` names (a one-slice scan: its own plane, ``spec.axis`` ignored)."""
    flat = volume.affine is None or 1 in volume.array.shape
    return cut(volume, None if flat else spec.axis, spec.slice, spec.slab, spec.projection)


def read_scan(path: str | Path, spec: ReadSpec) -> ScanImage:
    """Load ``path`` (decoded once per process, see :func:`~kdtoolkit.data.volume.load_volume`)
    and make the engine's image of it; raises ``KdError`` naming the file."""
    volume = load_volume(path)
    image = cut_slice(volume, spec)
    if spec.window is not None:
        values = window(image.array, *spec.window)
    elif spec.percentiles is not None:
        values = percentile_clip(image.array, *spec.percentiles)
    else:
        low, high = volume.value_range
        span = high - low if high > low else 1.0
        values = np.clip((image.array - np.float32(low)) / np.float32(span), 0.0, 1.0)
    height, width = values.shape
    scaled = Slice(np.asarray(values, dtype=np.float32), image.spacing, image.source)
    scale = (1.0, 1.0)
    if spec.spacing_mm > 0:
        scaled, scale = resample(scaled, spec.spacing_mm)
        scaled = Slice(np.clip(scaled.array, 0.0, 1.0), scaled.spacing, scaled.source)
    return ScanImage(scaled.array, scale, (width, height), scaled.spacing)
