"""The two views of a sample: the student's full image and the teacher's ROI crop.

:class:`ViewConfig` says how samples become tensors; :func:`plan_views` gives the matrices of
one sample's views (augmented in training), so the teacher's crop, the student's image and
the ROI mask all come from one sampling (:mod:`kdtoolkit.data.warp`) of the decoded image.
ROIs follow :mod:`kdtoolkit.data.geometry`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from kdtoolkit.data.affine import (
    as3x3,
    letterbox_matrix,
    resize_matrix,
    roi_matrix,
    transform_points,
)
from kdtoolkit.data.augment import Jitter, draw_jitter, jitter_roi, random_affine, transform_roi
from kdtoolkit.data.geometry import Box, roi_corners
from kdtoolkit.data.imageio import expand_channels, image_tensor, to_tensor
from kdtoolkit.data.warp import warp, warp_tensor
from kdtoolkit.errors import KdError

if TYPE_CHECKING:
    from kdtoolkit.config.recipe import Recipe

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGENET_GREY_MEAN = (0.449,)
IMAGENET_GREY_STD = (0.226,)


@dataclass(frozen=True)
class ViewConfig:
    """How samples become tensors.

    ``image_size``/``crop_size`` are (h, w) of the student input and the teacher crop;
    ``letterbox`` keeps the full image's aspect ratio (zero padding) instead of stretching;
    ``mean``/``std`` normalise each channel (one value applies to all; default ImageNet's,
    averaged over channels when ``channels == 1``); ``mask`` is the ROI mask kind.
    Augmentation (training only): ``flip_p`` horizontal flip probability, ``degrees`` max
    rotation, ``scale`` zoom range, ``translate`` max shift as a fraction of
    the image size; the teacher's crop box: ``roi_shift`` (± fraction of its width along it
    and of its height across it), ``roi_scale`` (± relative size of each side),
    ``roi_degrees`` (± angle), see :func:`~kdtoolkit.data.augment.jitter_roi`; intensity:
    ``brightness`` (± added), ``contrast`` (± relative gain), ``gamma`` (exponent in
    exp(±gamma)), ``noise`` (Gaussian std), all on [0, 1] pixels; 0 turns each off.
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
    roi_shift: tuple[float, float] | float = (0.0, 0.0)
    roi_scale: float = 0.0
    roi_degrees: float = 0.0
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
        if isinstance(self.roi_shift, int | float):  # one fraction: along and across
            object.__setattr__(self, "roi_shift", (self.roi_shift, self.roi_shift))
        for name in ("image_size", "crop_size", "mean", "std", "scale", "roi_shift"):
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
        if len(self.roi_shift) != 2 or min(self.roi_shift) < 0:
            problems.append(f"roi_shift must be (along, across) >= 0, got {self.roi_shift}")
        if not 0 <= self.roi_scale < 1:
            problems.append(f"roi_scale must be in [0, 1), got {self.roi_scale}")
        nonnegative = (
            "degrees",
            "translate",
            "roi_degrees",
            "brightness",
            "contrast",
            "gamma",
            "noise",
        )
        for name in nonnegative:
            if getattr(self, name) < 0:
                problems.append(f"{name} must be >= 0, got {getattr(self, name)}")
        if problems:
            raise KdError("\n".join(f"view config: {p}" for p in problems))


def view_config(recipe: Recipe) -> ViewConfig:
    """The :class:`ViewConfig` of a recipe: its ``data`` sizes and channels, ``roi.mask``
    and every ``augment`` key (``augment.scale = s`` is the zoom range ``(1 − s, 1 + s)``;
    one ``augment.roi_shift`` applies along and across)."""
    a = recipe.augment
    return ViewConfig(
        image_size=recipe.size("image"),
        crop_size=recipe.size("crop"),
        channels=recipe.data.channels,
        letterbox=recipe.data.letterbox,
        mask=recipe.roi.mask,
        flip_p=a.flip_p,
        degrees=a.degrees,
        scale=(1 - a.scale, 1 + a.scale),
        translate=a.translate,
        roi_shift=a.roi_shift,
        roi_scale=a.roi_scale,
        roi_degrees=a.roi_degrees,
        brightness=a.brightness,
        contrast=a.contrast,
        gamma=a.gamma,
        noise=a.noise,
    )


def normalise_views(t: torch.Tensor, cfg: ViewConfig) -> torch.Tensor:
    """[0, 1] views (…×C×H×W: one, or a batch) expanded to ``cfg.channels`` and
    standardised with ``cfg.mean``/``cfg.std``."""
    t = expand_channels(t, cfg.channels)
    mean = torch.tensor(cfg.mean, dtype=torch.float32, device=t.device).view(-1, 1, 1)
    std = torch.tensor(cfg.std, dtype=torch.float32, device=t.device).view(-1, 1, 1)
    return ((t - mean) / std).contiguous()


def normalise(image: np.ndarray | torch.Tensor, cfg: ViewConfig) -> torch.Tensor:
    """A [0, 1] view (H×W×C array, e.g. from :func:`crop_roi`, or a C×H×W tensor) as the
    normalised C×H×W tensor a model takes (grey is repeated when ``cfg.channels == 3``)."""
    t = image if isinstance(image, torch.Tensor) else to_tensor(image)
    if t.shape[0] not in (1, cfg.channels):
        raise KdError(f"image has {t.shape[0]} channels, the view config {cfg.channels}")
    return normalise_views(t.float(), cfg)


def student_matrix(source: tuple[int, int], cfg: ViewConfig) -> np.ndarray:
    """Matrix from a ``source = (H, W)`` image's pixels to student-input pixels (letterbox or
    stretch, per ``cfg.letterbox``); map Grad-CAM maps back with its inverse."""
    if cfg.letterbox:
        return letterbox_matrix(source, cfg.image_size)[0]
    return resize_matrix(source, cfg.image_size)


def student_view(image: np.ndarray | str | Path, cfg: ViewConfig) -> torch.Tensor:
    """Student input (C×H×W, normalised) for a raw image: a path, or an array as from
    :func:`kdtoolkit.data.imageio.load_image` (float in [0, 1], or uint8/uint16). Identical
    to the evaluation-mode ``image`` of :class:`kdtoolkit.data.dataset.KdDataset`."""
    src = image_tensor(image, cfg.channels)
    matrix = student_matrix(tuple(src.shape[-2:]), cfg)
    return normalise_views(warp_tensor(src, matrix, cfg.image_size), cfg)


def crop_roi(image: np.ndarray, box: Box, angle: float, size: tuple[int, int]) -> np.ndarray:
    """The teacher's view: the ROI ``box`` rotated by ``angle`` (kdtoolkit.data.geometry
    convention), sampled in its own frame (so the ROI comes out axis-aligned) and resized to
    ``size = (h, w)`` in one bilinear sampling. The single definition of the crop geometry,
    for expert boxes and detected ones (angle 0) alike; ``normalise(crop_roi(...), cfg)``
    equals the evaluation-mode ``crop`` of :class:`kdtoolkit.data.dataset.KdDataset`."""
    return warp(image, roi_matrix(roi_corners(box, angle), size), size)


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
    jitter: Jitter | None
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
    :class:`kdtoolkit.data.dataset.KdDataset`); without, it plans the plain evaluation views."""
    if rng is not None:
        aug = as3x3(random_affine(rng, source, cfg.flip_p, cfg.degrees, cfg.scale, cfg.translate))
        jitter: Jitter | None = draw_jitter(rng, cfg.brightness, cfg.contrast, cfg.gamma, cfg.noise)
    else:
        aug, jitter = np.eye(3), None
    image = student_matrix(source, cfg) @ aug
    if crop_source is not None:
        crop = resize_matrix(crop_source, cfg.crop_size)
        if np.linalg.det(aug[:2, :2]) < 0:
            crop = np.array([[-1.0, 0, cfg.crop_size[1]], [0, 1, 0], [0, 0, 1]]) @ crop
    elif sample.box is None:
        crop = resize_matrix(source, cfg.crop_size) @ aug
    elif jitter is None:  # evaluation: exactly crop_roi
        crop = roi_matrix(roi_corners(sample.box, sample.angle), cfg.crop_size)
    else:
        box, angle = transform_roi(sample.box, sample.angle, aug)
        if any(cfg.roi_shift) or cfg.roi_scale or cfg.roi_degrees:
            box, angle = jitter_roi(rng, box, angle, cfg.roi_shift, cfg.roi_scale, cfg.roi_degrees)
        crop = roi_matrix(roi_corners(box, angle), cfg.crop_size) @ aug
    corners = None
    if roi[0] is not None:
        corners = transform_points(roi_corners(tuple(roi[0]), float(roi[1])), image)
    return ViewPlan(image, crop, crop_source is not None, corners, jitter, rng)
