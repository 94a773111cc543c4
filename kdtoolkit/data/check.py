"""``kd data check``: every problem of a data set at once, a summary and a contact sheet.

Besides the row checks of :func:`kdtoolkit.data.manifest.check_manifest` (unreadable image, bad
slice, box outside, ...), every image is decoded once to find duplicates (the same image and
slice on two rows, or the same pixels under two names); predefined folds must keep a patient
(``group``) in one fold, and every class needs at least one row (one patient) per fold.
Names shown are the manifest's; nothing from file headers is.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import warnings
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from kdtoolkit.data.geometry import roi_corners
from kdtoolkit.data.imageio import image_key, load_image, read_native
from kdtoolkit.data.manifest import Manifest, Sample, check_manifest
from kdtoolkit.data.scan import ReadSpec
from kdtoolkit.data.view import crop_roi
from kdtoolkit.errors import KdError
from kdtoolkit.fileio import atomic_path

Progress = Callable[[str, int, int], None]


@dataclass
class DataCheck:
    """The outcome: the good rows, every problem line, and summary tables (title, header,
    rows) to print."""

    manifest: Manifest
    problems: list[str]
    tables: list[tuple[str, tuple[str, ...], list[tuple[str, ...]]]] = field(default_factory=list)


def name_of(sample: Sample, manifest: Manifest) -> str:
    """A sample's image as the manifest names it (relative to its folder), with its slice."""
    name = os.path.relpath(sample.image, manifest.path.parent)
    return name if sample.read is None else f"{name}[{sample.slice}]"


def check_data(
    path: str | Path,
    classes: Sequence[str] | None = None,
    read: ReadSpec | None = None,
    folds: int = 5,
    progress: Progress | None = None,
) -> DataCheck:
    """Check the manifest at ``path`` and every image it names (see the module)."""

    def rows_done(done: int, total: int) -> None:
        if progress is not None:
            progress("rows", done, total)

    manifest, problems = check_manifest(path, classes, True, read, rows_done)
    where = manifest.path
    seen_key: dict[object, Sample] = {}
    seen_pixels: dict[str, Sample] = {}
    total = len(manifest.samples)
    for done, sample in enumerate(manifest.samples, 1):
        key = image_key(sample)
        if key in seen_key:
            first = seen_key[key]
            problems.append(
                f"{where}:{sample.row}: image '{name_of(sample, manifest)}' is also on row "
                f"{first.row} — remove one of the two rows"
            )
        else:
            seen_key[key] = sample
            try:
                with warnings.catch_warnings():  # NaN voxels: named below, not warned about
                    warnings.simplefilter("ignore", RuntimeWarning)
                    pixels = read_native(sample)
            except KdError as exc:
                problems.append(f"{where}:{sample.row}: {exc}")
            else:
                bad = non_finite(pixels)
                if bad:
                    kind = "voxels" if sample.read is not None else "pixels"
                    problems.append(
                        f"{where}:{sample.row}: '{name_of(sample, manifest)}' has {bad} NaN or "
                        f"infinite {kind} — fix the image or remove the row"
                    )
                digest = hashlib.sha256(np.ascontiguousarray(pixels).tobytes()).hexdigest()
                if digest in seen_pixels:
                    first = seen_pixels[digest]
                    problems.append(
                        f"{where}:{sample.row}: same pixels as row {first.row} "
                        f"('{name_of(first, manifest)}') — remove the duplicate image"
                    )
                else:
                    seen_pixels[digest] = sample
        if progress is not None:
            progress("images", done, total)
    problems += fold_problems(manifest, folds)
    return DataCheck(manifest, problems, summary(manifest))


def non_finite(pixels: np.ndarray) -> int:
    """How many values of ``pixels`` are NaN or infinite (0 for integer images)."""
    if not np.issubdtype(pixels.dtype, np.floating):
        return 0
    return int(np.count_nonzero(~np.isfinite(pixels)))


def fold_problems(manifest: Manifest, folds: int) -> list[str]:
    """A patient on rows of two predefined folds; a class with fewer rows (or patients) than
    ``folds``."""
    where, samples = manifest.path, manifest.samples
    problems = []
    fold_of: dict[str, Sample] = {}
    for s in samples:
        if s.group is None or s.fold is None:
            continue
        first = fold_of.setdefault(s.group, s)
        if first.fold != s.fold:
            problems.append(
                f"{where}:{s.row}: patient '{s.group}' is in fold {s.fold} here and in fold "
                f"{first.fold} on row {first.row} — keep each group in one fold"
            )
    for label, name in enumerate(manifest.classes):
        members = [s for s in samples if s.label == label]
        groups = {s.group if s.group is not None else ("row", s.row) for s in members}
        if len(groups) < folds:
            unit = "rows" if len(groups) == len(members) else "patients"
            problems.append(
                f"{where}:1: class '{name}' has {len(groups)} {unit}, fewer than the {folds} "
                "folds — add images of it or lower cv.folds"
            )
    return problems


def summary(manifest: Manifest) -> list[tuple[str, tuple[str, ...], list[tuple[str, ...]]]]:
    """Tables: classes × count, groups, image sizes, spacing, box sizes and angles."""
    samples = manifest.samples
    tables = []
    by_class = Counter(s.label for s in samples)
    groups_by_class: dict[int, set[str]] = defaultdict(set)
    for s in samples:
        if s.group is not None:
            groups_by_class[s.label].add(s.group)
    tables.append((
        "classes",
        ("class", "images", "patients"),
        [(name, str(by_class[i]), str(len(groups_by_class[i]) or "—"))
         for i, name in enumerate(manifest.classes)],
    ))  # fmt: skip
    per_group = Counter(s.group for s in samples if s.group is not None)
    counts = sorted(per_group.values())
    tables.append((
        "groups",
        ("patients", "images per patient (min / median / max)", "rows without group"),
        [(str(len(per_group)),
          f"{counts[0]} / {np.median(counts):g} / {counts[-1]}" if counts else "—",
          str(sum(s.group is None for s in samples)))],
    ))  # fmt: skip
    sizes = Counter((s.width, s.height) for s in samples)
    kinds = Counter("2D file" if s.read is None else "scan" for s in samples)
    tables.append((
        "image sizes (engine)",
        ("width × height", "images"),
        [(f"{w} × {h}", str(c)) for (w, h), c in sizes.most_common(8)]
        + [(f"({kind})", str(c)) for kind, c in kinds.items()],
    ))  # fmt: skip
    spacing = Counter(
        "unknown" if s.spacing is None else f"{s.spacing[0]:.4g} × {s.spacing[1]:.4g}"
        for s in samples
    )
    tables.append((
        "spacing (mm, row × col)",
        ("spacing", "images"),
        [(k, str(c)) for k, c in spacing.most_common(8)],
    ))  # fmt: skip
    boxed = [s for s in samples if s.box is not None]
    if boxed:
        widths = np.array([s.box[2] - s.box[0] for s in boxed])
        heights = np.array([s.box[3] - s.box[1] for s in boxed])
        angles = np.array([s.angle for s in boxed])
        rows = [
            (name, *(f"{v:.1f}" for v in np.percentile(values, [0, 25, 50, 75, 100])))
            for name, values in (("box width", widths), ("box height", heights),
                                 ("angle (°)", angles))
        ]  # fmt: skip
        rows.append(("rotated boxes", f"{np.mean(angles != 0):.0%}", "", "", "", ""))
        tables.append(("boxes (engine pixels)", ("", "min", "25%", "median", "75%", "max"), rows))
    return tables


def contact_sheet(
    manifest: Manifest,
    out: Path,
    crop_size: tuple[int, int] = (224, 224),
    per_class: int = 4,
    seed: int = 0,
) -> Path:
    """A PNG of up to ``per_class`` images per class (seeded draw): each image with its ROI
    drawn, and beside it the crop the teacher sees (``crop_size`` = (h, w))."""
    os.environ.setdefault("MPLCONFIGDIR", tempfile.mkdtemp(prefix="kd-mpl-"))
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rng = np.random.default_rng(seed)
    picks: list[list[Sample]] = []
    for label in range(len(manifest.classes)):
        members = [s for s in manifest.samples if s.label == label]
        chosen = rng.choice(len(members), min(per_class, len(members)), replace=False)
        picks.append([members[i] for i in sorted(chosen)])
    cols = max(1, max((len(p) for p in picks), default=1))
    rows = max(1, len(picks))
    fig = Figure(figsize=(cols * 4.0, rows * 2.3), dpi=100)
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(rows, cols * 2, width_ratios=[1.3, 1.0] * cols)
    for r, samples in enumerate(picks):
        for c in range(cols):
            image_ax, crop_ax = fig.add_subplot(grid[r, 2 * c]), fig.add_subplot(grid[r, 2 * c + 1])
            image_ax.set_axis_off()
            crop_ax.set_axis_off()
            if c >= len(samples):
                continue
            s = samples[c]
            image = load_image(s, 1)[:, :, 0]
            image_ax.imshow(image, cmap="gray", vmin=0, vmax=1)
            image_ax.set_title(
                f"{manifest.classes[s.label]} · row {s.row}\n{name_of(s, manifest)}", fontsize=6
            )
            if s.box is not None:
                corners = roi_corners(s.box, s.angle)
                closed = np.vstack([corners, corners[:1]]) - 0.5
                image_ax.plot(closed[:, 0], closed[:, 1], color="#ff3030", linewidth=1)
            if s.crop is not None:
                crop = load_image(s.crop, 1)[:, :, 0]
            elif s.box is not None:
                crop = crop_roi(image[:, :, None], s.box, s.angle, crop_size)[:, :, 0]
            else:
                crop = image
            crop_ax.imshow(crop, cmap="gray", vmin=0, vmax=1)
            crop_ax.set_title("teacher crop", fontsize=6)
    fig.tight_layout()
    out = Path(out)
    with atomic_path(out, parents=False) as tmp:
        fig.savefig(tmp, format="png")
    return out
