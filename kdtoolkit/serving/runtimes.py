"""The runtimes an export is served with: onnxruntime, TorchScript, ``torch.export``; the
optional ONNX packages, imported with one line naming the extra when missing."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdtoolkit.errors import KdError
from kdtoolkit.serving.exported import onnx_session, private_caches

INSTALL = 'pip install "kdtoolkit[export]"'
Runtime = Callable[[np.ndarray], list[np.ndarray]]


def require(*modules: str) -> None:
    """Import ``modules``; one line naming the extra when one is missing."""
    import importlib

    for name in modules:
        try:
            with private_caches():  # onnxruntime writes a device id when imported
                importlib.import_module(name)
        except ImportError:
            raise KdError(
                f"ONNX export needs onnx, onnxscript and onnxruntime ({name} is missing): {INSTALL}"
            ) from None


def load_program(path: Path, extra_files: dict[str, str] | None = None) -> Any:
    """``torch.export.load`` without the traceback torch logs (as a warning) before it raises
    on a damaged file: the caller turns the error into one line."""
    logger = logging.getLogger("torch.export")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        return torch.export.load(str(path), extra_files=extra_files)
    finally:
        logger.setLevel(level)


def load_runtime(path: Path, fmt: str) -> Runtime:
    """A function running the exported file at ``path`` in its own runtime: onnxruntime (CPU),
    ``torch.jit.load`` or ``torch.export.load``; N×C×H×W float32 in, its outputs out."""
    if fmt == "onnx":
        require("onnxruntime")
        session = onnx_session(path, torch.get_num_threads())  # as many threads as torch
        return lambda x: list(session.run(None, {"image": x}))
    if fmt == "torchscript":
        with warnings.catch_warnings():  # TorchScript is deprecated, still what servers run
            warnings.simplefilter("ignore", FutureWarning)
            module = torch.jit.load(str(path), map_location="cpu")
    else:
        module = load_program(path).module()

    def run(x: np.ndarray) -> list[np.ndarray]:
        with torch.no_grad():
            out = module(torch.from_numpy(x))
        return [t.numpy() for t in (out if isinstance(out, tuple | list) else (out,))]

    return run


def run_in_batches(runtime: Runtime, x: np.ndarray) -> list[np.ndarray]:
    """The runtime on a batch of one, one of three, then the rest (the batch axis is
    dynamic: a graph that fixed it fails here)."""
    parts = [runtime(x[a:b]) for a, b in ((0, 1), (1, 4), (4, len(x))) if a < min(b, len(x))]
    return [np.concatenate(outs) for outs in zip(*parts, strict=True)]
