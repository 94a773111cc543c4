"""A synthetic SOS phantom: midsagittal-slice-like grey images with a staged synchondrosis.

Every image is drawn in a *canonical* head frame (x to the face, y down; at the identity pose
the image spans [-1, 1] in both axes) and mapped to pixels by a random pose (rotation, scale,
shift of the whole anatomy). The spheno-occipital synchondrosis sits on the clivus between the
sphenoid body and the basi-occiput; its 2:1 ROI (long side along the clivus, top edge on the
endocranial surface) holds the stage pattern (Bassed et al.):

1. an open dark cleft across the whole bone;
2. fused at the endocranial (top) end, cleft open below;
3. about half fused (top half bone, bottom half cleft);
4. fully fused, a bright scar line across the bone;
5. even trabecular bone.

Decoy bars of the same size and texture (on the vault, in the cervical spine, on the occipital
squama, on the palate) carry random stage patterns unrelated to the label, so a full-image model
has to find the clivus. Geometry follows :mod:`kdtoolkit.data.geometry`: pixel ``(row i, col j)``
covers ``x ∈ [j, j+1), y ∈ [i, i+1)`` and ``roi_corners(box, angle)`` are the band's corners.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import tempfile
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from kdtoolkit.data.geometry import roi_corners
from kdtoolkit.errors import KdError

STAGES = ("stage_1", "stage_2", "stage_3", "stage_4", "stage_5")
PAPER_COUNTS = (158, 88, 92, 124, 252)
"""Scans per stage in the paper (Halimi Milani et al. 2025); they sum to 714 (of 723 scans)."""

GENERATOR_VERSION = 2
"""Bumped whenever the drawing changes, so cached phantoms are regenerated."""

MANIFEST_COLUMNS = ("image", "label", "x0", "y0", "x1", "y1", "angle", "group")
PARAMS_FILE = "phantom.json"

# Intensities (0..1) before contrast, noise and 8-bit quantisation.
AIR, SOFT, BRAIN, CSF, BONE, CORTEX, TOOTH = 0.03, 0.30, 0.40, 0.24, 0.70, 0.86, 0.97
BASE_ZOOM = 0.92  # mean pose scale: the head fills the image with a small margin
TRABECULAR = 0.05  # amplitude of the bone texture (unit-variance band-pass noise)


@dataclass(frozen=True)
class Difficulty:
    """How hard the full-image problem is; the crop stays stageable at every setting.

    ``band_width``: ROI width / image width at the mean pose (the ROI covers ``band_width`` ×
    ``band_width / 2`` of the image; the pose scale varies it by ±``scale_jitter``); the clivus
    thickness is 0.4 ROI widths. Allowed range 0.05–0.2.
    ``min_decoys``/``max_decoys``: decoy bands per image (uniform in the range).
    ``noise``: σ of the additive Gaussian noise, in units of the full intensity range.
    ``pattern_contrast``: multiplies the cleft darkness and scar brightness (1 = default).
    ``max_rotation`` (degrees), ``scale_jitter``, ``max_shift`` (fraction of the image): pose.
    ``age_cues``: strength of the global maturity cues (skull size, sphenoid sinus, dentition,
    face height, vault thickness, vertebrae); 0 draws none. ``age_spread``: σ, in stages, of the
    maturity around the stage (the overlap between stages seen through the cues).

    The defaults are the ``"paper"`` regime; :func:`preset` names the others.
    """

    band_width: float = 0.125
    min_decoys: int = 2
    max_decoys: int = 4
    noise: float = 0.04
    pattern_contrast: float = 1.0
    max_rotation: float = 15.0
    scale_jitter: float = 0.05
    max_shift: float = 0.05
    age_cues: float = 1.0
    age_spread: float = 0.2

    def check(self) -> None:
        """Raise ``KdError`` for values the generator cannot draw."""
        problems = []
        if not 0.05 <= self.band_width <= 0.2:
            problems.append(f"band_width must be in [0.05, 0.2], got {self.band_width}")
        if not 0 <= self.min_decoys <= self.max_decoys <= 8:
            problems.append(
                f"decoys need 0 <= min_decoys <= max_decoys <= 8, got "
                f"{self.min_decoys}..{self.max_decoys}"
            )
        if not 0 <= self.noise <= 0.5:
            problems.append(f"noise must be in [0, 0.5], got {self.noise}")
        if not 0 < self.pattern_contrast <= 3:
            problems.append(f"pattern_contrast must be in (0, 3], got {self.pattern_contrast}")
        if not 0 <= self.max_rotation <= 45:
            problems.append(f"max_rotation must be in [0, 45], got {self.max_rotation}")
        if not 0 <= self.scale_jitter <= 0.25:
            problems.append(f"scale_jitter must be in [0, 0.25], got {self.scale_jitter}")
        if not 0 <= self.max_shift <= 0.15:
            problems.append(f"max_shift must be in [0, 0.15], got {self.max_shift}")
        if not 0 <= self.age_cues <= 2:
            problems.append(f"age_cues must be in [0, 2], got {self.age_cues}")
        if not 0 < self.age_spread <= 3:
            problems.append(f"age_spread must be in (0, 3], got {self.age_spread}")
        if problems:
            raise KdError("phantom: " + "; ".join(problems))


PRESETS = {
    "paper": Difficulty(),
    "hard": Difficulty(scale_jitter=0.1, age_cues=0.0),
}
"""Named regimes. ``paper``: global maturity cues let a full-image model stage most slices, as
on real scans. ``hard``: no such cues; only the synchondrosis tells the stage."""


def preset(name: str, **overrides) -> Difficulty:
    """The named :data:`PRESETS` regime with ``overrides`` (``None`` values are ignored)."""
    if name not in PRESETS:
        raise KdError(f"phantom: unknown difficulty {name!r} (known: {', '.join(PRESETS)})")
    return replace(PRESETS[name], **{k: v for k, v in overrides.items() if v is not None})


@dataclass(frozen=True)
class PhantomSample:
    """One drawn slice: 8-bit image, its stage (0-based), ROI box and angle (degrees)."""

    image: np.ndarray
    stage: int
    box: tuple[float, float, float, float]
    angle: float
    decoys: list[tuple[float, float, float, float, float, int]] = field(default_factory=list)
    """Decoy ROIs as ``(x0, y0, x1, y1, angle, pattern_stage)``."""
    cues: dict[str, float] = field(default_factory=dict)
    """Maturity behind each global cue (0 ≈ stage 1, 1 ≈ stage 5); empty without cues."""


# --------------------------------------------------------------------------------------------
# stage mix


def stage_counts(n: int, proportions: tuple[int, ...] = PAPER_COUNTS) -> list[int]:
    """Images per stage: ``proportions`` scaled to ``n`` by the largest-remainder method
    (ties go to the earlier stage)."""
    if n < 0:
        raise KdError(f"phantom: n must be >= 0, got {n}")
    total = sum(proportions)
    quotas = [n * p / total for p in proportions]
    counts = [math.floor(q) for q in quotas]
    order = sorted(range(len(quotas)), key=lambda i: (-(quotas[i] - counts[i]), i))
    for i in order[: n - sum(counts)]:
        counts[i] += 1
    return counts


def stage_order(n: int, seed: int) -> np.ndarray:
    """The 0-based stage of each of the ``n`` images: the stage mix, shuffled by ``seed``."""
    stages = np.repeat(np.arange(len(STAGES)), stage_counts(n))
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(2**31,))).permutation(
        stages
    )


# --------------------------------------------------------------------------------------------
# drawing primitives (canonical coordinates, signed distances, 1-pixel soft edges)


def _rot(deg: float) -> tuple[float, float]:
    a = math.radians(deg)
    return math.cos(a), math.sin(a)


class _Canvas:
    """The image being drawn, with the canonical coordinates of every pixel centre."""

    def __init__(self, size: int, rotation: float, scale: float, shift: tuple[float, float]):
        self.size = size
        self.rotation, self.scale, self.shift = rotation, scale, shift
        half = size / 2
        j = (np.arange(size, dtype=np.float32) + 0.5) / half - 1.0
        px, py = np.meshgrid(j - shift[0], j - shift[1])
        c, s = _rot(rotation)
        # inverse of p = shift + scale * M(rotation) X, with M(a) = [[c, s], [-s, c]]
        self.x = ((c * px - s * py) / scale).astype(np.float32)
        self.y = ((s * px + c * py) / scale).astype(np.float32)
        self.px = 2.0 / (size * scale)  # one pixel in canonical units
        self.img = np.full((size, size), AIR, dtype=np.float32)

    def to_image(self, x: float, y: float) -> tuple[float, float]:
        """Canonical point -> continuous image coordinates (pixels)."""
        c, s = _rot(self.rotation)
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


def _local(x, y, cx: float, cy: float, angle: float):
    """Coordinates along (u) and across (v) an ROI-like frame at ``(cx, cy)``, ``angle``."""
    c, s = _rot(angle)
    dx, dy = x - cx, y - cy
    return c * dx - s * dy, s * dx + c * dy


def _sdf_ellipse(x, y, cx, cy, a, b):
    return (np.hypot((x - cx) / a, (y - cy) / b) - 1.0) * min(a, b)


def _sdf_capsule(x, y, p, q, r):
    px, py = x - p[0], y - p[1]
    dx, dy = q[0] - p[0], q[1] - p[1]
    t = np.clip((px * dx + py * dy) / (dx * dx + dy * dy), 0.0, 1.0)
    return np.hypot(px - t * dx, py - t * dy) - r


def _sdf_rbox(u, v, hw, hh, r):
    qx, qy = np.abs(u) - (hw - r), np.abs(v) - (hh - r)
    outside = np.hypot(np.maximum(qx, 0), np.maximum(qy, 0))
    return outside + np.minimum(np.maximum(qx, qy), 0) - r


def _band_noise(rng: np.random.Generator, shape, sigma_fine: float, sigma_coarse: float):
    """Band-pass noise with unit standard deviation (trabecular / gyral texture)."""
    w = rng.standard_normal(shape).astype(np.float32)
    t = ndimage.gaussian_filter(w, sigma_fine) - ndimage.gaussian_filter(w, sigma_coarse)
    return t / (t.std() + 1e-6)


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Very smooth noise (``cells`` × ``cells`` control grid), unit-ish amplitude."""
    grid = rng.standard_normal((cells, cells)).astype(np.float32)
    out = ndimage.zoom(grid, size / cells, order=3, mode="nearest", grid_mode=True)
    return out[:size, :size]


# --------------------------------------------------------------------------------------------
# the stage pattern and the bone bars that carry it


def _pattern_params(rng: np.random.Generator, stage: int, contrast: float) -> dict:
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


def _draw_pattern(cv: _Canvas, win, u, v, width: float, bone: float, p: dict) -> None:
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


def _bone_bar(cv: _Canvas, tex: np.ndarray, cx, cy, angle, length, bone, level) -> None:
    """A rounded bony bar (cortex and trabecular inside) centred on ``(cx, cy)``."""
    win = cv.window(cx, cy, length / 2 + bone)
    if win is None:
        return
    u, v = _local(cv.x[win], cv.y[win], cx, cy, angle)
    sdf = _sdf_rbox(u, v, length / 2, bone / 2, bone * 0.45)
    cv.paint(win, sdf, CORTEX)
    cv.paint(win, sdf + 0.12 * bone, level + TRABECULAR * tex[win])


# --------------------------------------------------------------------------------------------
# one slice


CUE_AMOUNT = {
    "skull": 0.35,  # head size in the fixed field of view
    "sinus": 1.5,  # pneumatisation of the sphenoid sinus
    "teeth": 3.5,  # unerupted tooth buds (mixed dentition)
    "face": 0.6,  # chin lower and larger (facial growth)
    "vault": 1.6,  # thickness of the skull vault
    "spine": 0.6,  # depth of the vertebral bodies (cervical maturation)
    "density": 0.6,  # grey level of the diploe, jaw and vertebrae (mineralisation)
}
"""How far each cue moves from the least to the most mature slice at ``age_cues = 1``."""
CUES = tuple(CUE_AMOUNT)
"""The global maturity cues (all absent at ``age_cues = 0``)."""
CUE_NOISE = 0.08
"""σ of each cue's own variation around the slice's maturity (0..1 scale)."""


def _maturity(rng: np.random.Generator, stage: int, d: Difficulty) -> dict[str, float]:
    """Maturity behind each cue: the slice's maturity, ``(stage + N(0, age_spread)) / 4``, plus
    a little independent variation per cue (0 ≈ stage 1, 1 ≈ stage 5)."""
    m = (stage + rng.normal(0.0, d.age_spread)) / (len(STAGES) - 1)
    return {c: float(m + rng.normal(0.0, CUE_NOISE)) for c in CUES}


def _pose(rng: np.random.Generator, d: Difficulty) -> tuple[float, float, tuple[float, float]]:
    rotation = rng.uniform(-d.max_rotation, d.max_rotation)
    scale = rng.uniform(1 - d.scale_jitter, 1 + d.scale_jitter) * BASE_ZOOM
    # canonical units: the image is 2 wide, so ±2·max_shift is ±max_shift of the image
    shift = (2 * d.max_shift * rng.uniform(-1, 1), 2 * d.max_shift * rng.uniform(-1, 1))
    return rotation, scale, shift


def render(
    rng: np.random.Generator, stage: int, size: int = 256, difficulty: Difficulty | None = None
) -> PhantomSample:
    """Draw one slice of 0-based ``stage`` with the random generator ``rng``."""
    d = difficulty or Difficulty()
    age = _maturity(rng, stage, d) if d.age_cues > 0 else {}

    def j(spread: float) -> float:  # symmetric jitter
        return rng.uniform(-spread, spread)

    def grow(cue: str, least: float = 0.0) -> float:  # 1 ± amount/2, immature to mature
        if not age:
            return 1.0
        m = min(max(age[cue], -0.1), 1.1)
        return max(1 + d.age_cues * CUE_AMOUNT[cue] * (m - 0.5), least)

    dense = grow("density", 0.8) - 1  # added to the bone level outside the clivus

    # anatomy (canonical units)
    width = 2 * d.band_width / BASE_ZOOM  # ROI width; the image is 2 canonical units wide
    height = width / 2
    bone = 0.8 * height  # clivus thickness; the ROI keeps a margin above and below
    cc = (-0.12 + j(0.03), -0.22 + j(0.03))
    ax, ay = 0.80 * (1 + j(0.04)), 0.64 * (1 + j(0.04))
    vault_t = 0.07 * (1 + j(0.15)) * grow("vault", 0.4)
    sph = (0.15 + j(0.02), 0.10 + j(0.02))
    sph_angle = -8 + j(6)
    clivus_angle = 57 + j(6)  # ROI angle of the band: its long axis points to the sphenoid
    ca, sa = _rot(clivus_angle)
    p_top = (0.06 + j(0.015), 0.10 + j(0.015))
    clivus_len = max(0.48 * (1 + j(0.05)), 2.1 * width)
    basion = (p_top[0] - ca * clivus_len, p_top[1] + sa * clivus_len)
    frac = 0.45 + j(0.04)
    band_c = (p_top[0] - ca * clivus_len * frac, p_top[1] + sa * clivus_len * frac)
    opisthion = (basion[0] - 0.20 + j(0.03), basion[1] + j(0.03))
    spine_x = basion[0] + 0.05 + j(0.02)

    # pose: the whole ROI must lie inside the image
    for _ in range(100):
        rotation, scale, shift = _pose(rng, d)
        scale *= grow("skull")
        cv = _Canvas(size, rotation, scale, shift)
        angle = clivus_angle + rotation
        corners = _corners(cv, band_c, clivus_angle, width, height)
        if corners.min() >= 1 and corners.max() <= size - 1:
            break
    else:  # pragma: no cover - only with extreme difficulty settings
        raise KdError("phantom: could not place the ROI inside the image; lower max_shift")

    s256 = size / 256
    tex = _band_noise(rng, (size, size), 0.7 * s256, 2.2 * s256)
    x, y = cv.x, cv.y
    full = (slice(None), slice(None))

    # soft tissue: scalp, face, neck
    head = np.minimum.reduce(
        [
            _sdf_ellipse(x, y, cc[0], cc[1], ax + 0.05, ay + 0.05),
            _sdf_ellipse(x, y, 0.30 + j(0.03), 0.42, 0.42, 0.55),
            _sdf_rbox(x + 0.18, y - 1.1, 0.42 + j(0.03), 0.8, 0.1),
        ]
    )
    cv.paint(full, head, SOFT + 0.02 * tex)

    # brain: inside the vault, above the cranial base
    base_x = [-2.0, cc[0] - ax, -0.58, opisthion[0], basion[0], p_top[0], 0.2, cc[0] + ax, 2.0]
    base_y = [0.25, 0.25, 0.30, opisthion[1], basion[1], p_top[1] - 0.04, 0.03, 0.0, 0.0]
    base = np.interp(x, base_x, base_y).astype(np.float32)
    inner = _sdf_ellipse(x, y, cc[0], cc[1], ax - vault_t, ay - vault_t)
    gyri = _smooth_noise(rng, size, 12)
    cv.paint(full, np.maximum(inner, y - base), BRAIN + 0.025 * gyri)
    cv.paint(full, np.maximum(-inner - 0.012, np.maximum(inner, y - base)), CSF + 0.03)

    # vault ring (outer table, diploe, inner table), open over the face and the skull base
    outer = _sdf_ellipse(x, y, cc[0], cc[1], ax, ay)
    psi = np.degrees(np.arctan2((y - cc[1]) / ay, (x - cc[0]) / ax)) % 360
    sector = np.where((psi > 22) & (psi < 128), 1.0, -1.0)
    ring = np.maximum(np.maximum(outer, -inner), sector * 0.2)
    cv.paint(full, ring, CORTEX)
    cv.paint(full, ring + vault_t * 0.3, BONE - 0.1 + dense + TRABECULAR * tex)
    occ_top = (cc[0] + ax * math.cos(math.radians(128)), cc[1] + ay * math.sin(math.radians(128)))
    win = cv.window(*opisthion, 0.5)
    if win is not None:
        occ = _sdf_capsule(cv.x[win], cv.y[win], occ_top, opisthion, vault_t / 2)
        cv.paint(win, occ, CORTEX)
        cv.paint(win, occ + vault_t * 0.3, BONE - 0.1 + dense + TRABECULAR * tex[win])

    # airway: nasal cavity, nasopharynx, oropharynx
    naso = (sph[0] + 0.02 + j(0.02), sph[1] + 0.21 + j(0.02))
    airway = np.minimum.reduce(
        [
            _sdf_capsule(x, y, (0.52, 0.20), (naso[0] + 0.05, naso[1] - 0.04), 0.055 + j(0.01)),
            _sdf_capsule(x, y, naso, (spine_x + 0.20, basion[1] + 0.10), 0.045 + j(0.01)),
            _sdf_capsule(x, y, (spine_x + 0.20, basion[1] + 0.10), (spine_x + 0.18, 1.6), 0.04),
        ]
    )
    cv.paint(full, airway, AIR + 0.02)
    for k in range(3):  # turbinates
        cv.paint(
            full,
            _sdf_ellipse(x, y, 0.42 - 0.09 * k + j(0.01), 0.17 + 0.035 * k, 0.06, 0.012),
            SOFT + 0.05,
        )

    # face bones: anterior cranial floor, palate, teeth, chin
    floor = _sdf_capsule(x, y, (cc[0] + ax - 0.04, 0.0), (sph[0] + 0.04, sph[1] - 0.1), 0.018)
    cv.paint(full, floor, CORTEX - 0.05)
    palate_y = 0.33 + j(0.02)
    cv.paint(full, _sdf_capsule(x, y, (0.58, palate_y), (0.2, palate_y), 0.026), CORTEX - 0.04)
    for k in range(2):
        ty = palate_y + 0.07 + 0.11 * k
        cv.paint(full, _sdf_ellipse(x, y, 0.57 + j(0.01), ty, 0.03, 0.05), TOOTH)
    if age:  # unerupted permanent teeth in the alveolar bone, fewer as the dentition matures
        buds = int(np.clip(round(d.age_cues * CUE_AMOUNT["teeth"] * (0.8 - age["teeth"])), 0, 3))
        for k in range(buds):
            bx, by = 0.48 - 0.08 * k + j(0.01), palate_y + (0.06 if k % 2 else 0.2) + j(0.01)
            cv.paint(full, _sdf_ellipse(x, y, bx, by, 0.04, 0.045), SOFT + 0.04)
            cv.paint(full, _sdf_ellipse(x, y, bx, by, 0.028, 0.033), TOOTH)
    face = grow("face")
    chin = _sdf_ellipse(
        x, y, 0.52 + j(0.02), 0.70 + j(0.02) + (face - 1) / 2, 0.07 * face, 0.11 * face
    )
    cv.paint(full, chin, CORTEX)
    cv.paint(full, chin + 0.02, BONE - 0.05 + dense + TRABECULAR * tex)

    # cervical spine: anterior arch of the atlas, dens + C2, C3, C4; canal and cord behind
    canal = _sdf_rbox(x - (spine_x - 0.17), y - 1.0, 0.06, 0.55, 0.05)
    cv.paint(full, canal, CSF)
    cv.paint(full, canal + 0.025, SOFT + 0.03)
    cv.paint(full, _sdf_ellipse(x, y, spine_x + 0.09, basion[1] + 0.07, 0.035, 0.03), CORTEX)
    vert = grow("spine")  # vertebral bodies deepen with maturation
    for top_y, bottom_y in ((basion[1] + 0.03, basion[1] + 0.33), (basion[1] + 0.37, 1.02)):
        mid = (top_y + bottom_y) / 2
        _bone_bar(cv, tex, spine_x, mid, 90, bottom_y - top_y, 0.16 * vert, BONE - 0.05 + dense)
    _bone_bar(cv, tex, spine_x, 1.2, 90, 0.13, 0.16, BONE - 0.05)

    # sphenoid body with its sinus and the sella; the clivus down to the basion
    win = cv.window(*sph, 0.3)
    if win is not None:
        u, v = _local(cv.x[win], cv.y[win], sph[0], sph[1], sph_angle)
        body = _sdf_rbox(u, v, 0.13, 0.09, 0.04)
        cv.paint(win, body, CORTEX)
        cv.paint(win, body + 0.012, BONE + TRABECULAR * tex[win])
        pneu = min(grow("sinus", 0.3), 1.5)
        sinus = _sdf_ellipse(
            u, v, 0.03 + j(0.01), 0.01, (0.07 + j(0.01)) * pneu, (0.05 + j(0.01)) * pneu
        )
        cv.paint(win, sinus, AIR + 0.03)
        sella = _sdf_ellipse(cv.x[win], cv.y[win], sph[0] - 0.05, sph[1] - 0.09, 0.045, 0.04)
        cv.paint(win, sella, SOFT + 0.06)
    _bone_bar(
        cv,
        tex,
        (p_top[0] + basion[0]) / 2,
        (p_top[1] + basion[1]) / 2,
        clivus_angle,
        clivus_len + bone,
        bone,
        BONE,
    )
    dorsum = _sdf_capsule(x, y, p_top, (p_top[0] - 0.05, p_top[1] - 0.09), 0.018)
    cv.paint(full, dorsum, CORTEX)

    # the synchondrosis
    win = cv.window(*band_c, width)
    u, v = _local(cv.x[win], cv.y[win], band_c[0], band_c[1], clivus_angle)
    _draw_pattern(cv, win, u, v, width, bone, _pattern_params(rng, stage, d.pattern_contrast))

    # decoys
    decoys = []
    wanted = int(rng.integers(d.min_decoys, d.max_decoys + 1))
    sites = _decoy_sites(rng, cc, ax, ay, vault_t, spine_x, basion, occ_top, opisthion, palate_y)
    taken = [band_c]
    for cx, cy, dangle in sites:
        if len(decoys) == wanted:
            break
        if any(math.hypot(cx - px, cy - py) < 1.5 * width for px, py in taken):
            continue
        dc = _corners(cv, (cx, cy), dangle, 1.7 * width, height)
        if dc.min() < 1 or dc.max() > size - 1:
            continue
        taken.append((cx, cy))
        _bone_bar(cv, tex, cx, cy, dangle, 1.7 * width, bone, BONE)
        win = cv.window(cx, cy, width)
        u, v = _local(cv.x[win], cv.y[win], cx, cy, dangle)
        pattern = int(rng.integers(0, len(STAGES)))
        _draw_pattern(cv, win, u, v, width, bone, _pattern_params(rng, pattern, d.pattern_contrast))
        decoys.append((*_box(cv, (cx, cy), width, height), dangle + rotation, pattern))

    # acquisition: blur, bias field, contrast, noise
    img = ndimage.gaussian_filter(cv.img, 0.5 * s256)
    img *= 1 + 0.06 * _smooth_noise(rng, size, 4)
    img = np.clip(img, 0, 1) ** rng.uniform(0.8, 1.25)
    img = img * rng.uniform(0.85, 1.1) + rng.uniform(-0.03, 0.05)
    img += d.noise * rng.standard_normal(img.shape).astype(np.float32)
    img8 = np.clip(np.rint(img * 255), 0, 255).astype(np.uint8)
    return PhantomSample(img8, stage, _box(cv, band_c, width, height), angle, decoys, age)


def _corners(cv: _Canvas, centre, angle: float, width: float, height: float) -> np.ndarray:
    return roi_corners(_box(cv, centre, width, height), angle + cv.rotation)


def _box(cv: _Canvas, centre, width: float, height: float) -> tuple[float, float, float, float]:
    """Unrotated image box of a canonical ``width`` × ``height`` frame at ``centre``."""
    ix, iy = cv.to_image(*centre)
    k = cv.scale * cv.size / 2
    return (ix - k * width / 2, iy - k * height / 2, ix + k * width / 2, iy + k * height / 2)


def _decoy_sites(rng, cc, ax, ay, vault_t, spine_x, basion, occ_top, opisthion, palate_y):
    """Candidate decoy centres and angles, in random order (vault, spine, occiput, palate)."""
    sites = []
    for _ in range(24):
        kind = rng.choice(4, p=[0.55, 0.2, 0.1, 0.15])
        flip = 180.0 * int(rng.integers(0, 2))
        if kind == 0:  # on the vault, along it
            psi = math.radians(rng.uniform(128, 382))
            x = cc[0] + (ax - vault_t / 2) * math.cos(psi)
            y = cc[1] + (ay - vault_t / 2) * math.sin(psi)
            tx, ty = -ax * math.sin(psi), ay * math.cos(psi)
            sites.append((x, y, math.degrees(math.atan2(-ty, tx)) + flip))
        elif kind == 1:  # in the cervical spine, along it
            y = basion[1] + rng.uniform(0.2, 0.7)
            sites.append((spine_x + rng.uniform(-0.02, 0.02), y, 90 + rng.uniform(-10, 10) + flip))
        elif kind == 2:  # on the occipital squama
            t = rng.uniform(0.2, 0.8)
            x = occ_top[0] + t * (opisthion[0] - occ_top[0])
            y = occ_top[1] + t * (opisthion[1] - occ_top[1])
            a = math.degrees(math.atan2(-(opisthion[1] - occ_top[1]), opisthion[0] - occ_top[0]))
            sites.append((x, y, a + rng.uniform(-8, 8) + flip))
        else:  # along the palate / nasal floor
            sites.append((rng.uniform(0.25, 0.5), palate_y, rng.uniform(-10, 10) + flip))
    return sites


def crop(image: np.ndarray, box, angle: float, out_w: int, out_h: int) -> np.ndarray:
    """The ROI frame of ``image`` resampled (bilinear) to ``out_w`` × ``out_h``."""
    x0, y0, x1, y1 = box
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    c, s = _rot(angle)
    du = ((np.arange(out_w) + 0.5) / out_w - 0.5) * (x1 - x0)
    dv = ((np.arange(out_h) + 0.5) / out_h - 0.5) * (y1 - y0)
    uu, vv = np.meshgrid(du, dv)
    xs = cx + uu * c + vv * s
    ys = cy - uu * s + vv * c
    out = ndimage.map_coordinates(image.astype(np.float32), [ys - 0.5, xs - 0.5], order=1)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------
# writing a data set


def _sample_rng(seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(index,)))


def _png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array, mode="L").save(buf, format="PNG", compress_level=3)
    return buf.getvalue()


def _write_bytes(path: Path, data: bytes) -> None:
    """Write via a temporary file in the same folder and ``os.replace``."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _make_one(job: tuple) -> dict:
    out_dir, index, stage, seed, size, crops, difficulty = job
    sample = render(_sample_rng(seed, index), stage, size, difficulty)
    name = f"sos_{index:05d}.png"
    _write_bytes(out_dir / "images" / name, _png_bytes(sample.image))
    x0, y0, x1, y1 = sample.box
    row = {
        "image": f"images/{name}",
        "label": STAGES[stage],
        "x0": f"{x0:.3f}",
        "y0": f"{y0:.3f}",
        "x1": f"{x1:.3f}",
        "y1": f"{y1:.3f}",
        "angle": f"{sample.angle:.3f}",
        "group": f"p{index:05d}",
    }
    if crops:
        w = max(round(x1 - x0), 2)
        patch = crop(sample.image, sample.box, sample.angle, w, max(w // 2, 1))
        _write_bytes(out_dir / "crops" / name, _png_bytes(patch))
        row["crop"] = f"crops/{name}"
    return row


def _jobs(out_dir: Path, n: int, seed: int, size: int, crops: bool, d: Difficulty) -> Iterator:
    for i, stage in enumerate(stage_order(n, seed)):
        yield (out_dir, i, int(stage), seed, size, crops, d)


def write_phantom(
    out_dir: Path,
    n: int = 723,
    seed: int = 0,
    size: int = 256,
    crops: bool = False,
    difficulty: Difficulty | None = None,
    workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Write ``n`` phantom slices (``images/*.png``) and ``manifest.csv`` into ``out_dir``;
    return the manifest path.

    The same arguments give the same bytes. ``crops`` also writes the expert crops
    (``crops/*.png``, a ``crop`` column). ``workers``: processes (default: the CPUs, at most 8;
    1 draws in this process). ``progress(done, total)`` is called after every image. The
    manifest is written last and atomically, so a manifest on disk always names complete images.
    """
    d = _checked(n, size, difficulty)
    out_dir = Path(out_dir)
    manifest = out_dir / "manifest.csv"
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    if crops:
        (out_dir / "crops").mkdir(exist_ok=True)
    if workers is None:
        workers = min(os.cpu_count() or 1, 8) if n >= 32 else 1
    rows: list[dict] = []
    jobs = _jobs(out_dir, n, seed, size, crops, d)
    if workers <= 1:
        results = map(_make_one, jobs)
        pool = None
    else:
        pool = ProcessPoolExecutor(workers, mp_context=_mp_context())
        results = pool.map(_make_one, jobs, chunksize=8)
    try:
        for i, row in enumerate(results, 1):
            rows.append(row)
            if progress is not None:
                progress(i, n)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    columns = [*MANIFEST_COLUMNS, "crop"] if crops else list(MANIFEST_COLUMNS)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    _write_bytes(manifest, buf.getvalue().encode())
    return manifest


def _checked(n: int, size: int, difficulty: Difficulty | None) -> Difficulty:
    """The difficulty to draw with; ``KdError`` for arguments the generator cannot draw."""
    d = difficulty or Difficulty()
    d.check()
    if n < 1:
        raise KdError(f"phantom: n must be >= 1, got {n}")
    if not 64 <= size <= 4096:
        raise KdError(f"phantom: size must be in [64, 4096], got {size}")
    return d


def _mp_context():
    import multiprocessing

    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else "spawn")


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """An exclusive lock on ``folder`` (POSIX ``flock``; a no-op elsewhere)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(folder / ".phantom.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def phantom_params(
    n: int, seed: int, size: int, crops: bool, difficulty: Difficulty | None = None
) -> dict:
    """Everything that determines a generated phantom (stored beside its manifest)."""
    return {
        "generator": "kd_sos.phantom",
        "version": GENERATOR_VERSION,
        "n": n,
        "seed": seed,
        "size": size,
        "crops": crops,
        "difficulty": asdict(difficulty or Difficulty()),
    }


def ensure_phantom(
    cache_dir: Path,
    n: int = 723,
    seed: int = 0,
    size: int = 256,
    crops: bool = False,
    difficulty: Difficulty | None = None,
    workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """The manifest of the phantom with these parameters in ``cache_dir``: reused when it was
    generated before (``phantom.json`` matches and the manifest exists), else (re)generated.

    Refuses to overwrite a ``manifest.csv`` that the generator did not write.
    """
    _checked(n, size, difficulty)
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    params = phantom_params(n, seed, size, crops, difficulty)
    manifest, params_file = cache_dir / "manifest.csv", cache_dir / PARAMS_FILE
    with _locked(cache_dir):
        if manifest.exists():
            if not params_file.exists():
                raise KdError(
                    f"{manifest} exists and was not written by the phantom generator; "
                    f"choose an empty folder"
                )
            with contextlib.suppress(ValueError, OSError):
                if json.loads(params_file.read_text()) == params:
                    return manifest
        manifest.unlink(missing_ok=True)
        params_file.unlink(missing_ok=True)
        for sub in ("images", "crops"):  # only files this generator names
            for old in (cache_dir / sub).glob("sos_*.png"):
                old.unlink()
        _write_bytes(params_file, (json.dumps(params, indent=2) + "\n").encode())
        return write_phantom(cache_dir, n, seed, size, crops, difficulty, workers, progress)
