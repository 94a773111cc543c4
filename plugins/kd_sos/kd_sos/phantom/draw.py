"""Drawing primitives of the phantom: the canvas in canonical head coordinates, signed distance
functions, noise textures, the stage pattern and the bone bars that carry it, ROI boxes and the
ROI crop."""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from kdtoolkit.data.geometry import roi_corners

# Intensities (0..1) before contrast, noise and 8-bit quantisation.
AIR, SOFT, BRAIN, CSF, BONE, CORTEX, TOOTH = 0.03, 0.30, 0.40, 0.24, 0.70, 0.86, 0.97
TRABECULAR = 0.05  # amplitude of the bone texture (unit-variance band-pass noise)


# --------------------------------------------------------------------------------------------
# drawing primitives (canonical coordinates, signed distances, 1-pixel soft edges)


def rot(deg: float) -> tuple[float, float]:
    """``(cos, sin)`` of ``deg`` degrees."""
    a = math.radians(deg)
    return math.cos(a), math.sin(a)


class Canvas:
    """The image being drawn, with the canonical coordinates of every pixel centre."""

    def __init__(self, size: int, rotation: float, scale: float, shift: tuple[float, float]):
        self.size = size
        self.rotation, self.scale, self.shift = rotation, scale, shift
        half = size / 2
        j = (np.arange(size, dtype=np.float32) + 0.5) / half - 1.0
        px, py = np.meshgrid(j - shift[0], j - shift[1])
        c, s = rot(rotation)
        # inverse of p = shift + scale * M(rotation) X, with M(a) = [[c, s], [-s, c]]
        self.x = ((c * px - s * py) / scale).astype(np.float32)
        self.y = ((s * px + c * py) / scale).astype(np.float32)
        self.px = 2.0 / (size * scale)  # one pixel in canonical units
        self.img = np.full((size, size), AIR, dtype=np.float32)

    def to_image(self, x: float, y: float) -> tuple[float, float]:
        """Canonical point -> continuous image coordinates (pixels)."""
        c, s = rot(self.rotation)
        half = self.size / 2
        u = self.shift[0] + self.scale * (c * x + s * y)
        v = self.shift[1] + self.scale * (-s * x + c * y)
        return half * (1 + u), half * (1 + v)

    def window(self, cx: float, cy: float, radius: float) -> tuple[slice, slice] | None:
        """Pixel window holding the canonical disc ``(cx, cy, radius)``; None when off-image."""
        ix, iy = self.to_image(cx, cy)
        r = radius * self.scale * self.size / 2 + 2
        x0, x1 = max(int(ix - r), 0), min(int(math.ceil(ix + r)), self.size)
        y0, y1 = max(int(iy - r), 0), min(int(math.ceil(iy + r)), self.size)
        if x0 >= x1 or y0 >= y1:
            return None
        return slice(y0, y1), slice(x0, x1)

    def coverage(self, sdf: np.ndarray) -> np.ndarray:
        return np.clip(0.5 - sdf / self.px, 0.0, 1.0)

    def paint(self, win, sdf: np.ndarray, value) -> None:
        """Blend ``value`` (scalar or array over ``win``) where ``sdf < 0``."""
        a = self.coverage(sdf)
        target = self.img[win]
        target += a * (value - target)


def local(x, y, cx: float, cy: float, angle: float):
    """Coordinates along (u) and across (v) an ROI-like frame at ``(cx, cy)``, ``angle``."""
    c, s = rot(angle)
    dx, dy = x - cx, y - cy
    return c * dx - s * dy, s * dx + c * dy


def sdf_ellipse(x, y, cx, cy, a, b):
    return (np.hypot((x - cx) / a, (y - cy) / b) - 1.0) * min(a, b)


def sdf_capsule(x, y, p, q, r):
    px, py = x - p[0], y - p[1]
    dx, dy = q[0] - p[0], q[1] - p[1]
    t = np.clip((px * dx + py * dy) / (dx * dx + dy * dy), 0.0, 1.0)
    return np.hypot(px - t * dx, py - t * dy) - r


def sdf_rbox(u, v, hw, hh, r):
    qx, qy = np.abs(u) - (hw - r), np.abs(v) - (hh - r)
    outside = np.hypot(np.maximum(qx, 0), np.maximum(qy, 0))
    return outside + np.minimum(np.maximum(qx, qy), 0) - r


def band_noise(rng: np.random.Generator, shape, sigma_fine: float, sigma_coarse: float):
    """Band-pass noise with unit standard deviation (trabecular / gyral texture)."""
    w = rng.standard_normal(shape).astype(np.float32)
    t = ndimage.gaussian_filter(w, sigma_fine) - ndimage.gaussian_filter(w, sigma_coarse)
    return t / (t.std() + 1e-6)


def smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Very smooth noise (``cells`` × ``cells`` control grid), unit-ish amplitude."""
    grid = rng.standard_normal((cells, cells)).astype(np.float32)
    out = ndimage.zoom(grid, size / cells, order=3, mode="nearest", grid_mode=True)
    return out[:size, :size]


# --------------------------------------------------------------------------------------------
# the stage pattern and the bone bars that carry it


def pattern_params(rng: np.random.Generator, stage: int, contrast: float) -> dict:
    return {
        "stage": stage,
        "u0": rng.uniform(-0.08, 0.08),  # cleft position, fraction of the ROI width
        "tilt": math.tan(math.radians(rng.uniform(-12, 12))),
        "wave": rng.uniform(0.0, 0.04),
        "phase": rng.uniform(0, 2 * math.pi),
        "cleft_w": rng.uniform(0.16, 0.26),  # fraction of the bone thickness
        "cleft_depth": contrast * rng.uniform(0.30, 0.42),
        "scar_w": rng.uniform(0.14, 0.20),
        "scar_gain": contrast * rng.uniform(0.20, 0.30),
        "fused": {1: rng.uniform(0.15, 0.3), 2: rng.uniform(0.5, 0.65)}.get(stage, 0.0),
    }


def draw_pattern(cv: Canvas, win, u, v, width: float, bone: float, p: dict) -> None:
    """Draw stage ``p['stage']`` (0-based) into a bone bar of thickness ``bone`` whose frame
    is ``u`` (along, ROI width ``width``) and ``v`` (across; negative = endocranial/top)."""
    stage = p["stage"]
    if stage == 4:
        return
    centre = (
        p["u0"] * width
        + p["tilt"] * v
        + p["wave"] * bone * np.sin(2 * math.pi * v / bone + p["phase"])
    )
    du = np.abs(u - centre)
    half = bone / 2
    if stage == 3:  # fully fused, bright scar across the bone
        sdf = np.maximum(du - p["scar_w"] * bone / 2, np.abs(v) - half * 0.98)
        cv.paint(win, sdf, cv.img[win] + p["scar_gain"])
        return
    top = -half + p["fused"] * bone  # stages 2 and 3: fused above ``top``
    if stage == 0:
        top = -half * 1.2
    taper = np.clip((v - top) / (0.15 * bone), 0.0, 1.0) if stage in (1, 2) else 1.0
    sdf = np.maximum(du - p["cleft_w"] * bone / 2 * taper, np.maximum(top - v, v - half * 1.2))
    here = cv.img[win]
    cv.paint(win, sdf, np.minimum(here, np.maximum(here - p["cleft_depth"], SOFT + 0.04)))
    if stage in (1, 2):  # faint sclerosis along the fused part
        sdf = np.maximum(du - p["scar_w"] * bone / 2, np.maximum(v - top, -half * 0.98 - v))
        cv.paint(win, sdf, cv.img[win] + 0.35 * p["scar_gain"])


def bone_bar(cv: Canvas, tex: np.ndarray, cx, cy, angle, length, bone, level) -> None:
    """A rounded bony bar (cortex and trabecular inside) centred on ``(cx, cy)``."""
    win = cv.window(cx, cy, length / 2 + bone)
    if win is None:
        return
    u, v = local(cv.x[win], cv.y[win], cx, cy, angle)
    sdf = sdf_rbox(u, v, length / 2, bone / 2, bone * 0.45)
    cv.paint(win, sdf, CORTEX)
    cv.paint(win, sdf + 0.12 * bone, level + TRABECULAR * tex[win])


# --------------------------------------------------------------------------------------------
# ROI frames


def frame_corners(cv: Canvas, centre, angle: float, width: float, height: float) -> np.ndarray:
    """Image corners (:func:`roi_corners`) of a canonical ``width`` × ``height`` frame at
    ``centre`` whose long side is at ``angle`` degrees in the canonical frame."""
    return roi_corners(frame_box(cv, centre, width, height), angle + cv.rotation)


def frame_box(cv: Canvas, centre, width: float, height: float) -> tuple[float, float, float, float]:
    """Unrotated image box of a canonical ``width`` × ``height`` frame at ``centre``."""
    ix, iy = cv.to_image(*centre)
    k = cv.scale * cv.size / 2
    return (ix - k * width / 2, iy - k * height / 2, ix + k * width / 2, iy + k * height / 2)


def crop(image: np.ndarray, box, angle: float, out_w: int, out_h: int) -> np.ndarray:
    """The ROI frame of ``image`` resampled (bilinear) to ``out_w`` × ``out_h``."""
    x0, y0, x1, y1 = box
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    c, s = rot(angle)
    du = ((np.arange(out_w) + 0.5) / out_w - 0.5) * (x1 - x0)
    dv = ((np.arange(out_h) + 0.5) / out_h - 0.5) * (y1 - y0)
    uu, vv = np.meshgrid(du, dv)
    xs = cx + uu * c + vv * s
    ys = cy - uu * s + vv * c
    out = ndimage.map_coordinates(image.astype(np.float32), [ys - 0.5, xs - 0.5], order=1)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)
