"""Serving a trained model: ``KdModel`` owns its preprocessing (from the checkpoint's metadata),
so a student stages full images with no crop and no detector."""

from __future__ import annotations

import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdtoolkit.data.view import ViewConfig, student_view
from kdtoolkit.engine.device import resolve_device
from kdtoolkit.errors import KdError
from kdtoolkit.fileio import reading
from kdtoolkit.models.checkpoint import load_model
from kdtoolkit.models.gradcam import cam_for_images

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"}
#: An image for ``KdModel``: a file path, or an H×W / H×W×C array (uint8, uint16, or float in
#: [0, 1]).
ImageLike = str | Path | np.ndarray


@dataclass
class Prediction:
    """One image's result: the predicted class, its index and every class's probability."""

    image: str
    label: str
    index: int
    probabilities: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """``{"image", "class", "index", "probabilities"}`` (strict JSON: finite numbers)."""
        return {
            "image": self.image,
            "class": self.label,
            "index": self.index,
            "probabilities": self.probabilities,
        }


class KdModel:
    """A trained kdtoolkit model with the preprocessing it was trained with.

    >>> model = KdModel.load("runs/x/fold_0/student/model.safetensors")  # doctest: +SKIP
    >>> model.predict(["slice.png"])[0].label                            # doctest: +SKIP
    """

    def __init__(self, model: torch.nn.Module, metadata: dict[str, Any]) -> None:
        self.model = model.eval()
        self.metadata = metadata
        self.classes: list[str] = list(metadata["classes"])
        self.view: str = metadata.get("view", "image")
        self.config = view_config(metadata)

    @classmethod
    def load(cls, checkpoint: str | Path, device: str | torch.device = "auto") -> KdModel:
        """The model of a kdtoolkit checkpoint (``model.safetensors`` of a stage) on
        ``device`` (``auto``: CUDA when present)."""
        dev = resolve_device(device) if isinstance(device, str) else device
        model, meta = load_model(checkpoint, dev)
        with reading(checkpoint, "checkpoint's metadata", "give a model.safetensors of kd run"):
            return cls(model, meta)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def preprocess(self, images: Sequence[ImageLike]) -> torch.Tensor:
        """The model's input batch (N×C×H×W, normalised) for ``images``."""
        return torch.stack([student_view(image, self.config) for image in images])

    def logits(self, images: Sequence[ImageLike]) -> np.ndarray:
        """Raw class scores, N×K."""
        with torch.no_grad():
            return self.model(self.preprocess(images).to(self.device)).float().cpu().numpy()

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Class probabilities (N×K) from raw scores: the one definition ``predict`` and every
        export (``kd export``) use, traced into the exported graph as written here."""
        return torch.softmax(logits.float(), 1)

    def predict(self, images: Sequence[ImageLike], batch_size: int = 16) -> list[Prediction]:
        """Class and probabilities of every image; a non-finite output is an error."""
        out: list[Prediction] = []
        for chunk in batches(images, batch_size):
            probs = self.probabilities(torch.from_numpy(self.logits(chunk))).numpy()
            for image, p in zip(chunk, probs, strict=True):
                if not np.isfinite(p).all():
                    raise KdError(
                        f"{describe(image)}: the model gave non-finite scores; the checkpoint "
                        "holds diverged weights (retrain with a lower learning rate)"
                    )
                k = int(np.argmax(p))
                out.append(
                    Prediction(
                        describe(image),
                        self.classes[k],
                        k,
                        {c: float(v) for c, v in zip(self.classes, p, strict=True)},
                    )
                )
        return out

    def cam(self, images: Sequence[ImageLike], batch_size: int = 16) -> np.ndarray:
        """Grad-CAM of the predicted class for every image, N×H×W in [0, 1] at the model's
        input resolution (letterboxed as the model sees the image)."""
        cams = [
            cam_for_images(self.model, self.preprocess(chunk).to(self.device)).float().cpu()
            for chunk in batches(images, batch_size)
        ]
        return torch.cat(cams).numpy()


def view_config(metadata: dict[str, Any]) -> ViewConfig:
    """How a model's inputs are made, from its checkpoint's (or an export's) metadata: input
    size, channels, letterbox and normalisation. A crop model (``view`` other than ``image``)
    takes crops as given: stretched to its input, as the teacher saw them."""
    size = (int(metadata["input_size"][0]), int(metadata["input_size"][1]))
    return ViewConfig(
        image_size=size,
        crop_size=size,
        channels=metadata["channels"],
        letterbox=metadata["letterbox"] if metadata.get("view", "image") == "image" else False,
        mean=metadata["normalisation"]["mean"],
        std=metadata["normalisation"]["std"],
    )


def batches(items: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def describe(image: ImageLike) -> str:
    return str(image) if isinstance(image, str | Path) else f"array {np.shape(image)}"


def image_paths(paths: Sequence[str | Path]) -> list[Path]:
    """Image files among ``paths``; folders are searched (not recursively), sorted."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
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


def predict(
    checkpoint: str | Path,
    paths: Sequence[str | Path],
    cam_dir: str | Path | None = None,
    device: str = "auto",
    batch_size: int = 16,
) -> PredictReport:
    """Stage every image with a student checkpoint; Grad-CAM overlays in ``cam_dir`` when
    given (the folder is made first: one that cannot be is an error before any work).
    Unreadable files are skipped and listed in ``skipped``."""
    if cam_dir is not None:
        make_cam_dir(Path(cam_dir))
    model = KdModel.load(checkpoint, device)
    if model.view != "image":
        raise KdError(
            f"{checkpoint}: a {model.metadata.get('role')} checkpoint that takes crops; "
            f"kd predict serves students (full images), e.g. fold_0/student/model.safetensors"
        )
    readable: list[Path] = []
    skipped: list[tuple[str, str]] = []
    for path in image_paths(paths):
        try:
            model.preprocess([path])
        except (KdError, OSError, ValueError) as e:
            skipped.append((str(path), str(e).splitlines()[0]))
        else:
            readable.append(path)
    results = [p.to_dict() for p in model.predict(readable, batch_size)]
    if cam_dir is not None and readable:
        write_cams(Path(cam_dir), model, readable, batch_size)
    return PredictReport(results, skipped)


def cam_name(path: Path, used: set[str]) -> str:
    """``<stem>_cam.png``, or with the parent folder's name (and a number) when taken."""
    name = f"{path.stem}_cam.png"
    k = 1
    while name in used:
        name = f"{path.parent.name}_{path.stem}{'' if k == 1 else f'_{k}'}_cam.png"
        k += 1
    used.add(name)
    return name


def make_cam_dir(cam_dir: Path) -> None:
    """Make the Grad-CAM folder (and its parents); one line when it cannot be made."""
    if cam_dir.exists() and not cam_dir.is_dir():
        raise KdError(f"{cam_dir}: is a file; give --cam a folder")
    try:
        cam_dir.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=cam_dir)  # noqa: SIM115
        probe.close()
    except OSError as e:
        raise KdError(
            f"{cam_dir}: cannot be written ({e.strerror or type(e).__name__}); choose another "
            "--cam folder"
        ) from None


def write_cams(cam_dir: Path, model: KdModel, files: list[Path], batch_size: int) -> None:
    """One overlay PNG per image: the model's input in grey with its Grad-CAM on top."""
    from matplotlib import colormaps
    from PIL import Image

    from kdtoolkit.fileio import atomic_path

    cam_dir.mkdir(parents=True, exist_ok=True)
    used: set[str] = set()
    for chunk in batches(files, batch_size):
        cams = model.cam(chunk)
        inputs = model.preprocess(chunk).numpy()
        for f, image, cam in zip(chunk, inputs, cams, strict=True):
            grey = image.mean(0)
            grey = (grey - grey.min()) / max(1e-6, float(np.ptp(grey)))
            heat = colormaps["jet"](cam)[..., :3]
            overlay = 0.55 * np.repeat(grey[..., None], 3, axis=2) + 0.45 * heat
            pixels = Image.fromarray((overlay * 255).clip(0, 255).astype(np.uint8))
            with atomic_path(cam_dir / cam_name(f, used)) as tmp:
                pixels.save(tmp, format="PNG")
