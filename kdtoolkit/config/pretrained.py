"""``teacher.pretrained`` / ``student.pretrained``: a model's starting weights, checked when a
recipe is validated (``kd validate``); nothing is downloaded here.

- ``false``: random initialisation;
- a path: a local weights file, safetensors or a torch/timm state dict (read with
  ``weights_only=True``; nothing is ever unpickled);
- ``"timm"``: timm's own pretrained weights of the backbone's timm model (the backbone name, or
  its ``variant`` option for a registered backbone built on timm), from the Hugging Face hub
  cache or the hub. ``HF_HUB_OFFLINE=1`` is respected: offline and not cached is an error that
  says how to pass a local file, never a silent fallback to random weights.

The key is the same as the backbone option ``backbone_options.pretrained`` (the value the
backbone factory receives); :func:`check_model_pretrained` fills one from the other.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from kdtoolkit.config.option import declared_options
from kdtoolkit.fileio import first_line

#: Hub tags: pretrained weights fetched by a library rather than read from a file.
HUB_TAGS = ("timm",)
#: Files timm reads from a hub repository, in its order (safetensors first).
HUB_FILES = ("model.safetensors", "pytorch_model.bin")
_TRUE = {"1", "ON", "YES", "TRUE"}


def local_hint(role: str) -> str:
    """How to pass a local file instead (``role``: ``teacher``/``student``, or "")."""
    key = f"{role}.pretrained" if role else "pretrained"
    file = '"path/to/weights.safetensors"'
    return f"download the weights elsewhere and pass a local file: {key} = {file}"


def weights_file_problem(path: str | Path) -> str | None:
    """None when ``path`` is a readable weights file (a safetensors header, or a torch file
    that ``torch.load(weights_only=True)`` reads into tensors); else what is wrong."""
    path = Path(path).expanduser()
    if not path.is_file():
        return f"{str(path)!r}: no such file"
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                keys = list(f.keys())
        except Exception as e:  # any unreadable header is the user's file
            return f"{str(path)!r}: not a safetensors file ({str(e).splitlines()[0]})"
        return None if keys else f"{str(path)!r}: holds no tensors"
    import pickle

    import torch

    try:
        try:
            state: Any = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # the legacy (non-zip) format cannot be memory-mapped
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        return (
            f"{str(path)!r}: holds Python objects that a weights-only load refuses (files are "
            "never unpickled); save a state dict of tensors or a .safetensors file"
        )
    except Exception as e:
        return f"{str(path)!r}: not a torch weights file ({first_line(e)})"
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not state:
        return f"{str(path)!r}: not a state dict of tensors"
    if not all(isinstance(v, torch.Tensor) for v in state.values()):
        return f"{str(path)!r}: not a state dict of tensors"
    return None


def hub_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` is set (read now, and as huggingface_hub read it)."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in _TRUE:
        return True
    try:
        from huggingface_hub import constants
    except ImportError:
        return False
    return bool(constants.HF_HUB_OFFLINE)


def _reachable(url: str, timeout: float = 3.0) -> bool:
    host = urlparse(url).hostname
    if not host:
        return False
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def _cached(pretrained_cfg: Any) -> bool:
    """True when timm's weights of ``pretrained_cfg`` are in the hub or torch-hub cache."""
    hub_id = getattr(pretrained_cfg, "hf_hub_id", None)
    if hub_id:
        from huggingface_hub import try_to_load_from_cache

        repo, _, revision = str(hub_id).partition("@")
        names = [pretrained_cfg.hf_hub_filename] if pretrained_cfg.hf_hub_filename else []
        for name in [*names, *HUB_FILES]:
            found = try_to_load_from_cache(repo, name, revision=revision or None)
            if isinstance(found, str):
                return True
    url = getattr(pretrained_cfg, "url", None)
    if url:
        import torch

        name = Path(urlparse(url).path).name
        return (Path(torch.hub.get_dir()) / "checkpoints" / name).is_file()
    return False


def timm_hub_problem(model: str, role: str = "teacher") -> str | None:
    """None when timm can load its pretrained weights of ``model`` (cached, or the hub is
    reachable and not switched off); else a one-line problem that says how to pass a file."""
    import timm.models

    try:
        cfg = timm.models.get_pretrained_cfg(model)
    except Exception:
        cfg = None
    if cfg is None or not (cfg.hf_hub_id or cfg.url or cfg.file):
        return f"timm has no pretrained weights for {model!r}; pass a local weights file"
    if cfg.file and Path(cfg.file).is_file():
        return None
    if _cached(cfg):
        return None
    if hub_offline():
        why = "HF_HUB_OFFLINE is set"
    else:
        from huggingface_hub import constants

        if _reachable(constants.ENDPOINT if cfg.hf_hub_id else str(cfg.url)):
            return None
        why = "the hub is not reachable"
    return (
        f"timm's pretrained weights of {model!r} are not in the local hub cache and {why}; "
        f"{local_hint(role)}"
    )


def timm_model_name(backbone: str, options: dict[str, Any], factory: Any) -> str | None:
    """The timm model whose weights ``"timm"`` means: ``backbone`` when timm knows it, else the
    backbone's ``variant`` option (its declared default when unset); None when neither is."""
    import timm

    if timm.is_model(backbone):
        return backbone
    declared = declared_options(factory)
    if "variant" in declared:
        variant = options.get("variant", declared["variant"].default)
        if isinstance(variant, str) and timm.is_model(variant):
            return variant
    return None


def check_model_pretrained(role: str, config: Any, factory: Any) -> list[str]:
    """Problems of ``{role}.pretrained`` (and ``{role}.backbone_options.pretrained``, the same
    value) for backbone ``factory``; on success both hold the value (``pretrained`` False and
    no option when none is wanted)."""
    key = f"{role}.pretrained"
    value, option = config.pretrained, config.backbone_options.get("pretrained")
    if value is True:
        return [f'{key}: true is ambiguous; use "timm" (timm\'s pretrained weights) or a file']
    if value == "":
        return [f'{key}: empty; use false, "timm" or a path to a weights file']
    if value is not False and option is not None and option != value:
        return [f"{key}: {role}.backbone_options.pretrained says {option!r}; keep one of the two"]
    value = value if value is not False else option
    if value is None or value is False:
        return []
    if "pretrained" not in declared_options(factory):
        return [
            f"{key}: backbone {config.backbone!r} takes no pretrained weights (no pretrained "
            "option); set it to false"
        ]
    if value in HUB_TAGS:
        name = timm_model_name(config.backbone, config.backbone_options, factory)
        if name is None:
            return [f'{key}: "timm" needs a timm model; {config.backbone!r} is not one']
        problem = timm_hub_problem(name, role)
    else:
        problem = weights_file_problem(value)
    if problem:
        return [f"{key}: {problem}"]
    config.pretrained, config.backbone_options["pretrained"] = value, value
    return []
