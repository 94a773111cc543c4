"""ROI geometry shared by data views, masks and detectors.

Convention (image pixels, x to the right, y down): an ROI is the box ``x0, y0, x1, y1``
rotated by ``angle`` degrees about its centre, counter-clockwise as seen on screen. A corner
offset ``(dx, dy)`` from the centre maps to ``(dx·cos a + dy·sin a, −dx·sin a + dy·cos a)``.
With ``angle = 0`` the ROI is the plain axis-aligned box.
"""

from __future__ import annotations

import numpy as np

#: An axis-aligned box ``x0, y0, x1, y1`` in pixels (the ROI before its rotation).
Box = tuple[float, float, float, float]


def roi_axes(angle: float | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors (x, y) of an ROI's own frame in image pixels: along its width and across
    it (its height), for one angle in degrees or an array of them (then shape (…, 2))."""
    a = np.radians(angle)
    c, s = np.cos(a), np.sin(a)
    return np.stack([c, -s], axis=-1), np.stack([s, c], axis=-1)


def roi_corners(box: Box, angle: float = 0.0) -> np.ndarray:
    """The ROI's 4 corners, shape (4, 2) as (x, y): top-left, top-right, bottom-right,
    bottom-left of the unrotated box, after rotation."""
    x0, y0, x1, y1 = box
    centre = np.array([(x0 + x1) / 2, (y0 + y1) / 2])
    hw, hh = (x1 - x0) / 2, (y1 - y0) / 2
    offsets = np.array([[-hw, -hh], [hw, -hh], [hw, hh], [-hw, hh]], dtype=np.float64)
    along, across = roi_axes(angle)
    return centre + offsets[:, :1] * along + offsets[:, 1:] * across


def enclosing_box(box: Box, angle: float = 0.0) -> np.ndarray:
    """Axis-aligned box ``[x0, y0, x1, y1]`` around the rotated ROI."""
    corners = roi_corners(box, angle)
    return np.array([*corners.min(axis=0), *corners.max(axis=0)])
