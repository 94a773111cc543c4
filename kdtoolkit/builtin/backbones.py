"""Built-in backbones. Any timm model name works without registration (the timm resolver);
this plugin adds ``convnext_attn``, ConvNeXt with a spatial-attention or attention-pooling
head, and ``roi_zoom``, a full-image student that locates and resamples its ROI."""

from __future__ import annotations

from kdtoolkit.builtin.roi_zoom import roi_zoom
from kdtoolkit.models.backbone import convnext_attn
from kdtoolkit.plugins.hookspec import hookimpl


@hookimpl
def kd_register_backbones(registry):
    registry.register("convnext_attn", convnext_attn)
    registry.register("roi_zoom", roi_zoom)
