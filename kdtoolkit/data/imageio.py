"""Decoding images into [0, 1] float arrays and C×H×W tensors.

Integers are divided by their dtype's maximum (255 or 65535); RGB becomes grey with BT.601
luma; grey becomes RGB by repeating the channel; alpha is dropped.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from kdtoolkit.errors import KdError

#: ITU-R BT.601 luma weights, used to turn RGB into grey.
LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def read_native(path: str | Path) -> np.ndarray:
    """Decode ``path`` into H×W×c (c = 1 or 3) uint8, uint16 or float32, without scaling."""
    try:
        with Image.open(path) as im:
            mode = im.mode
            if mode.startswith("I;16"):
                arr = np.asarray(im).astype(np.uint16)
            elif mode == "I":
                arr = np.asarray(im)
                if arr.size and (arr.min() < 0 or arr.max() > 65535):
                    raise KdError(
                        f"{path}: 32-bit integer image with values outside 0..65535 — save it "
                        "as 8- or 16-bit"
                    )
                arr = arr.astype(np.uint16)
            elif mode == "F":
                arr = np.clip(np.asarray(im, dtype=np.float32), 0.0, 1.0)
            elif mode in ("1", "L", "LA"):
                arr = np.asarray(im.convert("L"))
            else:
                arr = np.asarray(im.convert("RGB"))
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise KdError(f"{path}: unreadable image ({exc}) — use PNG, JPEG or TIFF") from None
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return np.ascontiguousarray(arr)


def to_float(native: np.ndarray, channels: int) -> np.ndarray:
    """Scale a :func:`read_native` array by its dtype's maximum into [0, 1] float32; RGB
    becomes grey when ``channels == 1`` (grey stays single-channel, see
    :func:`expand_channels`)."""
    if channels not in (1, 3):
        raise KdError(f"channels must be 1 or 3, got {channels}")
    if native.dtype == np.float32:
        out = native.astype(np.float32, copy=True)
    else:
        out = native.astype(np.float32) / np.float32(np.iinfo(native.dtype).max)
    if channels == 1 and out.shape[2] == 3:
        out = (out @ LUMA)[:, :, None]
    return np.ascontiguousarray(out)


def expand_channels(t: torch.Tensor, channels: int) -> torch.Tensor:
    """…×C×H×W with 1 channel → ``channels`` channels (grey → RGB repeats)."""
    if t.shape[-3] == channels:
        return t
    return t.expand(*t.shape[:-3], channels, *t.shape[-2:]).contiguous()


def load_image(path: str | Path, channels: int) -> np.ndarray:
    """Read a PNG/JPEG/TIFF (8- or 16-bit, grey or RGB) as float32 H×W×``channels`` in [0, 1]."""
    arr = to_float(read_native(path), channels)
    if arr.shape[2] != channels:
        arr = np.repeat(arr, channels, axis=2)
    return arr


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """An H×W or H×W×C image as a float32 C×H×W tensor."""
    arr = np.asarray(image, dtype=np.float32)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


def to_array(t: torch.Tensor) -> np.ndarray:
    """A C×H×W tensor as an H×W×C array."""
    return np.ascontiguousarray(t.permute(1, 2, 0).cpu().numpy())


def image_tensor(image: np.ndarray | str | Path, channels: int) -> torch.Tensor:
    """A raw image as a [0, 1] C×H×W tensor (C = 1 or ``channels``): a path, or an array as
    from :func:`load_image` (float in [0, 1]) or uint8/uint16 (scaled by the dtype's maximum)."""
    if isinstance(image, str | Path):
        return to_tensor(to_float(read_native(image), channels))
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3):
        raise KdError(f"expected an H×W, H×W×1 or H×W×3 image, got shape {arr.shape}")
    if arr.dtype in (np.uint8, np.uint16):
        arr = to_float(arr, channels)
    else:
        arr = arr.astype(np.float32)
        if channels == 1 and arr.shape[2] == 3:
            arr = arr @ LUMA
    return to_tensor(arr)
