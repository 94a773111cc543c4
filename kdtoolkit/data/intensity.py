"""Intensity scaling and pixel-size resampling of scan slices.

``window`` and ``percentile_clip`` turn physical values (HU, MR intensities) into [0, 1].
``resample`` brings a :class:`~kdtoolkit.data.volume.Slice` to a target mm/pixel and returns
the scale factors; manifest boxes stay in the original slice's pixel coordinates and are mapped
through those factors with :func:`scale_roi` (pixels: x right, y down, the image covers
``[0, W] × [0, H]``; a point ``(x, y)`` goes to ``(x·sx, y·sy)``).
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from kdtoolkit.data.geometry import roi_corners
from kdtoolkit.data.volume import Slice
from kdtoolkit.errors import KdError

#: Common CT windows: (level, width) in HU.
CT_WINDOWS = {
    "brain": (40.0, 80.0),
    "soft_tissue": (40.0, 400.0),
    "lung": (-600.0, 1500.0),
    "bone": (400.0, 1800.0),
    "liver": (60.0, 160.0),
}


def window(array: np.ndarray, level: float, width: float) -> np.ndarray:
    """Linear window: ``level - width/2`` → 0, ``level + width/2`` → 1, clipped; float32."""
    if not width > 0:
        raise KdError(f"window width {width} — give a positive width (HU), e.g. 400")
    low = level - width / 2
    return np.clip((np.asarray(array, dtype=np.float32) - low) / width, 0.0, 1.0)


def percentile_clip(array: np.ndarray, low: float = 0.5, high: float = 99.5) -> np.ndarray:
    """Map the ``low``–``high`` percentiles to 0–1, clipped; float32 (zeros if flat)."""
    if not 0 <= low < high <= 100:
        raise KdError(f"percentiles {low}, {high} — give 0 <= low < high <= 100, e.g. 0.5, 99.5")
    values = np.asarray(array, dtype=np.float32)
    lo, hi = np.percentile(values, [low, high])
    if hi <= lo:
        return np.zeros_like(values)
    return np.clip((values - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def resample(
    image: Slice, spacing: float | tuple[float, float]
) -> tuple[Slice, tuple[float, float]]:
    """Resize ``image`` to ``spacing`` mm/pixel (one value or (row, col)), bilinear with
    antialiasing when shrinking.

    Returns the new slice and the scale factors ``(sx, sy)`` (new pixels per old pixel, from the
    rounded output size, so they map coordinates exactly); the new slice's spacing is the
    actual one after rounding.
    """
    row_mm, col_mm = (spacing, spacing) if isinstance(spacing, int | float) else spacing
    if not (row_mm > 0 and col_mm > 0):
        raise KdError(f"{image.source}: target spacing {spacing} — give positive mm per pixel")
    height, width = image.array.shape
    new_h = max(1, round(height * image.spacing[0] / row_mm))
    new_w = max(1, round(width * image.spacing[1] / col_mm))
    sx, sy = new_w / width, new_h / height
    if (new_h, new_w) == (height, width):
        array = image.array.astype(np.float32, copy=True)
    else:
        pil = Image.fromarray(np.ascontiguousarray(image.array, dtype=np.float32), mode="F")
        array = np.asarray(pil.resize((new_w, new_h), Image.Resampling.BILINEAR), np.float32)
    new_spacing = (image.spacing[0] / sy, image.spacing[1] / sx)
    return Slice(array, new_spacing, image.source), (sx, sy)


def scale_roi(
    box: tuple[float, float, float, float], angle: float, scale: tuple[float, float]
) -> tuple[tuple[float, float, float, float], float]:
    """Map an ROI (``box``, ``angle`` in the kdtoolkit.data.geometry convention) through the
    scaling ``(sx, sy)``; use ``(1/sx, 1/sy)`` to map back.

    Exact when ``sx == sy`` or the angle is a multiple of 90°. Otherwise the scaled rectangle is
    a parallelogram: the result keeps its centre, the direction and length of its top edge and
    its area.
    """
    sx, sy = scale
    if not (sx > 0 and sy > 0):
        raise KdError(f"scale {scale} — give positive scale factors")
    corners = roi_corners(box, angle) * np.array([sx, sy])
    centre = corners.mean(axis=0)
    top = corners[1] - corners[0]  # TL -> TR
    width = float(np.hypot(*top))
    side = corners[3] - corners[0]  # TL -> BL
    height = abs(float(top[0] * side[1] - top[1] * side[0])) / width
    new_angle = math.degrees(math.atan2(-top[1], top[0]))
    if math.isclose(new_angle, angle, abs_tol=1e-9):
        new_angle = angle
    cx, cy = float(centre[0]), float(centre[1])
    new_box = (cx - width / 2, cy - height / 2, cx + width / 2, cy + height / 2)
    return new_box, new_angle
