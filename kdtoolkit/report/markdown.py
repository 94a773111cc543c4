"""The run's Markdown report (``report.md``), written from its typed results."""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from kdtoolkit.fileio import atomic_write_text
from kdtoolkit.models.temperature import MIN_SAMPLES, T_MAX, T_MIN
from kdtoolkit.report.format import TABLE_METRICS, fmt, md_table, mean_std, model_of
from kdtoolkit.report.metrics import summarise
from kdtoolkit.report.results import (
    BASELINE_FULL,
    STUDENT,
    TEACHER_CROP,
    RunResults,
    ordered_rows,
    row_label,
)
from kdtoolkit.report.verdicts import statistics_lines

#: (metric, heading, shown as percent)
EXTRA_METRICS = (("macro_f1", "macro F1", True), ("qwk", "QWK", False), ("mae", "MAE", False))
ATTENTION_METRICS = (
    ("pointing_game", "pointing game", True),
    ("pointing_ceiling", "pointing ceiling", True),
    ("dead_cam", "dead CAMs", True),
    ("cam_iou", "CAM IoU", False),
)
#: ROI-provider metrics with a fixed form: (meaning, form); form is "percent", "count" or
#: "number". Others are shown as percent when every value lies in [0, 1].
ROI_METRICS = {
    "map50": ("detection mAP@0.5, held-out images", "percent"),
    "map50_95": ("detection mAP@0.5:0.95, held-out images", "percent"),
    "mean_iou": ("mean IoU of the chosen boxes with the expert boxes", "percent"),
    "n_fallback": ("images without a detection (fallback box used)", "count"),
    "latency_ms": ("provider latency, ms / image (batch of one)", "number"),
    "shift_along_p90": (
        "90% of box centres within this share of the ROI width, along it",
        "percent",
    ),
    "shift_across_p90": ("the same across the ROI, in shares of its height", "percent"),
    "size_p90": ("90% of boxes have both sides within this relative error", "percent"),
    "angle_error_deg": ("mean angle error of the chosen boxes, degrees", "number"),
}
#: Pipeline names of the latency table (others: ``row_label``).
LATENCY_LABELS = {
    "student": "student alone, full image",
    "baseline_full": "baseline alone, full image",
    "two_stage": "two-stage: ROI provider + crop + teacher",
    "two_stage_detector": "two-stage: ROI provider only",
    "two_stage_crop": "two-stage: crop + teacher only",
}


def link(run: Path, target: str | os.PathLike[str]) -> str:
    """``target`` as a link from ``run`` (absolute paths made relative)."""
    p = Path(target)
    if p.is_absolute():
        with contextlib.suppress(ValueError):  # another drive on Windows: keep it absolute
            p = Path(os.path.relpath(p, run.resolve()))
    return p.as_posix()


def write_report(
    run_dir: str | os.PathLike[str],
    results: RunResults,
    figures: Mapping[str, str | os.PathLike[str]] | None = None,
    title: str | None = None,
) -> Path:
    """Write ``run_dir/report.md`` and return its path.

    Sections: the results table (setting | model | acc | prec | rec | F1, percent, mean ± std,
    rows present only), the gap-closure line, the statistics of the pooled held-out predictions
    (paired comparisons with verdicts, intervals: ``verdicts.statistics_lines``), macro
    F1/QWK/MAE, attention agreement (pointing game, CAM IoU), ROI provider metrics per fold,
    latency, accuracy per fold (real fold ids) and figure links. ``figures``: ``{title:
    path}``, relative to ``run_dir`` or absolute.
    """
    run = Path(run_dir)
    summary = results.summary
    classes = results.classes
    rows = ordered_rows(summary)
    n_folds = len(results.folds)
    out: list[str] = [f"# {title or 'Results'}", ""]
    out.append(
        f"{len(classes)} classes: {', '.join(str(c) for c in classes)}. "
        f"Mean ± std over {n_folds} fold{'s' if n_folds != 1 else ''}"
        + (" (sample std)." if n_folds > 1 else ".")
    )
    out.append("")

    table_rows = [
        [
            row_label(row),
            model_of(results.models, row),
            *(fmt(mean_std(summary[row].get(m)), True) for m, _ in TABLE_METRICS),
        ]
        for row in rows
        if any(m in summary[row] for m, _ in TABLE_METRICS)
    ]
    out += ["## Classification", ""]
    out += md_table(["setting", "model", *(h for _, h in TABLE_METRICS)], table_rows)
    out.append("")
    out += gap_lines(results)
    labels = {row: row_label(row) for row in rows}
    out += statistics_lines(results.statistics(), labels, order=rows)
    out += extra_metrics_section(summary, rows)
    out += attention_section(summary, rows)
    out += calibration_section(results.calibration(), rows)
    out += roi_section(results.roi)
    out += latency_section(results.latency_ms)
    out += per_fold_section(results, rows)
    if figures:
        out += ["## Figures", ""]
        for name, target in figures.items():
            out += [f"### {name}", "", f"![{name}]({link(run, target)})", ""]
    return atomic_write_text(run / "report.md", "\n".join(out).rstrip() + "\n")


def gap_lines(results: RunResults) -> list[str]:
    gap = results.gap_closure()
    if gap is None:
        return [
            "Gap closure: not available (needs the teacher_crop, baseline_full and student rows "
            "and a teacher more accurate than the baseline).",
            "",
        ]
    summary = results.summary
    s, b, t = (summary[r]["accuracy"]["mean"] for r in (STUDENT, BASELINE_FULL, TEACHER_CROP))
    return [
        f"The student closes {100 * gap:.1f}% of the gap between the full-image baseline and "
        f"the crop teacher: (student − baseline) / (teacher − baseline) in mean accuracy = "
        f"({100 * s:.2f} − {100 * b:.2f}) / ({100 * t:.2f} − {100 * b:.2f}).",
        "",
    ]


def extra_metrics_section(summary: Mapping[str, Any], rows: list[str]) -> list[str]:
    present = [(m, h, p) for m, h, p in EXTRA_METRICS if any(m in summary[r] for r in rows)]
    if not present:
        return []
    body = [
        [row_label(r), *(fmt(mean_std(summary[r].get(m)), p) for m, _, p in present)]
        for r in rows
        if any(m in summary[r] for m, _, _ in present)
    ]
    return [
        "## Other metrics",
        "",
        *md_table(["setting", *(h + (" (%)" if p else "") for _, h, p in present)], body),
        "",
        "QWK: quadratic-weighted Cohen's kappa; MAE: mean |class-index difference|.",
        "",
    ]


def calibration_section(calibration: Mapping[str, Mapping[str, Any]], rows: list[str]) -> list[str]:
    """ECE before and after temperature scaling, pooled over the folds' held-out samples."""
    present = [r for r in rows if r in calibration]
    if not present:
        return []
    body = []
    for r in present:
        c = calibration[r]
        temps = ", ".join(f"{t:.2f}" for t in c.get("temperatures", []))
        ece = [None if c.get(k) is None else (float(c[k]), None) for k in ("ece", "ece_calibrated")]
        body.append([row_label(r), fmt(ece[0], True), fmt(ece[1], True), temps])
    return [
        "## Calibration",
        "",
        *md_table(["setting", "ECE (%)", "ECE, temperature-scaled (%)", "T per fold"], body),
        "",
        "ECE: top-label expected calibration error, 15 equal-width confidence bins, over the "
        "pooled held-out samples. T: the temperature each fold's model divides its logits by, "
        "fitted on that fold's validation split (never its held-out fold) and kept in "
        f"[{T_MIN:g}, {T_MAX:g}], and only where a likelihood-ratio test finds the model "
        f"miscalibrated there (5% level); T = 1 where that split has fewer than {MIN_SAMPLES} "
        "samples, is classified without error, or the test does not reject T = 1. Scaling "
        "helped where the second ECE is the lower.",
        "",
    ]


def attention_section(summary: Mapping[str, Any], rows: list[str]) -> list[str]:
    attention = {
        row: {m: summary[row][m] for m, _, _ in ATTENTION_METRICS if m in summary[row]}
        for row in rows
    }
    attention = {row: values for row, values in attention.items() if values}
    if not attention:
        return []
    shown = [m for m in ATTENTION_METRICS if any(m[0] in v for v in attention.values())]
    body = [
        [row_label(r), *(fmt(mean_std(attention[r].get(m)), p) for m, _, p in shown)]
        for r in ordered_rows(attention)
    ]
    header = ["setting", *(h + (" (%)" if p else "") for _, h, p in shown)]
    ceiling = (
        "Pointing ceiling: share of ROIs holding a feature-grid cell centre, the highest "
        "pointing game a CAM upsampled from that grid can reach. "
        if any(m == "pointing_ceiling" for m, _, _ in shown)
        else ""
    )
    return [
        "## Attention agreement with the ROI",
        "",
        *md_table(header, body),
        "",
        "Pointing game: share of images whose Grad-CAM maximum lies in the ROI. "
        + ceiling
        + "CAM IoU: IoU of the top 20% CAM pixels with the ROI.",
        "",
    ]


def roi_section(per_fold: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """The ROI provider's metrics ``{fold id: {metric: value}}``: one line per metric, mean ±
    std and one column per fold, with the meaning of the known ones (``ROI_METRICS``)."""
    if not any(per_fold.values()):
        return []
    roi = summarise([{"roi": dict(f)} for f in per_fold.values() if f]).get("roi", {})
    keys = [k for k in ROI_METRICS if k in roi] + [k for k in roi if k not in ROI_METRICS]
    stats = {k: mean_std(roi[k]) for k in keys}
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
        cells = [fmt(value, pct, digits) + (" %" if pct else "")]
        for fold in per_fold.values():
            v = (fold or {}).get(key)
            number = isinstance(v, int | float | np.number) and not isinstance(v, bool)
            number = number and math.isfinite(float(v))
            if not number:
                cells.append("–")
            elif form == "count":
                cells.append(f"{float(v):.0f}")
            else:
                cells.append(fmt((float(v), None), pct))
        body.append([key, *cells, meaning])
    header = ["metric", "mean ± std", *(f"fold {k}" for k in per_fold), "meaning"]
    return ["## ROI provider (held-out folds)", "", *md_table(header, body), ""]


def latency_section(latency: Mapping[str, float]) -> list[str]:
    if not latency:
        return []
    keys = [k for k in LATENCY_LABELS if k in latency]
    keys += [k for k in latency if k not in LATENCY_LABELS]
    body = [
        [LATENCY_LABELS.get(k) or row_label(k), fmt(mean_std(latency[k]), False, 1)] for k in keys
    ]
    return [
        "## Latency",
        "",
        *md_table(["pipeline", "ms / image"], body),
        "",
        "Mean time per held-out image, batch of one, from the decoded image to the result.",
        "",
    ]


def per_fold_section(results: RunResults, rows: list[str]) -> list[str]:
    """Accuracy per fold (%), one line per fold, named by its real id."""
    if not results.folds:
        return []
    fold_rows = [r for r in rows if any(r in f.metrics for f in results.folds)]
    body = []
    for fold in results.folds:
        cells = []
        for r in fold_rows:
            v = fold.metrics.get(r, {}).get("accuracy")
            cells.append("–" if v is None else f"{100 * float(v):.2f}")
        body.append([str(fold.fold), *cells])
    return ["## Accuracy per fold (%)", "", *md_table(["fold", *fold_rows], body), ""]
