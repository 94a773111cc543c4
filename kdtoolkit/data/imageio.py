"""Decoding images into [0, 1] float arrays and C×H×W tensors: the one entry for every image.

Integers are divided by their dtype's maximum (255 or 65535); RGB becomes grey with BT.601
luma; grey becomes RGB by repeating the channel; alpha is dropped. Scans (DICOM, NIfTI) are cut
and scaled by :func:`kdtoolkit.data.scan.read_scan` with a :class:`~kdtoolkit.data.scan.ReadSpec`.

An image *source* is a path or a manifest sample (anything with ``image`` and ``read``
attributes: its path and its :class:`~kdtoolkit.data.scan.ReadSpec`, None for a 2D file).
"""

from __future__ import annotations

from collections.abc import Hashable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from kdtoolkit.data.scan import ReadSpec, read_scan
from kdtoolkit.data.volume import is_volume_path
from kdtoolkit.errors import KdError

if TYPE_CHECKING:  # torch is imported where tensors are made: reading needs numpy alone
    import torch

#: ITU-R BT.601 luma weights, used to turn RGB into grey.
LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def source_of(source: Any) -> tuple[Path, ReadSpec | None]:
    """(path, read spec) of an image source; a scan path alone gets the default spec."""
    if isinstance(source, str | Path):
        path = Path(source)
        return path, (ReadSpec() if is_volume_path(path) else None)
    return Path(source.image), getattr(source, "read", None)


def image_key(source: Any) -> Hashable:
    """What identifies the decoded image of a source (two slices of one scan differ)."""
    return source_of(source)


def read_native(source: Any, read: ReadSpec | None = None) -> np.ndarray:
    """Decode a source into H×W×c (c = 1 or 3) uint8, uint16 or float32, without scaling; a
    scan (or any source with a ``read`` spec) comes back as float32 H×W×1 in [0, 1]."""
    path, spec = source_of(source)
    spec = read or spec
    if spec is not None:
        return read_scan(path, spec).array[:, :, None]
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
                arr = np.asarray(im, dtype=np.float32)
                if bad := int(arr.size - np.isfinite(arr).sum()):
                    raise KdError(
                        f"{path}: holds NaN or infinite values ({bad} NaN or infinite pixels "
                        "of a float image) — fix the image or remove it"
                    )
                arr = np.clip(arr, 0.0, 1.0)
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


def load_image(source: Any, channels: int) -> np.ndarray:
    """Read a source (PNG/JPEG/TIFF, 8- or 16-bit, grey or RGB; a scan, see the module) as
    float32 H×W×``channels`` in [0, 1]."""
    arr = to_float(read_native(source), channels)
    if arr.shape[2] != channels:
        arr = np.repeat(arr, channels, axis=2)
    return arr


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """An H×W or H×W×C image as a float32 C×H×W tensor."""
    import torch

    arr = np.asarray(image, dtype=np.float32)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


def to_array(t: torch.Tensor) -> np.ndarray:
    """A C×H×W tensor as an H×W×C array."""
    return np.ascontiguousarray(t.permute(1, 2, 0).cpu().numpy())


def image_tensor(image: Any, channels: int) -> torch.Tensor:
    """:func:`image_array` as a C×H×W tensor."""
    return to_tensor(image_array(image, channels))


def image_array(image: Any, channels: int) -> np.ndarray:
    """A raw image as a [0, 1] float32 H×W×C array (C = 1 or ``channels``): a source, or an
    array as from :func:`load_image` (float in [0, 1]) or uint8/uint16 (scaled by the dtype's
    maximum)."""
    if isinstance(image, str | Path) or hasattr(image, "image"):
        return to_float(read_native(image), channels)
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3):
        raise KdError(f"expected an H×W, H×W×1 or H×W×3 image, got shape {arr.shape}")
    if arr.dtype in (np.uint8, np.uint16):
        return to_float(arr, channels)
    arr = arr.astype(np.float32)
    if channels == 1 and arr.shape[2] == 3:
        arr = (arr @ LUMA)[:, :, None]
    return arr
