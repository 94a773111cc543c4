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

from kdtoolkit.errors import KdError
from kdtoolkit.fileio import atomic_write_bytes, atomic_write_text

META_KEY = "kdtoolkit"


def save_checkpoint(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, Any]) -> None:
    """Write weights and metadata atomically (the old file stays intact if this fails)."""
    flat = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    text = json.dumps(metadata, sort_keys=True, default=str)
    atomic_write_bytes(Path(path), save(flat, metadata={META_KEY: text}))
    atomic_write_text(Path(path).with_suffix(".json"), json.dumps(metadata, indent=2, default=str))


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, metadata) of a checkpoint written by ``save_checkpoint``."""
    path = Path(path)
    if not path.is_file():
        raise KdError(f"{path}: checkpoint not found")
    data = path.read_bytes()
    try:
        tensors = load(data)
        header_len = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + header_len])
    except (SafetensorError, ValueError) as e:
        raise KdError(f"{path}: not a safetensors checkpoint ({e})") from None
    meta_text = header.get("__metadata__", {}).get(META_KEY)
    if meta_text is None:
        raise KdError(f"{path}: a safetensors file without kdtoolkit metadata")
    return tensors, json.loads(meta_text)


def save_state(path: Path, state: dict[str, Any]) -> None:
    """Atomically write a resume state (torch pickle of tensors and plain data)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(Path(path), buffer.getvalue())


def load_state(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)
