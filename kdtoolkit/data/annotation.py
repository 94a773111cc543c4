"""Box annotations as manifest rows (the file readers are in :mod:`.annotation_formats`).

Boxes are converted to the manifest's ROI convention (:mod:`kdtoolkit.data.geometry`): the box
``x0, y0, x1, y1`` in full-image pixels rotated by ``angle`` degrees about its centre,
counter-clockwise on screen. CVAT's ``rotation`` (and the ``rotation`` attribute of CVAT's COCO
export) is clockwise, so ``angle = -rotation``. YOLO-OBB corners are fitted with the rectangle
whose angle lies in (-45, 45] (the same region, corners relabelled).

The manifest holds one ROI per image. Labels come from a CSV (``image,label`` columns) or, without
one, from each box's class name. Every problem is collected and raised at once as an
:class:`AnnotationError`, one line per problem naming the file and the fix.
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kdtoolkit.data.geometry import roi_corners
from kdtoolkit.data.manifest_fields import BOUNDS_TOLERANCE
from kdtoolkit.errors import KdError
from kdtoolkit.fileio import atomic_write_text

MANIFEST_HEADER = ("image", "label", "x0", "y0", "x1", "y1", "angle")
MAX_LISTED = 30

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class Annotation:
    """One box of an annotation file, in manifest convention."""

    image: Path  # absolute
    label: str  # class name of the box
    box: Box
    angle: float
    where: str  # "file:line" or "file: image 'x' box 2", for messages
    size: tuple[int, int] | None = None  # (width, height) when the file states it


@dataclass(frozen=True)
class Row:
    """One manifest row; ``box`` None leaves the box columns empty."""

    image: Path  # absolute
    label: str
    box: Box | None
    angle: float = 0.0


class AnnotationError(KdError):
    """Every problem found while importing; ``problems`` holds the lines of the message."""

    def __init__(self, problems: list[str]) -> None:
        shown = problems[:MAX_LISTED]
        if len(problems) > MAX_LISTED:
            shown.append(f"... and {len(problems) - MAX_LISTED} more problems")
        super().__init__("\n".join(shown))
        self.problems = problems


def rect_from_corners(corners: np.ndarray) -> tuple[Box, float]:
    """The ROI (box, angle) of 4 rectangle corners given in order around it (either way round).

    The angle is chosen in (-45, 45]; raises ``ValueError`` if the points are not a rectangle.
    """
    p = np.asarray(corners, dtype=np.float64).reshape(4, 2)
    u = (p[1] - p[0] + p[2] - p[3]) / 2  # one pair of edges
    v = (p[3] - p[0] + p[2] - p[1]) / 2  # the other pair
    length = float(np.hypot(*u))
    area = abs(float(u[0] * v[1] - u[1] * v[0]))
    if length < 1e-9 or area < 1e-9:
        raise ValueError("the corners enclose no area")
    width, height = length, area / length
    angle = math.degrees(math.atan2(-u[1], u[0]))  # top edge direction, screen convention
    angle = (angle + 90) % 180 - 90  # [-90, 90): the same rectangle
    if angle > 45:
        angle, width, height = angle - 90, height, width
    elif angle <= -45:
        angle, width, height = angle + 90, height, width
    angle = 0.0 if abs(angle) < 1e-12 else angle
    cx, cy = p.mean(axis=0)
    box = (cx - width / 2, cy - height / 2, cx + width / 2, cy + height / 2)
    fitted = roi_corners(box, angle)
    gap = max(float(np.min(np.hypot(*(fitted - q).T))) for q in p)
    if gap > max(0.5, 0.01 * math.hypot(width, height)):
        raise ValueError(f"the corners are not a rectangle (off by {gap:.2g} px)")
    return (float(box[0]), float(box[1]), float(box[2]), float(box[3])), float(angle)


def from_clockwise(box: Box, rotation: float) -> tuple[Box, float]:
    """A box with a clockwise rotation in degrees (CVAT) → (box, manifest angle)."""
    angle = (-float(rotation) + 180) % 360 - 180
    return box, (0.0 if angle == 0 else (180.0 if angle == -180 else angle))


# -- to manifest rows -----------------------------------------------------------------------


def to_rows(
    annotations: list[Annotation],
    images: str | Path,
    labels: str | Path | None = None,
    roi_class: str | None = None,
) -> list[Row]:
    """One row per image. With ``labels`` (CSV with ``image,label`` columns; image paths relative
    to the ``images`` folder or bare file names) its rows, in order, with the image's box if
    any; without it every annotated image labelled by its box's class. ``roi_class`` keeps only
    the boxes of that class."""
    if roi_class is not None:
        annotations = [a for a in annotations if a.label == roi_class]
    problems: list[str] = []
    by_image: dict[Path, list[Annotation]] = defaultdict(list)
    for ann in annotations:
        by_image[ann.image].append(ann)
    for image, anns in by_image.items():
        if len(anns) > 1:
            places = "; ".join(a.where for a in anns[:3])
            problems.append(
                f"{image}: {len(anns)} boxes ({places}) — the manifest holds one ROI "
                "per image: delete the extra boxes or pass --roi-class"
            )
        elif not anns[0].image.is_file():
            problems.append(
                f"{anns[0].where}: image {image} not found — put it under the images folder"
            )
        else:
            problems.extend(_box_problems(anns[0]))
    rows: list[Row] = []
    if labels is None:
        for image in sorted(by_image):
            ann = by_image[image][0]
            rows.append(Row(image, ann.label, ann.box, ann.angle))
    else:
        images = Path(images).expanduser().resolve()
        labels = Path(labels).expanduser().resolve()
        rows = _rows_from_labels(labels, images, by_image, problems)
    if problems:
        raise AnnotationError(problems)
    return rows


def manifest_text(rows: list[Row], folder: Path) -> str:
    """The CSV text of ``rows``; image paths relative to ``folder`` (the manifest's)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(MANIFEST_HEADER)
    for row in rows:
        image = Path(os.path.relpath(row.image, folder)).as_posix()
        if row.box is None:
            writer.writerow([image, row.label, "", "", "", "", ""])
        else:
            writer.writerow([image, row.label, *(_num(v) for v in row.box), _num(row.angle)])
    return buffer.getvalue()


def write_manifest(rows: list[Row], path: str | Path) -> Path:
    """Write ``rows`` as ``manifest.csv`` at ``path`` atomically."""
    path = Path(path).expanduser().resolve()
    return atomic_write_text(path, manifest_text(rows, path.parent))


# -- helpers --------------------------------------------------------------------------------


def _rows_from_labels(
    labels: Path, images: Path, by_image: dict[Path, list[Annotation]], problems: list[str]
) -> list[Row]:
    try:
        with labels.open(newline="", encoding="utf-8-sig") as handle:
            records = list(csv.reader(handle))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise AnnotationError(
            [
                f"{labels}: cannot read the labels CSV ({exc}) — give a UTF-8 "
                "CSV with image,label columns"
            ]
        ) from None
    header = [c.strip().lower() for c in records[0]] if records else []
    if "image" not in header or "label" not in header:
        raise AnnotationError(
            [
                f"{labels}:1: needs columns image,label (found: "
                f"{', '.join(header) or 'none'}) — add the header"
            ]
        )
    col_image, col_label = header.index("image"), header.index("label")
    by_name: dict[str, list[Path]] = defaultdict(list)
    for file in images.rglob("*"):
        if file.is_file():
            by_name[file.name].append(file.resolve())
    rows: list[Row] = []
    used: set[Path] = set()
    for line, record in enumerate(records[1:], start=2):
        if not any(c.strip() for c in record):
            continue
        name = record[col_image].strip() if col_image < len(record) else ""
        label = record[col_label].strip() if col_label < len(record) else ""
        if not name or not label:
            problems.append(f"{labels}:{line}: empty image or label — fill both")
            continue
        image = _resolve_labelled(name, images, by_name)
        if image is None:
            problems.append(
                f"{labels}:{line}: image '{name}' not found — give its path "
                "relative to the images folder"
            )
            continue
        used.add(image)
        anns = by_image.get(image, [])
        ann = anns[0] if len(anns) == 1 else None
        rows.append(Row(image, label, ann.box if ann else None, ann.angle if ann else 0.0))
    for image in sorted(set(by_image) - used):
        problems.append(
            f"{image}: has a box but no row in {labels.name} — add 'image,label' for it"
        )
    return rows


def _resolve_labelled(name: str, images: Path, by_name: dict[str, list[Path]]) -> Path | None:
    """A labels-CSV image: a path under ``images``, else a unique bare file name."""
    candidate = (images / name).resolve()
    if candidate.is_file():
        return candidate
    matches = by_name.get(Path(name).name, [])
    return matches[0] if len(matches) == 1 else None


def _box_problems(ann: Annotation) -> list[str]:
    x0, y0, x1, y1 = ann.box
    if not all(math.isfinite(v) for v in ann.box):
        return [f"{ann.where}: box coordinates are NaN or infinite — fix or delete it"]
    if not (x1 > x0 and y1 > y0):
        return [f"{ann.where}: box has no area — delete it or redraw it"]
    if ann.size is None:
        return []
    width, height = ann.size
    corners = roi_corners(ann.box, ann.angle)
    low, high = corners.min(axis=0), corners.max(axis=0)
    tol = BOUNDS_TOLERANCE
    if low.min() >= -tol and high[0] <= width + tol and high[1] <= height + tol:
        return []
    return [
        f"{ann.where}: box is outside the image ({width}x{height}) — clip it to the image in "
        "the annotation tool"
    ]


def _num(value: float) -> str:
    return format(float(value) + 0.0, ".12g")
