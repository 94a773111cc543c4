"""The two views of a sample: the student's full image and the teacher's ROI crop.

Coordinates are continuous pixels, x to the right, y down; an image of width W and height H
covers ``[0, W] × [0, H]`` (pixel ``i`` spans ``[i, i + 1)``, its centre is ``i + 0.5``).
Geometric transforms are 3×3 (or 2×3) affine matrices mapping *source* pixels to
*destination* pixels; ROIs follow :mod:`kdtoolkit.data.geometry`. Every resampling (resize,
letterbox, ROI crop, augmentation) is one bilinear :func:`warp` of the decoded image (with an
antialiased pre-reduction when it shrinks), so an augmented view is sampled once, and the
teacher's crop, the student's image and the ROI mask all come from the same matrix.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from kdtoolkit.data.geometry import roi_corners
from kdtoolkit.errors import KdError

Box = tuple[float, float, float, float]
#: ITU-R BT.601 luma weights, used to turn RGB into grey.
LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
#: Gaussian mask width: sigma = GAUSSIAN_SIGMA × half-extent, per ROI axis (peak 1 at the centre).
GAUSSIAN_SIGMA = 0.5
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGENET_GREY_MEAN = (0.449,)
IMAGENET_GREY_STD = (0.226,)


# --------------------------------------------------------------------------- decoding


def _read_native(path: str | Path) -> np.ndarray:
    """Decode ``path`` into H×W×c (c = 1 or 3) uint8, uint16 or float32, without scaling."""
    try:
        with Image.open(path) as im:
            mode = im.mode
            if mode.startswith("I;16"):
                arr = np.asarray(im).astype(np.uint16)
            elif mode == "I":
                arr = np.asarray(im)
                if arr.size and (arr.min() < 0 or arr.max() > 65535):
                    raise KdError(
                        f"{path}: 32-bit integer image with values outside 0..65535 — save it "
                        "as 8- or 16-bit"
                    )
                arr = arr.astype(np.uint16)
            elif mode == "F":
                arr = np.clip(np.asarray(im, dtype=np.float32), 0.0, 1.0)
            elif mode in ("1", "L", "LA"):
                arr = np.asarray(im.convert("L"))
            else:
                arr = np.asarray(im.convert("RGB"))
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise KdError(f"{path}: unreadable image ({exc}) — use PNG, JPEG or TIFF") from None
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return np.ascontiguousarray(arr)


def _to_float(native: np.ndarray, channels: int) -> np.ndarray:
    """Scale by the dtype's maximum into [0, 1] float32; RGB becomes grey when
    ``channels == 1`` (grey stays single-channel here, see :func:`_expand`)."""
    if channels not in (1, 3):
        raise KdError(f"channels must be 1 or 3, got {channels}")
    if native.dtype == np.float32:
        out = native.astype(np.float32, copy=True)
    else:
        out = native.astype(np.float32) / np.float32(np.iinfo(native.dtype).max)
    if channels == 1 and out.shape[2] == 3:
        out = (out @ LUMA)[:, :, None]
    return np.ascontiguousarray(out)


def _expand(t: torch.Tensor, channels: int) -> torch.Tensor:
    """…×C×H×W with 1 channel → ``channels`` channels (grey → RGB repeats)."""
    if t.shape[-3] == channels:
        return t
    return t.expand(*t.shape[:-3], channels, *t.shape[-2:]).contiguous()


def load_image(path: str | Path, channels: int) -> np.ndarray:
    """Read a PNG/JPEG/TIFF (8- or 16-bit, grey or RGB) as float32 H×W×``channels`` in [0, 1].

    Integers are divided by their dtype's maximum (255 or 65535); RGB → grey uses BT.601
    luma; grey → RGB repeats the channel; alpha is dropped.
    """
    arr = _to_float(_read_native(path), channels)
    if arr.shape[2] != channels:
        arr = np.repeat(arr, channels, axis=2)
    return arr


# --------------------------------------------------------------------------- warping


def _as3x3(matrix: np.ndarray) -> np.ndarray:
    m = np.asarray(matrix, dtype=np.float64)
    if m.shape == (3, 3):
        return m
    if m.shape == (2, 3):
        return np.vstack([m, [0.0, 0.0, 1.0]])
    raise ValueError(f"affine matrix must be 2×3 or 3×3, got {m.shape}")


def transform_points(points: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Apply an affine matrix (2×3 or 3×3) to points of shape (..., 2)."""
    m = _as3x3(matrix)
    p = np.asarray(points, dtype=np.float64)
    return p @ m[:2, :2].T + m[:2, 2]


#: Downsampling by more than this (source pixels per output pixel) is antialiased.
ANTIALIAS_STEP = 1.25


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
    inv = torch.from_numpy(np.linalg.inv(np.stack([_as3x3(m) for m in matrices])))
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
    resampling of every view, one sample (:func:`warp`) or a batch on the device
    (:mod:`kdtoolkit.data.bank`)."""
    out = stack.new_zeros((len(rows), stack.shape[1], int(size[0]), int(size[1])))
    direct: list[int] = []
    for j, (row, (height, width), matrix) in enumerate(zip(rows, sizes, matrices, strict=True)):
        matrix = _as3x3(matrix)
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


def _warp(src: torch.Tensor, matrix: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """:func:`warp_stack` of one C×H×W image."""
    return warp_stack(src[None], [0], [tuple(src.shape[-2:])], [matrix], size)[0]


def _tensor(image: np.ndarray) -> torch.Tensor:
    arr = np.asarray(image, dtype=np.float32)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


def _array(t: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(t.permute(1, 2, 0).cpu().numpy())


def warp(image: np.ndarray, matrix: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resample H×W×C ``image`` through ``matrix`` (source → destination pixels) into an
    h×w×C image, ``size = (h, w)``; bilinear, zeros outside the source."""
    return _array(_warp(_tensor(image), matrix, size))


# --------------------------------------------------------------------------- teacher view


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


def crop_roi(image: np.ndarray, box: Box, angle: float, size: tuple[int, int]) -> np.ndarray:
    """The teacher's view: the ROI ``box`` rotated by ``angle`` (kdtoolkit.data.geometry
    convention), sampled in its own frame (so the ROI comes out axis-aligned) and resized to
    ``size = (h, w)`` in one bilinear sampling. The single definition of the crop geometry,
    for expert boxes and detected ones (angle 0) alike."""
    return warp(image, roi_matrix(roi_corners(box, angle), size), size)


# --------------------------------------------------------------------------- student view


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


def letterbox(
    image: np.ndarray, size: tuple[int, int]
) -> tuple[np.ndarray, float, tuple[float, float]]:
    """Resize H×W×C ``image`` into ``size = (h, w)`` keeping its aspect ratio, zero-padded
    on both sides; returns ``(image, scale, (pad_x, pad_y))`` for :func:`map_points`."""
    matrix, scale, pad = letterbox_matrix(image.shape[:2], size)
    return warp(image, matrix, size), scale, pad


def map_points(
    points: np.ndarray, scale: float, pad: tuple[float, float], inverse: bool = False
) -> np.ndarray:
    """Original-image points (..., 2) as (x, y) → letterboxed pixels (``p·scale + pad``);
    ``inverse=True`` maps letterboxed pixels back."""
    p = np.asarray(points, dtype=np.float64)
    offset = np.asarray(pad, dtype=np.float64)
    return (p - offset) / scale if inverse else p * scale + offset


def resize_matrix(source: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
    """Matrix stretching a ``source = (H, W)`` image to ``size = (h, w)``."""
    return np.diag([size[1] / source[1], size[0] / source[0], 1.0])


# --------------------------------------------------------------------------- masks


def roi_masks(corners: torch.Tensor, size: tuple[int, int], kind: str = "box") -> torch.Tensor:
    """ROI masks, float32 B×H×W, for B parallelograms ``corners`` (B×4×2: top-left,
    top-right, bottom-right, bottom-left) in the mask's pixels; computed in float64 on
    ``corners``' device. A degenerate ROI (no area) gives an empty mask. See
    :func:`roi_mask` for the two kinds."""
    if kind not in ("box", "gaussian"):
        raise KdError(f"unknown mask kind '{kind}' — use 'box' or 'gaussian'")
    c = corners.to(torch.float64)
    h, w = int(size[0]), int(size[1])
    frame = torch.stack([(c[:, 1] - c[:, 0]) / 2, (c[:, 3] - c[:, 0]) / 2], dim=2)  # B×2×2
    flat = torch.linalg.det(frame).abs() < 1e-12
    eye = torch.eye(2, dtype=torch.float64, device=c.device)
    inv = torch.linalg.inv(torch.where(flat[:, None, None], eye, frame))
    centre = c.mean(dim=1)
    dx = (torch.arange(w, dtype=torch.float64, device=c.device) + 0.5)[None, None, :]
    dy = (torch.arange(h, dtype=torch.float64, device=c.device) + 0.5)[None, :, None]
    dx, dy = dx - centre[:, 0, None, None], dy - centre[:, 1, None, None]
    u = inv[:, 0, 0, None, None] * dx + inv[:, 0, 1, None, None] * dy
    v = inv[:, 1, 0, None, None] * dx + inv[:, 1, 1, None, None] * dy
    if kind == "box":
        mask = (torch.maximum(u.abs(), v.abs()) <= 1.0).to(torch.float32)
    else:
        mask = torch.exp(-(u**2 + v**2) / (2 * GAUSSIAN_SIGMA**2)).to(torch.float32)
    return mask.masked_fill(flat[:, None, None], 0.0)


def roi_mask(
    roi: np.ndarray | Sequence[float],
    size: tuple[int, int],
    kind: str = "box",
    angle: float = 0.0,
) -> np.ndarray:
    """ROI mask, float32 of ``size = (H, W)``, in the pixels the ROI is given in.

    ``roi`` is 4 corners (4×2: top-left, top-right, bottom-right, bottom-left — any
    parallelogram, e.g. an ROI after augmentation) or a box ``x0, y0, x1, y1`` rotated by
    ``angle``. With ROI-frame coordinates ``u, v`` in [−1, 1] across the ROI:
    ``kind="box"`` is 1 on pixel centres inside (a filled rotated rectangle), 0 elsewhere;
    ``kind="gaussian"`` is ``exp(−(u² + v²) / (2σ²))`` with σ = 0.5, i.e. a separable
    Gaussian in the ROI's own frame with sigma = half-extent / 2 on each axis, peak 1 at the
    centre (≈0.14 at the edge midpoints).
    """
    corners = np.asarray(roi, dtype=np.float64)
    if corners.shape == (4,):
        corners = roi_corners(tuple(corners), angle)
    if corners.shape != (4, 2):
        raise ValueError(f"roi must be 4 corners (4×2) or a box of 4 numbers, got {corners.shape}")
    return roi_masks(torch.from_numpy(corners)[None], size, kind)[0].numpy()


def masks_and_boxes(
    corners: Sequence[np.ndarray | None], size: tuple[int, int], kind: str, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """The student-view ``mask`` (B×1×H×W, on ``device``) and ``box`` (B×4, CPU: the
    axis-aligned box around the ROI, clipped to the input) of B ROIs given as corners in
    student-input pixels; ``None`` (no ROI) gives an all-ones mask and the whole input."""
    h, w = size
    masks = torch.ones((len(corners), 1, h, w), device=device)
    boxes = torch.tensor([[0.0, 0.0, w, h]] * len(corners), dtype=torch.float32)
    known = [j for j, c in enumerate(corners) if c is not None]
    if known:
        stacked = np.stack([corners[j] for j in known])
        masks[known, 0] = roi_masks(torch.from_numpy(stacked).to(device), size, kind)
        lo = np.clip(stacked.min(axis=1), 0, [w, h])
        hi = np.clip(stacked.max(axis=1), 0, [w, h])
        boxes[known] = torch.from_numpy(np.concatenate([lo, hi], axis=1).astype(np.float32))
    return masks, boxes


# --------------------------------------------------------------------------- augmentation


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
    if np.linalg.det(_as3x3(matrix)[:2, :2]) < 0:
        p = p[[1, 0, 3, 2]]  # mirrored: the ROI's left and right swap
    edge = p[1] - p[0]
    width = float(np.hypot(*edge))
    height = float(np.hypot(*(p[3] - p[0])))
    new_angle = math.degrees(math.atan2(-edge[1], edge[0]))
    cx, cy = p.mean(axis=0)
    return (cx - width / 2, cy - height / 2, cx + width / 2, cy + height / 2), new_angle


@dataclass(frozen=True)
class _Jitter:
    gamma: float
    gain: float
    bias: float
    noise: float


def _draw_jitter(rng: np.random.Generator, cfg: ViewConfig) -> _Jitter:
    g, c, b = rng.random(3)
    return _Jitter(
        gamma=math.exp((2 * g - 1) * cfg.gamma),
        gain=1.0 + (2 * c - 1) * cfg.contrast,
        bias=(2 * b - 1) * cfg.brightness,
        noise=cfg.noise,
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
    jitters: Sequence[_Jitter], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(gamma, gain, bias) of a batch's jitters as (B,) tensors on ``device``."""
    values = torch.tensor([(j.gamma, j.gain, j.bias) for j in jitters], dtype=torch.float32)
    return tuple(values.to(device).unbind(1))  # type: ignore[return-value]


def _jitter_one(t: torch.Tensor, jitter: _Jitter, rng: np.random.Generator) -> torch.Tensor:
    """:func:`apply_jitter` of one C×H×W view, its noise drawn from the sample's ``rng``."""
    noise = None
    if jitter.noise > 0:
        draw = rng.standard_normal(tuple(t.shape), dtype=np.float32) * np.float32(jitter.noise)
        noise = torch.from_numpy(draw).to(t.device)[None]
    return apply_jitter(t[None], *jitter_tensors([jitter], t.device), noise)[0]


@dataclass
class ViewPlan:
    """How one sample's views are sampled: matrices from source pixels to the student input
    (``image``) and to the teacher crop (``crop``, whose source is the expert crop file when
    ``crop_from_file``, else the full image), the mask ROI's ``corners`` in student-input
    pixels (None: no ROI), and the intensity ``jitter`` with the generator ``rng`` the
    per-sample noise comes from (both None in evaluation)."""

    image: np.ndarray
    crop: np.ndarray
    crop_from_file: bool
    corners: np.ndarray | None
    jitter: _Jitter | None
    rng: np.random.Generator | None


def plan_views(
    sample: Any,
    source: tuple[int, int],
    crop_source: tuple[int, int] | None,
    cfg: ViewConfig,
    rng: np.random.Generator | None,
    roi: tuple[Box | None, float],
) -> ViewPlan:
    """The :class:`ViewPlan` of ``sample`` (a full image of ``source = (H, W)``, an expert
    crop file of ``crop_source`` or None) with the mask ROI ``roi = (box, angle)`` in
    full-image pixels. With ``rng`` (training) it draws the augmentation (see
    :class:`KdDataset`); without, it plans the plain evaluation views."""
    if rng is not None:
        aug = _as3x3(random_affine(rng, source, cfg.flip_p, cfg.degrees, cfg.scale, cfg.translate))
        jitter: _Jitter | None = _draw_jitter(rng, cfg)
    else:
        aug, jitter = np.eye(3), None
    image = student_matrix(source, cfg) @ aug
    if crop_source is not None:
        crop = resize_matrix(crop_source, cfg.crop_size)
        if np.linalg.det(aug[:2, :2]) < 0:
            crop = np.array([[-1.0, 0, cfg.crop_size[1]], [0, 1, 0], [0, 0, 1]]) @ crop
    elif sample.box is None:
        crop = resize_matrix(source, cfg.crop_size) @ aug
    elif jitter is None:  # evaluation: exactly crop_view / crop_roi
        crop = roi_matrix(roi_corners(sample.box, sample.angle), cfg.crop_size)
    else:
        box, angle = transform_roi(sample.box, sample.angle, aug)
        crop = roi_matrix(roi_corners(box, angle), cfg.crop_size) @ aug
    corners = None
    if roi[0] is not None:
        corners = transform_points(roi_corners(tuple(roi[0]), float(roi[1])), image)
    return ViewPlan(image, crop, crop_source is not None, corners, jitter, rng)


# --------------------------------------------------------------------------- config


@dataclass(frozen=True)
class ViewConfig:
    """How samples become tensors.

    ``image_size``/``crop_size`` are (h, w) of the student input and the teacher crop;
    ``letterbox`` keeps the full image's aspect ratio (zero padding) instead of stretching;
    ``mean``/``std`` normalise each channel (one value applies to all; default ImageNet's,
    averaged over channels when ``channels == 1``); ``mask`` is the ROI mask kind.
    Augmentation (training only): ``flip_p`` horizontal flip probability, ``degrees`` max
    rotation, ``scale`` zoom range, ``translate`` max shift as a fraction of
    the image size; intensity: ``brightness`` (± added), ``contrast`` (± relative gain),
    ``gamma`` (exponent in exp(±gamma)), ``noise`` (Gaussian std), all on [0, 1] pixels.
    """

    image_size: tuple[int, int] = (224, 224)
    crop_size: tuple[int, int] = (224, 224)
    channels: int = 3
    letterbox: bool = True
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    mask: str = "box"
    flip_p: float = 0.5
    degrees: float = 10.0
    scale: tuple[float, float] = (0.9, 1.1)
    translate: float = 0.05
    brightness: float = 0.1
    contrast: float = 0.1
    gamma: float = 0.1
    noise: float = 0.01

    def __post_init__(self) -> None:
        grey = self.channels == 1
        if self.mean is None:
            object.__setattr__(self, "mean", IMAGENET_GREY_MEAN if grey else IMAGENET_MEAN)
        if self.std is None:
            object.__setattr__(self, "std", IMAGENET_GREY_STD if grey else IMAGENET_STD)
        for name in ("image_size", "crop_size", "mean", "std", "scale"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        problems = []
        for name in ("image_size", "crop_size"):
            value = getattr(self, name)
            if len(value) != 2 or any(int(v) != v or v < 1 for v in value):
                problems.append(f"{name} must be two positive integers (h, w), got {value}")
        if self.channels not in (1, 3):
            problems.append(f"channels must be 1 or 3, got {self.channels}")
        for name in ("mean", "std"):
            if len(getattr(self, name)) not in (1, self.channels):
                count = "1 value" if self.channels == 1 else f"1 or {self.channels} values"
                problems.append(
                    f"{name} needs {count} for {self.channels} channels, got {getattr(self, name)}"
                )
        if any(s <= 0 for s in self.std):
            problems.append(f"std must be positive, got {self.std}")
        if self.mask not in ("box", "gaussian"):
            problems.append(f"mask must be 'box' or 'gaussian', got '{self.mask}'")
        if not 0.0 <= self.flip_p <= 1.0:
            problems.append(f"flip_p must be in [0, 1], got {self.flip_p}")
        if len(self.scale) != 2 or not 0 < self.scale[0] <= self.scale[1]:
            problems.append(f"scale must be (low, high) with 0 < low <= high, got {self.scale}")
        for name in ("degrees", "translate", "brightness", "contrast", "gamma", "noise"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must be >= 0, got {getattr(self, name)}")
        if problems:
            raise KdError("\n".join(f"view config: {p}" for p in problems))


def _normalise(t: torch.Tensor, cfg: ViewConfig) -> torch.Tensor:
    """A [0, 1] view (…×C×H×W: one, or a batch) expanded to ``cfg.channels`` and
    standardised with ``cfg.mean``/``cfg.std``."""
    t = _expand(t, cfg.channels)
    mean = torch.tensor(cfg.mean, dtype=torch.float32, device=t.device).view(-1, 1, 1)
    std = torch.tensor(cfg.std, dtype=torch.float32, device=t.device).view(-1, 1, 1)
    return ((t - mean) / std).contiguous()


def normalise(image: np.ndarray | torch.Tensor, cfg: ViewConfig) -> torch.Tensor:
    """A [0, 1] view (H×W×C array, e.g. from :func:`crop_roi`, or a C×H×W tensor) as the
    normalised C×H×W tensor a model takes (grey is repeated when ``cfg.channels == 3``)."""
    t = image if isinstance(image, torch.Tensor) else _tensor(image)
    if t.shape[0] not in (1, cfg.channels):
        raise KdError(f"image has {t.shape[0]} channels, the view config {cfg.channels}")
    return _normalise(t.float(), cfg)


def student_matrix(source: tuple[int, int], cfg: ViewConfig) -> np.ndarray:
    """Matrix from a ``source = (H, W)`` image's pixels to student-input pixels (letterbox or
    stretch, per ``cfg.letterbox``); map Grad-CAM maps back with its inverse."""
    if cfg.letterbox:
        return letterbox_matrix(source, cfg.image_size)[0]
    return resize_matrix(source, cfg.image_size)


def _source(image: np.ndarray | str | Path, channels: int) -> torch.Tensor:
    if isinstance(image, str | Path):
        return _tensor(_to_float(_read_native(image), channels))
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3):
        raise KdError(f"expected an H×W, H×W×1 or H×W×3 image, got shape {arr.shape}")
    if arr.dtype in (np.uint8, np.uint16):
        arr = _to_float(arr, channels)
    else:
        arr = arr.astype(np.float32)
        if channels == 1 and arr.shape[2] == 3:
            arr = arr @ LUMA
    return _tensor(arr)


def student_view(image: np.ndarray | str | Path, cfg: ViewConfig) -> torch.Tensor:
    """Student input (C×H×W, normalised) for a raw image: a path, or an array as from
    :func:`load_image` (float in [0, 1], or uint8/uint16). Identical to the evaluation-mode
    ``image`` of :class:`KdDataset`."""
    src = _source(image, cfg.channels)
    matrix = student_matrix(tuple(src.shape[-2:]), cfg)
    return _normalise(_warp(src, matrix, cfg.image_size), cfg)


def crop_view(
    image: np.ndarray | str | Path, box: Box, angle: float, cfg: ViewConfig
) -> torch.Tensor:
    """Teacher input (C×h×w, normalised): :func:`crop_roi` of a raw image, e.g. on a detected
    box for the two-stage baseline. Identical to the evaluation-mode ``crop`` of
    :class:`KdDataset` for that ROI."""
    src = _source(image, cfg.channels)
    matrix = roi_matrix(roi_corners(box, angle), cfg.crop_size)
    return _normalise(_warp(src, matrix, cfg.crop_size), cfg)


# --------------------------------------------------------------------------- dataset


class KdDataset(Dataset):
    """Samples as tensors for teacher, student and baselines.

    ``samples`` is the whole manifest; the dataset serves ``samples[i] for i in indices``.
    Each item is a dict:

    - ``image`` C×H×W: the full image, letterboxed/resized to ``cfg.image_size``, normalised;
    - ``crop`` C×h×w: the teacher view of the same sample, cut with :func:`roi_matrix` from
      the same augmented full-resolution image with the transformed expert ROI (a similarity
      augmentation thus only shows in the crop as a mirror), or the expert ``crop`` file
      stretched to ``cfg.crop_size`` with only the flip and intensity jitter;
    - ``mask`` 1×H×W: ROI mask in student-input pixels from ``mask_rois[sample.index]``
      (``(box, angle)`` in full-image pixels, e.g. a detector's) when given, else the expert
      ROI, transformed like the image;
    - ``box`` (4,): axis-aligned box around that transformed ROI, student-input pixels,
      clipped to the input;
    - ``label``, ``index`` (long): class and manifest index.

    A sample without an ROI (no box, none in ``mask_rois``) gets an all-ones mask and the
    whole input as its box; without a box or crop file its teacher crop is the whole image
    stretched to ``crop_size``.
    ``train=True`` applies the random geometric and intensity augmentation of ``cfg``,
    deterministic given ``seed``, the epoch (:meth:`set_epoch`; call it before creating the
    DataLoader iterator, and do not use persistent workers) and the sample's index; evaluation
    mode applies none. ``views`` limits the work: ``"image"`` (image, mask, box) and/or
    ``"crop"``. Decoded images are cached in memory (native dtype; share ``cache`` between
    datasets of a run; :meth:`preload` fills it before forking DataLoader workers).
    """

    def __init__(
        self,
        samples: Sequence[Any],
        indices: Sequence[int] | np.ndarray,
        cfg: ViewConfig,
        train: bool,
        seed: int,
        mask_rois: Mapping[int, tuple[Box | None, float]] | None = None,
        *,
        views: Sequence[str] = ("image", "crop"),
        cache: dict[Path, np.ndarray] | None = None,
    ) -> None:
        unknown = set(views) - {"image", "crop"}
        if unknown or not views:
            raise ValueError(f"views must be 'image' and/or 'crop', got {tuple(views)}")
        self.samples = samples
        self.indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        self.cfg = cfg
        self.train = bool(train)
        self.seed = int(seed)
        self.mask_rois = mask_rois
        self.views = tuple(views)
        self.cache: dict[Path, np.ndarray] = {} if cache is None else cache
        self.epoch = 0

    @property
    def labels(self) -> np.ndarray:
        """Class index of each item, in item order."""
        return np.array([self.samples[i].label for i in self.indices], dtype=np.int64)

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation draw of ``epoch``."""
        self.epoch = int(epoch)

    def preload(self) -> None:
        """Decode every image (and crop file) this dataset uses into the cache."""
        for i in self.indices:
            sample = self.samples[i]
            self._native(sample.image)
            if sample.crop is not None and "crop" in self.views:
                self._native(sample.crop)

    def _native(self, path: Path) -> np.ndarray:
        arr = self.cache.get(path)
        if arr is None:
            arr = self.cache[path] = _read_native(path)
        return arr

    def __len__(self) -> int:
        return len(self.indices)

    def roi(self, index: int) -> tuple[Box | None, float]:
        """The mask ROI of sample ``index``: from ``mask_rois`` when given, else expert."""
        if self.mask_rois is not None and index in self.mask_rois:
            return self.mask_rois[index]
        sample = self.samples[index]
        return sample.box, sample.angle

    def rng(self, index: int) -> np.random.Generator | None:
        """The augmentation generator of sample ``index`` this epoch (None in evaluation)."""
        return np.random.default_rng([self.seed, self.epoch, index]) if self.train else None

    def __getitem__(self, item: int) -> dict[str, torch.Tensor]:
        index = int(self.indices[item])
        sample = self.samples[index]
        cfg = self.cfg
        src = _tensor(_to_float(self._native(sample.image), cfg.channels))
        crop_src = None
        if sample.crop is not None and "crop" in self.views:
            crop_src = _tensor(_to_float(self._native(sample.crop), cfg.channels))
        plan = plan_views(
            sample,
            (src.shape[-2], src.shape[-1]),
            None if crop_src is None else (crop_src.shape[-2], crop_src.shape[-1]),
            cfg,
            self.rng(index),
            self.roi(index),
        )
        out: dict[str, torch.Tensor] = {}
        if "image" in self.views:
            image = _warp(src, plan.image, cfg.image_size)
            if plan.jitter is not None:
                image = _jitter_one(image, plan.jitter, plan.rng)
            out["image"] = _normalise(image, cfg)
            mask, box = masks_and_boxes([plan.corners], cfg.image_size, cfg.mask, src.device)
            out["mask"], out["box"] = mask[0], box[0]
        if "crop" in self.views:
            crop = _warp(src if crop_src is None else crop_src, plan.crop, cfg.crop_size)
            if plan.jitter is not None:
                crop = _jitter_one(crop, plan.jitter, plan.rng)
            out["crop"] = _normalise(crop, cfg)
        out["label"] = torch.tensor(sample.label, dtype=torch.long)
        out["index"] = torch.tensor(index, dtype=torch.long)
        return out
