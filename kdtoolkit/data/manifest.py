"""Read and check a dataset manifest (``manifest.csv``).

The whole manifest is checked before anything is returned: every problem (missing file,
unreadable image, bad box, unknown label, …) is collected and raised together as one
:class:`ManifestError`, one line per problem, ``"<manifest>:<row>: <what> — <how to fix>"``.
Rows are never silently dropped.

``image`` may name a 2D file, a DICOM file, a DICOM series folder or a NIfTI file; for scans the
``slice`` column (a 0-based index or ``mid``; empty: the read spec's default) picks the slice
and the :class:`~kdtoolkit.data.scan.ReadSpec` the rest. Boxes are given in the slice's own
pixels; when the spec resamples, each sample's ``box``/``angle``/``width``/``height`` are mapped
to the resampled image (``scale``), so everything downstream sees the engine's pixels.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from kdtoolkit.data.geometry import Box
from kdtoolkit.data.intensity import scale_roi
from kdtoolkit.data.manifest_fields import (
    BOX_COLUMNS,
    Source,
    check_bounds,
    check_image,
    check_source,
    label_resolver,
    parse_box,
)
from kdtoolkit.data.scan import ReadSpec
from kdtoolkit.errors import KdError

MANIFEST_NAME = "manifest.csv"
REQUIRED = ("image", "label")
OPTIONAL = ("angle", "crop", "group", "fold", "slice")
KNOWN_COLUMNS = (*REQUIRED, *BOX_COLUMNS, *OPTIONAL)


@dataclass(frozen=True)
class Sample:
    """One manifest row, checked and resolved."""

    index: int  # 0-based position in the manifest
    row: int  # line number in manifest.csv (header is line 1)
    image: Path  # absolute path
    label: int  # 0-based class index
    box: Box | None  # expert ROI x0,y0,x1,y1, full-image pixels
    angle: float  # degrees, kdtoolkit.data.geometry convention, 0 if absent
    crop: Path | None  # expert crop image, absolute
    group: str | None  # patient id
    fold: int | None  # predefined fold
    width: int  # of the image as the engine sees it (after resampling)
    height: int
    read: ReadSpec | None = None  # how the scan is read (its slice included); None: a 2D file
    scale: tuple[float, float] = (1.0, 1.0)  # engine pixels per manifest pixel (sx, sy)
    spacing: tuple[float, float] | None = None  # mm per engine pixel (row, col), when known

    @property
    def slice(self) -> int | str | None:
        """The scan slice read (index or ``"mid"``), None for a 2D file."""
        return None if self.read is None else self.read.slice


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
    read: ReadSpec | None = None,
) -> Manifest:
    """Read ``path`` (a ``manifest.csv`` or the folder holding one) and check every row.

    Labels are class names from ``classes`` or 0-based indices. A manifest whose labels are
    all class names is read by name (names win when class names look like numbers); one
    whose labels are all integers is read by index. With ``classes=None`` the classes are
    the sorted distinct names, or ``"0" … str(max)`` for integer labels.
    ``require_boxes``: the ``x0,y0,x1,y1`` columns must exist and be filled on every row
    (crops and masks need them); otherwise boxes are optional per row.
    Column names are case-insensitive; unknown columns are ignored. ``read``: how scans are
    read (default :class:`~kdtoolkit.data.scan.ReadSpec`; the engine passes
    :func:`kdtoolkit.data.scan.read_spec` of its recipe).
    Raises :class:`ManifestError` (a ``KdError``) listing every problem.
    """
    manifest, problems = check_manifest(path, classes, require_boxes, read)
    if problems:
        raise ManifestError(problems)
    return manifest


def check_manifest(
    path: str | Path,
    classes: Sequence[str] | None = None,
    require_boxes: bool = True,
    read: ReadSpec | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[Manifest, list[str]]:
    """:func:`read_manifest` without raising on row problems: the good rows and every problem
    line. ``progress(done, total)`` is called after each row. Raises :class:`ManifestError`
    only when no row can be read (no file, no header, no rows)."""
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
    return _check(
        path, header, rows, row_lines, classes, require_boxes, read or ReadSpec(), progress
    )


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
    spec: ReadSpec,
    progress: Callable[[int, int], None] | None,
) -> tuple[Manifest, list[str]]:
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

    label_of = label_resolver([cell(v, "label") for v in rows] if "label" in col else [], classes)
    resolved_classes = label_of.classes
    fold_rows = [bool(cell(v, "fold")) for v in rows] if "fold" in col else []
    any_fold = any(fold_rows)

    samples: list[Sample] = []
    for index, (values, row) in enumerate(zip(rows, row_lines, strict=True)):
        if progress is not None and index:
            progress(index, len(rows))
        ok = True
        if len(values) != len(header):
            report(
                row,
                f"row has {len(values)} fields but the header has {len(header)} — check the "
                "commas and quoting of this row",
            )
            ok = False

        # image (and slice)
        source: Source | None = None
        size: tuple[int, int] | None = None
        if "image" in col:
            source, problem = check_source(root, cell(values, "image"), cell(values, "slice"), spec)
            if problem:
                report(row, problem)
                ok = False
            size = None if source is None else source.size

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
        box: Box | None = None
        if has_box:
            box, problem = parse_box([cell(values, c) for c in BOX_COLUMNS], require_boxes)
            if problem:
                report(row, problem)
                ok = False
            elif box is not None and size is not None:
                problem = check_bounds(box, angle, size)
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
            crop_path, _, problem = check_image(root, crop_text, "crop")
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

        if ok and source is not None and label is not None:
            angle = angle if box is not None else 0.0
            if box is not None and source.scale != (1.0, 1.0):
                box, angle = scale_roi(box, angle, source.scale)
            samples.append(
                Sample(
                    index=index,
                    row=row,
                    image=source.path,
                    label=label,
                    box=box,
                    angle=angle,
                    crop=crop_path,
                    group=group,
                    fold=fold,
                    width=source.shape[0],
                    height=source.shape[1],
                    read=source.read,
                    scale=source.scale,
                    spacing=source.spacing,
                )
            )
    if progress is not None:
        progress(len(rows), len(rows))
    return Manifest(path=path, classes=resolved_classes, samples=samples), problems
