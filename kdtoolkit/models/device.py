"""The device a run uses, its fast-step policy (bf16 autocast and channels-last memory on CUDA,
``torch.compile`` of the feature trunk when asked) and process-wide seeding."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import random
import shutil
from typing import TypeVar

import numpy as np
import torch

from kdtoolkit.errors import KdError

T = TypeVar("T", torch.Tensor, torch.nn.Module)


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
    if device.type == "cuda" and device.index is not None:
        count = torch.cuda.device_count()
        if device.index >= count:
            raise KdError(
                f"experiment.device: {name!r} asked for but this machine has {count} CUDA "
                f"device(s) (cuda:0..cuda:{count - 1})"
            )
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


def channels_last(value: T, device: torch.device) -> T:
    """A 4-d tensor or a model in channels-last memory on CUDA (faster convolutions with
    autocast); unchanged on CPU."""
    if device.type != "cuda" or (isinstance(value, torch.Tensor) and value.ndim != 4):
        return value
    return value.to(memory_format=torch.channels_last)  # type: ignore[call-overload]


def compile_trunk(model: torch.nn.Module, device: torch.device, backend: str = "inductor") -> None:
    """``torch.compile`` the feature trunk of ``model`` in place (``experiment.compile``): its
    ``forward_features`` becomes the compiled one; the head stays eager, so the Grad-CAM term's
    second-order gradient never goes through compiled code. The weights (state dict) are
    unchanged. A one-line error when the compiler's tools are missing."""
    if backend == "inductor":
        if device.type == "cuda" and importlib.util.find_spec("triton") is None:
            raise KdError(
                "experiment.compile: torch.compile on CUDA needs triton, which is not "
                "installed; pip install triton or set experiment.compile = false"
            )
        compilers = (os.environ.get("CXX", ""), "g++", "clang++", "c++")
        if device.type == "cpu" and not any(c and shutil.which(c) for c in compilers):
            raise KdError(
                "experiment.compile: torch.compile on the CPU needs a C++ compiler (g++, "
                "clang++ or $CXX) and none was found; install one or set "
                "experiment.compile = false"
            )
    model.forward_features = torch.compile(model.forward_features, backend=backend)
