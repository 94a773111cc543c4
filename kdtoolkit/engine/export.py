"""Exporting a trained model for serving: ONNX, TorchScript or a ``torch.export`` program.

The exported graph is :class:`ServingModule`: the checkpoint's network followed by its
calibration (``probabilities_of``, the definition ``KdModel.predict`` uses), so the file outputs the
probabilities ``predict`` gives; optionally the feature map too, for a Grad-CAM after export.
The preprocessing (input size, letterbox, channels, normalisation, how scans are read, class
names) is written into the file's metadata (ONNX ``metadata_props``, a TorchScript extra file, a
``.pt2`` extra file; key ``kdtoolkit``) and into ``preprocess.json`` beside it. The file is
written to a temporary name, checked against ``KdModel`` (:mod:`kdtoolkit.engine.parity`), and
only then moved into place.
"""

from __future__ import annotations

import contextlib
import dataclasses
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

from kdtoolkit.data.warp import ANTIALIAS_STEP
from kdtoolkit.engine.export_digest import (
    check_digests,
    json_sha256,
    onnx_sha256,
    program_sha256,
    tensors_sha256,
)
from kdtoolkit.engine.parity import Parity, check_parity, differing_keys, sample_inputs
from kdtoolkit.engine.predict import KdModel
from kdtoolkit.engine.runtimes import require
from kdtoolkit.errors import KdError
from kdtoolkit.fileio import atomic_path, atomic_write_text, read_json
from kdtoolkit.models.temperature import probabilities_of

#: ``--format`` → the file suffix it is written with by default.
FORMATS = {"onnx": ".onnx", "torchscript": ".pt", "exported": ".pt2"}
META_KEY = "kdtoolkit"
EXTRA_FILE = "kdtoolkit.json"
SIDECAR = "preprocess.json"
MIN_OPSET = 18  # the oldest opset torch's dynamo ONNX exporter writes
#: The keys of the metadata that say how an input is made (``preprocess.json``).
PREPROCESS_KEYS = ("classes", "inputs", "preprocess", "scan")


class ServingModule(nn.Module):
    """``image`` (N×C×H×W, normalised) → ``probabilities`` (N×K), and the feature map
    (N×F×h×w) with ``features``: the model's ``forward_head(forward_features(x))``, then
    ``probabilities_of`` over the checkpoint's temperature (a buffer of this module, a copy of
    ``KdModel.network``'s): what ``KdModel.predict`` computes."""

    def __init__(self, kd: KdModel, features: bool = False) -> None:
        super().__init__()
        self.net = kd.model
        self.register_buffer("temperature", kd.network.temperature.detach().clone())
        self.features = features

    def forward(self, image: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if not self.features:
            return probabilities_of(self.net(image), self.temperature)
        maps = self.net.forward_features(image)
        return probabilities_of(self.net.forward_head(maps), self.temperature), maps


def linear_head(kd: KdModel, maps: torch.Tensor) -> dict[str, list] | None:
    """``{"weight", "bias"}`` when the head is global average pooling then a linear layer
    (checked on ``maps`` and on random maps: ``head(A) == mean_hw(A) @ Wᵀ + b``), else None."""
    if maps.ndim != 4:
        return None
    shape = (len(kd.classes), maps.shape[1])
    linears = [m for m in kd.model.modules() if isinstance(m, nn.Linear)]
    fc = next((m for m in reversed(linears) if tuple(m.weight.shape) == shape), None)
    if fc is None:
        return None
    noise = torch.randn(maps.shape, generator=torch.Generator().manual_seed(0))
    probe = torch.cat([maps, noise.to(maps) * maps.std().clamp_min(1e-3)])
    with torch.no_grad():
        expected = kd.model.forward_head(probe)
        linear = probe.mean((2, 3)) @ fc.weight.T + (0 if fc.bias is None else fc.bias)
    if expected.shape != linear.shape or not torch.allclose(expected, linear, atol=1e-5):
        return None
    bias = torch.zeros(fc.out_features) if fc.bias is None else fc.bias.detach()
    return {"weight": fc.weight.detach().tolist(), "bias": bias.tolist()}


def package_version() -> str:
    """kdtoolkit's installed version ("unknown" when run from a source tree alone)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("kdtoolkit")
    except PackageNotFoundError:
        return "unknown"


def export_metadata(
    kd: KdModel, checkpoint: Path, fmt: str, example: torch.Tensor, features: bool
) -> dict[str, Any]:
    """What the exported file says about itself: its inputs and outputs, the preprocessing
    that makes its input, how scans are read, the classes, and where it came from."""
    meta = kd.metadata
    c, h, w = example.shape[1:]
    outputs: list[dict[str, Any]] = [
        {"name": "probabilities", "shape": ["batch", len(kd.classes)], "dtype": "float32"}
    ]
    out: dict[str, Any] = {
        "format": fmt,
        "kdtoolkit": package_version(),
        "torch": torch.__version__.split("+")[0],
        "role": meta.get("role"),
        "backbone": meta.get("backbone"),
        "fold": meta.get("fold"),
        "recipe_digest": meta.get("recipe_digest"),
        "checkpoint": str(checkpoint),
        "classes": list(kd.classes),
        "inputs": [{"name": "image", "shape": ["batch", c, h, w], "dtype": "float32"}],
        "outputs": outputs,
        "preprocess": {
            "view": kd.view,
            "input_size": [h, w],
            "channels": c,
            "letterbox": kd.config.letterbox,
            "normalisation": {"mean": list(kd.config.mean), "std": list(kd.config.std)},
            "pixels": "integers / dtype maximum (255, 65535) into [0, 1]; RGB to grey with "
            "BT.601 luma, grey to RGB by repeating",
            "resample": "one bilinear sampling at pixel centres, zeros outside the image; "
            f"antialiased reduction first where an axis shrinks by more than {ANTIALIAS_STEP}",
            "layout": "NCHW, (pixel - mean) / std per channel",
        },
        # how KdModel reads scans (the checkpoint's ``read``), in the form it reads it back
        "scan": json.loads(json.dumps(dataclasses.asdict(kd.read))),
    }
    if "temperature" in meta:
        out["temperature"] = meta["temperature"]
    out["weights_sha256"] = tensors_sha256(kd.model.state_dict())
    if features:
        with torch.no_grad():
            maps = kd.model.forward_features(example)
        outputs.append(
            {"name": "features", "shape": ["batch", *maps.shape[1:]], "dtype": "float32"}
        )
        head = linear_head(kd, maps)
        out["cam"] = {"head": "pooling+linear", **head} if head else {"head": "other"}
    return out


def preprocess_part(metadata: dict[str, Any]) -> dict[str, Any]:
    """The part of an export's metadata that ``preprocess.json`` holds."""
    return {k: metadata[k] for k in PREPROCESS_KEYS if k in metadata}


def write_onnx(
    module: ServingModule, example: torch.Tensor, path: Path, meta: dict, opset: int | None
) -> None:
    require("onnx", "onnxscript")
    import onnx

    names = ["probabilities", "features"] if module.features else ["probabilities"]
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


def write_torchscript(module: ServingModule, example: torch.Tensor, path: Path, meta: dict) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(module, example, check_trace=False)
        meta["graph_sha256"] = program_sha256(traced)
        torch.jit.save(traced, str(path), _extra_files={EXTRA_FILE: json.dumps(meta)})


def write_exported(module: ServingModule, example: torch.Tensor, path: Path, meta: dict) -> None:
    batch = torch.export.Dim("batch", min=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.export.export(module, (example,), dynamic_shapes={"image": {0: batch}})
        meta["graph_sha256"] = program_sha256(program)
        torch.export.save(program, str(path), extra_files={EXTRA_FILE: json.dumps(meta)})


def load_checkpoint_model(checkpoint: Path) -> KdModel:
    """The ``KdModel`` of one checkpoint on the CPU; a run folder is an error naming a file."""
    if checkpoint.is_dir():
        raise KdError(
            f"{checkpoint} is a run folder; export one checkpoint, e.g. "
            f"{checkpoint / 'fold_0' / 'student' / 'model.safetensors'} (docs/deploy.md, Folds)"
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
                torch.export.load(str(path), extra_files=extra)
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
    """Refuse an output that cannot be written, before any work: a read-only file or a
    folder (the nearest existing one) that is not writable."""
    if path.exists() and not os.access(path, os.W_OK):
        raise KdError(f"-o {path}: the file is read-only; choose another -o or make it writable")
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
) -> ExportResult:
    """Export a checkpoint to ``output`` (default: beside it, with the format's suffix) as
    ``fmt`` (``onnx``, ``torchscript``, ``exported``), check parity against ``KdModel`` on
    ``samples`` inputs (held-out images of ``run``, else synthetic ones) and write
    ``preprocess.json`` beside it. A difference above ``tolerance`` is an error and leaves
    nothing written."""
    if fmt not in FORMATS:
        raise KdError(f"--format {fmt!r}: use one of {', '.join(FORMATS)}")
    if fmt == "onnx":
        require("onnx", "onnxscript", "onnxruntime")
    checkpoint = Path(checkpoint)
    path = Path(output) if output is not None else checkpoint.with_suffix(FORMATS[fmt])
    if path.suffix != FORMATS[fmt]:
        raise KdError(f"-o {path}: a {fmt} export is written as *{FORMATS[fmt]}; rename it")
    if path.is_dir():
        raise KdError(f"-o {path}: is a folder; give a file name ending in {FORMATS[fmt]}")
    check_options(tolerance, samples, opset if fmt == "onnx" else None)
    check_writable(path)
    kd = load_checkpoint_model(Path(checkpoint))
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
    module = ServingModule(kd, features).eval()
    with atomic_path(path) as tmp:
        try:
            if fmt == "onnx":
                write_onnx(module, example, tmp, meta, opset)
            elif fmt == "torchscript":
                write_torchscript(module, example, tmp, meta)
            else:
                write_exported(module, example, tmp, meta)
        except KdError as e:
            raise KdError(str(e).replace(str(tmp), str(path))) from None
        except Exception as e:  # noqa: BLE001 - an exporter's failure becomes one line
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            first = first.replace(str(tmp), str(path))
            raise KdError(
                f"{checkpoint}: backbone {kd.metadata.get('backbone')!r} could not be exported "
                f"as {fmt} ({type(e).__name__}: {first}); try another --format"
            ) from None
        try:
            parity = check_parity(kd, tmp, meta, images, kind, tolerance)
        except KdError as e:  # name the -o path, not the temporary file
            raise KdError(str(e).replace(str(tmp), str(path))) from None
        parity.raise_if_failed(path)
    atomic_write_text(sidecar, json.dumps(preprocess_part(meta), indent=2) + "\n")
    return ExportResult(path, sidecar, meta, parity)


def verify_export(
    checkpoint: str | Path,
    path: str | Path,
    run: str | Path | None = None,
    tolerance: float = 1e-4,
    samples: int = 8,
) -> Parity:
    """The parity check of an existing export against its checkpoint: inputs prepared as
        ``preprocess.json`` beside it says (what a server reads; the file's own metadata when
        there is none). The digests the export recorded are checked first (``export_digest``:
    any changed byte of its weights, another checkpoint, edited recorded preprocessing; an export
    without digests is refused); then a parity failure is an error naming the largest difference."""
    path = Path(path)
    check_options(tolerance, samples)
    meta = read_export_metadata(path)
    kd = load_checkpoint_model(Path(checkpoint))
    weights = tensors_sha256(kd.model.state_dict())
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
