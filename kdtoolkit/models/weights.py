"""Local pretrained weights: safetensors files and torch/timm state dicts (never the network).

A backbone's ``pretrained`` option (the recipe's ``teacher.pretrained``/``student.pretrained``,
checked by ``kdtoolkit.config.pretrained`` at validation) is None (random initialisation), a
path to a local weights file (``load_pretrained``) or ``"timm"`` (timm loads its own weights
when the model is created, from the hub cache or the hub); ``load_pretrained_option`` applies it
after construction. Torch files are only ever read with ``weights_only=True``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdtoolkit.errors import KdError
from kdtoolkit.fileio import first_line
from kdtoolkit.models.timm import TimmBackbone

log = logging.getLogger(__name__)


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # any unreadable file is the user input
        raise KdError(f"pretrained weights {path}: cannot read ({first_line(e)})") from None
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
    Torch files are read with ``weights_only=True``. A plain timm checkpoint loads into a
    ``TimmBackbone``'s inner model (parameters a subclass adds, such as ConvNeXtAttn's
    attention, keep their initialisation). With ``adapt`` (timm's own pretrained rules) a first
    convolution with another number of input channels is adapted and a classifier of another
    size is left at its initialisation. Any other missing, unexpected or differently shaped key
    raises ``KdError`` naming the file and the keys.
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


def load_pretrained_option(model: nn.Module, pretrained: str | None) -> None:
    """Apply a backbone's ``pretrained`` option after construction: a path is loaded with
    ``load_pretrained``; None and ``"timm"`` (already handled by timm) do nothing."""
    if pretrained is not None and pretrained != "timm":
        load_pretrained(model, pretrained)
