"""The device a run uses, its fast-step policy (bf16 autocast and channels-last memory on CUDA,
``torch.compile`` of the feature trunk when asked), process-wide seeding and the process-wide
torch settings a stage leaves as it found them (``torch_state``)."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import random
import shutil
from collections.abc import Iterator
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
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


#: Environment variables torch and its libraries read that a stage's code may set (cuBLAS's
#: deterministic workspace, the OpenMP thread count, the hash seed of child processes).
TORCH_ENV = ("CUBLAS_WORKSPACE_CONFIG", "OMP_NUM_THREADS", "PYTHONHASHSEED")


@contextlib.contextmanager
def torch_state() -> Iterator[None]:
    """Process-wide torch settings restored after the block, so nothing a stage (a detector's
    training library) sets leaks into the stages after it: intra-op threads, the
    deterministic-algorithms flag (with its warn-only mode and memory fill), cuDNN's
    ``deterministic``/``benchmark``/``enabled``/``allow_tf32``, the matmul TF32 switch and
    precision, the default dtype, the global random states (Python, NumPy, torch, CUDA once
    initialised) and ``TORCH_ENV``. The inter-op thread count can be set once per process and
    is left as it is."""
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    det = torch.utils.deterministic
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    fill = det.fill_uninitialized_memory
    flags = {k: getattr(cudnn, k) for k in ("deterministic", "benchmark", "enabled", "allow_tf32")}
    tf32, precision = matmul.allow_tf32, torch.get_float32_matmul_precision()
    dtype = torch.get_default_dtype()
    env = {k: os.environ.get(k) for k in TORCH_ENV}
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        if (deterministic, warn_only) != (
            torch.are_deterministic_algorithms_enabled(),
            torch.is_deterministic_algorithms_warn_only_enabled(),
        ):
            torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
        det.fill_uninitialized_memory = fill
        for name, value in flags.items():
            setattr(cudnn, name, value)
        if matmul.allow_tf32 != tf32:
            matmul.allow_tf32 = tf32
        if torch.get_float32_matmul_precision() != precision:
            torch.set_float32_matmul_precision(precision)
        torch.set_default_dtype(dtype)
        for k, v in env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


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
