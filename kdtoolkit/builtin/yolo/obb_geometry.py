"""Oriented boxes between the manifest's ROI convention and ultralytics' OBB task.

The manifest (:mod:`kdtoolkit.data.geometry`): a box ``x0, y0, x1, y1`` rotated by ``angle``
degrees counter-clockwise on screen (image y points down), so its width axis points along
``(cos a, −sin a)``. ultralytics (``ops.xywhr2xyxyxyxy``): ``cx, cy, w, h, r`` with ``r`` in
radians and the width axis along ``(cos r, sin r)``, i.e. clockwise on screen. Hence
``angle = −degrees(r)``. Its predictions are regularised to ``r ∈ [0, π/2)`` with ``w`` and ``h``
swapped where needed (``ops.regularize_rboxes``), so ``w`` may be the short side.

The canonical form here (:func:`canonical_roi`) makes the width the long side (the ROI is a
2:1 rectangle whose crop is wide) and takes the angle modulo 180° into ``[c − 90, c + 90)``: the
same rectangle. A rectangle cannot tell 180° turns apart, so ``c`` is the reference angle of the
training ROIs (:func:`reference_angle`, their mean direction): predicted crops come out the
same way up as the teacher's training crops (``kdtoolkit.data.view.crop_roi``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from kdtoolkit.data.geometry import Box, roi_corners


def wrap_angle(angle: float, centre: float = 0.0) -> float:
    """``angle`` (degrees) modulo 180, in ``[centre − 90, centre + 90)``."""
    return float((angle - centre + 90.0) % 180.0 - 90.0 + centre)


def canonical_roi(box: Box, angle: float, centre: float = 0.0) -> np.ndarray:
    """``[x0, y0, x1, y1, angle]`` of the same rectangle with the width the long side and the
    angle in ``[centre − 90, centre + 90)`` (a tall box turns by −90° and swaps its sides)."""
    x0, y0, x1, y1 = (float(v) for v in box)
    cx, cy, w, h = (x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0
    if w < h:
        w, h, angle = h, w, angle - 90.0
    return np.array([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2, wrap_angle(angle, centre)])


def reference_angle(rois: Sequence[tuple[Box, float]]) -> float:
    """The mean direction (degrees, circular mean over 360°) of the ROIs' long axes as the
    manifest gives them (a tall box's long axis is at ``angle − 90``); 0 for none."""
    angles = [a if b[2] - b[0] >= b[3] - b[1] else a - 90.0 for b, a in rois]
    if not angles:
        return 0.0
    rad = np.radians(np.asarray(angles, float))
    return float(math.degrees(math.atan2(np.sin(rad).mean(), np.cos(rad).mean())))


def xywhr_to_roi(xywhr: Any, centre: float = 0.0) -> np.ndarray:
    """An ultralytics ``cx, cy, w, h, r`` (pixels, radians) as the manifest's canonical
    ``[x0, y0, x1, y1, angle]``, angle in ``[centre − 90, centre + 90)`` (module docstring)."""
    cx, cy, w, h, r = (float(v) for v in np.asarray(xywhr, float)[:5])
    half = np.array([w, h]) / 2
    box = (cx - half[0], cy - half[1], cx + half[0], cy + half[1])
    return canonical_roi(box, -math.degrees(r), centre)


def roi_to_xywhr(box: Box, angle: float) -> np.ndarray:
    """The manifest ROI as ultralytics ``cx, cy, w, h, r`` (inverse of :func:`xywhr_to_roi`
    up to the canonical form)."""
    x0, y0, x1, y1 = (float(v) for v in box)
    return np.array([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0, -math.radians(angle)])


def obb_label(box: Box, angle: float, width: int, height: int) -> np.ndarray:
    """The OBB training label: the 4 rotated corners (:func:`roi_corners`) relative to the image
    size and clipped to it, shape (4, 2)."""
    corners = roi_corners(tuple(float(v) for v in box), angle) / np.array([width, height])
    return np.clip(corners, 0.0, 1.0)


def _clip(subject: list[np.ndarray], a: np.ndarray, b: np.ndarray) -> list[np.ndarray]:
    """Sutherland–Hodgman: the part of polygon ``subject`` left of the directed edge a → b."""

    def side(p: np.ndarray) -> float:
        return float((b[0] - a[0]) * (p[1] - a[1]) - (b[1] - a[1]) * (p[0] - a[0]))

    out: list[np.ndarray] = []
    for i, p in enumerate(subject):
        q = subject[i - 1]
        sp, sq = side(p), side(q)
        if sp >= 0:
            if sq < 0:
                out.append(q + (p - q) * (sq / (sq - sp)))
            out.append(p)
        elif sq >= 0:
            out.append(q + (p - q) * (sq / (sq - sp)))
    return out


def _area(poly: np.ndarray | list[np.ndarray]) -> float:
    pts = np.asarray(poly, float).reshape(-1, 2)
    if len(pts) < 3:
        return 0.0
    x, y = pts[:, 0], pts[:, 1]
    return float(abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) / 2)


def _ccw(corners: np.ndarray) -> np.ndarray:
    """The corners in counter-clockwise order of the (x, y) plane (positive signed area)."""
    x, y = corners[:, 0], corners[:, 1]
    signed = np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))
    return corners if signed >= 0 else corners[::-1]


def rotated_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise exact IoU of two N×5 arrays of rotated ROIs ``[x0, y0, x1, y1, angle]`` (polygon
    intersection of the two rectangles; 0 where both are empty)."""
    a, b = np.asarray(a, float).reshape(-1, 5), np.asarray(b, float).reshape(-1, 5)
    out = np.zeros(len(a))
    for i, (p, q) in enumerate(zip(a, b, strict=True)):
        pa, qa = _ccw(roi_corners(tuple(p[:4]), p[4])), _ccw(roi_corners(tuple(q[:4]), q[4]))
        poly: list[np.ndarray] = list(pa)
        for k in range(4):
            if not poly:
                break
            poly = _clip(poly, qa[k], qa[(k + 1) % 4])
        inter = _area(poly)
        union = _area(pa) + _area(qa) - inter
        out[i] = inter / union if union > 0 else 0.0
    return out


def angle_error(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Absolute difference of the rows' angles (last column, degrees) modulo 180: in [0, 90]."""
    d = np.abs(np.asarray(a, float)[:, -1] - np.asarray(b, float)[:, -1]) % 180.0
    return np.minimum(d, 180.0 - d)


def mean_angle(angles: np.ndarray, centre: float = 0.0) -> float:
    """The mean of axial angles (degrees, modulo 180): the circular mean of the doubled angles,
    halved, in ``[centre − 90, centre + 90)``."""
    doubled = np.radians(2 * np.asarray(angles, float))
    mean = math.degrees(math.atan2(np.sin(doubled).mean(), np.cos(doubled).mean())) / 2
    return wrap_angle(mean, centre)
