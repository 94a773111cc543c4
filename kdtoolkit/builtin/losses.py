"""Built-in plugin: the loss terms ``ce``, ``kl``, ``attention_mse``, ``attention_kl``,
``roi_feature``, ``roi_ce`` and ``attention_pool`` (``roi_box`` comes with ``roi_zoom``).

Notation: z student logits, t teacher logits, y labels, A the student's last feature map
(B×C×h×w, ``ctx.features``), Â its Grad-CAM map (``kdtoolkit.models.gradcam``, max-normalised to
[0, 1]), M the ROI mask (``ctx.masks``) area-resized to h×w. Everything is computed in float32.
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from torch import nn

from kdtoolkit.config.option import Range
from kdtoolkit.errors import KdError
from kdtoolkit.models.gradcam import EPS, gradcam, paper_cam, unwrap
from kdtoolkit.models.timm import TimmBackbone
from kdtoolkit.plugins.hookspec import hookimpl
from kdtoolkit.plugins.loss import LossContext, LossTerm


def _mask_at(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """ROI masks B×1×H×W (or B×H×W) → B×h×w by area averaging (adaptive average pool)."""
    if masks.ndim == 3:
        masks = masks[:, None]
    return F.adaptive_avg_pool2d(masks.float(), size)[:, 0]


def _distribution(x: torch.Tensor) -> torch.Tensor:
    """Non-negative B×h×w maps → distributions over h×w: ``(x + eps) / Σ(x + eps)``."""
    x = x.flatten(1) + EPS
    return x / x.sum(dim=1, keepdim=True)


def _spatial_kl(mask: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of ``KL(p ‖ q) = Σ p (log p − log q)`` with ``p = M / ΣM`` (an all-zero
    mask contributes 0) and ``q = (Â + eps) / Σ(Â + eps)``."""
    m = mask.flatten(1).clamp_min(0)
    p = m / m.sum(dim=1, keepdim=True).clamp_min(EPS)
    q = _distribution(attention)
    return (torch.xlogy(p, p) - p * q.log()).sum(dim=1).mean()


def _student_cam(
    ctx: LossContext, create_graph: bool, cam: Literal["gradcam", "paper"] = "gradcam"
) -> torch.Tensor:
    make = paper_cam if cam == "paper" else gradcam
    head = unwrap(ctx.student).forward_head
    return make(head, ctx.features, ctx.labels, create_graph=create_graph)


class CELoss(LossTerm):
    """Cross-entropy ``CE(y, z)``, weighted by ``ctx.class_weights`` when set, with optional
    label smoothing ε (targets ``(1 − ε)·onehot + ε/K``)."""

    def __init__(self, label_smoothing: Annotated[float, Range(ge=0, lt=1)] = 0.0) -> None:
        super().__init__()
        self.label_smoothing = label_smoothing

    def forward(self, ctx: LossContext) -> torch.Tensor:
        weight = ctx.class_weights
        if weight is not None:
            weight = weight.to(ctx.logits.device, torch.float32)
        return F.cross_entropy(
            ctx.logits.float(), ctx.labels, weight=weight, label_smoothing=self.label_smoothing
        )


class KLLoss(LossTerm):
    """Hinton distillation: ``T² · KL(P ‖ Q)``, ``P = softmax(t/T)`` (teacher, detached),
    ``Q = softmax(z/T)``, summed over classes and averaged over the batch (``batchmean``)."""

    needs_teacher = True

    def __init__(self, temperature: Annotated[float, Range(gt=0)] = 3.0) -> None:
        super().__init__()
        self.temperature = temperature

    def forward(self, ctx: LossContext) -> torch.Tensor:
        if ctx.teacher_logits is None:
            raise KdError("loss 'kl' needs teacher logits, but the batch has none")
        T = self.temperature
        log_q = F.log_softmax(ctx.logits.float() / T, dim=1)
        log_p = F.log_softmax(ctx.teacher_logits.detach().float() / T, dim=1)
        return T * T * F.kl_div(log_q, log_p, reduction="batchmean", log_target=True)


class AttentionMSELoss(LossTerm):
    """The paper's Grad-CAM term: ``mean((Â − M)²)`` over batch and h×w, with Â the student's
    Grad-CAM for the true class y, taken through the head only. ``cam``: ``"gradcam"`` (standard
    Grad-CAM: class-score gradient, ReLU, max-normalised) or ``"paper"`` (the paper's Eqs. 7–8:
    cross-entropy gradient, no ReLU, min–max normalised; ``kdtoolkit.models.gradcam.paper_cam``).
    ``create_graph``: keep the Grad-CAM weights differentiable (second order through the head);
    False detaches them."""

    def __init__(
        self, create_graph: bool = True, cam: Literal["gradcam", "paper"] = "gradcam"
    ) -> None:
        super().__init__()
        if cam not in ("gradcam", "paper"):
            raise KdError(f"loss 'attention_mse': cam must be 'gradcam' or 'paper', not {cam!r}")
        self.create_graph = create_graph
        self.cam = cam

    def forward(self, ctx: LossContext) -> torch.Tensor:
        cam = _student_cam(ctx, self.create_graph, self.cam)
        return (cam - _mask_at(ctx.masks, cam.shape[-2:])).pow(2).mean()


class AttentionKLLoss(LossTerm):
    """Scale-free Grad-CAM term. ``mode="kl"``: Â and M as distributions over h×w,
    ``KL(M/ΣM ‖ (Â+eps)/Σ(Â+eps))``, batch mean. ``mode="bce"``: per-pixel binary
    cross-entropy ``−[M log(Â+eps) + (1−M) log(1−Â+eps)]``, mean over batch and h×w."""

    def __init__(self, mode: Literal["kl", "bce"] = "kl", create_graph: bool = True) -> None:
        super().__init__()
        if mode not in ("kl", "bce"):
            raise KdError(f"loss 'attention_kl': mode must be 'kl' or 'bce', not {mode!r}")
        self.mode = mode
        self.create_graph = create_graph

    def forward(self, ctx: LossContext) -> torch.Tensor:
        cam = _student_cam(ctx, self.create_graph)
        mask = _mask_at(ctx.masks, cam.shape[-2:])
        if self.mode == "kl":
            return _spatial_kl(mask, cam)
        bce = mask * (cam + EPS).log() + (1 - mask) * (1 - cam + EPS).log()
        return -bce.mean()


def roi_pool(ctx: LossContext, output_size: int) -> torch.Tensor:
    """The student's map A pooled inside each ROI box, B×C×k×k (``k = output_size``), with
    ``torchvision.ops.roi_align``: boxes scaled from image pixels to feature cells per axis
    (``x·w/W``, ``y·h/H``), ``aligned=True``."""
    from torchvision.ops import roi_align  # torchvision takes seconds to import

    features = ctx.features.float()
    (h, w), (H, W) = features.shape[-2:], ctx.images.shape[-2:]
    scale = features.new_tensor([w / W, h / H, w / W, h / H])
    boxes = ctx.boxes.to(features.device, torch.float32) * scale
    index = torch.arange(len(boxes), device=features.device, dtype=torch.float32)
    rois = torch.cat([index[:, None], boxes], dim=1)
    size = (output_size, output_size)
    return roi_align(features, rois, size, spatial_scale=1.0, aligned=True)


class RoiFeatureLoss(LossTerm):
    """ROI feature distillation. The student's map A is pooled inside each ROI box with
    ``torchvision.ops.roi_align`` (boxes scaled from image pixels to feature cells per axis,
    ``x·w/W``, ``y·h/H``; ``aligned=True``; ``output_size``² bins, then averaged), passed through
    a learned adapter ``Linear(C_s → C_t)`` and matched to the teacher's crop features averaged
    over h×w (detached): ``metric="cosine"``: ``1 − cos(s, t)``; ``"mse"``:
    ``mean((LN(s) − LN(t))²)`` with a parameter-free layer norm over channels. Batch mean."""

    needs_teacher = True

    def __init__(
        self,
        output_size: Annotated[int, Range(ge=1)] = 1,
        metric: Literal["cosine", "mse"] = "cosine",
    ) -> None:
        super().__init__()
        if metric not in ("cosine", "mse"):
            raise KdError(f"loss 'roi_feature': metric must be 'cosine' or 'mse', not {metric!r}")
        self.output_size = output_size
        self.metric = metric
        self.adapter: nn.Linear | None = None

    def setup(self, student_channels: int, teacher_channels: int | None) -> None:
        if teacher_channels is None:
            raise KdError("loss 'roi_feature' needs a teacher (its feature width is unknown)")
        self.adapter = nn.Linear(student_channels, teacher_channels)

    def pooled_student(self, ctx: LossContext) -> torch.Tensor:
        """ROI-aligned student features, B×C_s (before the adapter)."""
        return roi_pool(ctx, self.output_size).mean(dim=(2, 3))

    def forward(self, ctx: LossContext) -> torch.Tensor:
        if self.adapter is None:
            raise KdError("loss 'roi_feature' was not set up (call setup(student, teacher))")
        if ctx.teacher_features is None:
            raise KdError("loss 'roi_feature' needs teacher features, but the batch has none")
        s = self.adapter(self.pooled_student(ctx))
        t = ctx.teacher_features.detach().float().mean(dim=(2, 3))
        if self.metric == "cosine":
            return (1 - F.cosine_similarity(s, t, dim=1)).mean()
        return F.mse_loss(F.layer_norm(s, s.shape[-1:]), F.layer_norm(t, t.shape[-1:]))


class RoiCELoss(LossTerm):
    """ROI classification: the student's map A pooled inside the ROI box (``roi_pool``,
    ``output_size``² bins) goes through the student's own plain head (pool → norm → linear;
    for ``convnext_attn`` the head without its attention block) to logits ``z_roi``;
    loss ``CE(y, z_roi)``. It teaches the features at the ROI, and the classifier, to stage
    the ROI; an attention-pooling head (``attention_pool``) then learns to pool there."""

    def __init__(self, output_size: Annotated[int, Range(ge=1)] = 2) -> None:
        super().__init__()
        self.output_size = output_size

    def forward(self, ctx: LossContext) -> torch.Tensor:
        model = unwrap(ctx.student)
        pooled = roi_pool(ctx, self.output_size).to(ctx.features.dtype)
        if isinstance(model, TimmBackbone):
            logits = TimmBackbone.forward_head(model, pooled)
        else:
            logits = model.forward_head(pooled)
        return F.cross_entropy(logits.float(), ctx.labels, weight=ctx.class_weights)


class AttentionPoolLoss(LossTerm):
    """Supervises the student's own attention map (``convnext_attn``'s ``last_attention``,
    B×1×h×w): ``KL(M/ΣM ‖ (a+eps)/Σ(a+eps))``, batch mean, with M the ROI mask at h×w."""

    def forward(self, ctx: LossContext) -> torch.Tensor:
        attention = getattr(unwrap(ctx.student), "last_attention", None)
        if attention is None:
            raise KdError(
                "loss 'attention_pool' needs a student with an attention map "
                "(backbone 'convnext_attn'); this student has none"
            )
        if attention.shape[0] != ctx.labels.shape[0]:
            raise KdError("loss 'attention_pool': the attention map is not of this batch")
        attention = attention.float()[:, 0] if attention.ndim == 4 else attention.float()
        return _spatial_kl(_mask_at(ctx.masks, attention.shape[-2:]), attention)


@hookimpl
def kd_register_losses(registry):
    registry.register("ce", CELoss)
    registry.register("kl", KLLoss)
    registry.register("attention_mse", AttentionMSELoss)
    registry.register("attention_kl", AttentionKLLoss)
    registry.register("roi_feature", RoiFeatureLoss)
    registry.register("roi_ce", RoiCELoss)
    registry.register("attention_pool", AttentionPoolLoss)
