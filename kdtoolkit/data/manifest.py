"""Read and check a dataset manifest (``manifest.csv``, design §3).

The whole manifest is checked before anything is returned: every problem (missing file,
unreadable image, bad box, unknown label, …) is collected and raised together as one
:class:`ManifestError`, one line per problem, ``"<manifest>:<row>: <what> — <how to fix>"``.
Rows are never silently dropped.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from kdtoolkit.data.geometry import roi_corners
from kdtoolkit.errors import KdError, suggestion

MANIFEST_NAME = "manifest.csv"
REQUIRED = ("image", "label")
BOX_COLUMNS = ("x0", "y0", "x1", "y1")
OPTIONAL = ("angle", "crop", "group", "fold")
KNOWN_COLUMNS = (*REQUIRED, *BOX_COLUMNS, *OPTIONAL)
#: Pixel modes :func:`load_image` can convert (8/16-bit grey, RGB, palette, alpha).
SUPPORTED_MODES = frozenset(
    {"1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "I", "I;16", "I;16L",
     "I;16B", "I;16N", "F"}
)  # fmt: skip
#: How far (pixels) an ROI corner may stick out of the image before it is an error.
BOUNDS_TOLERANCE = 0.5


@dataclass(frozen=True)
class Sample:
    """One manifest row, checked and resolved."""

    index: int  # 0-based position in the manifest
    row: int  # line number in manifest.csv (header is line 1)
    image: Path  # absolute path
    label: int  # 0-based class index
    box: tuple[float, float, float, float] | None  # expert ROI x0,y0,x1,y1, full-image pixels
    angle: float  # degrees, kdtoolkit.data.geometry convention, 0 if absent
    crop: Path | None  # expert crop image, absolute
    group: str | None  # patient id
    fold: int | None  # predefined fold
    width: int
    height: int


@dataclass(frozen=True)
class Manifest:
    """A checked manifest: ``classes[sample.label]`` is each sample's class name."""

    path: Path
    classes: tuple[str, ...]
    samples: list[Sample]


class ManifestError(KdError):
    """Every problem found in a manifest; ``problems`` holds the lines of the message."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def read_manifest(
    path: str | Path,
    classes: Sequence[str] | None = None,
    require_boxes: bool = True,
) -> Manifest:
    """Read ``path`` (a ``manifest.csv`` or the folder holding one) and check every row.

    Labels are class names from ``classes`` or 0-based indices. A manifest whose labels are
    all class names is read by name (names win when class names look like numbers); one
    whose labels are all integers is read by index. With ``classes=None`` the classes are
    the sorted distinct names, or ``"0" … str(max)`` for integer labels.
    ``require_boxes``: the ``x0,y0,x1,y1`` columns must exist and be filled on every row
    (crops and masks need them); otherwise boxes are optional per row.
    Column names are case-insensitive; unknown columns are ignored.
    Raises :class:`ManifestError` (a ``KdError``) listing every problem.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / MANIFEST_NAME
    path = path.resolve()
    if not path.is_file():
        raise ManifestError(
            [f"{path}: manifest not found — pass the path of manifest.csv or of its folder"]
        )
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            rows, header, row_lines = _read_rows(handle)
    except (UnicodeDecodeError, csv.Error) as exc:
        raise ManifestError(
            [f"{path}:1: cannot parse the manifest ({exc}) — save it as UTF-8 CSV"]
        ) from None
    return _check(path, header, rows, row_lines, classes, require_boxes)


def _read_rows(handle) -> tuple[list[list[str]], list[str], list[int]]:
    reader = csv.reader(handle)
    header: list[str] = []
    rows: list[list[str]] = []
    lines: list[int] = []
    for record in reader:
        if not any(cell.strip() for cell in record):
            continue  # blank line
        if not header:
            header = [cell.strip().lower() for cell in record]
            continue
        rows.append([cell.strip() for cell in record])
        lines.append(reader.line_num)
    return rows, header, lines


def _check(
    path: Path,
    header: list[str],
    rows: list[list[str]],
    row_lines: list[int],
    classes: Sequence[str] | None,
    require_boxes: bool,
) -> Manifest:
    problems: list[str] = []

    def report(row: int, text: str) -> None:
        problems.append(f"{path}:{row}: {text}")

    if not header:
        raise ManifestError(
            [f"{path}:1: manifest is empty — add a header line (image,label,...) and one row "
             "per image"]
        )  # fmt: skip
    present = ", ".join(header) if any(header) else "(none)"
    hint = ""
    if len(header) == 1 and any(sep in header[0] for sep in ";\t|"):
        hint = " (the file seems to use another separator; save it comma-separated)"
    for name in sorted({h for h in header if header.count(h) > 1}):
        report(1, f"column '{name}' appears twice — keep one")
    needed = [*REQUIRED, *(BOX_COLUMNS if require_boxes else ())]
    for name in needed:
        if name not in header:
            report(1, f"missing required column '{name}' — columns present: {present}{hint}")
    some_box = [c for c in BOX_COLUMNS if c in header]
    if not require_boxes and some_box and len(some_box) < 4:
        missing = ", ".join(c for c in BOX_COLUMNS if c not in header)
        report(1, f"box columns incomplete, missing {missing} — give all of x0,y0,x1,y1 or none")
    if not rows:
        report(1, "manifest has no data rows — add one row per image")
        raise ManifestError(problems)

    col = {name: header.index(name) for name in KNOWN_COLUMNS if name in header}
    has_box = len(some_box) == 4
    root = path.parent

    def cell(values: list[str], name: str) -> str:
        i = col.get(name)
        return values[i] if i is not None and i < len(values) else ""

    label_of = _label_resolver([cell(v, "label") for v in rows] if "label" in col else [], classes)
    resolved_classes = label_of.classes
    fold_rows = [bool(cell(v, "fold")) for v in rows] if "fold" in col else []
    any_fold = any(fold_rows)

    samples: list[Sample] = []
    for index, (values, row) in enumerate(zip(rows, row_lines, strict=True)):
        ok = True
        if len(values) != len(header):
            report(
                row,
                f"row has {len(values)} fields but the header has {len(header)} — check the "
                "commas and quoting of this row",
            )
            ok = False

        # image
        image_path: Path | None = None
        size: tuple[int, int] | None = None
        if "image" in col:
            image_path, size, problem = _check_image(root, cell(values, "image"), "image")
            if problem:
                report(row, problem)
                ok = False

        # label
        label: int | None = None
        if "label" in col:
            label, problem = label_of(cell(values, "label"))
            if problem:
                report(row, problem)
                ok = False

        # angle
        angle = 0.0
        angle_text = cell(values, "angle")
        if angle_text:
            try:
                angle = float(angle_text)
                if not math.isfinite(angle):
                    raise ValueError
            except ValueError:
                report(row, f"angle '{angle_text}' is not a number — give degrees, e.g. 12.5")
                angle, ok = 0.0, False

        # box
        box: tuple[float, float, float, float] | None = None
        if has_box:
            box, problem = _parse_box([cell(values, c) for c in BOX_COLUMNS], require_boxes)
            if problem:
                report(row, problem)
                ok = False
            elif box is not None and size is not None:
                problem = _check_bounds(box, angle, size)
                if problem:
                    report(row, problem)
                    ok = False
            if box is None and not problem and angle != 0.0:
                report(row, "angle given without a box — fill x0,y0,x1,y1 or clear the angle")
                ok = False

        # crop
        crop_path: Path | None = None
        crop_text = cell(values, "crop")
        if crop_text:
            crop_path, _, problem = _check_image(root, crop_text, "crop")
            if problem:
                report(row, problem)
                ok = False

        # group
        group = cell(values, "group") or None

        # fold
        fold: int | None = None
        fold_text = cell(values, "fold")
        if fold_text:
            try:
                fold = int(fold_text)
                if fold < 0:
                    raise ValueError
            except ValueError:
                report(
                    row,
                    f"bad fold value '{fold_text}' — use a 0-based fold index (0, 1, 2, ...)",
                )
                ok = False
        elif any_fold:
            report(row, "fold is empty but other rows set one — give every row a fold or none")
            ok = False

        if ok and image_path is not None and size is not None and label is not None:
            samples.append(
                Sample(
                    index=index,
                    row=row,
                    image=image_path,
                    label=label,
                    box=box,
                    angle=angle if box is not None else 0.0,
                    crop=crop_path,
                    group=group,
                    fold=fold,
                    width=size[0],
                    height=size[1],
                )
            )
    if problems:
        raise ManifestError(problems)
    return Manifest(path=path, classes=resolved_classes, samples=samples)


def _check_image(
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


def _parse_box(
    texts: list[str], required: bool
) -> tuple[tuple[float, float, float, float] | None, str | None]:
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


def _check_bounds(
    box: tuple[float, float, float, float], angle: float, size: tuple[int, int]
) -> str | None:
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


class _LabelResolver:
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


def _label_resolver(labels: list[str], classes: Sequence[str] | None) -> _LabelResolver:
    filled = [t for t in labels if t]
    all_int = bool(filled) and all(_is_int(t) for t in filled)
    if classes is not None:
        names = tuple(str(c) for c in classes)
        all_names = all(t in names for t in filled)
        return _LabelResolver(names, by_index=all_int and not all_names)
    if all_int:  # negative indices are reported as out of range
        top = max(0, *(int(t) for t in filled))
        return _LabelResolver(tuple(str(i) for i in range(top + 1)), by_index=True)
    return _LabelResolver(tuple(sorted(set(filled))), by_index=False)


def _is_int(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True
