"""The one bilinear resampling every training view goes through, through the affine matrices
of :mod:`kdtoolkit.data.affine` (source → destination pixels). Every
resampling (resize, letterbox, ROI crop, augmentation) is one bilinear :func:`warp_stack`
(with an antialiased pre-reduction when it shrinks), so an augmented view is sampled once.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from kdtoolkit.data.affine import as3x3, reduction
from kdtoolkit.data.imageio import to_array, to_tensor


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
        fx, fy = reduction(np.linalg.inv(matrix))
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
