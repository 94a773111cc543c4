"""What every served model has (``KdModel``, ``FoldEnsemble``, ``ExportedModel``): its
classes, the input it takes (:class:`~kdtoolkit.serving.preprocess.InputSpec`), how it reads
scans, and class probabilities of prepared batches; :class:`Predictor` turns those into
predictions of images. Torch-free."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kdtoolkit.data.scan import ReadSpec
from kdtoolkit.errors import KdError
from kdtoolkit.serving.preprocess import ImageLike, InputSpec, prepare


@dataclass
class Prediction:
    """One image's result: the predicted class, its index and every class's probability
    (``row``: its manifest line, when read from a manifest; ``folds``: the folds averaged)."""

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


class Predictor:
    """A served model: ``classes``, ``spec`` (its input), ``read`` (scan read settings),
    ``view`` (``image``: full images), ``metadata``, ``folds`` (a fold ensemble's; else None)
    and :meth:`batch_proba`, which subclasses define."""

    classes: list[str]
    spec: InputSpec
    read: ReadSpec
    view: str
    metadata: dict[str, Any]
    folds: list[int] | None = None

    def batch_proba(self, x: np.ndarray) -> np.ndarray:
        """Class probabilities (N×K) of a prepared batch (N×C×H×W float32)."""
        raise NotImplementedError

    def prepare(self, images: Sequence[ImageLike]) -> np.ndarray:
        """The model's input batch (N×C×H×W float32, normalised) of ``images``."""
        return prepare(images, self.spec, self.read)

    def predict_proba(self, images: Sequence[ImageLike], batch_size: int = 16) -> np.ndarray:
        """Class probabilities of ``images``, N×K (prepared and run ``batch_size`` at a time)."""
        parts = [self.batch_proba(self.prepare(chunk)) for chunk in batches(images, batch_size)]
        return np.concatenate(parts) if parts else np.zeros((0, len(self.classes)), np.float32)

    def predict(self, images: Sequence[ImageLike], batch_size: int = 16) -> list[Prediction]:
        """Class and probabilities of every image; a non-finite output is an error."""
        return self.predictions(images, self.predict_proba(images, batch_size))

    def predictions(self, images: Sequence[ImageLike], probs: np.ndarray) -> list[Prediction]:
        """The ``Prediction`` of each image from its probabilities; non-finite ones (of finite
        inputs) are the model's fault, an error."""
        out = []
        for image, p in zip(images, probs, strict=True):
            if not np.isfinite(p).all():
                raise KdError(
                    f"{describe(image)}: the model gave non-finite scores for a finite input; "
                    "the model holds diverged weights (retrain with a lower learning rate)"
                )
            k = int(np.argmax(p))
            probabilities = {c: float(v) for c, v in zip(self.classes, p, strict=True)}
            row, name = getattr(image, "row", None), describe(image)
            out.append(Prediction(name, self.classes[k], k, probabilities, row, self.folds))
        return out


def batches(items: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def describe(image: ImageLike) -> str:
    """How an image is named in results and errors: its path, or its array's shape."""
    if isinstance(image, str | Path):
        return str(image)
    if hasattr(image, "image"):
        return str(image.image)
    return f"array {np.shape(image)}"
