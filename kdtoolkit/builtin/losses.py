"""Built-in plugin: the loss terms ``ce``, ``kl``, ``attention_mse``, ``attention_kl``,
``roi_feature``, ``roi_ce`` and ``attention_pool`` (``roi_box`` comes with ``roi_zoom``).

Notation: z student logits, t teacher logits, y labels, A the student's last feature map
(B×C×h×w, ``ctx.features``), Â its Grad-CAM map (``kdtoolkit.models.gradcam``, normalised to
[0, 1]; of A, or of an earlier stage with ``cam_layer``), M the ROI mask (``ctx.masks``)
area-resized to Â's grid. Everything is computed in float32.
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn

from kdtoolkit.config.option import Range
from kdtoolkit.errors import KdError
from kdtoolkit.models.gradcam import EPS, cam_of, gradcam, paper_cam, signed_cam, unwrap
from kdtoolkit.models.timm import TimmBackbone
from kdtoolkit.plugins.hookspec import hookimpl
from kdtoolkit.plugins.loss import LossContext, LossTerm


def mask_at(
    masks: torch.Tensor, size: tuple[int, int], norm: Literal["area", "max"] = "area"
) -> torch.Tensor:
    """ROI masks B×1×H×W (or B×H×W) → B×h×w by area averaging (adaptive average pool);
    ``norm="max"`` then divides each map by its maximum (an empty mask stays 0)."""
    if masks.ndim == 3:
        masks = masks[:, None]
    pooled = F.adaptive_avg_pool2d(masks.float(), size)[:, 0]
    if norm == "max":
        pooled = pooled / pooled.amax(dim=(1, 2), keepdim=True).clamp_min(EPS)
    return pooled


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


CamKind = Literal["gradcam", "paper", "signed"]
CAMS = get_args(CamKind)


def _student_cam(ctx: LossContext, create_graph: bool, cam: CamKind = "gradcam") -> torch.Tensor:
    make = {"paper": paper_cam, "signed": signed_cam}.get(cam, gradcam)
    head = unwrap(ctx.student).forward_head
    return make(head, ctx.features, ctx.labels, create_graph=create_graph)


CamLayer = int | Literal["last"]


def several_processes() -> bool:
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def require_eager_one_process(student: nn.Module, what: str, alternative: str = "") -> None:
    """Refuse a compiled trunk or several processes for a term that differentiates twice
    through the trunk; ``what`` starts the message (the option at fault), ``alternative`` is
    appended to its fixes."""
    if hasattr(unwrap(student).forward_features, "_torchdynamo_orig_callable"):
        raise KdError(f"{what} needs an eager trunk; set experiment.compile = false{alternative}")
    if several_processes():
        raise KdError(
            f"{what} needs one process (a double backward through the trunk); run one "
            f"process{alternative.replace(' or ', ' or set ', 1)}"
        )


class CamTerm(LossTerm):
    """A loss on the student's Grad-CAM Â (options ``cam``, ``cam_layer``, ``create_graph``).

    ``cam_layer = "last"``: Â of the head's input A (``ctx.features``), through the head only.
    An int i: Â of the output of timm's feature stage ``feature_info[i]`` (negative counts from
    the end: -2 is the stage before the last, with twice the resolution); ``bind`` hooks that
    stage's module and the CAM gradient runs from the logits through the later stages and the
    head (with ``create_graph`` a double backward through them: eager, one process).
    """

    key: ClassVar[str] = ""

    def _cam_options(self, cam: str, cam_layer: CamLayer, create_graph: bool) -> None:
        if cam not in CAMS:
            raise KdError(
                f"loss '{self.key}': cam must be 'gradcam', 'paper' or 'signed', not {cam!r}"
            )
        if cam_layer != "last" and (isinstance(cam_layer, bool) or not isinstance(cam_layer, int)):
            raise KdError(
                f"loss '{self.key}': cam_layer must be 'last' or a stage index (an int, "
                f"e.g. -2), not {cam_layer!r}"
            )
        self.cam = cam
        self.cam_layer = cam_layer
        self.create_graph = create_graph
        self._hook: torch.utils.hooks.RemovableHandle | None = None
        self._captured: torch.Tensor | None = None
        self._nhwc = False

    def bind(self, student: nn.Module) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self.cam_layer == "last":
            return
        model = unwrap(student)
        info = getattr(getattr(model, "model", None), "feature_info", None)
        if not isinstance(info, list) or not info:
            raise KdError(
                f"cam_layer = {self.cam_layer}: backbone {type(model).__name__} has no feature "
                "stages (timm's feature_info); choices: 'last'"
            )
        n = len(info)
        if not -n <= self.cam_layer < n:
            raise KdError(
                f"cam_layer = {self.cam_layer}: this backbone has {n} feature stages; choices: "
                f"'last' or an index in {-n}..{n - 1}"
            )
        require_eager_one_process(model, f"cam_layer = {self.cam_layer}", " or cam_layer = 'last'")
        module = model.model.get_submodule(info[self.cam_layer]["module"])
        self._nhwc = bool(getattr(model, "channels_last_features", False))
        self._hook = module.register_forward_hook(self._capture)

    def _capture(self, module: nn.Module, inputs: object, output: torch.Tensor) -> None:
        if torch.is_grad_enabled():  # training forwards only, not validation
            self._captured = output

    def student_cam(self, ctx: LossContext) -> torch.Tensor:
        """Â, B×h×w in [0, 1] ([−1, 1] for ``cam = "signed"``), for the true classes."""
        if self.cam_layer == "last":
            return _student_cam(ctx, self.create_graph, self.cam)
        features, self._captured = self._captured, None
        if self._hook is None or features is None or features.shape[0] != ctx.labels.shape[0]:
            raise KdError(
                f"loss '{self.key}': the stage of cam_layer = {self.cam_layer} was not captured "
                "in this forward (the engine calls bind(student) before training)"
            )
        return cam_of(ctx.logits, features, ctx.labels, self.cam, self.create_graph, self._nhwc)


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

    #: Below 0.05 the softened distributions are one-hot in float32 and the term is zero.
    def __init__(self, temperature: Annotated[float, Range(ge=0.05, le=100)] = 3.0) -> None:
        super().__init__()
        self.temperature = temperature

    def forward(self, ctx: LossContext) -> torch.Tensor:
        if ctx.teacher_logits is None:
            raise KdError("loss 'kl' needs teacher logits, but the batch has none")
        T = self.temperature
        log_q = F.log_softmax(ctx.logits.float() / T, dim=1)
        log_p = F.log_softmax(ctx.teacher_logits.detach().float() / T, dim=1)
        return T * T * F.kl_div(log_q, log_p, reduction="batchmean", log_target=True)


class AttentionMSELoss(CamTerm):
    """The paper's Grad-CAM term: ``mean((Â − M)²)`` over batch and h×w, with Â the student's
    class-activation map for the true class y and M the ROI mask at Â's grid.

    ``cam``: ``"signed"`` (default: Grad-CAM before its ReLU, divided by its largest absolute
    value, in [−1, 1]), ``"gradcam"`` (standard Grad-CAM: ReLU, max-normalised) or ``"paper"``
    (the paper's Eqs. 7–8: descent direction of the cross-entropy, no ReLU, min–max normalised;
    ``kdtoolkit.models.gradcam.paper_cam``). ``mask_norm``: ``"max"`` (default: M area-averaged
    to Â's grid, then divided by its per-sample maximum, so the ROI's cells are 1 like a CAM's
    peak) or ``"area"`` (area-averaged only; peaks below 1 when the ROI is smaller than a
    cell). With the defaults the only zero of the term is ``Â = M`` (a map positive on the ROI,
    0 elsewhere), an all-zero map costs ``mean(M²)``, a constant positive one
    ``mean((1 − M)²)``, a negative one more, and the gradient never vanishes; with
    ``"gradcam"`` an all-zero map (ReLU everywhere off) is a flat minimum nearer than the mask.
    ``cam_layer``: ``"last"`` (the head's input, through the head only) or a feature-stage
    index (``CamTerm``). ``create_graph``: keep the Grad-CAM weights differentiable (second
    order); False detaches them."""

    key = "attention_mse"

    def __init__(
        self,
        create_graph: bool = True,
        cam: CamKind = "signed",
        cam_layer: CamLayer = "last",
        mask_norm: Literal["area", "max"] = "max",
    ) -> None:
        super().__init__()
        self._cam_options(cam, cam_layer, create_graph)
        if mask_norm not in ("area", "max"):
            raise KdError(
                f"loss 'attention_mse': mask_norm must be 'area' or 'max', not {mask_norm!r}"
            )
        self.mask_norm = mask_norm

    def forward(self, ctx: LossContext) -> torch.Tensor:
        cam = self.student_cam(ctx)
        return (cam - mask_at(ctx.masks, cam.shape[-2:], self.mask_norm)).pow(2).mean()


class AttentionKLLoss(CamTerm):
    """Scale-free Grad-CAM term. ``mode="kl"``: Â and M as distributions over h×w,
    ``KL(M/ΣM ‖ (Â+eps)/Σ(Â+eps))``, batch mean (the mask's scale cancels). ``mode="bce"``:
    per-pixel binary cross-entropy ``−[M log(Â+eps) + (1−M) log(1−Â+eps)]``, mean over batch
    and h×w. ``cam``, ``cam_layer``, ``create_graph`` as for ``attention_mse``."""

    key = "attention_kl"

    def __init__(
        self,
        mode: Literal["kl", "bce"] = "kl",
        create_graph: bool = True,
        cam: Literal["gradcam", "paper"] = "gradcam",
        cam_layer: CamLayer = "last",
    ) -> None:
        super().__init__()
        if mode not in ("kl", "bce"):
            raise KdError(f"loss 'attention_kl': mode must be 'kl' or 'bce', not {mode!r}")
        if cam == "signed":
            raise KdError(
                "loss 'attention_kl': cam = 'signed' has negative values, which are no "
                "distribution; use 'gradcam' or 'paper'"
            )
        self.mode = mode
        self._cam_options(cam, cam_layer, create_graph)

    def forward(self, ctx: LossContext) -> torch.Tensor:
        cam = self.student_cam(ctx)
        mask = mask_at(ctx.masks, cam.shape[-2:])
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
        return _spatial_kl(mask_at(ctx.masks, attention.shape[-2:]), attention)


@hookimpl
def kd_register_losses(registry):
    registry.register("ce", CELoss)
    registry.register("kl", KLLoss)
    registry.register("attention_mse", AttentionMSELoss)
    registry.register("attention_kl", AttentionKLLoss)
    registry.register("roi_feature", RoiFeatureLoss)
    registry.register("roi_ce", RoiCELoss)
    registry.register("attention_pool", AttentionPoolLoss)
