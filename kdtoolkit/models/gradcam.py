"""Grad-CAM through the classifier head, or through the later stages for an earlier map.

For a feature map A (B×C×h×w, the input of the head) and target classes y::

    w_c = mean_ij ∂s_y/∂A^c_ij        s = head(A), the logits
    CAM = ReLU(Σ_c w_c A^c)            optionally divided by its per-sample maximum

``cam="signed"`` (the attention loss's default) keeps the sign: ``Σ_c w_c A^c`` divided by its
largest absolute value, a map in [−1, 1] without ReLU. Its ReLU is the Grad-CAM's shape, but its
gradient never vanishes where the Grad-CAM is 0, and an all-zero or constant map is never the
best fit of a mask (see ``kdtoolkit.builtin.losses.AttentionMSELoss``).

``paper_cam`` is the variant of Halimi Milani et al. (CVPR-W 2025, Eqs. 7–8): the weights come
from the cross-entropy loss instead of the class score, no ReLU, and each map is min–max
normalised::

    w_c = −mean_ij ∂L_CE(s, y)/∂A^c_ij     CAM = minmax(Σ_c w_c A^c)

The minus sign: Eq. 7 writes the gradient of the loss, and taken literally ∂L/∂A has the sign
opposite to ∂s_y/∂A (∂L_CE/∂s_y = p_y − 1 < 0), so its high values mark the features that
raise the loss, the evidence *against* the class. The paper's map is meant to highlight where
the model looks for the class, i.e. the descent direction −∂L/∂A, which is what is computed.

The gradient is taken with ``torch.autograd.grad(s_y, A)``, which only runs the head's graph
(pooling → norm → linear, plus an attention block where the model has one); the backbone that
produced A is never differentiated twice. With ``create_graph=True`` the weights stay
differentiable (a second-order term through the head alone), so a loss on the CAM trains both
the features and the head. ``torch.compile`` and DistributedDataParallel refuse a double
backward through the whole model, which is why the CAM is never computed from the input.
``cam_of`` takes the CAM of any map in the graph of the logits (an earlier stage, with a finer
grid): its gradient then runs through the later stages too (eager models in one process only).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

EPS = 1e-8


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside DDP/DataParallel and ``torch.compile`` wrappers."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def _objective(logits: torch.Tensor, target: torch.Tensor, cam: str) -> torch.Tensor:
    """What the CAM weights are the gradient of: the class scores ``Σ_b s_y`` (``"gradcam"``)
    or the descent direction of the cross-entropy ``−Σ_b CE(s_b, y_b)`` (``"paper"``)."""
    if cam == "paper":
        labels = target.to(logits.device, torch.long)
        return -F.cross_entropy(logits.float(), labels, reduction="sum")
    return logits.gather(1, target.view(-1, 1).to(logits.device, torch.long)).sum()


def _weighted_map(
    features: torch.Tensor, grads: torch.Tensor, cam: str, normalize: bool
) -> torch.Tensor:
    """``Σ_c mean_ij(g^c) A^c``, then ReLU and max (``"gradcam"``), min–max (``"paper"``) or
    division by the largest absolute value (``"signed"``)."""
    weights = grads.float().mean(dim=(2, 3), keepdim=True)
    if cam == "signed":
        m = (weights * features.float()).sum(dim=1)
        return m / m.abs().amax(dim=(1, 2), keepdim=True).clamp_min(EPS)
    if cam == "paper":
        m = (weights * features.float()).sum(dim=1)
        low = m.amin(dim=(1, 2), keepdim=True)
        span = m.amax(dim=(1, 2), keepdim=True) - low
        return (m - low) / span.clamp_min(EPS)
    m = F.relu((weights * features.float()).sum(dim=1))
    if normalize:
        m = m / m.amax(dim=(1, 2), keepdim=True).clamp_min(EPS)
    return m


def _head_cam(
    head: Callable[[torch.Tensor], torch.Tensor],
    features: torch.Tensor,
    target: torch.Tensor,
    cam: str,
    create_graph: bool,
    normalize: bool,
) -> torch.Tensor:
    if features.ndim != 4:
        name = {"paper": "paper_cam", "signed": "signed_cam"}.get(cam, "gradcam")
        raise ValueError(f"{name} needs B×C×h×w features, got shape {tuple(features.shape)}")
    inference = not features.requires_grad
    if inference:
        features = features.detach().requires_grad_(True)
        create_graph = False
    with torch.enable_grad():
        objective = _objective(head(features), target, cam)
        (grads,) = torch.autograd.grad(objective, features, create_graph=create_graph)
        out = _weighted_map(features, grads, cam, normalize)
    return out.detach() if inference else out


def gradcam(
    head: Callable[[torch.Tensor], torch.Tensor],
    features: torch.Tensor,
    target: torch.Tensor,
    create_graph: bool = True,
    normalize: bool = True,
) -> torch.Tensor:
    """Grad-CAM maps (B×h×w, float32) of ``features`` (B×C×h×w) for classes ``target`` (B).

    ``head`` maps features to logits (e.g. ``model.forward_head``). When ``features`` does not
    require grad (computed under ``torch.no_grad``), a detached copy is used and the result is
    an inference CAM without a graph. ``normalize`` divides each map by its maximum (at least
    eps), so maps lie in [0, 1].
    """
    return _head_cam(head, features, target, "gradcam", create_graph, normalize)


def paper_cam(
    head: Callable[[torch.Tensor], torch.Tensor],
    features: torch.Tensor,
    target: torch.Tensor,
    create_graph: bool = True,
) -> torch.Tensor:
    """The paper's Grad-CAM (Eqs. 7–8), B×h×w float32 in [0, 1]: weights from the descent
    direction of the per-sample cross-entropy, ``w = −mean_ij ∂CE(head(A), y)/∂A`` (summed over
    the batch, so each sample's gradient is its own; the sign is explained in the module
    docstring), ``Σ_c w_c A^c`` without ReLU, then ``(m − min) / (max − min)`` per sample (a
    constant map gives 0). Taken through ``head`` only, like :func:`gradcam`."""
    return _head_cam(head, features, target, "paper", create_graph, True)


def signed_cam(
    head: Callable[[torch.Tensor], torch.Tensor],
    features: torch.Tensor,
    target: torch.Tensor,
    create_graph: bool = True,
) -> torch.Tensor:
    """Grad-CAM before its ReLU, B×h×w float32 in [−1, 1]: ``m = Σ_c w_c A^c`` with the
    class-score weights of :func:`gradcam`, divided per sample by ``max |m|`` (at least eps;
    an all-zero map stays 0). ``ReLU`` of it is :func:`gradcam`'s map times a positive factor.
    Taken through ``head`` only."""
    return _head_cam(head, features, target, "signed", create_graph, True)


def cam_of(
    logits: torch.Tensor,
    features: torch.Tensor,
    target: torch.Tensor,
    cam: str = "gradcam",
    create_graph: bool = True,
    channels_last: bool = False,
) -> torch.Tensor:
    """The CAM (B×h×w, float32, normalised as :func:`gradcam` or :func:`paper_cam`) of
    ``features``, any B×C×h×w map in the autograd graph of ``logits`` (e.g. an earlier stage's
    output captured by a forward hook). The gradient runs from the logits through everything
    between (later stages and head); the graph is retained for the loss's own backward, and
    with ``create_graph`` that part is differentiated twice (eager autograd only).
    ``channels_last``: ``features`` is B×h×w×C (a timm NHWC stage); the gradient is taken with
    respect to it as it is in the graph, then both are permuted to B×C×h×w."""
    if features.ndim != 4 or not features.requires_grad:
        raise ValueError(f"cam_of needs B×C×h×w features in the graph, got {tuple(features.shape)}")
    with torch.enable_grad():
        objective = _objective(logits, target, cam)
        (grads,) = torch.autograd.grad(
            objective, features, create_graph=create_graph, retain_graph=True
        )
        if channels_last:
            features, grads = features.permute(0, 3, 1, 2), grads.permute(0, 3, 1, 2)
        return _weighted_map(features, grads, cam, True)


def minmax(maps: torch.Tensor) -> torch.Tensor:
    """``(m − min) / (1e-7 + max(m − min))`` per map over the last two axes, as
    ``pytorch_grad_cam.utils.image.scale_cam_image``."""
    maps = maps - maps.amin(dim=(-2, -1), keepdim=True)
    return maps / (1e-7 + maps.amax(dim=(-2, -1), keepdim=True))


@torch.no_grad()
def cam_for_images(
    model: nn.Module, images: torch.Tensor, target: torch.Tensor | None = None
) -> torch.Tensor:
    """Inference Grad-CAM for ``images`` (B×C×H×W): B×H×W maps in [0, 1] computed as
    ``pytorch_grad_cam.GradCAM`` does: ``minmax(resize(minmax(ReLU(Σ_c w_c A^c))))`` with the
    standard (class-score) weights, a bilinear resize to the image size (half-pixel centres,
    ``align_corners=False``, as OpenCV's ``INTER_LINEAR``) and :func:`minmax`; an all-zero map
    stays 0. ``target`` defaults to the predicted class. ``model`` has
    ``forward_features``/``forward_head`` (a ``kdtoolkit.models.backbone.Backbone``). A model
    whose features are not in image coordinates provides ``image_attention(images)`` instead
    (B×H×W in [0, 1], e.g. ``roi_zoom``: where it looks), used for figures and metrics."""
    model = unwrap(model)
    if hasattr(model, "image_attention"):
        return model.image_attention(images).float().clamp(0, 1)
    features = model.forward_features(images)
    if target is None:
        target = model.forward_head(features).argmax(dim=1)
    cam = gradcam(model.forward_head, features, target, create_graph=False, normalize=False)
    cam = F.interpolate(
        minmax(cam)[:, None], size=images.shape[-2:], mode="bilinear", align_corners=False
    )
    return minmax(cam[:, 0]).clamp(0, 1)
