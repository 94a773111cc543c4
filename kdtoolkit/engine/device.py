"""The device a run uses, its autocast policy and process-wide seeding."""

from __future__ import annotations

import contextlib
import random

import numpy as np
import torch

from kdtoolkit.errors import KdError


def resolve_device(name: str) -> torch.device:
    """``auto`` → CUDA when present, else CPU; otherwise the named device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise KdError(
            f"experiment.device: unknown device {name!r} (auto, cpu, cuda, cuda:N)"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise KdError(f"experiment.device: {name!r} asked for but no CUDA device is available")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA, nothing on CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
