"""The student's input resampling in numpy: what :func:`kdtoolkit.data.warp.warp_stack` does
in torch (an antialiased reduction where the warp shrinks by more than ``ANTIALIAS_STEP``,
then one bilinear sampling at output pixel centres, zeros outside the image), for serving
without torch. ``tests/test_serving.py`` checks the two against each other and the reduction
against ``F.interpolate(antialias=True)``."""

from __future__ import annotations

import numpy as np

from kdtoolkit.data.affine import as3x3, reduction


def antialias_weights(size: int, out: int) -> np.ndarray:
    """The out×size matrix of an antialiased bilinear resize along one axis (PIL's and
    torch's ``antialias=True``: a triangle filter widened by the scale, normalised rows)."""
    scale = size / out
    support = scale if scale >= 1.0 else 1.0
    invscale = 1.0 / scale if scale >= 1.0 else 1.0
    weights = np.zeros((out, size))
    for i in range(out):
        center = scale * (i + 0.5)
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), size)
        j = np.arange(lo, hi)
        w = np.maximum(0.0, 1.0 - np.abs((j - center + 0.5) * invscale))
        total = w.sum()
        weights[i, lo:hi] = w / total if total else w
    return weights


def bilinear(image: np.ndarray, inv: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Sample H×W×C ``image`` at ``inv`` (destination → source pixels) of each output pixel
    centre, bilinearly, zeros outside: ``grid_sample(align_corners=False, zeros)``."""
    h, w = size
    height, width = image.shape[:2]
    u, v = np.meshgrid(np.arange(w) + 0.5, np.arange(h) + 0.5)
    x = inv[0, 0] * u + inv[0, 1] * v + inv[0, 2] - 0.5  # source pixel index space
    y = inv[1, 0] * u + inv[1, 1] * v + inv[1, 2] - 0.5
    x0, y0 = np.floor(x).astype(np.int64), np.floor(y).astype(np.int64)
    fx, fy = (x - x0)[..., None], (y - y0)[..., None]
    out = np.zeros((h, w, image.shape[2]))
    for dy, wy in ((0, 1 - fy), (1, fy)):
        for dx, wx in ((0, 1 - fx), (1, fx)):
            yy, xx = y0 + dy, x0 + dx
            inside = (yy >= 0) & (yy < height) & (xx >= 0) & (xx < width)
            values = image[yy.clip(0, height - 1), xx.clip(0, width - 1)]
            out += np.where(inside[..., None], values * wy * wx, 0.0)
    return out


def warp_array(image: np.ndarray, matrix: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resample H×W×C ``image`` through ``matrix`` (source → destination pixels) into a
    float32 h×w×C image, ``size = (h, w)``: ``warp_stack``'s arithmetic (float64 inside)."""
    matrix = as3x3(matrix)
    height, width = image.shape[:2]
    fx, fy = reduction(np.linalg.inv(matrix))
    source = np.asarray(image, dtype=np.float64)
    if fx != 1.0 or fy != 1.0:
        rh, rw = max(1, round(height / fy)), max(1, round(width / fx))
        rows, cols = antialias_weights(height, rh), antialias_weights(width, rw)
        source = np.einsum("ih,hwc,jw->ijc", rows, source, cols)
        matrix = matrix @ np.diag([width / rw, height / rh, 1.0])
    out = bilinear(source, np.linalg.inv(matrix), (int(size[0]), int(size[1])))
    return out.astype(np.float32)
