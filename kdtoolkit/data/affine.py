"""Affine matrices between pixel frames, with no array library beyond numpy.

Coordinates are continuous pixels, x to the right, y down; an image of width W and height H
covers ``[0, W] × [0, H]`` (pixel ``i`` spans ``[i, i + 1)``, its centre is ``i + 0.5``).
Matrices are 3×3 (or 2×3) affine maps from *source* pixels to *destination* pixels. The
resampling through them is :mod:`kdtoolkit.data.warp` (torch, training) and
:mod:`kdtoolkit.serving.resample` (numpy, serving), the same arithmetic checked against each
other.
"""

from __future__ import annotations

import numpy as np

from kdtoolkit.errors import KdError

#: Downsampling by more than this (source pixels per output pixel) is antialiased.
ANTIALIAS_STEP = 1.25


def as3x3(matrix: np.ndarray) -> np.ndarray:
    """A 2×3 or 3×3 affine matrix as 3×3 float64."""
    m = np.asarray(matrix, dtype=np.float64)
    if m.shape == (3, 3):
        return m
    if m.shape == (2, 3):
        return np.vstack([m, [0.0, 0.0, 1.0]])
    raise ValueError(f"affine matrix must be 2×3 or 3×3, got {m.shape}")


def transform_points(points: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Apply an affine matrix (2×3 or 3×3) to points of shape (..., 2)."""
    m = as3x3(matrix)
    p = np.asarray(points, dtype=np.float64)
    return p @ m[:2, :2].T + m[:2, 2]


def resize_matrix(source: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
    """Matrix stretching a ``source = (H, W)`` image to ``size = (h, w)``."""
    return np.diag([size[1] / source[1], size[0] / source[0], 1.0])


def letterbox_matrix(
    source: tuple[int, int], size: tuple[int, int]
) -> tuple[np.ndarray, float, tuple[float, float]]:
    """Matrix, scale and ``(pad_x, pad_y)`` fitting a ``source = (H, W)`` image into
    ``size = (h, w)`` keeping its aspect ratio, centred (padding may be fractional)."""
    height, width = source
    h, w = size
    scale = min(h / height, w / width)
    pad = ((w - width * scale) / 2.0, (h - height * scale) / 2.0)
    matrix = np.array([[scale, 0.0, pad[0]], [0.0, scale, pad[1]], [0.0, 0.0, 1.0]])
    return matrix, scale, pad


def roi_matrix(corners: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """3×3 matrix from image pixels to crop pixels of ``size = (h, w)`` that takes the ROI
    corners (top-left, top-right, bottom-right, bottom-left, as from
    :func:`kdtoolkit.data.geometry.roi_corners`) to the crop's corners: the ROI's own frame."""
    c = np.asarray(corners, dtype=np.float64)
    h, w = size
    crop_to_image = np.array(
        [
            [(c[1, 0] - c[0, 0]) / w, (c[3, 0] - c[0, 0]) / h, c[0, 0]],
            [(c[1, 1] - c[0, 1]) / w, (c[3, 1] - c[0, 1]) / h, c[0, 1]],
            [0.0, 0.0, 1.0],
        ]
    )
    if abs(np.linalg.det(crop_to_image)) < 1e-12:
        raise KdError(f"ROI with corners {c.tolist()} has no area — check the box")
    return np.linalg.inv(crop_to_image)


def reduction(inv: np.ndarray) -> tuple[float, float]:
    """Source pixels per output pixel along x and y (1 where no antialiasing is needed)."""
    lin = inv[:2, :2]
    if abs(lin[0, 1]) < 1e-9 and abs(lin[1, 0]) < 1e-9:  # axis-aligned: per-axis factors
        fx, fy = abs(lin[0, 0]), abs(lin[1, 1])
    else:  # rotated: isotropic, the finer of the two output directions
        fx = fy = min(np.hypot(*lin[:, 0]), np.hypot(*lin[:, 1]))
    return (fx if fx > ANTIALIAS_STEP else 1.0), (fy if fy > ANTIALIAS_STEP else 1.0)
