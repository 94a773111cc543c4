"""Built-in plugin: every timm model name is a backbone, through a registry resolver.

Nothing is registered by name; the resolver turns any name of ``timm.list_models()`` into a
``timm_backbone`` factory with that name bound. Blocking this plugin
(``KD_DISABLE_PLUGINS=kdtoolkit.builtin.timm``) leaves only the registered backbones.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Annotated, Any

from kdtoolkit.config.option import Range
from kdtoolkit.models.timm import TimmBackbone, create_timm_model
from kdtoolkit.models.weights import load_pretrained_option
from kdtoolkit.plugins.hookspec import hookimpl


def timm_backbone(
    name: str,
    num_classes: int,
    in_chans: int,
    pretrained: str | None = None,
    drop_rate: Annotated[float, Range(ge=0, lt=1)] = 0.0,
    drop_path_rate: Annotated[float, Range(ge=0, lt=1)] = 0.0,
) -> TimmBackbone:
    """Any timm model by name. ``pretrained``: None (random init, no network), a local weights
    file (``kdtoolkit.models.weights.load_pretrained``) or ``"timm"`` (timm downloads its
    weights)."""
    model = TimmBackbone(
        create_timm_model(name, num_classes, in_chans, pretrained, drop_rate, drop_path_rate),
        in_chans,
    )
    load_pretrained_option(model, pretrained)
    return model


def bind_timm_name(name: str) -> Callable[..., TimmBackbone]:
    """``timm_backbone`` with ``name`` bound, as a factory whose keyword parameters declare
    the options (what ``kdtoolkit.config.option`` inspects)."""

    def factory(num_classes: int, in_chans: int, **options: Any) -> TimmBackbone:
        return timm_backbone(name, num_classes, in_chans, **options)

    signature = inspect.signature(timm_backbone)
    factory.__signature__ = signature.replace(  # type: ignore[attr-defined]
        parameters=[p for p in signature.parameters.values() if p.name != "name"]
    )
    factory.__annotations__ = {
        k: v for k, v in timm_backbone.__annotations__.items() if k != "name"
    }
    factory.__name__ = factory.__qualname__ = f"timm_backbone[{name}]"
    return factory


def resolve_timm_name(name: str) -> Callable[..., TimmBackbone] | None:
    """The factory of timm model ``name``, or None when timm does not know the name."""
    import timm  # imported on first use: timm and torchvision take seconds to import

    return bind_timm_name(name) if timm.is_model(name) else None


def timm_names() -> list[str]:
    """Every timm model name."""
    import timm

    return timm.list_models()


@hookimpl
def kd_register_backbones(registry):
    registry.add_resolver(
        "timm", resolve_timm_name, describe="any timm model name", candidates=timm_names
    )
