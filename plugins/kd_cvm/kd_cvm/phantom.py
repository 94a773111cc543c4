"""A synthetic lateral-cephalogram phantom for cervical vertebral maturation (CVM) staging.

Each image is drawn in a *canonical* head frame (face to the right, y down; at the identity pose
the image spans [-1, 1] in both axes) and mapped to pixels by a random pose (rotation, scale,
shift). The skull, face and mandible fill the upper and right part; the cervical spine (dens,
C2, C3, C4, then C5 and C6) runs down below the cranial base, posterior to the mandibular ramus.

The stage (Baccetti CS1–CS6) is drawn into C2–C4: concavities at the lower borders of C2
(from CS2), C3 (from CS3) and C4 (from CS4), and the C3/C4 bodies change from trapezoidal to
horizontal rectangular, square (CS5) and vertical rectangular (CS6). The expert ROI is a tall
1:2 (width:height) box around C2–C4 in the spine's frame, rotated with the head (``angle``,
counter-clockwise degrees, as in a kdtoolkit manifest). C5 and C6 carry random shapes, and
global maturity cues (skull and mandible size) follow the stage only noisily, so a full-image
model has something to go on but has to find C2–C4 to stage well.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

STAGES = ("CS1", "CS2", "CS3", "CS4", "CS5", "CS6")
AIR, SOFT, BRAIN, BONE, CORTEX = 0.05, 0.30, 0.38, 0.58, 0.82

#: Per stage (0-based): C3/C4 body height / width, taper of the upper border (trapezoid), and
#: the vertebrae (C2, C3, C4) whose lower border is concave.
SHAPES = (
    (0.55, 0.45, ()),
    (0.58, 0.38, ("C2",)),
    (0.68, 0.18, ("C2", "C3")),
    (0.72, 0.0, ("C2", "C3", "C4")),
    (1.0, 0.0, ("C2", "C3", "C4")),
    (1.3, 0.0, ("C2", "C3", "C4")),
)
SPINE_X = -0.32  # canonical x of the vertebral bodies' centre line
DENS_TOP = -0.02  # canonical y of the tip of the dens
GAP = 0.035  # intervertebral disc height, in canonical units
MARGIN = 0.05  # ROI margin around C2-C4 (canonical units)


@dataclass(frozen=True)
class Pose:
    """Image placement of the canonical frame: rotation (degrees, counter-clockwise), scale,
    shift (fraction of the half image)."""

    rotation: float
    scale: float
    shift: tuple[float, float]


@dataclass(frozen=True)
class PhantomImage:
    """One drawn cephalogram: 8-bit image, stage (0-based), ROI box and angle (degrees)."""

    image: np.ndarray
    stage: int
    box: tuple[float, float, float, float]
    angle: float
    vertebrae: dict[str, tuple[float, float]]
    """Image position (x, y) of the centre of each drawn vertebral body (C2, C3, ...)."""


class Canvas:
    """The image and the canonical coordinates of its pixel centres under ``pose``."""

    def __init__(self, size: int, pose: Pose) -> None:
        self.size, self.pose = size, pose
        j = (np.arange(size, dtype=np.float32) + 0.5) / (size / 2) - 1.0
        px, py = np.meshgrid(j - pose.shift[0], j - pose.shift[1])
        a = math.radians(pose.rotation)
        c, s = math.cos(a), math.sin(a)
        self.x = (c * px - s * py) / pose.scale
        self.y = (s * px + c * py) / pose.scale
        self.px = 2.0 / (size * pose.scale)  # one pixel in canonical units
        self.img = np.full((size, size), AIR, dtype=np.float32)

    def to_image(self, x: float, y: float) -> tuple[float, float]:
        """Canonical point -> image pixels (x right, y down)."""
        a = math.radians(self.pose.rotation)
        c, s = math.cos(a), math.sin(a)
        u = self.pose.shift[0] + self.pose.scale * (c * x + s * y)
        v = self.pose.shift[1] + self.pose.scale * (-s * x + c * y)
        return self.size / 2 * (1 + u), self.size / 2 * (1 + v)

    def paint(self, sdf: np.ndarray, value: float | np.ndarray) -> None:
        """Blend ``value`` where the signed distance ``sdf`` (canonical units) is negative."""
        alpha = np.clip(0.5 - sdf / self.px, 0.0, 1.0)
        self.img += alpha * (value - self.img)


def ellipse(cv: Canvas, cx: float, cy: float, a: float, b: float) -> np.ndarray:
    return (np.hypot((cv.x - cx) / a, (cv.y - cy) / b) - 1.0) * min(a, b)


def capsule(cv: Canvas, p: tuple[float, float], q: tuple[float, float], r: float) -> np.ndarray:
    dx, dy = q[0] - p[0], q[1] - p[1]
    t = np.clip(((cv.x - p[0]) * dx + (cv.y - p[1]) * dy) / (dx * dx + dy * dy), 0.0, 1.0)
    return np.hypot(cv.x - p[0] - t * dx, cv.y - p[1] - t * dy) - r


def vertebra(cv, cx, cy, width, height, taper, concavity, tilt) -> np.ndarray:
    """Signed distance (approximate) of a vertebral body: ``taper`` lowers the upper border
    towards the front (a trapezoid), ``concavity`` lifts the middle of the lower border."""
    a = math.radians(tilt)
    c, s = math.cos(a), math.sin(a)
    dx, dy = cv.x - cx, cv.y - cy
    u, v = c * dx - s * dy, s * dx + c * dy  # u towards the face, v down
    rel = np.clip(u / width + 0.5, 0.0, 1.0)
    top = -height / 2 + taper * height * rel
    bottom = height / 2 - concavity * np.clip(1 - (2 * u / width) ** 2, 0.0, 1.0)
    return -np.minimum(np.minimum(width / 2 - np.abs(u), v - top), bottom - v)


def smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    grid = rng.standard_normal((cells, cells)).astype(np.float32)
    img = Image.fromarray(grid, mode="F").resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(img, dtype=np.float32)


def draw_head(cv: Canvas, rng: np.random.Generator, maturity: float) -> None:
    """Skull, face, mandible and neck soft tissue; their size grows (noisily) with maturity."""
    grow = 1.0 + 0.08 * (maturity - 0.5) + rng.normal(0, 0.03)
    cv.paint(capsule(cv, (-0.3, 0.0), (-0.25, 1.3), 0.32), SOFT)  # neck
    cv.paint(ellipse(cv, 0.42, 0.32, 0.36 * grow, 0.42 * grow), SOFT)  # face soft tissue
    cx, cy = -0.08, -0.5
    cv.paint(ellipse(cv, cx, cy, 0.78 * grow, 0.52 * grow), CORTEX)  # skull
    vault = 0.05 + 0.02 * maturity
    cv.paint(ellipse(cv, cx, cy, 0.78 * grow - vault, 0.52 * grow - vault), BRAIN)
    cv.paint(ellipse(cv, 0.5, -0.08, 0.13, 0.1), AIR + 0.1)  # orbit
    cv.paint(capsule(cv, (0.2, 0.12), (0.62, 0.18), 0.07), BONE)  # maxilla / palate
    reach = 0.55 + 0.12 * maturity + rng.normal(0, 0.04)  # mandible length
    gonion = (0.02 + rng.normal(0, 0.02), 0.55)
    cv.paint(capsule(cv, (0.06, 0.05), gonion, 0.05), BONE)  # ramus
    cv.paint(capsule(cv, gonion, (gonion[0] + reach, 0.68), 0.055), BONE)  # body
    for k in range(int(rng.integers(5, 8))):  # teeth
        tx = 0.3 + 0.06 * k
        cv.paint(capsule(cv, (tx, 0.24), (tx, 0.34), 0.022), CORTEX)
        cv.paint(capsule(cv, (tx + 0.02, 0.44), (tx + 0.02, 0.55), 0.022), CORTEX)


def draw_spine(cv: Canvas, rng: np.random.Generator, stage: int, texture: np.ndarray):
    """Dens, C2–C6 and their posterior arches; returns the canonical ROI box and the centres
    of the drawn bodies."""
    width = 0.2 * rng.uniform(0.94, 1.06)
    centres: dict[str, tuple[float, float]] = {}
    y = DENS_TOP
    cv.paint(capsule(cv, (SPINE_X, y + 0.03), (SPINE_X, y + 0.12), 0.045), BONE + 0.05)
    y += 0.09
    for name in ("C2", "C3", "C4", "C5", "C6"):
        shape_stage = stage if name in ("C3", "C4") else int(rng.integers(0, 6))
        ratio, taper, concave = SHAPES[shape_stage]
        if name == "C2":
            ratio, taper, concave = 1.1, 0.0, SHAPES[stage][2]
        height = width * (ratio + rng.normal(0, 0.04))
        taper = max(0.0, taper + rng.normal(0, 0.04))
        depth = width * rng.uniform(0.16, 0.22) if name in concave else width * 0.02
        x = SPINE_X + 0.04 * (y - 0.4)  # a slight lordosis
        cy = y + height / 2
        tilt = rng.normal(0, 3)
        sdf = vertebra(cv, x, cy, width, height, taper, depth, tilt)
        cv.paint(sdf, CORTEX)
        cv.paint(sdf + 0.2 * cv.px + 0.02, BONE + 0.05 * texture)
        arch = (x - width / 2 - 0.02, cy)
        cv.paint(capsule(cv, arch, (arch[0] - 0.16, cy + 0.05), 0.03), BONE)  # spinous process
        centres[name] = (x, cy)
        y += height + GAP
        if name == "C4":
            bottom = y - GAP
    top = DENS_TOP - MARGIN
    tall = bottom + MARGIN - top
    box = (SPINE_X - tall / 4, top, SPINE_X + tall / 4, bottom + MARGIN)
    return box, centres


def render(stage: int, size: int, seed: int, index: int, noise: float = 0.04) -> PhantomImage:
    """Draw image ``index`` of stage ``stage`` (0-based); the same arguments, the same image."""
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(index,)))
    pose = Pose(
        rotation=float(rng.uniform(-12, 12)),
        scale=float(rng.uniform(0.85, 0.95)),
        shift=(float(rng.uniform(-0.06, 0.06)), float(rng.uniform(-0.08, 0.0))),
    )
    maturity = float(np.clip((stage + rng.normal(0, 1.2)) / 5, 0, 1))
    cv = Canvas(size, pose)
    draw_head(cv, rng, maturity)
    texture = smooth_noise(rng, size, max(4, size // 6))
    (x0, y0, x1, y1), centres = draw_spine(cv, rng, stage, texture)
    cv.img += 0.04 * smooth_noise(rng, size, 4) + rng.normal(0, noise, cv.img.shape)
    image = np.clip(np.rint(cv.img * 255), 0, 255).astype(np.uint8)
    cx, cy = cv.to_image((x0 + x1) / 2, (y0 + y1) / 2)
    half_w, half_h = (x1 - x0) * size / 4 * pose.scale, (y1 - y0) * size / 4 * pose.scale
    box = (cx - half_w, cy - half_h, cx + half_w, cy + half_h)
    return PhantomImage(
        image=image,
        stage=stage,
        box=tuple(round(v, 2) for v in box),
        angle=round(pose.rotation, 3),
        vertebrae={k: cv.to_image(*v) for k, v in centres.items()},
    )


def stage_order(n: int, seed: int) -> np.ndarray:
    """The 0-based stage of each of ``n`` images: as even a mix as ``n`` allows, shuffled."""
    stages = np.arange(n) % len(STAGES)
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(2**31,))).permutation(
        stages
    )
