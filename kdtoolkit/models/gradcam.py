"""Grad-CAM through the classifier head only.

For a feature map A (B×C×h×w, the input of the head) and target classes y::

    w_c = mean_ij ∂s_y/∂A^c_ij        s = head(A), the logits
    CAM = ReLU(Σ_c w_c A^c)            optionally divided by its per-sample maximum

``paper_cam`` is the variant of Halimi Milani et al. (CVPR-W 2025, Eqs. 7–8): the weights are
the gradient of the cross-entropy loss instead of the class score, no ReLU, and each map is
min–max normalised::

    w_c = mean_ij ∂L_CE(s, y)/∂A^c_ij     CAM = minmax(Σ_c w_c A^c)

The gradient is taken with ``torch.autograd.grad(s_y, A)``, which only runs the head's graph
(pooling → norm → linear, plus an attention block where the model has one); the backbone that
produced A is never differentiated twice. With ``create_graph=True`` the weights stay
differentiable (a second-order term through the head alone), so a loss on the CAM trains both
the features and the head. ``torch.compile`` and DistributedDataParallel refuse a double
backward through the whole model, which is why the CAM is never computed from the input.
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
    if features.ndim != 4:
        raise ValueError(f"gradcam needs B×C×h×w features, got shape {tuple(features.shape)}")
    inference = not features.requires_grad
    if inference:
        features = features.detach().requires_grad_(True)
        create_graph = False
    with torch.enable_grad():
        logits = head(features)
        score = logits.gather(1, target.view(-1, 1).to(logits.device, torch.long)).sum()
        (grads,) = torch.autograd.grad(score, features, create_graph=create_graph)
        weights = grads.float().mean(dim=(2, 3), keepdim=True)
        cam = F.relu((weights * features.float()).sum(dim=1))
        if normalize:
            cam = cam / cam.amax(dim=(1, 2), keepdim=True).clamp_min(EPS)
    return cam.detach() if inference else cam


def paper_cam(
    head: Callable[[torch.Tensor], torch.Tensor],
    features: torch.Tensor,
    target: torch.Tensor,
    create_graph: bool = True,
) -> torch.Tensor:
    """The paper's Grad-CAM (Eqs. 7–8), B×h×w float32 in [0, 1]: weights from the gradient of
    the per-sample cross-entropy ``CE(head(A), y)`` (summed over the batch, so each sample's
    gradient is its own), ``Σ_c w_c A^c`` without ReLU, then ``(m − min) / (max − min)`` per
    sample (a constant map gives 0). Taken through ``head`` only, like :func:`gradcam`."""
    if features.ndim != 4:
        raise ValueError(f"paper_cam needs B×C×h×w features, got shape {tuple(features.shape)}")
    inference = not features.requires_grad
    if inference:
        features = features.detach().requires_grad_(True)
        create_graph = False
    with torch.enable_grad():
        logits = head(features).float()
        labels = target.to(logits.device, torch.long)
        loss = F.cross_entropy(logits, labels, reduction="sum")
        (grads,) = torch.autograd.grad(loss, features, create_graph=create_graph)
        weights = grads.float().mean(dim=(2, 3), keepdim=True)
        cam = (weights * features.float()).sum(dim=1)
        low = cam.amin(dim=(1, 2), keepdim=True)
        span = cam.amax(dim=(1, 2), keepdim=True) - low
        cam = (cam - low) / span.clamp_min(EPS)
    return cam.detach() if inference else cam


@torch.no_grad()
def cam_for_images(
    model: nn.Module, images: torch.Tensor, target: torch.Tensor | None = None
) -> torch.Tensor:
    """Inference Grad-CAM for ``images`` (B×C×H×W): B×H×W maps in [0, 1], upsampled
    bilinearly to the image size. ``target`` defaults to the predicted class. ``model`` has
    ``forward_features``/``forward_head`` (a ``kdtoolkit.models.backbone.Backbone``). A model
    whose features are not in image coordinates provides ``image_attention(images)`` instead
    (B×H×W in [0, 1], e.g. ``roi_zoom``: where it looks), used for figures and metrics."""
    model = unwrap(model)
    if hasattr(model, "image_attention"):
        return model.image_attention(images).float().clamp(0, 1)
    features = model.forward_features(images)
    if target is None:
        target = model.forward_head(features).argmax(dim=1)
    cam = gradcam(model.forward_head, features, target, create_graph=False, normalize=True)
    cam = F.interpolate(cam[:, None], size=images.shape[-2:], mode="bilinear", align_corners=False)
    return cam[:, 0].clamp(0, 1)
