"""An exported student served with onnxruntime alone (no torch): ``ExportedModel`` reads the
kdtoolkit metadata inside an ONNX file written by ``kd export`` (input, preprocessing, scan
read settings, classes, temperature inside the graph; a fold ensemble's folds) and predicts as
``KdModel`` does on the checkpoint. ``pip install "kdtoolkit[serve]"`` installs what it
needs."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from kdtoolkit.errors import KdError
from kdtoolkit.fileio import private_cache_dir
from kdtoolkit.serving.predictor import Predictor
from kdtoolkit.serving.preprocess import export_read_spec, input_spec

META_KEY = "kdtoolkit"
SERVE_INSTALL = 'pip install "kdtoolkit[serve]"'


def onnx_session(path: Path, threads: int = 0) -> Any:
    """An onnxruntime CPU session of ``path`` (``threads`` 0: onnxruntime's choice); one line
    when the runtime is missing or the file is not a model."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise KdError(f"serving an ONNX model needs onnxruntime: {SERVE_INSTALL}") from None
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    try:
        with private_caches():
            return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - onnxruntime's own errors become one line
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise KdError(
            f"{path}: cannot be loaded as an ONNX model ({first}); export it again"
        ) from None


@contextlib.contextmanager
def private_caches() -> Iterator[None]:
    """onnxruntime keeps a device id under ``$XDG_CACHE_HOME``; point it at kdtoolkit's
    per-user temporary folder while a session is made (unless the user chose a folder)."""
    saved = os.environ.get("XDG_CACHE_HOME")
    if saved is None:
        os.environ["XDG_CACHE_HOME"] = str(private_cache_dir())
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("XDG_CACHE_HOME", None)


class ExportedModel(Predictor):
    """An ONNX export of ``kd export`` on onnxruntime: its probabilities are the calibrated
    ones (the temperature is inside the graph); a fold-ensemble export averages its folds."""

    def __init__(self, path: str | Path, threads: int = 0) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise KdError(f"{self.path}: no such exported model")
        self.session = onnx_session(self.path, threads)
        text = self.session.get_modelmeta().custom_metadata_map.get(META_KEY)
        try:
            meta = json.loads(text) if text else None
            if not isinstance(meta, dict):
                raise ValueError("no kdtoolkit metadata")
            self.metadata: dict[str, Any] = meta
            self.classes = list(meta["classes"])
            self.spec = input_spec(meta["preprocess"])
            self.read = export_read_spec(meta)
            self.view = meta["preprocess"].get("view", "image")
        except (ValueError, KeyError, TypeError) as e:
            raise KdError(
                f"{self.path}: not a kd export or its metadata is incomplete ({e}); export it "
                "with kd export"
            ) from None
        self.folds = list(meta["folds"]) if meta.get("folds") is not None else None

    def batch_proba(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(["probabilities"], {"image": np.ascontiguousarray(x)})[0]
