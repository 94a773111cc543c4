"""Serving a trained checkpoint: ``KdModel`` owns its preprocessing (from the checkpoint's
metadata: input size, letterbox, channels, normalisation and how scans are read,
:mod:`kdtoolkit.serving.preprocess`), so a student stages full images with no crop and no
detector, exactly as it was evaluated; ``FoldEnsemble`` averages the fold students of a run
folder."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdtoolkit.errors import KdError
from kdtoolkit.fileio import reading
from kdtoolkit.models.checkpoint import load_model
from kdtoolkit.models.device import resolve_device
from kdtoolkit.models.gradcam import cam_for_images
from kdtoolkit.models.temperature import Probabilities
from kdtoolkit.serving.predictor import Predictor, batches
from kdtoolkit.serving.preprocess import ImageLike, input_spec, read_spec_of


class TorchPredictor(Predictor):
    """What the checkpoint models share: their input as a tensor and Grad-CAMs of images
    (``cam_of`` of a prepared batch, defined by each)."""

    def preprocess(self, images: Sequence[ImageLike]) -> torch.Tensor:
        """The model's input batch (N×C×H×W, normalised) for ``images``, as a tensor."""
        return torch.from_numpy(self.prepare(images))

    def cam(self, images: Sequence[ImageLike], batch_size: int = 16) -> np.ndarray:
        """Grad-CAM of the predicted class for every image, N×H×W in [0, 1] at the model's
        input resolution (letterboxed as the model sees the image); ``batch_size`` at a time."""
        parts = [
            self.cam_of(self.prepare(chunk), batch_size) for chunk in batches(images, batch_size)
        ]
        return np.concatenate(parts) if parts else np.zeros((0, *self.spec.image_size), np.float32)

    def cam_of(self, x: np.ndarray, batch_size: int = 16) -> np.ndarray:
        raise NotImplementedError


class KdModel(TorchPredictor):
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
        self.spec = input_spec(metadata)
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

    def logits(self, images: Sequence[ImageLike]) -> np.ndarray:
        """Raw class scores, N×K (no temperature)."""
        with torch.no_grad():
            return self.model(self.preprocess(images).to(self.device)).float().cpu().numpy()

    def probabilities(self, batch: torch.Tensor) -> torch.Tensor:
        """Class probabilities (N×K) of a preprocessed batch: ``softmax(logits / T)``, the one
        place they are computed (``network``)."""
        with torch.no_grad():
            return self.network(batch.to(self.device)).cpu()

    def batch_proba(self, x: np.ndarray) -> np.ndarray:
        return self.probabilities(torch.from_numpy(x)).numpy()

    def cam_of(self, x: np.ndarray, batch_size: int = 16) -> np.ndarray:
        """:meth:`cam` of a prepared batch."""
        cams = [
            cam_for_images(self.model, torch.from_numpy(chunk).to(self.device)).float().cpu()
            for chunk in batches(x, batch_size)
        ]
        return torch.cat(cams).numpy()


class FoldEnsemble(TorchPredictor):
    """The fold students of a run folder as one model: the mean of their (calibrated)
    probabilities; their inputs are made once (the members of one run share their
    preprocessing; members that do not are an error naming them)."""

    def __init__(
        self, members: Sequence[KdModel], names: Sequence[str], folds: Sequence[int] = ()
    ) -> None:
        self.members, self.names = list(members), list(names)
        self.folds = list(folds) or list(range(len(self.members)))
        first = self.members[0]
        self.classes, self.view, self.metadata = first.classes, first.view, first.metadata
        self.spec, self.read = first.spec, first.read
        for m, name in zip(self.members, self.names, strict=True):
            if m.classes != self.classes:
                raise KdError(f"{name}: classes {m.classes} differ from {self.classes}")
            if (m.spec, m.read) != (self.spec, self.read):
                raise KdError(
                    f"{name}: its input or scan read settings differ from {self.names[0]}'s; "
                    "average models of one run only"
                )

    @classmethod
    def load(
        cls,
        run_dir: str | Path,
        device: str | torch.device = "auto",
        calibrated: bool = True,
        allow_missing: bool = False,
    ) -> FoldEnsemble:
        """The ``fold_<k>/student/model.safetensors`` of ``run_dir``, in fold order (see
        :func:`fold_checkpoints`)."""
        found = fold_checkpoints(run_dir, allow_missing)
        return cls(
            [KdModel.load(p, device, calibrated) for _, p in found],
            [str(p) for _, p in found],
            [k for k, _ in found],
        )

    def batch_proba(self, x: np.ndarray) -> np.ndarray:
        """The mean of the members' probabilities, N×K."""
        return np.mean([m.batch_proba(x) for m in self.members], axis=0)

    def cam_of(self, x: np.ndarray, batch_size: int = 16) -> np.ndarray:
        """The mean of the members' Grad-CAMs (each of its own predicted class)."""
        return np.mean([m.cam_of(x, batch_size) for m in self.members], axis=0)


def fold_checkpoints(run_dir: str | Path, allow_missing: bool = False) -> list[tuple[int, Path]]:
    """(fold, ``fold_<k>/student/model.safetensors``) of ``run_dir``, in fold order. Every fold
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
    return found


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
