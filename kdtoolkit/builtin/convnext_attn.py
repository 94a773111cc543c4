"""Built-in plugin: ``convnext_attn``, a timm ConvNeXt with a spatial-attention or
attention-pooling head between its last stage and its classifier."""

from __future__ import annotations

from typing import Annotated, Literal

import torch
from torch import nn

from kdtoolkit.config.option import Range
from kdtoolkit.errors import KdError
from kdtoolkit.models.timm import TimmBackbone, create_timm_model
from kdtoolkit.models.weights import load_pretrained_option
from kdtoolkit.plugins.hookspec import hookimpl


class SpatialAttention(nn.Module):
    """CBAM spatial attention map: ``a = sigmoid(conv_k×k([mean_c(A); max_c(A)]))``, B×1×h×w.

    The convolution starts at zero, so ``a = 0.5`` everywhere at initialisation (a uniform
    scale that the head's LayerNorm removes: the model starts as its plain ConvNeXt).
    """

    def __init__(self, kernel_size: int = 7) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2)
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        stats = torch.cat(
            [features.mean(dim=1, keepdim=True), features.amax(dim=1, keepdim=True)], dim=1
        )
        return torch.sigmoid(self.conv(stats))


class AttentionPool(nn.Module):
    """Attention-pooling weights: ``p = softmax_hw(conv1×1(A))``, B×1×h×w, summing to 1.

    The 1×1 convolution starts at zero, so ``p`` is uniform at initialisation and the pooling
    equals global average pooling.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, 1, 1)
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        logits = self.conv(features)
        b, _, h, w = logits.shape
        return logits.float().flatten(1).softmax(dim=1).view(b, 1, h, w).to(features.dtype)


class ConvNeXtAttn(TimmBackbone):
    """A timm ConvNeXt ("ConvNeXt+Attn") with an attention block between the last stage and the
    classifier. The attention belongs to the *head*: ``forward_features`` is the plain ConvNeXt
    feature map A (last stage, B×C×h×w) and ``forward_head(A)`` is

    - ``attention="spatial"`` (CBAM-style spatial attention):
      ``a = sigmoid(conv7×7([mean_c(A); max_c(A)]))``, logits = timm head(A·a), where timm's
      ConvNeXt head is global average pool → LayerNorm → linear;
    - ``attention="pool"`` (attention pooling): ``p = softmax_{h×w}(conv1×1(A))``,
      ``z = Σ_ij p_ij A_ij``, logits = LayerNorm → linear of z (timm's head on the pooled
      B×C×1×1 map, where its average pool is the identity).

    ``self.last_attention`` holds the last map (B×1×h×w, with its graph): ``a`` after the
    sigmoid (values in (0, 1)) or ``p`` after the softmax (sums to 1 over h×w), for a loss
    to supervise (``attention_pool``). Grad-CAM through ``forward_head`` therefore includes the
    attention block; the head stays cheap (one small convolution, pooling, norm, linear).
    """

    def __init__(
        self,
        model: nn.Module,
        in_chans: int | None = None,
        attention: Literal["spatial", "pool"] = "spatial",
        kernel_size: int = 7,
    ) -> None:
        super().__init__(model, in_chans)
        if attention == "spatial":
            self.attention: nn.Module = SpatialAttention(kernel_size)
        elif attention == "pool":
            self.attention = AttentionPool(self.num_features)
        else:
            raise KdError(
                f"convnext_attn: attention must be 'spatial' or 'pool', not {attention!r}"
            )
        self.mode = attention
        self.last_attention: torch.Tensor | None = None

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        attention = self.attention(features)
        self.last_attention = attention
        if self.mode == "spatial":
            pooled = features * attention
        else:
            pooled = (features * attention).sum(dim=(2, 3), keepdim=True)
        return super().forward_head(pooled)


def convnext_attn(
    num_classes: int,
    in_chans: int,
    variant: str = "convnext_tiny",
    pretrained: str | None = None,
    drop_rate: Annotated[float, Range(ge=0, lt=1)] = 0.0,
    drop_path_rate: Annotated[float, Range(ge=0, lt=1)] = 0.0,
    attention: Literal["spatial", "pool"] = "spatial",
    kernel_size: Annotated[int, Range(ge=1)] = 7,
) -> ConvNeXtAttn:
    """ConvNeXt+Attn (see ``ConvNeXtAttn``): timm ``variant`` with a spatial-attention
    (``"spatial"``, CBAM, ``kernel_size``×``kernel_size`` conv) or attention-pooling
    (``"pool"``) head. ``pretrained``: None, a local weights file or ``"timm"``
    (``kdtoolkit.models.weights``); a plain timm checkpoint loads the ConvNeXt and leaves the
    attention at its (neutral) initialisation."""
    if kernel_size % 2 == 0:
        raise KdError(f"convnext_attn: kernel_size must be odd, not {kernel_size}")
    model = ConvNeXtAttn(
        create_timm_model(variant, num_classes, in_chans, pretrained, drop_rate, drop_path_rate),
        in_chans,
        attention=attention,
        kernel_size=kernel_size,
    )
    load_pretrained_option(model, pretrained)
    return model


@hookimpl
def kd_register_backbones(registry):
    registry.register("convnext_attn", convnext_attn)
