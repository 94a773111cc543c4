"""Checks of single manifest cells: image files, boxes, ROI bounds and labels.

Each check returns its value and a problem line (None when fine), in the manifest's
``"<what> — <how to fix>"`` style, so :func:`kdtoolkit.data.manifest.read_manifest` can
report every problem at once.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from kdtoolkit.data.geometry import Box, roi_corners
from kdtoolkit.data.scan import ReadSpec, read_scan
from kdtoolkit.data.volume import is_volume_path
from kdtoolkit.errors import KdError, suggestion

BOX_COLUMNS = ("x0", "y0", "x1", "y1")
#: Pixel modes :func:`kdtoolkit.data.imageio.load_image` can convert (8/16-bit grey, RGB,
#: palette, alpha).
SUPPORTED_MODES = frozenset(
    {"1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "I", "I;16", "I;16L",
     "I;16B", "I;16N", "F"}
)  # fmt: skip
#: How far (pixels) an ROI corner may stick out of the image before it is an error.
BOUNDS_TOLERANCE = 0.5


def check_image(
    root: Path, text: str, what: str
) -> tuple[Path | None, tuple[int, int] | None, str | None]:
    """Resolve and open an image file (header only). Returns (path, (W, H), problem)."""
    if not text:
        return None, None, f"{what} path is empty — give the file path relative to the manifest"
    file = Path(text).expanduser()
    file = (file if file.is_absolute() else root / file).resolve()
    if not file.is_file():
        return (
            None,
            None,
            f"missing {what} file '{text}' (looked for {file}) — paths are relative to the "
            "manifest's folder",
        )
    try:
        with Image.open(file) as im:
            size, mode = im.size, im.mode
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return None, None, f"unreadable {what} '{text}' ({reason}) — use PNG, JPEG or TIFF"
    if mode not in SUPPORTED_MODES:
        return (
            None,
            None,
            f"unsupported pixel mode '{mode}' in {what} '{text}' — save it as 8- or 16-bit grey "
            "or 8-bit RGB",
        )
    if size[0] < 1 or size[1] < 1:
        return None, None, f"{what} '{text}' has no pixels ({size[0]}x{size[1]}) — replace it"
    return file, size, None


@dataclass(frozen=True)
class Source:
    """A checked ``image`` cell: ``size`` (W, H) as in the manifest's pixels, ``shape`` (W, H)
    as the engine sees it, ``read`` the scan spec (None: a 2D file), ``scale`` (sx, sy) engine
    pixels per manifest pixel, ``spacing`` mm per pixel (row, col) when known."""

    path: Path
    size: tuple[int, int]
    shape: tuple[int, int]
    read: ReadSpec | None = None
    scale: tuple[float, float] = (1.0, 1.0)
    spacing: tuple[float, float] | None = None


def check_source(
    root: Path, text: str, slice_text: str, spec: ReadSpec
) -> tuple[Source | None, str | None]:
    """Resolve and check an ``image`` cell with its ``slice`` cell: a 2D file (header only) or a
    scan (decoded, cut and scaled with ``spec`` and the row's slice)."""
    file = (root / Path(text).expanduser()).resolve() if text else None
    if file is not None and (file.is_dir() or (file.is_file() and is_volume_path(file))):
        if slice_text in ("", "mid"):
            index: int | str = slice_text or spec.slice
        elif is_int(slice_text) and int(slice_text) >= 0:
            index = int(slice_text)
        else:
            return None, f"slice '{slice_text}' is not a slice index — give 0, 1, ... or 'mid'"
        read = dataclasses.replace(spec, slice=index)
        try:
            scan = read_scan(file, read)
        except KdError as exc:
            reason = str(exc).removeprefix(f"{file}: ").removeprefix(f"{file}")
            return None, f"image '{text}': {reason}"
        shape = (scan.array.shape[1], scan.array.shape[0])
        return Source(file, scan.size, shape, read, scan.scale, scan.spacing), None
    path, size, problem = check_image(root, text, "image")
    if problem is None and slice_text:
        problem = f"slice '{slice_text}' given for the 2D image '{text}' — clear the slice cell"
    if path is None or size is None or problem:
        return None, problem
    return Source(path, size, size), None


def parse_box(texts: list[str], required: bool) -> tuple[Box | None, str | None]:
    """The box of the ``x0, y0, x1, y1`` cell texts (None when all are empty and boxes are
    not ``required``), and a problem."""
    if not any(texts):
        if required:
            return None, "box is empty — fill x0,y0,x1,y1 (expert ROI in full-image pixels)"
        return None, None
    values: list[float] = []
    bad: list[str] = []
    for name, text in zip(BOX_COLUMNS, texts, strict=True):
        try:
            value = float(text)
            if not math.isfinite(value):
                raise ValueError
            values.append(value)
        except ValueError:
            bad.append(f"{name}='{text}'")
    if bad:
        return None, (
            f"box not numeric ({', '.join(bad)}) — give x0,y0,x1,y1 as numbers in full-image pixels"
        )
    x0, y0, x1, y1 = values
    if x1 <= x0 or y1 <= y0:
        return None, (
            f"box is empty ({x0:g},{y0:g},{x1:g},{y1:g}: needs x1 > x0 and y1 > y0) — give the "
            "top-left corner first"
        )
    return (x0, y0, x1, y1), None


def check_bounds(box: Box, angle: float, size: tuple[int, int]) -> str | None:
    """A problem when the ROI ``(box, angle)`` sticks out of an image of ``size = (W, H)``
    by more than ``BOUNDS_TOLERANCE``, else None."""
    width, height = size
    tol = BOUNDS_TOLERANCE
    if angle == 0.0:
        x0, y0, x1, y1 = box
        if x0 < -tol or y0 < -tol or x1 > width + tol or y1 > height + tol:
            return (
                f"box ({x0:g},{y0:g},{x1:g},{y1:g}) is outside the image ({width}x{height}) — "
                "boxes are in full-image pixels, 0 <= x <= width, 0 <= y <= height"
            )
        return None
    corners = roi_corners(box, angle)
    xs, ys = corners[:, 0], corners[:, 1]
    if xs.min() < -tol or ys.min() < -tol or xs.max() > width + tol or ys.max() > height + tol:
        pts = " ".join(f"({x:.1f},{y:.1f})" for x, y in corners)
        return (
            f"rotated ROI corners outside the image ({width}x{height}): {pts} — shrink the box "
            "or check the angle (degrees, counter-clockwise)"
        )
    return None


class LabelResolver:
    """Maps label text to a class index; ``classes`` are the resolved class names."""

    def __init__(self, classes: tuple[str, ...], by_index: bool) -> None:
        self.classes = classes
        self.by_index = by_index
        self._lookup = {name: i for i, name in enumerate(classes)}

    def __call__(self, text: str) -> tuple[int | None, str | None]:
        if not text:
            return None, "label is empty — give a class name or a 0-based class index"
        listing = ", ".join(self.classes)
        if self.by_index:
            value = int(text)
            if 0 <= value < len(self.classes):
                return value, None
            return None, (
                f"label index {value} out of range — use 0..{len(self.classes) - 1} "
                f"(classes: {listing})"
            )
        if text in self._lookup:
            return self._lookup[text], None
        return None, (
            f"unknown label '{text}'{suggestion(text, self.classes)} — use one of: {listing}"
        )


def label_resolver(labels: list[str], classes: Sequence[str] | None) -> LabelResolver:
    """The :class:`LabelResolver` of a manifest's label texts: by name or by index (see
    :func:`kdtoolkit.data.manifest.read_manifest`)."""
    filled = [t for t in labels if t]
    all_int = bool(filled) and all(is_int(t) for t in filled)
    if classes is not None:
        names = tuple(str(c) for c in classes)
        all_names = all(t in names for t in filled)
        return LabelResolver(names, by_index=all_int and not all_names)
    if all_int:  # negative indices are reported as out of range
        top = max(0, *(int(t) for t in filled))
        return LabelResolver(tuple(str(i) for i in range(top + 1)), by_index=True)
    return LabelResolver(tuple(sorted(set(filled))), by_index=False)


def is_int(text: str) -> bool:
    """Whether ``text`` reads as an integer."""
    try:
        int(text)
    except ValueError:
        return False
    return True
