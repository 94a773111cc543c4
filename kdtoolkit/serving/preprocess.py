"""How a served student's input is made, with numpy alone: the one definition that
``KdModel`` (a checkpoint), the export parity check and the torch-free ``ExportedModel`` (an
ONNX file) use. An image is decoded (:mod:`kdtoolkit.data.imageio`; scans with the model's
read settings), scaled into [0, 1], letterboxed or stretched to the input size in one
resampling (:mod:`kdtoolkit.serving.resample`), given the model's channels and normalised."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from kdtoolkit.data.affine import letterbox_matrix, resize_matrix
from kdtoolkit.data.imageio import image_array
from kdtoolkit.data.scan import ReadSpec, spec_of
from kdtoolkit.data.volume import is_volume_path
from kdtoolkit.errors import KdError
from kdtoolkit.serving.resample import warp_array

#: An image for a served model: a file path (a 2D image, a DICOM file or series folder, a
#: NIfTI volume), an H×W / H×W×C array (uint8, uint16, or float in [0, 1]), or a manifest
#: ``Sample``.
ImageLike = str | Path | np.ndarray | Any


@dataclass(frozen=True)
class InputSpec:
    """A model's input: ``image_size`` (h, w), ``channels``, ``letterbox`` (keep the aspect
    ratio, zero padding) or stretch, per-channel ``mean``/``std`` on [0, 1] pixels."""

    image_size: tuple[int, int]
    channels: int
    letterbox: bool
    mean: tuple[float, ...]
    std: tuple[float, ...]


@dataclass(frozen=True)
class ScanSource:
    """A scan path with the read settings it is read with (an image source, see
    ``kdtoolkit.data.imageio``)."""

    image: Path
    read: ReadSpec


def input_spec(metadata: dict[str, Any]) -> InputSpec:
    """The input of a checkpoint's model (its metadata) or of an export (its ``preprocess``).
    A crop model (``view`` other than ``image``) takes crops as given: stretched to its
    input, as the teacher saw them."""
    size = (int(metadata["input_size"][0]), int(metadata["input_size"][1]))
    full_image = metadata.get("view", "image") == "image"
    return InputSpec(
        image_size=size,
        channels=int(metadata["channels"]),
        letterbox=bool(metadata["letterbox"]) and full_image,
        mean=tuple(float(v) for v in metadata["normalisation"]["mean"]),
        std=tuple(float(v) for v in metadata["normalisation"]["std"]),
    )


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


def prepare_one(image: ImageLike, spec: InputSpec, read: ReadSpec) -> np.ndarray:
    """The model input (C×H×W float32, normalised) of one image."""
    pixels = image_array(source_of(image, read), spec.channels)
    height, width = pixels.shape[:2]
    if spec.letterbox:
        matrix = letterbox_matrix((height, width), spec.image_size)[0]
    else:
        matrix = resize_matrix((height, width), spec.image_size)
    out = warp_array(pixels, matrix, spec.image_size)
    if out.shape[2] != spec.channels:
        if out.shape[2] != 1:
            raise KdError(f"image has {out.shape[2]} channels, the model {spec.channels}")
        out = np.repeat(out, spec.channels, axis=2)
    mean = np.asarray(spec.mean, dtype=np.float32)
    std = np.asarray(spec.std, dtype=np.float32)
    return np.ascontiguousarray(((out - mean) / std).transpose(2, 0, 1), dtype=np.float32)


def prepare(images: Sequence[ImageLike], spec: InputSpec, read: ReadSpec) -> np.ndarray:
    """The model input batch (N×C×H×W float32) of ``images`` (N may be 0)."""
    if not len(images):
        return np.zeros((0, spec.channels, *spec.image_size), np.float32)
    return np.stack([prepare_one(image, spec, read) for image in images])


def export_read_spec(metadata: dict[str, Any]) -> ReadSpec:
    """How an export reads scans: its metadata's ``scan`` (the defaults when absent)."""
    return read_spec_of({"read": metadata.get("scan") or {}})


def prepare_inputs(images: Sequence[ImageLike], metadata: dict[str, Any]) -> np.ndarray:
    """The input batch (N×C×H×W float32) of an exported model for ``images`` (paths or
    arrays), made as its metadata's ``preprocess`` says, scans read as its ``scan`` says
    (``preprocess.json`` or the metadata inside the file): what ``KdModel.preprocess`` does
    for the checkpoint."""
    return prepare(images, input_spec(metadata["preprocess"]), export_read_spec(metadata))
