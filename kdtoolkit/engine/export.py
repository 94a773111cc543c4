"""Exporting a trained model for serving: ONNX, TorchScript or a ``torch.export`` program.

The exported graph is :class:`ServingModule`: the checkpoint's network followed by its
calibration (``probabilities_of``, the definition ``KdModel.predict`` uses), so the file outputs the
probabilities ``predict`` gives; optionally the feature map too, for a Grad-CAM after export.
The preprocessing (input size, letterbox, channels, normalisation, how scans are read, class
names) is written into the file's metadata (ONNX ``metadata_props``, a TorchScript extra file, a
``.pt2`` extra file; key ``kdtoolkit``) and into ``preprocess.json`` beside it. The file is
written to a temporary name, checked against ``KdModel`` (:mod:`kdtoolkit.serving.parity`), and
only then moved into place.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdtoolkit.engine.export_digest import (
    check_digests,
    json_sha256,
    onnx_sha256,
    program_sha256,
)
from kdtoolkit.engine.export_module import (
    export_metadata,
    preprocess_part,
    serving_module,
    weights_sha256,
)
from kdtoolkit.errors import KdError
from kdtoolkit.fileio import atomic_path, atomic_write_text, read_json
from kdtoolkit.serving.kdmodel import FoldEnsemble, KdModel
from kdtoolkit.serving.parity import Parity, check_parity, differing_keys, sample_inputs
from kdtoolkit.serving.runtimes import load_program, require

#: ``--format`` → the file suffix it is written with by default.
FORMATS = {"onnx": ".onnx", "torchscript": ".pt", "exported": ".pt2"}
META_KEY = "kdtoolkit"
EXTRA_FILE = "kdtoolkit.json"
SIDECAR = "preprocess.json"
MIN_OPSET = 18  # the oldest opset torch's dynamo ONNX exporter writes


def write_onnx(
    module: nn.Module, example: torch.Tensor, path: Path, meta: dict, opset: int | None
) -> None:
    require("onnx", "onnxscript")
    import onnx

    names = (
        ["probabilities", "features"] if getattr(module, "features", False) else ["probabilities"]
    )
    batch = torch.export.Dim("batch", min=1)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module,
            (example,),
            dynamo=True,
            input_names=["image"],
            output_names=names,
            dynamic_shapes={"image": {0: batch}},
            opset_version=opset,
            external_data=False,
            verbose=False,
        )
    model = program.model_proto
    meta["opset"] = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    meta["graph_sha256"] = onnx_sha256(model)
    onnx.helper.set_model_props(model, {META_KEY: json.dumps(meta)})
    onnx.save_model(model, str(path))


def write_torchscript(module: nn.Module, example: torch.Tensor, path: Path, meta: dict) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(module, example, check_trace=False)
        meta["graph_sha256"] = program_sha256(traced)
        torch.jit.save(traced, str(path), _extra_files={EXTRA_FILE: json.dumps(meta)})


def write_exported(module: nn.Module, example: torch.Tensor, path: Path, meta: dict) -> None:
    batch = torch.export.Dim("batch", min=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.export.export(module, (example,), dynamic_shapes={"image": {0: batch}})
        meta["graph_sha256"] = program_sha256(program)
        torch.export.save(program, str(path), extra_files={EXTRA_FILE: json.dumps(meta)})


def write_graph(
    module: nn.Module, example: torch.Tensor, tmp: Path, meta: dict, opset: int | None, what: str
) -> None:
    """Write ``module`` to ``tmp`` in ``meta["format"]``; an exporter's failure is one line
    naming ``what``."""
    fmt = meta["format"]
    try:
        if fmt == "onnx":
            write_onnx(module, example, tmp, meta, opset)
        elif fmt == "torchscript":
            write_torchscript(module, example, tmp, meta)
        else:
            write_exported(module, example, tmp, meta)
    except KdError:
        raise
    except Exception as e:  # noqa: BLE001 - an exporter's failure becomes one line
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise KdError(
            f"{what} could not be exported as {fmt} ({type(e).__name__}: {first}); try another "
            "--format"
        ) from None


def load_checkpoint_model(checkpoint: Path, ensemble: bool = False) -> KdModel | FoldEnsemble:
    """The ``KdModel`` of one checkpoint on the CPU, or with ``ensemble`` the ``FoldEnsemble``
    of a run folder (every fold the run asked for); a run folder without ``ensemble`` is an
    error naming a file."""
    if ensemble:
        if not checkpoint.is_dir():
            raise KdError(f"{checkpoint}: --ensemble exports a run folder's fold students; give it")
        return FoldEnsemble.load(checkpoint, device="cpu")
    if checkpoint.is_dir():
        raise KdError(
            f"{checkpoint} is a run folder; export one checkpoint, e.g. "
            f"{checkpoint / 'fold_0' / 'student' / 'model.safetensors'}, or all its folds as "
            "one graph with --ensemble (docs/deploy.md, Folds)"
        )
    return KdModel.load(checkpoint, device="cpu")


def format_of(path: Path) -> str:
    """The export format of a file, from its suffix."""
    for fmt, suffix in FORMATS.items():
        if path.suffix == suffix:
            return fmt
    raise KdError(
        f"{path}: not an exported model (.onnx, .pt or .pt2); give the file kd export wrote"
    )


def read_export_metadata(path: str | Path) -> dict[str, Any]:
    """The kdtoolkit metadata inside an exported file (any of the three formats)."""
    path = Path(path)
    if not path.is_file():
        raise KdError(f"{path}: no such exported model")
    fmt = format_of(path)
    try:
        if fmt == "onnx":
            require("onnx")
            import onnx

            props = {
                p.key: p.value
                for p in onnx.load(str(path), load_external_data=False).metadata_props
            }
            text = props.get(META_KEY)
        else:
            extra = {EXTRA_FILE: ""}
            if fmt == "torchscript":
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", FutureWarning)
                    torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
            else:
                load_program(path, extra)
            text = extra[EXTRA_FILE] or None
        if text is None:
            raise ValueError("it holds no kdtoolkit metadata")
        meta = json.loads(text)
    except KdError:
        raise
    except Exception as e:  # noqa: BLE001 - every loader's own error becomes one line
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise KdError(f"{path}: cannot be read as a kd export ({first}); export it again") from None
    return meta


@dataclass
class ExportResult:
    """What ``export_model`` wrote: the model file, its ``preprocess.json``, the metadata
    inside the file and the parity check that passed."""

    path: Path
    preprocess: Path
    metadata: dict[str, Any]
    parity: Parity


def check_options(tolerance: float, samples: int, opset: int | None = None) -> None:
    """Refuse an option no export can use, before any work: ``samples`` ≥ 1, a finite
    ``tolerance`` ≥ 0, an ``opset`` the ONNX exporter writes (18 to onnx's newest)."""
    if samples < 1:
        raise KdError(f"--samples {samples}: the parity check needs at least 1 image")
    if not (math.isfinite(tolerance) and tolerance >= 0):
        raise KdError(f"--tolerance {tolerance}: give a finite difference ≥ 0, e.g. 1e-4")
    if opset is not None:
        import onnx

        newest = onnx.defs.onnx_opset_version()
        if not MIN_OPSET <= opset <= newest:
            raise KdError(f"--opset {opset}: the exporter writes opsets {MIN_OPSET} to {newest}")


def check_writable(path: Path) -> None:
    """Refuse an output that cannot be written, before any work: a read-only file, a folder
    more than one missing level deep (one missing folder is made, no more), a
    ``preprocess.json`` beside it that is not a file, or a folder (the nearest existing one)
    that is not writable."""
    if path.exists() and not os.access(path, os.W_OK):
        raise KdError(f"-o {path}: the file is read-only; choose another -o or make it writable")
    if not path.parent.is_dir() and not path.parent.parent.is_dir():
        raise KdError(
            f"-o {path}: {path.parent.parent} does not exist; create it first (kd export makes "
            "one missing folder, no more)"
        )
    sidecar = path.parent / SIDECAR
    if sidecar.exists() and not sidecar.is_file():
        raise KdError(
            f"{sidecar}: is not a file; kd export writes the model's preprocessing there: "
            "remove it or choose another -o"
        )
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not os.access(folder, os.W_OK | os.X_OK):
        raise KdError(
            f"-o {path}: cannot write into {folder} (permission denied); choose another -o"
        )


def export_model(
    checkpoint: str | Path,
    output: str | Path | None = None,
    fmt: str = "onnx",
    *,
    features: bool = False,
    run: str | Path | None = None,
    tolerance: float = 1e-4,
    samples: int = 8,
    opset: int | None = None,
    ensemble: bool = False,
) -> ExportResult:
    """Export a checkpoint to ``output`` (default: beside it, with the format's suffix) as
    ``fmt`` (``onnx``, ``torchscript``, ``exported``), check parity against ``KdModel`` on
    ``samples`` inputs (held-out images of ``run``, else synthetic ones) and write
    ``preprocess.json`` beside it. A difference above ``tolerance`` is an error and leaves
    nothing written. With ``ensemble``, ``checkpoint`` is a run folder and the file is one
    graph of all its fold students (the mean of their calibrated probabilities, checked
    against ``FoldEnsemble``; default ``RUN/ensemble<suffix>``)."""
    if fmt not in FORMATS:
        raise KdError(f"--format {fmt!r}: use one of {', '.join(FORMATS)}")
    if fmt == "onnx":
        require("onnx", "onnxscript", "onnxruntime")
    checkpoint = Path(checkpoint)
    default = checkpoint / "ensemble" if ensemble else checkpoint
    path = Path(output) if output is not None else default.with_suffix(FORMATS[fmt])
    if path.suffix != FORMATS[fmt]:
        raise KdError(f"-o {path}: a {fmt} export is written as *{FORMATS[fmt]}; rename it")
    if path.is_dir():
        raise KdError(f"-o {path}: is a folder; give a file name ending in {FORMATS[fmt]}")
    check_options(tolerance, samples, opset if fmt == "onnx" else None)
    check_writable(path)
    if features and ensemble:
        raise KdError("--features with --ensemble: export one fold with --features for Grad-CAM")
    kd = load_checkpoint_model(checkpoint, ensemble)
    if features and not hasattr(kd.model, "forward_features"):
        raise KdError(f"{checkpoint}: backbone {kd.metadata.get('backbone')} has no feature map")
    images, kind = sample_inputs(kd, run, samples)
    example = kd.preprocess(images[:2])
    meta = export_metadata(kd, checkpoint, fmt, example, features)
    sidecar = path.parent / SIDECAR
    fix = "delete it, or export into a folder of its own"
    if sidecar.is_file() and read_json(sidecar, SIDECAR, fix) != preprocess_part(meta):
        raise KdError(
            f"{sidecar}: another model's preprocessing is there; export into a folder of its own"
        )
    meta["preprocess_sha256"] = json_sha256(preprocess_part(meta))
    module = serving_module(kd, features)
    made, had_sidecar = not path.parent.exists(), sidecar.exists()
    try:
        with atomic_path(path) as tmp:
            what = f"{checkpoint}: backbone {kd.metadata.get('backbone')!r}"
            try:
                write_graph(module, example, tmp, meta, opset, what)
                parity = check_parity(kd, tmp, meta, images, kind, tolerance)
            except KdError as e:  # name the -o path, not the temporary file
                raise KdError(str(e).replace(str(tmp), str(path))) from None
            parity.raise_if_failed(path)
            # before the model moves into place: a preprocess.json that cannot be written
            # leaves no model behind
            atomic_write_text(sidecar, json.dumps(preprocess_part(meta), indent=2) + "\n")
    except BaseException:
        with contextlib.suppress(OSError):
            if not had_sidecar:  # the model did not move into place: neither does this
                sidecar.unlink(missing_ok=True)
            if made:  # the one folder this export made, when nothing else is in it
                path.parent.rmdir()
        raise
    return ExportResult(path, sidecar, meta, parity)


def verify_export(
    checkpoint: str | Path,
    path: str | Path,
    run: str | Path | None = None,
    tolerance: float = 1e-4,
    samples: int = 8,
) -> Parity:
    """The parity check of an existing export against its checkpoint (a run folder: against
    its ``FoldEnsemble``, for an ``--ensemble`` export): inputs prepared as
    ``preprocess.json`` beside it says (what a server reads; the file's own metadata when
    there is none). The digests the export recorded are checked first (``export_digest``:
    any changed byte of its weights, another checkpoint, edited recorded preprocessing; an export
    without digests is refused); then a parity failure is an error naming the largest difference."""
    path = Path(path)
    check_options(tolerance, samples)
    meta = read_export_metadata(path)
    kd = load_checkpoint_model(Path(checkpoint), ensemble=Path(checkpoint).is_dir())
    weights = weights_sha256(kd)
    check_digests(path, meta, weights, json_sha256(preprocess_part(meta)))
    sidecar = path.parent / SIDECAR
    mismatched: list[str] = []
    if sidecar.is_file():
        served = read_json(sidecar, "export's preprocessing", "export the model again")
        mismatched = differing_keys(served, preprocess_part(meta))
        meta = {**meta, **served}
    images, inputs = sample_inputs(kd, run, samples)
    parity = check_parity(kd, path, meta, images, inputs, tolerance, mismatched)
    parity.raise_if_failed(path)
    return parity
