"""Results files (JSON, CSV), the Markdown report and its figures.

Structures (rows such as ``teacher_crop``, ``baseline_full``, ``two_stage``, ``student``;
metrics such as ``accuracy``, all fractions):

- ``folds``: ``[{row: {metric: value}}]``, one dict per fold (``kdtoolkit.report.metrics``);
- ``summary``: ``{row: {metric: {"mean": x, "std": s}}}`` (``kdtoolkit.report.metrics.summarise``).

Figures use matplotlib's Agg canvas directly (no pyplot, no global backend switch) and every
file is written atomically (``kdtoolkit.fileio``).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Polygon

from kdtoolkit.fileio import atomic_write_bytes, atomic_write_text
from kdtoolkit.report.metrics import ROWS, gap_closure, summarise

#: Setting column of the paper's table for the canonical rows.
ROW_LABELS = {
    "teacher_crop": "crops (teacher, upper bound)",
    "baseline_full": "full image, baseline",
    "two_stage": "two-stage: ROI crop → teacher",
    "student": "full image, student (KD)",
}
TABLE_METRICS = (("accuracy", "acc"), ("precision", "prec"), ("recall", "rec"), ("f1", "F1"))
#: (metric, heading, shown as percent)
EXTRA_METRICS = (("macro_f1", "macro F1", True), ("qwk", "QWK", False), ("mae", "MAE", False))
ATTENTION_METRICS = (("pointing_game", "pointing game", True), ("cam_iou", "CAM IoU", False))
#: ROI-provider metrics with a fixed form: (meaning, form); form is "percent", "count" or
#: "number". Others are shown as percent when every value lies in [0, 1].
ROI_METRICS = {
    "map50": ("detection mAP@0.5, held-out images", "percent"),
    "map50_95": ("detection mAP@0.5:0.95, held-out images", "percent"),
    "mean_iou": ("mean IoU of the chosen boxes with the expert boxes", "percent"),
    "n_fallback": ("images without a detection (fallback box used)", "count"),
    "latency_ms": ("provider latency, ms / image (batch of one)", "number"),
}
#: Pipeline names of the latency table (others: :func:`row_label`).
LATENCY_LABELS = {
    "student": "student alone, full image",
    "baseline_full": "baseline alone, full image",
    "two_stage": "two-stage: detector + crop + teacher",
    "two_stage_detector": "two-stage: detector only",
    "two_stage_crop": "two-stage: crop + teacher only",
}
_RESERVED = ("summary", "folds")

Summary = Mapping[str, Mapping[str, Mapping[str, float]]]
Folds = Sequence[Mapping[str, Mapping[str, float]]]


# -- helpers -----------------------------------------------------------------------------------


def ordered_rows(rows: Any) -> list[str]:
    """Canonical rows first (teacher_crop, baseline_full, two_stage, student), then the rest
    in their given order."""
    names = list(rows)
    return [r for r in ROWS if r in names] + [r for r in names if r not in ROWS]


def row_label(row: str) -> str:
    """The table's setting text for ``row`` (``student_x`` → ``full image, student (x)``)."""
    if row in ROW_LABELS:
        return ROW_LABELS[row]
    if row.startswith("student_"):
        return f"full image, student ({row.removeprefix('student_')})"
    return row


def _jsonable(obj: Any) -> Any:
    """Plain JSON types; NaN/inf become null (strict JSON)."""
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, list | tuple | set):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, bool | np.bool_):
        return bool(obj)
    if isinstance(obj, int | np.integer):
        return int(obj)
    if isinstance(obj, float | np.floating):
        value = float(obj)
        return value if math.isfinite(value) else None
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if obj is None or isinstance(obj, str):
        return obj
    if hasattr(obj, "tolist"):  # torch tensors and the like
        return _jsonable(obj.tolist())
    return str(obj)


def _mean_std(value: Any) -> tuple[float, float | None] | None:
    """``(mean, std)`` from ``{"mean", "std"}``, a list of per-fold values, or a plain number
    (std None: shown without "± std")."""
    if value is None:
        return None
    if isinstance(value, Mapping):
        if "mean" not in value or value["mean"] is None:
            return None
        return float(value["mean"]), float(value.get("std") or 0.0)
    if isinstance(value, list | tuple | np.ndarray):
        arr = np.asarray([v for v in value if v is not None], dtype=np.float64)
        if arr.size == 0:
            return None
        return float(arr.mean()), float(arr.std(ddof=1)) if arr.size >= 2 else 0.0
    return float(value), None


def _fmt(ms: tuple[float, float | None] | None, percent: bool, digits: int | None = None) -> str:
    if ms is None:
        return "–"
    mean, std = ms
    d = (2 if percent else 3) if digits is None else digits
    k = 100 if percent else 1
    return f"{k * mean:.{d}f}" + ("" if std is None else f" ± {k * std:.{d}f}")


def _model_of(models: Mapping[str, str] | str | None, row: str) -> str:
    if isinstance(models, str):
        return models
    return str((models or {}).get(row, ""))


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return lines


def _save(fig: Figure, path: str | os.PathLike[str], dpi: int = 120) -> Path:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    return atomic_write_bytes(path, buf.getvalue())


# -- results files -----------------------------------------------------------------------------


def write_results(
    run_dir: str | os.PathLike[str],
    folds: Folds,
    summary: Summary,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``results.json`` and ``results.csv`` into ``run_dir``; return the JSON path.

    JSON: ``{"summary": {row: {metric: {"mean", "std"}}}, "folds": [{row: {metric: x}}],
    **extra}`` (``extra`` may not use the keys ``summary``/``folds``; NaN is written as null).
    CSV: columns ``fold,row,<metrics…>``, one line per fold × row (fold = 0-based index), then a
    ``mean`` and a ``std`` line per row; a metric a row lacks is left empty.
    """
    run = Path(run_dir)
    extra = dict(extra or {})
    clash = [k for k in _RESERVED if k in extra]
    if clash:
        raise ValueError(f"extra may not contain the keys {clash}")
    doc = {"summary": _jsonable(summary), "folds": _jsonable(list(folds)), **_jsonable(extra)}
    json_path = atomic_write_text(
        run / "results.json", json.dumps(doc, indent=2, allow_nan=False) + "\n"
    )

    rows = ordered_rows(dict.fromkeys([r for f in folds for r in f] + list(summary)))
    metrics: list[str] = []
    for source in [*folds, summary]:
        for per_row in source.values():
            metrics += [m for m in per_row if m not in metrics]

    def cell(value: Any) -> str:
        if value is None:
            return ""
        value = float(value)
        return repr(value) if math.isfinite(value) else ""

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["fold", "row", *metrics])
    for i, fold in enumerate(folds):
        for row in rows:
            if row in fold:
                writer.writerow([i, row, *(cell(fold[row].get(m)) for m in metrics)])
    for stat in ("mean", "std"):
        for row in rows:
            if row in summary:
                values = summary[row]
                writer.writerow(
                    [stat, row, *(cell(values[m][stat] if m in values else None) for m in metrics)]
                )
    atomic_write_text(run / "results.csv", buf.getvalue())
    return json_path


# -- Markdown report ---------------------------------------------------------------------------


def _link(run: Path, target: str | os.PathLike[str]) -> str:
    p = Path(target)
    if p.is_absolute():
        with contextlib.suppress(ValueError):  # another drive on Windows: keep it absolute
            p = Path(os.path.relpath(p, run.resolve()))
    return p.as_posix()


def write_report(
    run_dir: str | os.PathLike[str],
    summary: Summary,
    folds: Folds,
    classes: Sequence[str],
    figures: Mapping[str, str | os.PathLike[str]] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``run_dir/report.md`` and return its path.

    Sections: the paper-style table (setting | model | acc | prec | rec | F1, percent,
    mean ± std, rows present only), the gap-closure line, macro F1/QWK/MAE, attention agreement
    (pointing game, CAM IoU), ROI detection, latency, per-fold accuracy and figure links.

    ``figures``: ``{title: path}``, paths relative to ``run_dir`` (absolute ones are made
    relative). ``extra`` keys used (all optional): ``title``; ``models`` ``{row: model name}``
    or one name for all rows;
    ``gap_closure`` (float, else computed from ``summary``); ``attention`` ``{row: {metric:
    value}}`` (added to attention metrics found in ``summary``); ``roi``: per-fold ``[{metric:
    value}]`` or ``{fold: {metric: value}}`` (mean ± std plus one column per fold), or
    ``{metric: value}``; :data:`ROI_METRICS` have a fixed form and meaning, another metric
    whose values all lie in [0, 1] is shown as percent; ``latency_ms`` ``{name: ms}`` (named
    as in :data:`LATENCY_LABELS`). A value may be a number, ``{"mean", "std"}`` or a per-fold list.
    """
    run = Path(run_dir)
    extra = dict(extra or {})
    models = extra.get("models")
    rows = ordered_rows(summary)
    n_folds = len(folds)
    out: list[str] = [f"# {extra.get('title') or 'Results'}", ""]
    out.append(
        f"{len(classes)} classes: {', '.join(str(c) for c in classes)}. "
        f"Mean ± std over {n_folds} fold{'s' if n_folds != 1 else ''}"
        + (" (sample std)." if n_folds > 1 else ".")
    )
    out.append("")

    # The paper's table.
    table_rows = [
        [
            row_label(row),
            _model_of(models, row),
            *(_fmt(_mean_std(summary[row].get(m)), True) for m, _ in TABLE_METRICS),
        ]
        for row in rows
        if any(m in summary[row] for m, _ in TABLE_METRICS)
    ]
    out += ["## Classification", ""]
    out += _md_table(["setting", "model", *(h for _, h in TABLE_METRICS)], table_rows)
    out.append("")

    # Gap closure.
    gap = extra.get("gap_closure")
    if not isinstance(gap, int | float) or isinstance(gap, bool) or not math.isfinite(gap):
        gap = gap_closure(summary)
    if gap is not None:
        s, b, t = (
            summary[r]["accuracy"]["mean"] for r in ("student", "baseline_full", "teacher_crop")
        )
        out.append(
            f"The student closes {100 * gap:.1f}% of the gap between the full-image baseline and "
            f"the crop teacher: (student − baseline) / (teacher − baseline) in mean accuracy = "
            f"({100 * s:.2f} − {100 * b:.2f}) / ({100 * t:.2f} − {100 * b:.2f})."
        )
    else:
        out.append(
            "Gap closure: not available (needs the teacher_crop, baseline_full and student rows "
            "and a teacher more accurate than the baseline)."
        )
    out.append("")

    # Extra classification metrics.
    present = [(m, h, p) for m, h, p in EXTRA_METRICS if any(m in summary[r] for r in rows)]
    if present:
        out += ["## Other metrics", ""]
        body = [
            [row_label(r), *(_fmt(_mean_std(summary[r].get(m)), p) for m, _, p in present)]
            for r in rows
            if any(m in summary[r] for m, _, _ in present)
        ]
        out += _md_table(["setting", *(h + (" (%)" if p else "") for _, h, p in present)], body)
        out += [
            "",
            "QWK: quadratic-weighted Cohen's kappa; MAE: mean |class-index difference|.",
            "",
        ]

    # Attention agreement.
    attention: dict[str, dict[str, Any]] = {}
    for row, metrics in (extra.get("attention") or {}).items():
        attention.setdefault(row, {}).update(metrics)
    for row in rows:
        for m, _, _ in ATTENTION_METRICS:
            if m in summary[row]:
                attention.setdefault(row, {})[m] = summary[row][m]
    if attention:
        out += ["## Attention agreement with the ROI", ""]
        body = [
            [
                row_label(r),
                *(_fmt(_mean_std(attention[r].get(m)), p) for m, _, p in ATTENTION_METRICS),
            ]
            for r in ordered_rows(attention)
        ]
        out += _md_table(
            ["setting", *(h + (" (%)" if p else "") for _, h, p in ATTENTION_METRICS)], body
        )
        out += [
            "",
            "Pointing game: share of images whose Grad-CAM maximum lies in the ROI. "
            "CAM IoU: IoU of the top 20% CAM pixels with the ROI.",
            "",
        ]

    # ROI detection.
    out += _roi_section(extra.get("roi"))

    # Latency.
    latency = extra.get("latency_ms")
    if latency:
        out += ["## Latency", ""]
        out += _md_table(
            ["pipeline", "ms / image"],
            [
                [LATENCY_LABELS.get(k) or row_label(k), _fmt(_mean_std(latency[k]), False, 1)]
                for k in [k for k in LATENCY_LABELS if k in latency]
                + [k for k in latency if k not in LATENCY_LABELS]
            ],
        )
        out += [
            "",
            "Mean time per held-out image, batch of one, from the decoded image to the result.",
            "",
        ]

    # Per-fold accuracy.
    if folds:
        fold_rows = [r for r in rows if any(r in f for f in folds)]
        out += ["## Accuracy per fold (%)", ""]
        body = []
        for i, fold in enumerate(folds):
            cells = []
            for r in fold_rows:
                v = fold.get(r, {}).get("accuracy")
                cells.append("–" if v is None else f"{100 * float(v):.2f}")
            body.append([str(i), *cells])
        out += _md_table(["fold", *fold_rows], body)
        out.append("")

    if figures:
        out += ["## Figures", ""]
        for title, target in figures.items():
            out += [f"### {title}", "", f"![{title}]({_link(run, target)})", ""]

    return atomic_write_text(run / "report.md", "\n".join(out).rstrip() + "\n")


def _roi_section(roi: Any) -> list[str]:
    """The ROI provider's metrics: one line per metric, mean ± std and one column per fold
    (when given per fold), with the meaning of the known ones (:data:`ROI_METRICS`)."""
    if not roi:
        return []
    per_fold: dict[str, Mapping[str, Any]] = {}
    if isinstance(roi, Sequence) and not isinstance(roi, str):
        per_fold = {str(i): f for i, f in enumerate(roi)}
    elif all(isinstance(v, Mapping) and "mean" not in v for v in roi.values()):
        per_fold = {str(k): v for k, v in roi.items()}  # {fold: {metric: value}}
    if per_fold:
        roi = summarise([{"roi": dict(f)} for f in per_fold.values() if f]).get("roi", {})
    keys = [k for k in ROI_METRICS if k in roi] + [k for k in roi if k not in ROI_METRICS]
    stats = {k: _mean_std(roi[k]) for k in keys}
    stats = {k: v for k, v in stats.items() if v is not None}
    if not stats:
        return []
    body = []
    for key, value in stats.items():
        meaning, form = ROI_METRICS.get(key, ("", ""))
        if not form:
            form = "percent" if 0.0 <= value[0] <= 1.0 and (value[1] or 0.0) <= 1.0 else "number"
        pct = form == "percent"
        digits = 1 if form == "count" else None
        cells = [_fmt(value, pct, digits) + (" %" if pct else "")]
        for fold in per_fold.values():
            v = (fold or {}).get(key)
            number = isinstance(v, int | float | np.number) and not isinstance(v, bool)
            number = number and math.isfinite(float(v))
            if not number:
                cells.append("–")
            elif form == "count":
                cells.append(f"{float(v):.0f}")
            else:
                cells.append(_fmt((float(v), None), pct))
        body.append([key, *cells, meaning])
    header = ["metric", "mean ± std", *(f"fold {k}" for k in per_fold), "meaning"]
    return ["## ROI provider (held-out folds)", "", *_md_table(header, body), ""]


# -- figures -----------------------------------------------------------------------------------


def plot_results_table(
    path: str | os.PathLike[str],
    summary: Summary,
    model_names: Mapping[str, str] | str | None = None,
) -> Path:
    """The paper-style table (setting | model | acc | prec | rec | F1, %) as a PNG.

    ``model_names``: ``{row: model name}``, or one name for every row.
    """
    rows = [r for r in ordered_rows(summary) if any(m in summary[r] for m, _ in TABLE_METRICS)]
    text = [
        [
            row_label(r),
            _model_of(model_names, r),
            *(_fmt(_mean_std(summary[r].get(m)), True) for m, _ in TABLE_METRICS),
        ]
        for r in rows
    ] or [["(no results)", "", *("–" for _ in TABLE_METRICS)]]
    fig = Figure(figsize=(11, 0.45 * (len(text) + 1) + 0.4))
    ax = fig.add_subplot()
    ax.axis("off")
    table = ax.table(
        cellText=text,
        colLabels=["setting", "model", *(h for _, h in TABLE_METRICS)],
        loc="center",
        cellLoc="center",
    )
    table.auto_set_font_size(False)
    table.set_fontsize(10)
    table.auto_set_column_width(list(range(2 + len(TABLE_METRICS))))
    table.scale(1, 1.4)
    for (r, _), c in table.get_celld().items():
        if r == 0:
            c.set_text_props(weight="bold")
            c.set_facecolor("#e6e6e6")
        elif r - 1 < len(rows) and rows[r - 1] == "student":
            c.set_facecolor("#e8f1fb")
    return _save(fig, path)


def plot_confusions(
    path: str | os.PathLike[str],
    matrices: Mapping[str, Any],
    classes: Sequence[str],
) -> Path:
    """One confusion-matrix panel per row, side by side.

    ``matrices``: ``{row: K×K counts}`` (rows true, columns predicted) or ``{row: [per-fold
    K×K]}``, which are summed. Cells show counts; colour is the share of the true class.
    """
    if not matrices:
        raise ValueError("no confusion matrices to plot")
    k = len(classes)
    rows = ordered_rows(matrices)
    fig = Figure(figsize=(3.6 * len(rows) + 0.8, 3.8 + 0.06 * k))
    axes = fig.subplots(1, len(rows), squeeze=False)[0]
    image = None
    for ax, row in zip(axes, rows, strict=True):
        m = np.asarray(matrices[row], dtype=np.float64)
        if m.ndim == 3:
            m = m.sum(axis=0)
        if m.shape != (k, k):
            raise ValueError(f"confusion matrix for {row!r} has shape {m.shape}, expected {(k, k)}")
        totals = m.sum(axis=1, keepdims=True)
        share = np.divide(m, totals, out=np.zeros_like(m), where=totals > 0)
        image = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
        for i in range(k):
            for j in range(k):
                ax.text(
                    j,
                    i,
                    f"{int(round(m[i, j]))}",
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="white" if share[i, j] > 0.5 else "black",
                )
        acc = np.trace(m) / m.sum() if m.sum() else float("nan")
        ax.set_title(f"{row_label(row)}\nacc {100 * acc:.1f}%", fontsize=9)
        ax.set_xticks(range(k), [str(c) for c in classes], rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(k), [str(c) for c in classes], fontsize=8)
        ax.set_xlabel("predicted")
    axes[0].set_ylabel("true")
    if image is not None:
        fig.colorbar(image, ax=list(axes), fraction=0.03, label="share of true class")
    return _save(fig, path)


def _display_image(image: Any) -> tuple[np.ndarray, bool]:
    """``(h×w or h×w×3 array in [0, 1], is_grey)`` from grey, HWC or CHW input."""
    arr = np.asarray(image, dtype=np.float64)
    if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3):
        arr = np.moveaxis(arr, 0, -1)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3):
        raise ValueError(f"image must be h×w or h×w×3, got shape {np.shape(image)}")
    lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
    arr = (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
    return np.nan_to_num(arr), arr.ndim == 2


def _draw_box(ax: Any, box: Any, scale: tuple[float, float] = (1.0, 1.0)) -> None:
    if box is None:
        return
    arr = np.asarray(box, dtype=np.float64)
    if arr.shape == (4,):
        x0, y0, x1, y1 = arr
        arr = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]])
    ax.add_patch(
        Polygon(arr * np.array(scale), closed=True, fill=False, edgecolor="lime", linewidth=1.5)
    )


def plot_cam_pairs(
    path: str | os.PathLike[str],
    images: Sequence[Any],
    cams_a: Sequence[Any],
    cams_b: Sequence[Any],
    boxes: Sequence[Any],
    titles: Sequence[str],
    labels: tuple[str, str] = ("baseline", "student"),
) -> Path:
    """Grad-CAM comparison (the paper's Fig. 3): one line per image with the image, the
    ``labels[0]`` CAM overlay and the ``labels[1]`` CAM overlay, the ROI drawn on each.

    ``images``: h×w grey or h×w×3 (or CHW) arrays, any range (min-max scaled for display).
    ``cams_*``: 2-D maps of any size, stretched over the image and min-max scaled; a × marks
    each CAM's maximum. ``boxes``: per image ``(x0, y0, x1, y1)``, an N×2 polygon (e.g. rotated
    ROI corners) in image pixels, or None. ``titles``: one line of text per image.
    """
    n = len(images)
    if n == 0:
        raise ValueError("no images to plot")
    if not len(cams_a) == len(cams_b) == len(boxes) == len(titles) == n:
        raise ValueError("images, cams_a, cams_b, boxes and titles must have the same length")
    shown_images = [_display_image(im) for im in images]
    aspect = max(im.shape[0] / im.shape[1] for im, _ in shown_images)
    fig = Figure(figsize=(9.0, n * (3.0 * min(aspect, 2.0) + 0.35) + 0.3))
    axes = fig.subplots(n, 3, squeeze=False)
    for i in range(n):
        img, grey = shown_images[i]
        h, w = img.shape[:2]
        extent = (0.0, float(w), float(h), 0.0)
        for j, cam in enumerate((None, cams_a[i], cams_b[i])):
            ax = axes[i, j]
            ax.imshow(img, cmap="gray" if grey else None, extent=extent, interpolation="nearest")
            if cam is not None:
                c = np.nan_to_num(np.squeeze(np.asarray(cam, dtype=np.float64)))
                lo, hi = float(c.min()), float(c.max())
                shown = (c - lo) / (hi - lo) if hi > lo else np.zeros_like(c)
                ax.imshow(
                    shown,
                    cmap="jet",
                    alpha=0.45,
                    vmin=0,
                    vmax=1,
                    extent=extent,
                    interpolation="bilinear",
                )
                if hi > lo:
                    r, cc = np.unravel_index(int(np.argmax(c)), c.shape)
                    ax.plot(
                        (cc + 0.5) * w / c.shape[1],
                        (r + 0.5) * h / c.shape[0],
                        "x",
                        color="white",
                        markersize=9,
                        markeredgewidth=2,
                    )
            _draw_box(ax, boxes[i])
            ax.set_xlim(0, w)
            ax.set_ylim(h, 0)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(("image", *labels)[j], fontsize=10)
        axes[i, 0].set_ylabel(str(titles[i]), fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


_IGNORED_KEYS = {"epoch", "step", "lr", "time", "seconds"}
_SCORE_COLOURS = ("C0", "navy", "darkcyan", "purple", "darkgoldenrod")


def _is_score(key: str) -> bool:
    return "accuracy" in key or (key.startswith("val_") and not key.endswith("loss"))


def plot_curves(path: str | os.PathLike[str], history: Mapping[str, Sequence[Mapping]]) -> Path:
    """Training curves, one subplot per stage.

    ``history``: ``{stage: [epoch dict, …]}``. In an epoch dict, ``epoch`` (optional) is the x
    value; ``loss`` is the total training loss (bold); any other number is a loss term (e.g.
    ``ce``, ``kd``, ``cam``), drawn on the left axis, except scores — keys containing
    ``accuracy`` and ``val_*`` keys other than ``val_loss`` — drawn on a right 0–1 axis.
    ``lr``, ``time``, ``seconds`` and ``step`` are ignored, as are non-numbers.
    """
    if not history:
        raise ValueError("no training history to plot")
    stages = list(history)
    ncols = min(3, len(stages))
    nrows = math.ceil(len(stages) / ncols)
    fig = Figure(figsize=(5.0 * ncols, 3.6 * nrows))
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[len(stages) :]:
        ax.axis("off")
    for ax, stage in zip(axes, stages, strict=False):
        epochs = list(history[stage])
        ax.set_title(stage, fontsize=10)
        ax.set_xlabel("epoch")
        if not epochs:
            ax.text(0.5, 0.5, "no epochs", ha="center", va="center", transform=ax.transAxes)
            continue
        xs = [e.get("epoch", i + 1) for i, e in enumerate(epochs)]
        keys: list[str] = []
        for e in epochs:
            for key, value in e.items():
                number = isinstance(value, int | float | np.number) and not isinstance(value, bool)
                if key not in keys and key not in _IGNORED_KEYS and number:
                    keys.append(key)

        def series(key: str, epochs: list = epochs) -> list[float]:
            return [float(e[key]) if e.get(key) is not None else float("nan") for e in epochs]

        losses = [k for k in keys if not _is_score(k)]
        scores = [k for k in keys if _is_score(k)]
        # Loss terms take colours C1…C9; scores have their own (C0 first) so none collide.
        for i, key in enumerate(losses):
            total = key == "loss"
            ax.plot(
                xs,
                series(key),
                label=key,
                linewidth=2.2 if total else 1.2,
                linestyle="-" if total else "--",
                color="black" if total else f"C{i % 9 + 1}",
                marker=".",
            )
        ax.set_ylabel("loss")
        handles, names = ax.get_legend_handles_labels()
        legend_ax = ax
        if scores:
            right = ax.twinx()
            for i, key in enumerate(scores):
                right.plot(
                    xs,
                    series(key),
                    label=key,
                    linewidth=1.8,
                    marker="o",
                    markersize=3,
                    color=_SCORE_COLOURS[i % len(_SCORE_COLOURS)],
                )
            top = np.nanmax([np.nanmax([*series(k), 0.0]) for k in scores])
            right.set_ylim(0, max(1.02, 1.02 * float(top)))
            right.set_ylabel("score")
            h2, n2 = right.get_legend_handles_labels()
            handles, names = handles + h2, names + n2
            legend_ax = right  # drawn on the top axis so no line crosses it
        if handles:
            legend_ax.legend(handles, names, fontsize=7, loc="best")
    fig.tight_layout()
    return _save(fig, path)
