"""Training augmentation: a random similarity (flip, rotation, zoom, shift) applied to the
sampling matrices, a jitter of the teacher's crop box (shift, size, angle: a detector's
errors), and an intensity jitter (gamma, contrast, brightness, noise) on pixels.

Every draw comes from the sample's generator in a fixed order (affine: 5 variates; jitter:
3 variates; crop-box jitter, when on and the crop is cut from the full image: 5 variates;
then the pixel noise of each view), so a seed reproduces the views exactly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from kdtoolkit.data.affine import as3x3, transform_points
from kdtoolkit.data.geometry import Box, roi_axes, roi_corners


def random_affine(
    rng: np.random.Generator,
    size: tuple[int, int],
    flip_p: float = 0.0,
    degrees: float = 0.0,
    scale: tuple[float, float] = (1.0, 1.0),
    translate: float = 0.0,
) -> np.ndarray:
    """A random 2×3 source → destination matrix for an image of ``size = (H, W)``: horizontal
    flip with probability ``flip_p``, rotation by U(−degrees, degrees) (counter-clockwise on
    screen, as ROI angles), scale U(scale) about the image centre, then a shift of
    U(−translate, translate) × W (and × H). Always draws the same number of variates."""
    height, width = size
    flip, theta, zoom, tx, ty = rng.random(5)
    a = math.radians((2 * theta - 1) * degrees)
    s = scale[0] + zoom * (scale[1] - scale[0])
    c, sn = math.cos(a) * s, math.sin(a) * s
    mirror = -1.0 if flip < flip_p else 1.0
    cx, cy = width / 2.0, height / 2.0
    shift = ((2 * tx - 1) * translate * width, (2 * ty - 1) * translate * height)
    # destination = centre + shift + R·S·Flip·(source − centre); R rotates offsets like geometry
    linear = np.array([[c, sn], [-sn, c]]) @ np.diag([mirror, 1.0])
    offset = np.array([cx + shift[0], cy + shift[1]]) - linear @ np.array([cx, cy])
    return np.hstack([linear, offset[:, None]])


def transform_roi(box: Box, angle: float, matrix: np.ndarray) -> tuple[Box, float]:
    """The ROI ``(box, angle)`` after a similarity transform (rotation, uniform scale,
    translation, flip): new centre, size and angle. A flip mirrors the ROI, so its angle is
    mirrored too (a horizontal flip turns ``angle`` into ``−angle``)."""
    p = transform_points(roi_corners(box, angle), matrix)
    if np.linalg.det(as3x3(matrix)[:2, :2]) < 0:
        p = p[[1, 0, 3, 2]]  # mirrored: the ROI's left and right swap
    edge = p[1] - p[0]
    width = float(np.hypot(*edge))
    height = float(np.hypot(*(p[3] - p[0])))
    new_angle = math.degrees(math.atan2(-edge[1], edge[0]))
    cx, cy = p.mean(axis=0)
    return (cx - width / 2, cy - height / 2, cx + width / 2, cy + height / 2), new_angle


def jitter_roi(
    rng: np.random.Generator,
    box: Box,
    angle: float,
    shift: tuple[float, float],
    scale: float,
    degrees: float,
) -> tuple[Box, float]:
    """The ROI ``(box, angle)`` moved as a detector's box may be: its centre by U(±shift[0])
    of its width along its own axis and U(±shift[1]) of its height across it, each side
    scaled by U(1 ± scale), the angle turned by U(±degrees). Always draws 5 variates."""
    u = 2 * rng.random(5) - 1
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    dx, dy = u[0] * shift[0] * w, u[1] * shift[1] * h  # in the ROI's own frame
    along, across = roi_axes(angle)
    cx, cy = np.array([(x0 + x1) / 2, (y0 + y1) / 2]) + dx * along + dy * across
    hw, hh = w * (1 + u[2] * scale) / 2, h * (1 + u[3] * scale) / 2
    return (cx - hw, cy - hh, cx + hw, cy + hh), angle + u[4] * degrees


@dataclass(frozen=True)
class Jitter:
    """One sample's intensity jitter: ``gamma`` exponent, contrast ``gain``, brightness
    ``bias`` and the std of its additive Gaussian ``noise`` (0: none)."""

    gamma: float
    gain: float
    bias: float
    noise: float


def draw_jitter(
    rng: np.random.Generator, brightness: float, contrast: float, gamma: float, noise: float
) -> Jitter:
    """A random :class:`Jitter`: exponent exp(U(−gamma, gamma)), gain 1 + U(−contrast,
    contrast), bias U(−brightness, brightness); always draws 3 variates (0 turns one off)."""
    g, c, b = rng.random(3)
    return Jitter(
        gamma=math.exp((2 * g - 1) * gamma),
        gain=1.0 + (2 * c - 1) * contrast,
        bias=(2 * b - 1) * brightness,
        noise=noise,
    )


def apply_jitter(
    t: torch.Tensor,
    gamma: torch.Tensor,
    gain: torch.Tensor,
    bias: torch.Tensor,
    noise: torch.Tensor | None,
) -> torch.Tensor:
    """Pixels only, on a B×C×H×W batch in [0, 1] with per-sample (B,) ``gamma`` (exponent),
    ``gain`` (contrast) and ``bias`` (brightness), plus additive ``noise`` (B×C×H×W or
    None); clipped to [0, 1]."""
    shape = (-1, 1, 1, 1)
    t = t.clamp(0.0, 1.0) ** gamma.view(shape) * gain.view(shape) + bias.view(shape)
    if noise is not None:
        t = t + noise
    return t.clamp(0.0, 1.0)


def jitter_tensors(
    jitters: Sequence[Jitter], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(gamma, gain, bias) of a batch's jitters as (B,) tensors on ``device``."""
    values = torch.tensor([(j.gamma, j.gain, j.bias) for j in jitters], dtype=torch.float32)
    return tuple(values.to(device).unbind(1))  # type: ignore[return-value]


def jitter_view(t: torch.Tensor, jitter: Jitter, rng: np.random.Generator) -> torch.Tensor:
    """:func:`apply_jitter` of one C×H×W view, its noise drawn from the sample's ``rng``."""
    noise = None
    if jitter.noise > 0:
        draw = rng.standard_normal(tuple(t.shape), dtype=np.float32) * np.float32(jitter.noise)
        noise = torch.from_numpy(draw).to(t.device)[None]
    return apply_jitter(t[None], *jitter_tensors([jitter], t.device), noise)[0]
