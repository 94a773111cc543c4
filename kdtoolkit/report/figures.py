"""The run's figures: results table, confusion matrices, Grad-CAM pairs, training curves.

Figures use matplotlib's Agg canvas directly (no pyplot, no global backend switch) and every
file is written atomically (``kdtoolkit.fileio``).
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Polygon

from kdtoolkit.fileio import atomic_write_bytes
from kdtoolkit.report.format import TABLE_METRICS, fmt, mean_std, model_of
from kdtoolkit.report.results import Summary, ordered_rows, row_label


def _save(fig: Figure, path: str | os.PathLike[str], dpi: int = 120) -> Path:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    return atomic_write_bytes(path, buf.getvalue())


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
            model_of(model_names, r),
            *(fmt(mean_std(summary[r].get(m)), True) for m, _ in TABLE_METRICS),
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


def plot_reliability(path: str | os.PathLike[str], curves: Mapping[str, tuple[Any, Any]]) -> Path:
    """Reliability diagrams, one panel per row: accuracy against mean confidence per bin
    before and after temperature scaling (``curves``: ``{row: (before, after)}``,
    ``report.calibration.Reliability``), the diagonal for perfect calibration."""
    rows = ordered_rows(curves)
    fig = Figure(figsize=(3.4 * max(1, len(rows)), 3.4))
    for i, row in enumerate(rows):
        ax = fig.add_subplot(1, max(1, len(rows)), i + 1)
        ax.plot([0, 1], [0, 1], color="0.6", lw=1, ls="--")
        for curve, name, colour in zip(curves[row], ("before", "after"), ("C3", "C0"), strict=True):
            used = curve.share > 0
            ax.plot(
                curve.confidence[used],
                curve.accuracy[used],
                "o-",
                color=colour,
                ms=3,
                label=f"{name} T (ECE {100 * curve.ece:.1f}%)",
            )
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", title=row_label(row))
        if i == 0:
            ax.set_ylabel("accuracy")
        ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    return _save(fig, path)
