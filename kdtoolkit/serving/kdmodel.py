"""Serving a trained model: ``KdModel`` owns its preprocessing (from the checkpoint's metadata:
input size, letterbox, channels, normalisation and how scans are read), so a student stages
full images with no crop and no detector, exactly as it was evaluated; ``FoldEnsemble``
averages the fold students of a run folder."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from kdtoolkit.data.scan import ReadSpec, spec_of
from kdtoolkit.data.view import ViewConfig, student_view
from kdtoolkit.data.volume import is_volume_path
from kdtoolkit.engine.device import resolve_device
from kdtoolkit.errors import KdError
from kdtoolkit.fileio import reading
from kdtoolkit.models.checkpoint import load_model
from kdtoolkit.models.gradcam import cam_for_images
from kdtoolkit.models.temperature import Probabilities

#: An image for ``KdModel``: a file path (a 2D image, a DICOM file or series folder, a NIfTI
#: volume), an H×W / H×W×C array (uint8, uint16, or float in [0, 1]), or a manifest ``Sample``.
ImageLike = str | Path | np.ndarray | Any


@dataclass
class Prediction:
    """One image's result: the predicted class, its index and every class's probability
    (``row``: its manifest line, when read from a manifest)."""

    image: str
    label: str
    index: int
    probabilities: dict[str, float] = field(default_factory=dict)
    row: int | None = None
    folds: list[int] | None = None

    def to_dict(self) -> dict[str, Any]:
        """``{"image", "class", "index", "probabilities"}``, ``"row"`` for a manifest row and
        ``"folds"`` for a fold ensemble's (the folds averaged) (strict JSON: finite numbers)."""
        out: dict[str, Any] = {
            "image": self.image,
            "class": self.label,
            "index": self.index,
            "probabilities": self.probabilities,
        }
        if self.row is not None:
            out["row"] = self.row
        if self.folds is not None:
            out["folds"] = self.folds
        return out


@dataclass(frozen=True)
class ScanSource:
    """A scan path with the read settings it is read with (an image source, see
    ``kdtoolkit.data.imageio``)."""

    image: Path
    read: ReadSpec


def read_spec_of(metadata: dict[str, Any]) -> ReadSpec:
    """How a checkpoint's model reads scans: its ``read`` metadata, else (older checkpoints)
    the ``[data]`` section of the recipe stored with it, else the defaults."""
    saved = metadata.get("read")
    if saved is None:
        data = (metadata.get("recipe") or {}).get("data") or {}
        return spec_of(SimpleNamespace(**data))
    return spec_of(SimpleNamespace(**saved))


def source_of(image: ImageLike, read: ReadSpec) -> Any:
    """What is read for ``image``: a scan path (DICOM, NIfTI) with the read settings ``read``;
    anything else as it is."""
    if isinstance(image, str | Path) and is_volume_path(image):
        return ScanSource(Path(image), read)
    return image


class KdModel:
    """A trained kdtoolkit model with the preprocessing it was trained with and the
    temperature fitted on its validation split (``calibrated``; a checkpoint without one: 1).

    >>> model = KdModel.load("runs/x/fold_0/student/model.safetensors")  # doctest: +SKIP
    >>> model.predict(["slice.png"])[0].label                            # doctest: +SKIP
    """

    def __init__(
        self, model: torch.nn.Module, metadata: dict[str, Any], calibrated: bool = True
    ) -> None:
        self.model = model.eval()
        self.metadata = metadata
        self.classes: list[str] = list(metadata["classes"])
        self.view: str = metadata.get("view", "image")
        self.config = view_config(metadata)
        self.read = read_spec_of(metadata)
        self.temperature = float(metadata.get("temperature", 1.0)) if calibrated else 1.0
        #: The input batch → probabilities module (temperature inside): what exports export.
        self.network = Probabilities(self.model, self.temperature).eval()

    @classmethod
    def load(
        cls, checkpoint: str | Path, device: str | torch.device = "auto", calibrated: bool = True
    ) -> KdModel:
        """The model of a kdtoolkit checkpoint (``model.safetensors`` of a stage) on
        ``device`` (``auto``: CUDA when present); ``calibrated``: apply its temperature."""
        dev = resolve_device(device) if isinstance(device, str) else device
        model, meta = load_model(checkpoint, dev)
        with reading(checkpoint, "checkpoint's metadata", "give a model.safetensors of kd run"):
            return cls(model, meta, calibrated).to(dev)

    def to(self, device: torch.device) -> KdModel:
        self.network.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def source(self, image: ImageLike) -> Any:
        """What is read for ``image``: a scan path gets the checkpoint's read settings."""
        return source_of(image, self.read)

    def preprocess(self, images: Sequence[ImageLike]) -> torch.Tensor:
        """The model's input batch (N×C×H×W, normalised) for ``images``."""
        return torch.stack([student_view(self.source(image), self.config) for image in images])

    def logits(self, images: Sequence[ImageLike]) -> np.ndarray:
        """Raw class scores, N×K (no temperature)."""
        with torch.no_grad():
            return self.model(self.preprocess(images).to(self.device)).float().cpu().numpy()

    def probabilities(self, batch: torch.Tensor) -> torch.Tensor:
        """Class probabilities (N×K) of a preprocessed batch: ``softmax(logits / T)``, the one
        place they are computed (``network``)."""
        with torch.no_grad():
            return self.network(batch.to(self.device)).cpu()

    def predict_proba(self, images: Sequence[ImageLike]) -> np.ndarray:
        """Class probabilities of ``images``, N×K."""
        return self.probabilities(self.preprocess(images)).numpy()

    def predict(self, images: Sequence[ImageLike], batch_size: int = 16) -> list[Prediction]:
        """Class and probabilities of every image; a non-finite output is an error."""
        return predictions_of(self, images, batch_size)

    def cam(self, images: Sequence[ImageLike], batch_size: int = 16) -> np.ndarray:
        """Grad-CAM of the predicted class for every image, N×H×W in [0, 1] at the model's
        input resolution (letterboxed as the model sees the image)."""
        cams = [
            cam_for_images(self.model, self.preprocess(chunk).to(self.device)).float().cpu()
            for chunk in batches(images, batch_size)
        ]
        return torch.cat(cams).numpy()


class FoldEnsemble:
    """The fold students of a run folder as one model: the mean of their (calibrated)
    probabilities; each reads its input with its own preprocessing."""

    def __init__(
        self, members: Sequence[KdModel], names: Sequence[str], folds: Sequence[int] = ()
    ) -> None:
        self.members, self.names = list(members), list(names)
        self.folds = list(folds) or list(range(len(self.members)))
        first = self.members[0]
        self.classes, self.view, self.metadata = first.classes, first.view, first.metadata
        for m, name in zip(self.members, self.names, strict=True):
            if m.classes != self.classes:
                raise KdError(f"{name}: classes {m.classes} differ from {self.classes}")

    @classmethod
    def load(
        cls,
        run_dir: str | Path,
        device: str | torch.device = "auto",
        calibrated: bool = True,
        allow_missing: bool = False,
    ) -> FoldEnsemble:
        """The ``fold_<k>/student/model.safetensors`` of ``run_dir``, in fold order. Every fold
        the run was asked for (``recipe.resolved.json``: ``cv.only``, else every fold of every
        repeat) must be there, unless ``allow_missing``."""
        run_dir = Path(run_dir)
        found = sorted(
            (int(m.group(1)), f / "student" / "model.safetensors")
            for f in run_dir.iterdir()
            if (m := re.fullmatch(r"fold_(\d+)", f.name))
            and (f / "student/model.safetensors").is_file()
        )
        if not found:
            raise KdError(
                f"{run_dir}: no fold_<k>/student/model.safetensors; give a run folder of kd run "
                "or one checkpoint"
            )
        missing = [k for k in expected_folds(run_dir) if k not in dict(found)]
        if missing and not allow_missing:
            names = ", ".join(f"fold_{k}/student/model.safetensors" for k in missing)
            raise KdError(
                f"{run_dir}: {names} missing ({len(found)} of {len(found) + len(missing)} folds "
                "found); finish the run (the same kd run command), or pass "
                "--allow-missing-folds to average the folds found"
            )
        return cls(
            [KdModel.load(p, device, calibrated) for _, p in found],
            [str(p) for _, p in found],
            [k for k, _ in found],
        )

    def preprocess(self, images: Sequence[ImageLike]) -> torch.Tensor:
        return self.members[0].preprocess(images)

    def predict_proba(self, images: Sequence[ImageLike]) -> np.ndarray:
        """The mean of the members' probabilities, N×K."""
        return np.mean([m.predict_proba(images) for m in self.members], axis=0)

    def predict(self, images: Sequence[ImageLike], batch_size: int = 16) -> list[Prediction]:
        return predictions_of(self, images, batch_size)

    def cam(self, images: Sequence[ImageLike], batch_size: int = 16) -> np.ndarray:
        """The mean of the members' Grad-CAMs (each of its own predicted class)."""
        return np.mean([m.cam(images, batch_size) for m in self.members], axis=0)


def expected_folds(run_dir: Path) -> list[int]:
    """The folds a run folder's recipe asks for: ``cv.only``, else ``range(folds × repeats)``
    (``recipe.resolved.json``; none when it is missing or unreadable)."""
    try:
        cv = json.loads((run_dir / "recipe.resolved.json").read_text())["recipe"]["cv"]
        return [
            int(k) for k in cv.get("only") or range(int(cv["folds"]) * int(cv.get("repeats", 1)))
        ]
    except (OSError, ValueError, KeyError, TypeError):
        return []


def predictions_of(
    model: KdModel | FoldEnsemble, images: Sequence[ImageLike], batch_size: int
) -> list[Prediction]:
    """``model``'s ``Prediction`` of every image, in batches; non-finite scores are an error."""
    out: list[Prediction] = []
    for chunk in batches(images, batch_size):
        for image, p in zip(chunk, model.predict_proba(chunk), strict=True):
            if not np.isfinite(p).all():
                raise KdError(
                    f"{describe(image)}: the model gave non-finite scores; the checkpoint "
                    "holds diverged weights (retrain with a lower learning rate)"
                )
            k = int(np.argmax(p))
            probabilities = {c: float(v) for c, v in zip(model.classes, p, strict=True)}
            row = getattr(image, "row", None)
            folds = model.folds if isinstance(model, FoldEnsemble) else None
            out.append(Prediction(describe(image), model.classes[k], k, probabilities, row, folds))
    return out


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
    if isinstance(image, str | Path):
        return str(image)
    if hasattr(image, "image"):
        return str(image.image)
    return f"array {np.shape(image)}"
