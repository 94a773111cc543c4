"""Digests that tie an exported file to what it was made from: the weights and program inside
the file, the checkpoint's weights and the preprocessing. ``kd export`` records them in the
file's metadata; ``kd export --verify`` recomputes them, so any changed byte of the weights
fails the check, however little it moves the probabilities."""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Any

import torch

from kdtoolkit.errors import KdError
from kdtoolkit.serving.runtimes import load_program

#: The metadata keys of the digests (sha256, hex).
KEYS = ("graph_sha256", "weights_sha256", "preprocess_sha256")


def tensors_sha256(tensors: dict[str, torch.Tensor], extra: str = "") -> str:
    """sha256 over the tensors' names, dtypes, shapes and bytes (sorted by name), then
    ``extra`` (a program's code)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    h.update(extra.encode())
    return h.hexdigest()


def json_sha256(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def onnx_sha256(model: Any) -> str:
    """sha256 of an ONNX model's serialised bytes without its metadata properties (where
    the digests themselves are kept): every initializer, node and attribute."""
    import onnx

    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    del copy.metadata_props[:]
    return hashlib.sha256(copy.SerializeToString(deterministic=True)).hexdigest()


def program_sha256(program: Any) -> str:
    """sha256 of a TorchScript module's or ``torch.export`` program's weights, buffers and
    constants, and its code (of every TorchScript submodule)."""
    if isinstance(program, torch.jit.ScriptModule):  # every submodule's code, not the top's
        code = "".join(f"{name}\n{code_of(m)}" for name, m in program.named_modules())
        return tensors_sha256(dict(program.state_dict()), code)
    tensors = {
        **program.state_dict,
        **{f"constant.{k}": v for k, v in program.constants.items() if isinstance(v, torch.Tensor)},
    }
    return tensors_sha256(tensors, program.graph_module.code)


def code_of(module: Any) -> str:
    """A TorchScript module's code ('' for one without a method of its own, e.g. a container)."""
    try:
        return module.code
    except (AttributeError, RuntimeError):
        return ""


def file_sha256(path: Path, fmt: str) -> str:
    """The graph digest of an exported file, as ``kd export`` recorded it."""
    if fmt == "onnx":
        import onnx

        return onnx_sha256(onnx.load(str(path)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if fmt == "torchscript":
            return program_sha256(torch.jit.load(str(path), map_location="cpu"))
        return program_sha256(load_program(path))


def check_digests(path: Path, meta: dict[str, Any], weights: str, preprocess: str) -> None:
    """Refuse an export whose weights or program differ from those it was written with, whose
    checkpoint's weights (``weights``) changed since, or whose recorded preprocessing was
    edited (``preprocess``: the digest of the metadata's preprocessing part)."""
    missing = [k for k in KEYS if k not in meta]
    if missing:
        raise KdError(
            f"{path}: records no digest ({', '.join(missing)}); it was exported by an older "
            "version: export it again"
        )
    try:
        graph = file_sha256(path, meta["format"])
    except Exception as e:  # noqa: BLE001 - a damaged file is one line
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise KdError(f"{path}: cannot be read ({first}); export it again") from None
    found = [
        what
        for what, ok in (
            ("its weights or program changed since it was exported", graph == meta["graph_sha256"]),
            (
                "the checkpoint's weights are not those it was exported from",
                weights == meta["weights_sha256"],
            ),
            ("its recorded preprocessing was edited", preprocess == meta["preprocess_sha256"]),
        )
        if not ok
    ]
    if found:
        raise KdError(f"{path}: digest check failed: {'; '.join(found)}; export it again")
