"""Checkpoints: safetensors weights with JSON metadata, written atomically.

``save_checkpoint(path, tensors, metadata)`` writes ``path`` (safetensors; the metadata JSON is
stored in its header under ``"kdtoolkit"``) and a readable ``path.with_suffix('.json')`` beside
it. Resume state (optimiser, scheduler, RNG) goes to a separate torch file via ``save_state``.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save
from torch import nn

from kdtoolkit.errors import KdError
from kdtoolkit.fileio import atomic_write_bytes, atomic_write_text, reading
from kdtoolkit.models.backbone import build_backbone

META_KEY = "kdtoolkit"


def save_checkpoint(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, Any]) -> None:
    """Write weights and metadata atomically (the old file stays intact if this fails)."""
    flat = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    bad = [k for k, v in flat.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise KdError(f"{path}: not written, weights {', '.join(bad[:3])} are not finite")
    text = json.dumps(metadata, sort_keys=True, default=str)
    atomic_write_bytes(Path(path), save(flat, metadata={META_KEY: text}))
    atomic_write_text(Path(path).with_suffix(".json"), json.dumps(metadata, indent=2, default=str))


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, metadata) of a checkpoint written by ``save_checkpoint``."""
    path = Path(path)
    if not path.is_file():
        raise KdError(f"{path}: checkpoint not found")
    with reading(path, "checkpoint", "give a model.safetensors written by kd run"):
        data = path.read_bytes()
        try:
            tensors = load(data)
        except SafetensorError as e:
            raise ValueError(f"not a safetensors file: {e}") from None
    return tensors, read_metadata(path)


def read_metadata(path: Path) -> dict[str, Any]:
    """The kdtoolkit metadata of a checkpoint, from its header alone (no tensors read)."""
    path = Path(path)
    with reading(path, "checkpoint", "give a model.safetensors written by kd run"):
        with open(path, "rb") as fh:
            size = int.from_bytes(fh.read(8), "little")
            if not 0 < size < 100_000_000:
                raise ValueError("not a safetensors file (bad header size)")
            header = json.loads(fh.read(size))
            ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
            fh.seek(0, 2)
            if fh.tell() < 8 + size + max(ends, default=0):
                raise ValueError("truncated: shorter than its header says")
        if META_KEY not in (header.get("__metadata__") or {}):
            raise ValueError("a safetensors file without kdtoolkit metadata")
        meta = json.loads(header["__metadata__"][META_KEY])
        if not isinstance(meta, dict):
            raise ValueError("its kdtoolkit metadata is not a JSON object")
    return meta


def save_state(path: Path, state: dict[str, Any]) -> None:
    """Atomically write a resume state (torch pickle of tensors and plain data)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(Path(path), buffer.getvalue())


def load_state(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


def weights_of(model: nn.Module, loss: nn.Module) -> dict[str, torch.Tensor]:
    """Model weights plus the loss terms' trainable parameters (``loss.`` prefix), on CPU."""
    out = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    out.update({f"loss.{k}": v.detach().cpu().clone() for k, v in loss.state_dict().items()})
    return out


def split_weights(weights: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """(model weights, loss-term weights) from ``weights_of`` output."""
    model = {k: v for k, v in weights.items() if not k.startswith("loss.")}
    loss = {k[5:]: v for k, v in weights.items() if k.startswith("loss.")}
    return model, loss


def load_model(checkpoint: str | Path, device: torch.device | str = "cpu"):
    """(model in eval mode, metadata) of a kdtoolkit checkpoint."""
    weights, meta = load_checkpoint(Path(checkpoint))
    return model_from_weights(weights, meta, checkpoint).to(device).eval(), meta


def model_from_weights(
    weights: dict[str, torch.Tensor], meta: dict[str, Any], checkpoint: str | Path
) -> nn.Module:
    """The model (on CPU, eval mode) that ``weights`` (``weights_of`` output) fill, built from
    the checkpoint metadata ``meta``; errors name ``checkpoint``."""
    model_weights, _ = split_weights(weights)
    with reading(checkpoint, "checkpoint's metadata", "give a model.safetensors written by kd run"):
        options = {k: v for k, v in meta["backbone_options"].items() if k != "pretrained"}
        str(meta["backbone"]), len(meta["classes"]), int(meta["channels"])
    try:
        model = build_backbone(meta["backbone"], len(meta["classes"]), meta["channels"], options)
        result = model.load_state_dict(model_weights, strict=False)
    except (KeyError, TypeError, RuntimeError) as e:
        raise KdError(
            f"{checkpoint}: its weights do not fit backbone {meta.get('backbone')!r} of its "
            f"metadata ({mismatch(e)}); use the model.json written with it"
        ) from None
    if result.missing_keys or result.unexpected_keys:
        keys = [*result.missing_keys[:2], *result.unexpected_keys[:2]]
        raise KdError(
            f"{checkpoint}: its weights do not fit backbone {meta['backbone']!r} of its metadata "
            f"({len(result.missing_keys)} missing, {len(result.unexpected_keys)} unexpected, "
            f"e.g. {', '.join(keys)}); use the model.json written with it"
        )
    bad = [k for k, v in model_weights.items() if v.is_floating_point() and not v.isfinite().all()]
    if bad:
        raise KdError(f"{checkpoint}: weights {', '.join(bad[:3])} are not finite; retrain it")
    return model.eval()


def mismatch(e: BaseException) -> str:
    """The first line of a load error, shortened (a size mismatch names one key)."""
    text = str(e).strip().splitlines()
    sized = [line.strip() for line in text if "size mismatch" in line]
    first = sized[0] if sized else (text[0] if text else "")
    return f"{type(e).__name__}: {first[:200]}"
