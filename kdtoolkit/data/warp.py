"""Affine matrices and the one bilinear resampling every view goes through.

Coordinates are continuous pixels, x to the right, y down; an image of width W and height H
covers ``[0, W] × [0, H]`` (pixel ``i`` spans ``[i, i + 1)``, its centre is ``i + 0.5``).
Matrices are 3×3 (or 2×3) affine maps from *source* pixels to *destination* pixels. Every
resampling (resize, letterbox, ROI crop, augmentation) is one bilinear :func:`warp_stack`
(with an antialiased pre-reduction when it shrinks), so an augmented view is sampled once.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from kdtoolkit.data.imageio import to_array, to_tensor
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


def _reduction(inv: np.ndarray) -> tuple[float, float]:
    """Source pixels per output pixel along x and y (1 where no antialiasing is needed)."""
    lin = inv[:2, :2]
    if abs(lin[0, 1]) < 1e-9 and abs(lin[1, 0]) < 1e-9:  # axis-aligned: per-axis factors
        fx, fy = abs(lin[0, 0]), abs(lin[1, 1])
    else:  # rotated: isotropic, the finer of the two output directions
        fx = fy = min(np.hypot(*lin[:, 0]), np.hypot(*lin[:, 1]))
    return (fx if fx > ANTIALIAS_STEP else 1.0), (fy if fy > ANTIALIAS_STEP else 1.0)


def _sample(
    stack: torch.Tensor, matrices: Sequence[np.ndarray], size: tuple[int, int]
) -> torch.Tensor:
    """One bilinear ``grid_sample`` of each image of the B×C×Hp×Wp ``stack`` through its
    matrix (source → destination pixels; zeros outside the stack). The sampling grid is
    computed in float64 at output pixel centres, on the stack's device."""
    h, w = int(size[0]), int(size[1])
    height, width = stack.shape[-2:]
    inv = torch.from_numpy(np.linalg.inv(np.stack([as3x3(m) for m in matrices])))
    inv = inv.to(stack.device)[:, :2, :, None, None]  # B×2×3×1×1
    u = torch.arange(w, dtype=torch.float64, device=stack.device) + 0.5
    v = torch.arange(h, dtype=torch.float64, device=stack.device)[:, None] + 0.5
    source = inv[:, :, 0] * u + inv[:, :, 1] * v + inv[:, :, 2]  # B×2×h×w, source pixels
    scale = torch.tensor([2.0 / width, 2.0 / height], dtype=torch.float64, device=stack.device)
    grid = (source.permute(0, 2, 3, 1) * scale - 1.0).to(stack.dtype)
    return F.grid_sample(stack, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def warp_stack(
    stack: torch.Tensor,
    rows: Sequence[int],
    sizes: Sequence[tuple[int, int]],
    matrices: Sequence[np.ndarray],
    size: tuple[int, int],
) -> torch.Tensor:
    """Bilinear resampling of images ``stack[rows[j]]`` (N×C×Hp×Wp; each image occupies the
    top-left ``sizes[j] = (H, W)`` of its slot, zeros elsewhere) through ``matrices[j]``
    (source → destination pixels) into a B×C×h×w batch, ``size = (h, w)``, zeros outside the
    source. Where a warp shrinks its image by more than ``ANTIALIAS_STEP``, that image is
    first reduced by the same factor with an antialiased resize
    (``F.interpolate(antialias=True)``), so the bilinear step stays near 1:1. The single
    resampling of every view, one sample (:func:`warp_tensor`) or a batch on the device
    (:mod:`kdtoolkit.data.bank`)."""
    out = stack.new_zeros((len(rows), stack.shape[1], int(size[0]), int(size[1])))
    direct: list[int] = []
    for j, (row, (height, width), matrix) in enumerate(zip(rows, sizes, matrices, strict=True)):
        matrix = as3x3(matrix)
        fx, fy = _reduction(np.linalg.inv(matrix))
        if fx == 1.0 and fy == 1.0:
            direct.append(j)
            continue
        rh, rw = max(1, round(height / fy)), max(1, round(width / fx))
        reduced = F.interpolate(
            stack[row : row + 1, :, :height, :width],
            size=(rh, rw),
            mode="bilinear",
            antialias=True,
            align_corners=False,
        )
        out[j] = _sample(reduced, [matrix @ np.diag([width / rw, height / rh, 1.0])], size)[0]
    if direct:
        chosen = torch.as_tensor([rows[j] for j in direct], device=stack.device)
        picked = torch.as_tensor(direct, device=stack.device)
        out[picked] = _sample(stack[chosen], [matrices[j] for j in direct], size)
    return out


def warp_tensor(src: torch.Tensor, matrix: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """:func:`warp_stack` of one C×H×W image into C×h×w, ``size = (h, w)``."""
    return warp_stack(src[None], [0], [tuple(src.shape[-2:])], [matrix], size)[0]


def warp(image: np.ndarray, matrix: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resample H×W×C ``image`` through ``matrix`` (source → destination pixels) into an
    h×w×C image, ``size = (h, w)``; bilinear, zeros outside the source."""
    return to_array(warp_tensor(to_tensor(image), matrix, size))
