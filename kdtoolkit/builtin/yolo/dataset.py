"""The ultralytics detection dataset of one fold, written by the ``yolo`` ROI provider.

In the provider's ``dataset/`` folder: ``images/{train,val}`` (images symlinked, or converted
to 8-bit PNG when they are 16-bit/float, scans, or of a format ultralytics does not read),
``labels/{train,val}`` (one label ``0 cx cy w h`` per image: the axis-aligned box around the
rotated expert ROI, see :func:`yolo_label`; another provider passes its own label line, e.g.
``yolo_obb``'s four corners) and ``data.yaml`` (one class ``roi``). The validation part is
carved from the fold's training part (:func:`split_samples`).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from kdtoolkit.data.geometry import Box, enclosing_box
from kdtoolkit.data.imageio import load_image

#: Image files ultralytics reads as they are (8-bit); anything else is converted to PNG.
_READABLE = {".bmp", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp"}
_MODES = {"1", "L", "LA", "P", "RGB", "RGBA"}


def roi_of(sample: Any) -> tuple[Box, float, int, int]:
    """``(box, angle, width, height)`` of a manifest sample, the arguments of the label
    functions below."""
    return sample.box, sample.angle, sample.width, sample.height


def yolo_label(
    box: Box, angle: float, width: int, height: int
) -> tuple[float, float, float, float]:
    """YOLO label ``(cx, cy, w, h)``, relative to the image size, of the axis-aligned box
    around the ROI ``box`` rotated by ``angle`` (see :mod:`kdtoolkit.data.geometry`), clipped to
    the image."""
    x0, y0, x1, y1 = enclosing_box(box, angle)
    x0, x1 = np.clip([x0, x1], 0.0, width)
    y0, y1 = np.clip([y0, y1], 0.0, height)
    return (
        float((x0 + x1) / 2 / width),
        float((y0 + y1) / 2 / height),
        float((x1 - x0) / width),
        float((y1 - y0) / height),
    )


def truth_box(box: Box, angle: float, width: int, height: int) -> np.ndarray:
    """The expert box a detector should find: ``[x0, y0, x1, y1]`` around the rotated ROI,
    clipped to the image (the pixel form of :func:`yolo_label`)."""
    cx, cy, w, h = yolo_label(box, angle, width, height)
    return np.array(
        [(cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width, (cy + h / 2) * height]
    )


def stage_image(sample: Any, folder: Path) -> Path:
    """``sample.image`` where ultralytics can read it: a symlink (or copy) in ``folder``, or
    an 8-bit PNG (min–max scaled) when the image is 16-bit, 32-bit or float; a scan's slice
    (a sample with a ``read`` spec) as the 8-bit PNG of the image the engine sees."""
    source = Path(sample.image)
    stem = f"{int(sample.index):06d}"
    folder.mkdir(parents=True, exist_ok=True)
    if getattr(sample, "read", None) is not None:
        target = folder / f"{stem}.png"
        pixels = load_image(sample, 1)[:, :, 0]
        Image.fromarray(np.round(pixels * 255).astype(np.uint8)).save(target)
        return target
    with Image.open(source) as im:
        if im.mode.startswith("I") or im.mode == "F":  # 16/32-bit integer or float grey
            arr = np.asarray(im, dtype=np.float64)
            lo, hi = float(arr.min()), float(arr.max())
            arr = (arr - lo) / (hi - lo) * 255 if hi > lo else np.zeros_like(arr)
            target = folder / f"{stem}.png"
            Image.fromarray(np.round(arr).astype(np.uint8)).save(target)
            return target
        if im.mode not in _MODES or source.suffix.lower() not in _READABLE:
            target = folder / f"{stem}.png"
            im.convert("RGB").save(target)
            return target
    target = folder / f"{stem}{source.suffix.lower()}"
    target.unlink(missing_ok=True)
    try:
        target.symlink_to(source.resolve())
    except OSError:  # e.g. no symlink rights on Windows
        shutil.copyfile(source, target)
    return target


def split_samples(samples: Sequence[Any], fraction: float, seed: int) -> tuple[list, list]:
    """``(train, val)`` of the detector: about ``fraction`` of ``samples`` for validation,
    whole groups at a time and stratified by class where possible
    (:func:`kdtoolkit.data.fold.split_validation` over the samples' positions). With
    ``fraction == 0`` or a single group (a sample without ``group`` is its own group),
    validation reuses the training samples."""
    groups = [s.group for s in samples]
    distinct = {g if g is not None else ("sample", i) for i, g in enumerate(groups)}
    if fraction <= 0 or len(distinct) < 2:
        return list(samples), list(samples)
    from kdtoolkit.data.fold import split_validation  # scikit-learn: only when training

    labels = [int(s.label) for s in samples]
    train, val = split_validation(np.arange(len(samples)), labels, groups, fraction, seed)
    return [samples[i] for i in train], [samples[i] for i in val]


def label_line(sample: Any) -> str:
    """The detection label line of ``sample``: ``0 cx cy w h`` (:func:`yolo_label`)."""
    cx, cy, w, h = yolo_label(*roi_of(sample))
    return f"0 {cx:.6f} {cy:.6f} {w:.6f} {h:.6f}"


def write_dataset(
    folder: Path,
    train: Sequence[Any],
    val: Sequence[Any],
    label: Callable[[Any], str] = label_line,
) -> tuple[Path, dict[int, Path]]:
    """An ultralytics dataset in ``folder``: ``images/{train,val}``, ``labels/{train,val}``
    (one ``label(sample)`` line per image) and ``data.yaml``; returns the YAML and each
    sample's staged image."""
    staged: dict[int, Path] = {}
    for split, samples in (("train", train), ("val", val)):
        images, labels = folder / "images" / split, folder / "labels" / split
        labels.mkdir(parents=True, exist_ok=True)
        for s in samples:
            image = stage_image(s, images)
            staged.setdefault(int(s.index), image)
            (labels / f"{image.stem}.txt").write_text(label(s) + "\n")
    data = folder / "data.yaml"
    data.write_text(
        f"path: {json.dumps(str(folder.resolve()))}\n"
        "train: images/train\nval: images/val\nnc: 1\nnames:\n  0: roi\n",
        encoding="utf-8",
    )
    return data, staged
