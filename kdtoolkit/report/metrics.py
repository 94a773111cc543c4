"""Classification and attention metrics, and their summary over folds.

All values are fractions (0.83, not 83). Rows are result settings (``teacher_crop``,
``baseline_full``, ``two_stage``, ``student``, ...), metrics are names such as ``accuracy``.

Pixel convention for CAMs and boxes: pixel ``(r, c)`` of an ``h × w`` map covers
``[c, c + 1) × [r, r + 1)``; it is inside a box or polygon when its centre ``(c + 0.5, r + 0.5)``
is (edges included). This is the convention of image pixel coordinates, so a box given in
full-image pixels applies unchanged to a CAM of the image's size; for a smaller CAM pass
``image_shape`` and the box is scaled.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    cohen_kappa_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
)

Box = Sequence[float] | np.ndarray


def _labels(values: Any, num_classes: int, name: str) -> np.ndarray:
    arr = np.asarray(values).reshape(-1)
    if arr.size and arr.dtype.kind not in "iub":
        try:
            as_float = arr.astype(np.float64)
        except (TypeError, ValueError):
            as_float = np.array([np.nan])
        if not (np.all(np.isfinite(as_float)) and np.all(as_float == np.round(as_float))):
            raise ValueError(f"{name} must hold integer class indices")
    arr = arr.astype(np.int64)
    if arr.size and (arr.min() < 0 or arr.max() >= num_classes):
        raise ValueError(f"{name} holds class indices outside 0..{num_classes - 1}")
    return arr


def _pair(y_true: Any, y_pred: Any, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    if num_classes < 1:
        raise ValueError("num_classes must be at least 1")
    t = _labels(y_true, num_classes, "y_true")
    p = _labels(y_pred, num_classes, "y_pred")
    if t.shape != p.shape:
        raise ValueError(f"y_true has {t.size} labels but y_pred has {p.size}")
    if t.size == 0:
        raise ValueError("no samples to score")
    return t, p


def classification_metrics(
    y_true: Any, y_pred: Any, num_classes: int, ordinal: bool
) -> dict[str, float]:
    """Metrics of one evaluation: ``accuracy``, weighted ``precision``/``recall``/``f1``
    (``zero_division=0``, as in the paper), ``macro_f1`` and, when ``ordinal``, ``qwk``
    (quadratic-weighted Cohen's kappa) and ``mae`` (mean absolute class-index difference).

    ``y_true``/``y_pred`` are 0-based class indices (any array-like). Classes absent from both
    still count in ``macro_f1`` (with F1 0), so folds are comparable. QWK is 1.0 when every
    label and prediction is the same single class (sklearn leaves that case undefined).
    """
    t, p = _pair(y_true, y_pred, num_classes)
    labels = list(range(num_classes))
    prec, rec, f1, _ = precision_recall_fscore_support(
        t, p, labels=labels, average="weighted", zero_division=0
    )
    out = {
        "accuracy": float(accuracy_score(t, p)),
        "precision": float(prec),
        "recall": float(rec),
        "f1": float(f1),
        "macro_f1": float(f1_score(t, p, labels=labels, average="macro", zero_division=0)),
    }
    if ordinal:
        if np.array_equal(t, p) and np.unique(t).size == 1:
            qwk = 1.0
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                qwk = float(cohen_kappa_score(t, p, labels=labels, weights="quadratic"))
        out["qwk"] = qwk
        out["mae"] = float(np.mean(np.abs(t - p)))
    return out


def confusion(y_true: Any, y_pred: Any, num_classes: int) -> np.ndarray:
    """``num_classes × num_classes`` count matrix (int64): rows true class, columns predicted."""
    t, p = _pair(y_true, y_pred, num_classes)
    return confusion_matrix(t, p, labels=list(range(num_classes))).astype(np.int64)


def summarise(
    folds: Sequence[Mapping[str, Mapping[str, float | None]]],
) -> dict[str, dict[str, dict[str, float]]]:
    """Mean and standard deviation of every ``row → metric`` over folds.

    ``folds`` is one ``{row: {metric: value}}`` per fold. A row or metric missing from a fold,
    or given as None/NaN there, is summarised over the folds that have it. ``std`` is the
    sample standard deviation (``ddof=1``, the usual "mean ± std" of k-fold CV) when at least
    two values exist, and 0.0 for one. Row and metric order follow first appearance.
    """
    values: dict[str, dict[str, list[float]]] = {}
    for fold in folds:
        for row, metrics in fold.items():
            per_row = values.setdefault(row, {})
            for metric, value in metrics.items():
                per_metric = per_row.setdefault(metric, [])
                if value is not None and math.isfinite(float(value)):
                    per_metric.append(float(value))
    summary: dict[str, dict[str, dict[str, float]]] = {}
    for row, metrics in values.items():
        summary[row] = {}
        for metric, vals in metrics.items():
            if not vals:
                continue
            arr = np.asarray(vals, dtype=np.float64)
            std = float(arr.std(ddof=1)) if arr.size >= 2 else 0.0
            summary[row][metric] = {"mean": float(arr.mean()), "std": std}
    return summary


def gap_closure(
    summary: Mapping[str, Mapping[str, Mapping[str, float]]],
    student: str = "student",
    baseline: str = "baseline_full",
    teacher: str = "teacher_crop",
    metric: str = "accuracy",
) -> float | None:
    """``(student − baseline) / (teacher − baseline)`` in mean ``metric`` (a fraction, may be
    negative or above 1).

    None when any of the three rows or the metric is missing, or when the teacher does not beat
    the baseline (gap ≤ 0): there is then no gap to close and the ratio would mislead.
    """
    try:
        s = float(summary[student][metric]["mean"])
        b = float(summary[baseline][metric]["mean"])
        t = float(summary[teacher][metric]["mean"])
    except (KeyError, TypeError):
        return None
    gap = t - b
    if not all(math.isfinite(v) for v in (s, b, t)) or gap <= 0:
        return None
    return (s - b) / gap


# -- attention agreement -----------------------------------------------------------------------


def _polygon(box: Box, scale: tuple[float, float]) -> np.ndarray:
    arr = np.asarray(box, dtype=np.float64)
    if arr.shape == (4,):
        x0, y0, x1, y1 = arr
        arr = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]])
    elif arr.ndim != 2 or arr.shape[1] != 2 or arr.shape[0] < 3:
        raise ValueError(f"box must be x0, y0, x1, y1 or an N×2 polygon, got shape {arr.shape}")
    return arr * np.array(scale)


def box_mask(
    shape: tuple[int, int], box: Box, image_shape: tuple[int, int] | None = None
) -> np.ndarray:
    """Boolean ``h × w`` mask of the pixels whose centres lie in ``box``.

    ``box`` is ``(x0, y0, x1, y1)`` or the corners of a convex polygon (N×2, x y, in order, e.g.
    ``kdtoolkit.data.geometry.roi_corners``). ``image_shape`` ``(H, W)``: the box is in pixels of an
    image of that size and is scaled to ``shape``.
    """
    h, w = int(shape[0]), int(shape[1])
    scale = (1.0, 1.0) if image_shape is None else (w / image_shape[1], h / image_shape[0])
    poly = _polygon(box, scale)
    ys, xs = np.mgrid[0:h, 0:w]
    px, py = xs + 0.5, ys + 0.5
    nxt = np.roll(poly, -1, axis=0)
    # Sign of the cross product of each edge with the point: all ≥ 0 or all ≤ 0 means inside.
    cross = [
        (bx - ax) * (py - ay) - (by - ay) * (px - ax)
        for (ax, ay), (bx, by) in zip(poly, nxt, strict=True)
    ]
    stack = np.stack(cross)
    eps = 1e-9 * max(1.0, float(np.abs(poly).max()))
    inside = np.all(stack >= -eps, axis=0) | np.all(stack <= eps, axis=0)
    # A degenerate (zero-area) polygon would otherwise contain its whole supporting line.
    x = poly[:, 0]
    y = poly[:, 1]
    area = 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))
    return inside if area > 0 else np.zeros((h, w), dtype=bool)


def _cam(cam: Any) -> np.ndarray:
    arr = np.asarray(cam, dtype=np.float64)
    arr = np.squeeze(arr)
    if arr.ndim != 2:
        raise ValueError(f"cam must be an h×w map, got shape {np.shape(cam)}")
    return np.nan_to_num(arr, nan=-np.inf)


def pointing_game(cam: Any, box: Box, image_shape: tuple[int, int] | None = None) -> bool:
    """True when the CAM's maximum lies inside ``box`` (see ``box_mask`` for the box forms).

    Ties go to the first maximum in row-major order; a flat CAM (no maximum) is a miss.
    """
    if is_dead(cam):
        return False
    arr = _cam(cam)
    r, c = np.unravel_index(int(np.argmax(arr)), arr.shape)
    return bool(box_mask(arr.shape, box, image_shape)[r, c])


def cam_box_iou(
    cam: Any, box: Box, top: float = 0.2, image_shape: tuple[int, int] | None = None
) -> float:
    """IoU between the CAM's top ``top`` fraction of pixels and the filled ``box``.

    The selection is every pixel ≥ the value of the ``ceil(top · h · w)``-th highest pixel
    (ties included), but never pixels at the map's minimum: a mostly-zero map selects only its
    positive support, and a flat map selects nothing (IoU 0).
    """
    if not 0 < top <= 1:
        raise ValueError("top must be in (0, 1]")
    arr = _cam(cam)
    k = max(1, math.ceil(top * arr.size))
    threshold = np.sort(arr, axis=None)[::-1][k - 1]
    selected = (arr >= threshold) & (arr > arr.min())
    target = box_mask(arr.shape, box, image_shape)
    union = int(np.count_nonzero(selected | target))
    if union == 0:
        return 0.0
    return int(np.count_nonzero(selected & target)) / union


def pointing_ceiling(
    boxes: Iterable[Box], grid: tuple[int, int], image_shape: tuple[int, int]
) -> float:
    """The highest pointing game reachable with CAMs of an ``h × w`` feature grid upsampled
    to ``image_shape`` (H, W): the share of ``boxes`` (image pixels) that contain at least one
    grid-cell centre ``((j + 0.5)·W/w, (i + 0.5)·H/h)``. A bilinear upsampling of the grid
    peaks at a cell centre, so a ROI that holds none can only be hit at its edge (to within a
    pixel) or not at all."""
    hits = [bool(box_mask(grid, box, image_shape).any()) for box in boxes]
    if not hits:
        raise ValueError("no boxes to score")
    return float(np.mean(hits))


def attention_metrics(
    cams: Iterable[Any],
    boxes: Iterable[Box],
    top: float = 0.2,
    image_shape: tuple[int, int] | None = None,
    hits: list[bool] | None = None,
) -> dict[str, float]:
    """``{"pointing_game": hit rate, "cam_iou": mean IoU, "dead_cam": share of dead CAMs}``
    over paired CAMs and boxes (``dead_cam``: :func:`is_dead`); ``hits`` (a list) receives each
    pair's pointing-game hit (True/False) in order."""
    found: list[bool] = []
    ious: list[float] = []
    dead: list[bool] = []
    for cam, box in zip(cams, boxes, strict=True):
        found.append(pointing_game(cam, box, image_shape))
        ious.append(cam_box_iou(cam, box, top, image_shape))
        dead.append(is_dead(cam))
    if not found:
        raise ValueError("no CAMs to score")
    if hits is not None:
        hits.extend(found)
    return {
        "pointing_game": float(np.mean(found)),
        "cam_iou": float(np.mean(ious)),
        "dead_cam": float(np.mean(dead)),
    }


def is_dead(cam: Any) -> bool:
    """A dead CAM: constant (all zero included) or without a finite value; it points nowhere."""
    arr = _cam(cam)
    finite = arr[np.isfinite(arr)]
    return finite.size == 0 or bool(finite.max() <= finite.min())
