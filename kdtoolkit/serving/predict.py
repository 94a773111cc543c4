"""``kd predict``: a student checkpoint, a run folder's fold students together, or an ONNX
export (torch-free), on image files, scans (DICOM files and series folders, NIfTI volumes, read
as the model's recipe read them) and manifest rows, with Grad-CAM overlays (checkpoints)."""

from __future__ import annotations

import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kdtoolkit.data.volume import NIFTI_SUFFIXES, is_volume_path
from kdtoolkit.errors import KdError
from kdtoolkit.serving.exported import ExportedModel
from kdtoolkit.serving.predictor import Predictor, batches, describe

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"}


def series_folder(folder: Path) -> bool:
    """Whether ``folder`` is one DICOM series: it holds DICOM files and no 2D image or NIfTI
    volume."""
    files = [f for f in folder.iterdir() if f.is_file()]
    if any(f.suffix.lower() in IMAGE_SUFFIXES or is_nifti(f) for f in files):
        return False
    return any(is_volume_path(f) for f in files)


def is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def image_paths(paths: Sequence[str | Path]) -> list[Path]:
    """Images and scans among ``paths``, folders searched (not recursively), sorted: a
    folder that is a DICOM series is one scan; any other folder gives its 2D images, NIfTI
    volumes, DICOM files and the DICOM series folders directly inside it."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir() and series_folder(p):
            out.append(p)
        elif p.is_dir():
            for f in sorted(p.iterdir()):
                if f.is_dir():
                    if series_folder(f):
                        out.append(f)
                elif f.suffix.lower() in IMAGE_SUFFIXES or is_volume_path(f):
                    out.append(f)
        elif p.is_file():
            out.append(p)
        else:
            raise KdError(f"{p}: no such image or folder")
    if not out:
        raise KdError(f"no images found in {', '.join(map(str, paths))}")
    return out


@dataclass
class PredictReport:
    """``predict``'s outcome: results for the readable images, and the files it skipped with
    the reason."""

    results: list[dict[str, Any]]
    skipped: list[tuple[str, str]]


def load_predictor(
    model: str | Path,
    device: str = "auto",
    calibrated: bool = True,
    allow_missing_folds: bool = False,
) -> Predictor:
    """The served model at ``model``: an ONNX export's ``ExportedModel`` (no torch), a run
    folder's ``FoldEnsemble`` or a checkpoint's ``KdModel``."""
    path = Path(model)
    if path.suffix == ".onnx":
        if not calibrated:
            raise KdError(
                f"{path}: an export applies its temperature inside the graph; predict with the "
                "checkpoint for --no-calibrated"
            )
        return ExportedModel(path)
    from kdtoolkit.serving.kdmodel import FoldEnsemble, KdModel

    if path.is_dir():
        return FoldEnsemble.load(path, device, calibrated, allow_missing_folds)
    return KdModel.load(path, device, calibrated)


def manifest_samples(model: Predictor, manifest: str | Path) -> list[Any]:
    """The rows of ``manifest`` as the model's evaluation read them: its classes, its read
    settings (each row's ``slice`` column included), boxes optional."""
    from kdtoolkit.data.manifest import read_manifest

    return list(
        read_manifest(manifest, model.classes, require_boxes=False, read=model.read).samples
    )


def predict(
    checkpoint: str | Path,
    paths: Sequence[str | Path],
    cam_dir: str | Path | None = None,
    device: str = "auto",
    batch_size: int = 16,
    manifest: str | Path | None = None,
    calibrated: bool = True,
    allow_missing_folds: bool = False,
) -> PredictReport:
    """Stage every image (and every row of ``manifest``) with a student checkpoint, the fold
    students of a run folder (``FoldEnsemble``) or an ONNX export (``ExportedModel``, no
    torch); ``calibrated``: with the fitted temperatures; ``allow_missing_folds``: a run folder
    whose run is missing folds averages the folds it has (else an error naming them). Each
    input is decoded once, whatever the folds and outputs. Grad-CAM overlays in ``cam_dir``
    when given (the folder is made first: one that cannot be is an error before any work).
    Unreadable files, and inputs holding NaN or infinite values, are skipped and listed in
    ``skipped``."""
    if cam_dir is not None and Path(checkpoint).suffix == ".onnx":
        raise KdError(
            f"{checkpoint}: Grad-CAM overlays need the checkpoint (an export has no gradients); "
            "drop --cam, or predict with the model.safetensors it was exported from"
        )
    if cam_dir is not None:
        make_cam_dir(Path(cam_dir))
    if not paths and manifest is None:
        raise KdError("nothing to predict: give images, folders or --manifest")
    model = load_predictor(checkpoint, device, calibrated, allow_missing_folds)
    if model.view != "image":
        raise KdError(
            f"{checkpoint}: a {model.metadata.get('role')} model that takes crops; "
            f"kd predict serves students (full images), e.g. fold_0/student/model.safetensors"
        )
    sources: list[Any] = list(image_paths(paths)) if paths else []
    if manifest is not None:
        sources += manifest_samples(model, manifest)
    results: list[dict[str, Any]] = []
    skipped: list[tuple[str, str]] = []
    used: set[str] = set()
    for chunk in batches(sources, batch_size):  # each input decoded once; memory per chunk
        readable, inputs = [], []
        for source in chunk:
            try:
                inputs.append(prepared(model, source))
            except (KdError, OSError, ValueError) as e:
                name, reason = describe(source), str(e).splitlines()[0]
                skipped.append((name, reason.removeprefix(f"{name}: ")))
            else:
                readable.append(source)
        if not readable:
            continue
        batch = np.stack(inputs)
        results += [p.to_dict() for p in model.predictions(readable, model.batch_proba(batch))]
        if cam_dir is not None:
            write_cams(Path(cam_dir), model, readable, batch, used)
    return PredictReport(results, skipped)


def prepared(model: Predictor, source: Any) -> np.ndarray:
    """The model's input (C×H×W) of one source; NaN or infinite values are the input's fault
    (a ``KdError`` naming them), not a warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        x = model.prepare([source])[0]
    if not np.isfinite(x).all():
        raise KdError(
            "holds NaN or infinite values (a damaged file, or one saved with undefined values); "
            "fix or remove it"
        )
    return x


def cam_name(path: Path, used: set[str]) -> str:
    """``<stem>_cam.png``, or with the parent folder's name (and a number) when taken."""
    path = Path(getattr(path, "image", path))
    if path.name.lower().endswith(".nii.gz"):
        path = path.with_suffix("")
    name = f"{path.stem}_cam.png"
    k = 1
    while name in used:
        name = f"{path.parent.name}_{path.stem}{'' if k == 1 else f'_{k}'}_cam.png"
        k += 1
    used.add(name)
    return name


def make_cam_dir(cam_dir: Path) -> None:
    """Make the Grad-CAM folder (one missing folder, no more: a mistyped path does not grow
    a tree of folders); one line when it cannot be made."""
    if cam_dir.exists() and not cam_dir.is_dir():
        raise KdError(f"{cam_dir}: is a file; give --cam a folder")
    if not cam_dir.exists() and not cam_dir.parent.is_dir():
        raise KdError(
            f"--cam {cam_dir}: {cam_dir.parent} does not exist; create it first (kd predict "
            "makes one missing folder, no more)"
        )
    try:
        cam_dir.mkdir(exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=cam_dir)  # noqa: SIM115
        probe.close()
    except OSError as e:
        raise KdError(
            f"{cam_dir}: cannot be written ({e.strerror or type(e).__name__}); choose another "
            "--cam folder"
        ) from None


def write_cams(
    cam_dir: Path, model: Any, files: list[Any], inputs: np.ndarray, used: set[str]
) -> None:
    """One overlay PNG per image: the model's input (``inputs``, prepared) in grey with its
    Grad-CAM on top (``used``: the file names taken so far)."""
    from matplotlib import colormaps
    from PIL import Image

    from kdtoolkit.fileio import atomic_path

    cams = model.cam_of(inputs, len(inputs))
    for f, image, cam in zip(files, inputs, cams, strict=True):
        grey = image.mean(0)
        grey = (grey - grey.min()) / max(1e-6, float(np.ptp(grey)))
        heat = colormaps["jet"](cam)[..., :3]
        overlay = 0.55 * np.repeat(grey[..., None], 3, axis=2) + 0.45 * heat
        pixels = Image.fromarray((overlay * 255).clip(0, 255).astype(np.uint8))
        with atomic_path(cam_dir / cam_name(f, used)) as tmp:
            pixels.save(tmp, format="PNG")
