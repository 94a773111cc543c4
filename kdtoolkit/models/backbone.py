"""The backbone interface, and how a backbone name becomes a model.

A backbone is an ``nn.Module`` that satisfies ``Backbone``. Names resolve in the backbone
registry (``kdtoolkit.plugins.manager.registries().backbones``): the names plugins registered
(e.g. ``convnext_attn``, ``roi_zoom``) first, then the registry's resolvers (the built-in
``kdtoolkit.builtin.timm`` plugin resolves any timm model name). ``build_backbone`` checks a
recipe's options against the factory's declaration and builds the model.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from kdtoolkit.config.option import check_options
from kdtoolkit.errors import KdError
from kdtoolkit.plugins.manager import registries

RESERVED = ("num_classes", "in_chans")
"""Factory parameters the engine fills itself; every other keyword parameter is an option."""


@runtime_checkable
class Backbone(Protocol):
    """What the engine needs of a model (``isinstance(model, Backbone)`` checks the names).

    - ``forward_features(x)``: the last feature map, B×C×h×w;
    - ``forward_head(features)``: logits from that map; cheap (pooling → norm → linear, plus
      an attention block where the model has one), so Grad-CAM is taken through it alone
      (``kdtoolkit.models.gradcam``);
    - ``forward(x)``: ``forward_head(forward_features(x))``;
    - ``num_features``: C, the channels of the feature map.

    Optional methods, looked up with ``getattr`` by the engine:

    - ``image_attention(x) -> B×H×W`` in [0, 1]: where the model looks, for a model whose
      feature map is not in image coordinates (used instead of Grad-CAM for figures and
      metrics, e.g. ``roi_zoom``);
    - ``load_teacher(state)``: start the student from a crop teacher's state dict (with
      ``student.init_from_teacher``); without it the whole state dict is loaded.
    """

    num_features: int

    def forward_features(self, x: torch.Tensor) -> torch.Tensor: ...

    def forward_head(self, features: torch.Tensor) -> torch.Tensor: ...

    def forward(self, x: torch.Tensor) -> torch.Tensor: ...


def backbone_options_factory(name: str) -> Callable[..., nn.Module]:
    """The factory that builds backbone ``name`` (registered or resolved); its keyword
    parameters other than ``RESERVED`` are the backbone's options. ``KdError`` with close
    matches for an unknown name."""
    return registries().backbones.get(name)


def is_known_backbone(name: str) -> bool:
    """True when the backbone registry knows ``name`` (registered or resolved)."""
    return name in registries().backbones


def unknown_message(name: str) -> str:
    """'unknown backbone ...' with close matches, as the backbone registry words it."""
    return registries().backbones.unknown_message(name)


def build_backbone(
    name: str, num_classes: int, in_chans: int, options: dict[str, Any] | None = None
) -> nn.Module:
    """Build backbone ``name`` with its recipe ``options``; options are checked against the
    factory's declaration first (``KdError`` listing every problem)."""
    factory = backbone_options_factory(name)
    options = dict(options or {})
    problems = check_options(factory, options, f"backbone.{name}", reserved=RESERVED)
    if problems:
        raise KdError("; ".join(problems))
    return factory(num_classes=num_classes, in_chans=in_chans, **options)


def create_backbone(name: str, *, num_classes: int, in_chans: int = 1, **options: Any) -> nn.Module:
    """Build backbone ``name`` with keyword ``options``, like ``timm.create_model``::

    model = create_backbone("convnext_attn", num_classes=4, variant="convnext_atto")
    """
    return build_backbone(name, num_classes, in_chans, options)
