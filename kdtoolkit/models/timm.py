"""The timm adapter: any timm model with a 4-D feature map as a ``Backbone``."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from kdtoolkit.config.pretrained import timm_hub_problem
from kdtoolkit.errors import KdError, suggestion

_PROBE_SIZE = 64


def _first_conv_in_chans(model: nn.Module) -> int:
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            return module.in_channels
    raise KdError(f"cannot tell the input channels of {type(model).__name__}; pass in_chans")


class TimmBackbone(nn.Module):
    """Any timm model whose ``forward_features`` is a 4-D feature map.

    ``forward_features`` returns B×C×h×w (models with NHWC output, e.g. Swin, are permuted);
    ``forward_head`` is timm's own head (global pool → [norm] → linear). A probe forward on a
    small zero image at construction rejects models with token (3-D) features, e.g. ViTs.
    The timm model itself is ``self.model``.
    """

    def __init__(self, model: nn.Module, in_chans: int | None = None) -> None:
        super().__init__()
        self.model = model
        self.channels_last_features = getattr(model, "output_fmt", "NCHW") == "NHWC"
        in_chans = in_chans or _first_conv_in_chans(model)
        self.num_features = self._probe(in_chans)

    @property
    def name(self) -> str:
        cfg = getattr(self.model, "pretrained_cfg", None) or {}
        return str(cfg.get("architecture", type(self.model).__name__))

    def _probe(self, in_chans: int) -> int:
        sizes = [(_PROBE_SIZE, _PROBE_SIZE)]
        cfg = getattr(self.model, "pretrained_cfg", None) or {}
        if "input_size" in cfg:
            sizes.append(tuple(cfg["input_size"][-2:]))
        param = next(self.model.parameters())
        was_training = self.model.training
        self.model.eval()
        try:
            for i, size in enumerate(sizes):
                x = torch.zeros(1, in_chans, *size, device=param.device, dtype=param.dtype)
                try:
                    with torch.no_grad():
                        features = self.model.forward_features(x)
                    break
                except Exception as e:  # some models need their native size
                    if i == len(sizes) - 1:
                        raise KdError(f"backbone {self.name!r}: a probe forward failed: {e}") from e
        finally:
            self.model.train(was_training)
        if not isinstance(features, torch.Tensor) or features.ndim != 4:
            shape = tuple(features.shape) if isinstance(features, torch.Tensor) else "not a tensor"
            raise KdError(
                f"backbone {self.name!r} gives features of shape {shape}, not a B×C×h×w map; "
                f"Grad-CAM and ROI losses need a convolutional feature map (use a CNN such as "
                f"convnext_*, resnet*, efficientnet_*)"
            )
        return int(features.shape[-1] if self.channels_last_features else features.shape[1])

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last feature map, B×C×h×w."""
        features = self.model.forward_features(x)
        return features.permute(0, 3, 1, 2) if self.channels_last_features else features

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """Logits from the feature map (timm's ``forward_head``)."""
        if self.channels_last_features:
            features = features.permute(0, 2, 3, 1)
        return self.model.forward_head(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def create_timm_model(
    name: str,
    num_classes: int,
    in_chans: int,
    pretrained: str | None = None,
    drop_rate: float = 0.0,
    drop_path_rate: float = 0.0,
) -> nn.Module:
    """The plain timm model ``name`` (an error with close matches for an unknown name).
    Only ``pretrained == "timm"`` asks timm for its pretrained weights (hub cache, else the
    hub; ``HF_HUB_OFFLINE`` respected; a one-line ``KdError`` when neither has them, see
    ``kdtoolkit.config.pretrained``); timm adapts the first convolution to ``in_chans`` and
    leaves a classifier of another size at its initialisation. A local weights file is loaded
    afterwards by the caller (``kdtoolkit.models.weights``)."""
    import timm  # imported here: timm and torchvision take seconds to import

    if not timm.is_model(name):
        raise KdError(f"unknown timm model {name!r}{suggestion(name, timm.list_models())}")
    if pretrained == "timm":
        problem = timm_hub_problem(name, role="")
        if problem:
            raise KdError(f"pretrained: {problem}")
    kwargs: dict[str, Any] = {"num_classes": num_classes, "in_chans": in_chans}
    if drop_rate:
        kwargs["drop_rate"] = drop_rate
    if drop_path_rate:
        kwargs["drop_path_rate"] = drop_path_rate
    return timm.create_model(name, pretrained=pretrained == "timm", **kwargs)
