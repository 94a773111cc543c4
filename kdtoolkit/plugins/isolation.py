"""Process-wide torch settings a plugin's code leaves as it found them (``torch_state``):
the engine runs every ROI provider inside it (``kdtoolkit.plugins.roi.run_provider``), so a
detector's training library cannot change the threads, determinism or random streams of the
stages after it."""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Iterator

import numpy as np
import torch

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
