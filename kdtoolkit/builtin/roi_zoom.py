"""Built-in plugin: ``roi_zoom``, a full-image student that looks closer (locate the ROI,
resample it, stage the resampled ROI), and ``roi_box``, the loss that teaches it where to look.

``RoiZoom`` is one network on the uncropped image (no detector, no external crop at
deployment). A *locator* trunk predicts the ROI as ``(cx, cy, half_w, half_h, cos 2a, sin 2a)``
in normalised image coordinates; a differentiable affine sampler (``grid_sample``) cuts that
rotated rectangle out of the input at ``crop_size`` with the ROI's long side horizontal, as the
teacher's crops; a *classifier* trunk stages it. The ``roi_box`` loss supervises the locator with
the ROI mask's moments, so the locator needs the ROI only in training.

Orientation: the ROI's long axis is mapped to the crop's x axis with a non-negative x component
in the image; ROIs whose long axis points the other way are seen rotated by 180°.
"""

from __future__ import annotations

import math
from typing import Annotated

import torch
import torch.nn.functional as F
from torch import nn

from kdtoolkit.config.option import Range
from kdtoolkit.errors import KdError
from kdtoolkit.models.backbone import build_backbone
from kdtoolkit.models.gradcam import unwrap
from kdtoolkit.plugins.hookspec import hookimpl
from kdtoolkit.plugins.loss import LossContext, LossTerm


def mask_moments(masks: torch.Tensor) -> torch.Tensor:
    """ROI parameters of masks (B×1×H×W or B×H×W) from their first and second moments:
    ``(cx, cy, half_long, half_short, cos 2a, sin 2a)`` in isotropic coordinates (pixel centres
    minus the image centre, divided by half the image *width*, on both axes, so angles are
    true angles; x spans [-1, 1]), half-lengths ``√(3λ)`` (exact for a filled rectangle) and
    ``a`` the long axis' angle from the image x axis (y down)."""
    m = masks.float().flatten(0, -3) if masks.ndim == 4 else masks.float()
    b, h, w = m.shape
    xs = (torch.arange(w, device=m.device, dtype=torch.float32) + 0.5 - w / 2) / (w / 2)
    ys = (torch.arange(h, device=m.device, dtype=torch.float32) + 0.5 - h / 2) / (w / 2)
    total = m.sum(dim=(1, 2)).clamp_min(1e-6)
    cx = (m.sum(1) * xs).sum(1) / total
    cy = (m.sum(2) * ys).sum(1) / total
    dx, dy = xs[None, None, :] - cx[:, None, None], ys[None, :, None] - cy[:, None, None]
    sxx = (m * dx * dx).sum(dim=(1, 2)) / total
    syy = (m * dy * dy).sum(dim=(1, 2)) / total
    sxy = (m * dx * dy).sum(dim=(1, 2)) / total
    two_a = torch.atan2(2 * sxy, sxx - syy)
    spread = torch.sqrt(((sxx - syy) / 2) ** 2 + sxy**2)
    mean = (sxx + syy) / 2
    long, short = (mean + spread).clamp_min(0), (mean - spread).clamp_min(0)
    return torch.stack(
        [cx, cy, torch.sqrt(3 * long), torch.sqrt(3 * short), torch.cos(two_a), torch.sin(two_a)],
        dim=1,
    )


def roi_grid(
    params: torch.Tensor, size: tuple[int, int], margin: float = 1.0, aspect: float = 1.0
) -> torch.Tensor:
    """Sampling grid (B×h×w×2, for ``grid_sample`` with ``align_corners=False``) of the rotated
    ROI ``params`` (as ``mask_moments``) in an image of width/height ``aspect``, long side along
    the crop's x axis."""
    cx, cy, hl, hs, c2, s2 = params.unbind(1)
    angle = 0.5 * torch.atan2(s2, c2)  # long axis in (-90°, 90°]: non-negative x component
    cos, sin = torch.cos(angle), torch.sin(angle)
    hl, hs = hl * margin, hs * margin
    # crop (u, v) in [-1, 1]² → image: centre + u·hl·(cos, sin) + v·hs·(−sin, cos)
    theta = torch.stack(
        [
            torch.stack([hl * cos, -hs * sin, cx], dim=1),
            torch.stack([hl * sin, hs * cos, cy], dim=1) * aspect,  # isotropic → normalised y
        ],
        dim=1,
    )
    return affine_grid(theta, size)


def affine_grid(theta: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``F.affine_grid(theta, (B, 1, h, w), align_corners=False)`` written with the batch size
    left free: the base grid (output pixel centres in [-1, 1]) times each ``theta`` (B×2×3), so
    an exported graph takes any batch size."""
    h, w = int(size[0]), int(size[1])
    xs = (torch.arange(w, device=theta.device, dtype=theta.dtype) * 2 + 1) / w - 1
    ys = (torch.arange(h, device=theta.device, dtype=theta.dtype) * 2 + 1) / h - 1
    base = torch.stack(
        [
            xs.expand(h, w),
            ys[:, None].expand(h, w),
            torch.ones(h, w, device=theta.device, dtype=theta.dtype),
        ],
        dim=-1,
    )  # h×w×3: (x, y, 1) at each output pixel
    return (base.reshape(1, h * w, 3) @ theta.transpose(1, 2)).reshape(-1, h, w, 2)


class RoiZoom(nn.Module):
    """Locator trunk → ROI parameters → resampled ROI → classifier trunk (see the module doc).

    ``forward_features(x)`` is the classifier's feature map of the resampled ROI and
    ``forward_head`` the classifier's head, so ``ce``/``kl`` apply as to any student.
    ``last_roi`` holds the last predicted parameters (for ``roi_box``); ``last_crop`` the
    resampled ROI. Grad-CAM losses on the full-image mask (``attention_*``, ``roi_feature``,
    ``roi_ce``) do not apply: the feature map is in crop coordinates; for figures and the
    pointing game, ``image_attention`` shows the predicted ROI instead of a Grad-CAM.
    """

    def __init__(
        self,
        locator: nn.Module,
        classifier: nn.Module,
        crop_size: tuple[int, int],
        margin: float,
        detach_roi: bool = True,
    ) -> None:
        super().__init__()
        self.locator = locator
        self.classifier = classifier
        self.crop_size = crop_size
        self.margin = margin
        self.detach_roi = detach_roi
        self.num_features = classifier.num_features
        self.where = nn.Conv2d(locator.num_features, 1, 1)  # centre: soft-argmax of a map
        self.shape_head = nn.Linear(locator.num_features, 4)  # extents and direction
        nn.init.zeros_(self.shape_head.weight)
        with torch.no_grad():  # start at a quarter of the image, horizontal
            self.shape_head.bias.copy_(torch.tensor([math.log(0.5), math.log(0.25), 1.0, 0.0]))
        self.last_roi: torch.Tensor | None = None
        self.last_crop: torch.Tensor | None = None
        self.last_attention: torch.Tensor | None = None

    def locate(self, x: torch.Tensor) -> torch.Tensor:
        """ROI parameters ``(cx, cy, half_long, half_short, cos 2a, sin 2a)`` of each image: the
        centre is the soft-argmax of the locator's map ``p = softmax_hw(conv1×1(L))`` (kept as
        ``last_attention``), the extents and direction a linear head on ``Σ p·L``."""
        features = self.locator.forward_features(x).float()
        b, _, h, w = features.shape
        p = self.where(features).flatten(1).softmax(dim=1).view(b, 1, h, w)
        self.last_attention = p
        xs = (torch.arange(w, device=x.device, dtype=torch.float32) + 0.5 - w / 2) / (w / 2)
        ys = (torch.arange(h, device=x.device, dtype=torch.float32) + 0.5 - h / 2) / (w / 2)
        ys = ys * (w / h) * (x.shape[-2] / x.shape[-1])  # feature rows → isotropic image units
        cx = (p.sum(dim=(1, 2)) * xs).sum(dim=1)
        cy = (p.sum(dim=(1, 3)) * ys).sum(dim=1)
        raw = self.shape_head((features * p).sum(dim=(2, 3)))
        halves = torch.exp(raw[:, :2].clamp(-6, 1))
        direction = F.normalize(raw[:, 2:4], dim=1, eps=1e-6)
        return torch.cat([cx[:, None], cy[:, None], halves, direction], dim=1)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        roi = self.locate(x)
        aspect = x.shape[-1] / x.shape[-2]
        sampled = roi.detach() if self.detach_roi else roi
        grid = roi_grid(sampled, self.crop_size, self.margin, aspect).to(x.dtype)
        crop = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        self.last_roi, self.last_crop = roi, crop
        return self.classifier.forward_features(crop)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.classifier.forward_head(features)

    def image_attention(self, x: torch.Tensor) -> torch.Tensor:
        """Where the model looks, B×H×W in [0, 1]: ``1 − max(|u|, |v|)`` inside the predicted
        ROI (u, v its own coordinates, ±1 at its border, 1 at its centre), 0 outside."""
        roi = self.locate(x).float()
        h, w = x.shape[-2:]
        xs = (torch.arange(w, device=x.device, dtype=torch.float32) + 0.5 - w / 2) / (w / 2)
        ys = (torch.arange(h, device=x.device, dtype=torch.float32) + 0.5 - h / 2) / (w / 2)
        cx, cy, hl, hs, c2, s2 = (v[:, None, None] for v in roi.unbind(1))
        angle = 0.5 * torch.atan2(s2, c2)
        dx, dy = xs[None, None, :] - cx, ys[None, :, None] - cy
        u = (dx * torch.cos(angle) + dy * torch.sin(angle)) / (hl * self.margin)
        v = (-dx * torch.sin(angle) + dy * torch.cos(angle)) / (hs * self.margin)
        return (1 - torch.maximum(u.abs(), v.abs())).clamp_min(0)

    def load_teacher(self, state: dict[str, torch.Tensor]) -> None:
        """Start the classifier from a crop teacher of the same architecture."""
        self.classifier.load_state_dict(state)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def roi_zoom(
    num_classes: int,
    in_chans: int,
    locator: str = "resnet18",
    classifier: str = "resnet18",
    crop_size: list[Annotated[int, Range(ge=8)]] | None = None,
    margin: Annotated[float, Range(gt=0)] = 1.0,
    detach_roi: bool = True,
) -> RoiZoom:
    """``RoiZoom`` with ``locator`` and ``classifier`` trunks (any backbone name: a registered
    one such as ``convnext_attn`` or a timm model; from scratch, default options) and crops of
    ``crop_size`` = [height, width] (default [64, 128]), ``margin`` × the ROI's extent.
    ``detach_roi``: the classifier's losses do not move the locator (only ``roi_box`` does).
    With ``student.init_from_teacher`` the classifier starts as the crop teacher (same
    backbone name as the teacher)."""
    size = tuple(crop_size or (64, 128))
    return RoiZoom(
        build_backbone(locator, num_classes, in_chans, {}),
        build_backbone(classifier, num_classes, in_chans, {}),
        (int(size[0]), int(size[1])),
        margin,
        detach_roi,
    )


class RoiBoxLoss(LossTerm):
    """Supervises ``RoiZoom``'s locator: smooth-L1 between its ROI parameters and those of the
    ROI mask (``mask_moments``), summed over the 6 parameters, batch mean."""

    def forward(self, ctx: LossContext) -> torch.Tensor:
        roi = getattr(unwrap(ctx.student), "last_roi", None)
        if roi is None or ctx.masks is None:
            raise KdError("loss 'roi_box' needs a roi_zoom student and ROI masks")
        target = mask_moments(ctx.masks.to(roi.device))
        return F.smooth_l1_loss(roi.float(), target, beta=0.05, reduction="none").sum(1).mean()


@hookimpl
def kd_register_backbones(registry):
    registry.register("roi_zoom", roi_zoom)


@hookimpl
def kd_register_losses(registry):
    registry.register("roi_box", RoiBoxLoss)
