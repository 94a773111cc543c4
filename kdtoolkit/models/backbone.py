"""Backbones: timm models behind one small interface, and ConvNeXt with an attention head.

A backbone is an ``nn.Module`` with ``forward_features(x)`` (last feature map, B×C×h×w),
``forward_head(features)`` (logits; cheap: pooling → norm → linear, so Grad-CAM can be taken
through it alone, see ``kdtoolkit.models.gradcam``), ``forward(x)`` and ``num_features`` (C).

Names resolve first in the backbone registry (plugins, e.g. ``convnext_attn``), then as any timm
model name (``timm.list_models()``). Weights: ``pretrained=None`` (default) never touches the
network; a path loads a local safetensors or torch state dict (``load_pretrained``); the word
``"timm"`` asks timm to fetch its pretrained weights (network, opt-in).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

import timm
import torch
from torch import nn

from kdtoolkit.config.option import Range, check_options
from kdtoolkit.errors import KdError, close_matches, suggestion

log = logging.getLogger(__name__)

RESERVED = ("num_classes", "in_chans")
"""Factory parameters the engine fills itself; every other keyword parameter is an option."""

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


# --------------------------------------------------------------------------- weights


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # any unreadable file is the user input
        raise KdError(f"pretrained weights {path}: cannot read: {e}") from e
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise KdError(f"pretrained weights {path}: not a state dict of tensors")
    return state


def _strip(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor] | None:
    if state and all(k.startswith(prefix) for k in state):
        return {k[len(prefix) :]: v for k, v in state.items()}
    return None


def _listing(keys: list[str], n: int = 5) -> str:
    shown = ", ".join(keys[:n])
    return f"{shown} (+{len(keys) - n} more)" if len(keys) > n else shown


def _adapt_timm(
    target: nn.Module, state: dict[str, torch.Tensor], own: dict[str, torch.Tensor]
) -> list[str]:
    """timm's pretrained conventions: a first conv with other input channels is adapted
    (``timm.models.adapt_input_conv``) and a classifier of another size is dropped (kept at
    its initialisation). Returns the dropped keys."""
    wrapped = isinstance(target, TimmBackbone)
    timm_model = target.model if wrapped else target
    prefix = "model." if wrapped else ""
    cfg = getattr(timm_model, "pretrained_cfg", None) or {}
    first = cfg.get("first_conv")
    for name in [first] if isinstance(first, str) else list(first or []):
        key = f"{prefix}{name}.weight"
        if key in state and key in own and state[key].ndim == 4 == own[key].ndim:
            src, dst = state[key].shape, own[key].shape
            if src[1] != dst[1] and (src[0], *src[2:]) == (dst[0], *dst[2:]):
                from timm.models import adapt_input_conv

                state[key] = adapt_input_conv(dst[1], state[key])
    dropped = []
    classifier = cfg.get("classifier")
    for name in [classifier] if isinstance(classifier, str) else list(classifier or []):
        for suffix in (".weight", ".bias"):
            key = f"{prefix}{name}{suffix}"
            if key in state and key in own and state[key].shape != own[key].shape:
                del state[key]
                dropped.append(key)
    return dropped


def load_pretrained(model: nn.Module, path: str | Path, *, adapt: bool = True) -> None:
    """Load a local safetensors file or torch/timm state dict into ``model``.

    The file may hold the state dict itself or wrap it in ``"state_dict"``/``"model"``; a
    leading ``module.`` (DDP) or ``model.`` prefix is stripped when that makes the keys fit.
    A plain timm checkpoint loads into a ``TimmBackbone``'s inner model (parameters the wrapper
    adds, such as ConvNeXtAttn's attention, keep their initialisation). With ``adapt`` (timm's
    own pretrained rules) a first convolution with another number of input channels is adapted
    and a classifier of another size is left at its initialisation. Any other missing,
    unexpected or differently shaped key raises ``KdError`` naming the file and the keys.
    """
    path = Path(path)
    if not path.is_file():
        raise KdError(f"pretrained weights {path}: no such file")
    raw = _read_state_dict(path)
    raw = _strip(raw, "module.") or raw
    variants = [raw] + [s for s in [_strip(raw, "model.")] if s is not None]
    targets: list[tuple[nn.Module, str]] = [(model, "")]
    if isinstance(model, TimmBackbone):
        targets.append((model.model, ""))
    best = max(
        ((t, s) for t, _ in targets for s in variants),
        key=lambda ts: len(ts[1].keys() & ts[0].state_dict().keys()),
    )
    target, state = best[0], dict(best[1])
    own = target.state_dict()
    dropped = _adapt_timm(target, state, own) if adapt else []
    missing = [k for k in own if k not in state and k not in dropped]
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in state
        if k in own and state[k].shape != own[k].shape
    ]
    problems = []
    for what, keys in (("missing", missing), ("unexpected", unexpected), ("shape", shapes)):
        if keys:
            problems.append(f"{len(keys)} {what} key(s): {_listing(keys)}")
    if problems:
        raise KdError(
            f"pretrained weights {path} do not fit {type(target).__name__}: " + "; ".join(problems)
        )
    if dropped:
        log.warning("%s: classifier %s has another size; it is not loaded", path, dropped)
    target.load_state_dict(state, strict=False)


# --------------------------------------------------------------------------- factories


def _create_timm(
    name: str,
    num_classes: int,
    in_chans: int,
    pretrained: str | None,
    drop_rate: float,
    drop_path_rate: float,
) -> nn.Module:
    if not timm.is_model(name):
        raise KdError(f"unknown timm model {name!r}{suggestion(name, timm.list_models())}")
    kwargs: dict[str, Any] = {"num_classes": num_classes, "in_chans": in_chans}
    if drop_rate:
        kwargs["drop_rate"] = drop_rate
    if drop_path_rate:
        kwargs["drop_path_rate"] = drop_path_rate
    return timm.create_model(name, pretrained=pretrained == "timm", **kwargs)


def _load_if_path(model: nn.Module, pretrained: str | None) -> None:
    if pretrained is not None and pretrained != "timm":
        load_pretrained(model, pretrained)


def timm_backbone(
    name: str,
    num_classes: int,
    in_chans: int,
    pretrained: str | None = None,
    drop_rate: Annotated[float, Range(ge=0, lt=1)] = 0.0,
    drop_path_rate: Annotated[float, Range(ge=0, lt=1)] = 0.0,
) -> TimmBackbone:
    """Any timm model by name. ``pretrained``: None (random init, no network), a local weights
    file (``load_pretrained``) or ``"timm"`` (timm downloads its weights)."""
    model = TimmBackbone(
        _create_timm(name, num_classes, in_chans, pretrained, drop_rate, drop_path_rate), in_chans
    )
    _load_if_path(model, pretrained)
    return model


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
    (``"pool"``) head. ``pretrained`` as in ``timm_backbone``; a plain timm checkpoint loads
    the ConvNeXt and leaves the attention at its (neutral) initialisation."""
    if kernel_size % 2 == 0:
        raise KdError(f"convnext_attn: kernel_size must be odd, not {kernel_size}")
    model = ConvNeXtAttn(
        _create_timm(variant, num_classes, in_chans, pretrained, drop_rate, drop_path_rate),
        in_chans,
        attention=attention,
        kernel_size=kernel_size,
    )
    _load_if_path(model, pretrained)
    return model


def _bind_timm_name(name: str) -> Callable[..., TimmBackbone]:
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


def _registry():
    from kdtoolkit.plugins.manager import registries

    return registries().backbones


def _did_you_mean(name: str) -> str:
    matches = close_matches(name, [*_registry().list(), *timm.list_models()], n=5)
    return " (did you mean " + " or ".join(repr(m) for m in matches) + "?)" if matches else ""


def unknown_message(name: str) -> str:
    """'unknown backbone ...' with close matches from the registry and timm's model list."""
    return (
        f"unknown backbone {name!r}{_did_you_mean(name)}; run `kd plugins` for the registered "
        f"ones, or any name of timm.list_models()"
    )


def is_known_backbone(name: str) -> bool:
    """True when ``name`` is a registered backbone or a timm model name."""
    return name in _registry() or timm.is_model(name)


def backbone_options_factory(name: str) -> Callable[..., nn.Module]:
    """The factory that builds backbone ``name``; its keyword parameters other than
    ``RESERVED`` are the backbone's options (``check_options(f, opts, path, RESERVED)``)."""
    registry = _registry()
    if name in registry:
        return registry.get(name)
    if timm.is_model(name):
        return _bind_timm_name(name)
    raise KdError(unknown_message(name))


def build_backbone(
    name: str, num_classes: int, in_chans: int, options: dict[str, Any] | None = None
) -> nn.Module:
    """Build backbone ``name`` (registry first, then timm) with its recipe ``options``;
    options are checked against the factory's declaration first."""
    factory = backbone_options_factory(name)
    options = dict(options or {})
    problems = check_options(factory, options, f"backbone.{name}", reserved=RESERVED)
    if problems:
        raise KdError("; ".join(problems))
    return factory(num_classes=num_classes, in_chans=in_chans, **options)
