"""ROI masks: which pixels lie inside an ROI, hard (box) or soft (Gaussian).

The single "inside the ROI" test of the package: a pixel is inside when its centre
``(c + 0.5, r + 0.5)`` has ROI-frame coordinates ``max(|u|, |v|) <= 1`` (:func:`roi_masks`,
:func:`roi_mask` with ``kind="box"``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from kdtoolkit.data.geometry import roi_corners
from kdtoolkit.errors import KdError

#: Gaussian mask width: sigma = GAUSSIAN_SIGMA × half-extent, per ROI axis (peak 1 at the centre).
GAUSSIAN_SIGMA = 0.5


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
