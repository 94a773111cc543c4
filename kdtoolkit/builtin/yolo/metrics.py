"""Detection metrics of the ``yolo`` ROI provider: box IoU, single-class AP and mAP, and
the errors of the chosen boxes in the truth ROI's own frame (what ``augment.roi_shift``,
``roi_scale`` and ``roi_degrees`` should cover).

One truth box per image; mAP@0.5:0.95 averages AP over the COCO IoU thresholds.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from kdtoolkit.data.geometry import roi_axes

#: IoU thresholds of mAP@0.5:0.95 (COCO): 0.50, 0.55, ..., 0.95.
IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)
#: Confidence down to which detections count for mAP (as ultralytics' own validation).
MAP_CONF = 0.001


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise IoU of two N×4 arrays of ``x0, y0, x1, y1`` boxes (0 where both are empty)."""
    a, b = np.asarray(a, float).reshape(-1, 4), np.asarray(b, float).reshape(-1, 4)
    w = np.clip(np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0]), 0, None)
    h = np.clip(np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1]), 0, None)
    inter = w * h
    area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])  # noqa: E731
    union = area(a) + area(b) - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def average_precision(
    image_ids: Sequence[int],
    scores: Sequence[float],
    ious: Sequence[float],
    n_truth: int,
    threshold: float,
) -> float:
    """Single-class AP with one ground-truth box per image, all-point interpolation (VOC 2010+).

    Detection ``k`` is on image ``image_ids[k]`` with confidence ``scores[k]`` and IoU
    ``ious[k]`` with that image's truth box. In order of decreasing score (ties keep their
    order), a detection is a true positive when its IoU ≥ ``threshold`` and its image's truth
    is not matched yet; otherwise a false positive. With precision ``p`` and recall ``r``
    (over ``n_truth`` images) after each detection, AP = Σ (r_k − r_{k−1}) · max_{j≥k} p_j.
    NaN when ``n_truth`` is 0.
    """
    if n_truth <= 0:
        return float("nan")
    order = np.argsort(-np.asarray(scores, float), kind="stable")
    matched: set[int] = set()
    tp = np.zeros(len(order))
    for rank, k in enumerate(order):
        if ious[k] >= threshold and image_ids[k] not in matched:
            matched.add(image_ids[k])
            tp[rank] = 1
    ctp, cfp = np.cumsum(tp), np.cumsum(1 - tp)
    recall = np.concatenate([[0.0], ctp / n_truth, [1.0]])
    precision = np.concatenate([[1.0], ctp / np.maximum(ctp + cfp, 1), [0.0]])
    precision = np.maximum.accumulate(precision[::-1])[::-1]  # the precision envelope
    steps = np.flatnonzero(recall[1:] != recall[:-1])
    return float(np.sum((recall[steps + 1] - recall[steps]) * precision[steps + 1]))


def detection_map(
    detections: Sequence[tuple[int, float, Sequence[float]]],
    truth: dict[int, Sequence[float]],
    iou: Callable[[np.ndarray, np.ndarray], np.ndarray] = box_iou,
) -> tuple[float, float]:
    """``(mAP@0.5, mAP@0.5:0.95)`` of ``detections`` ``(image id, score, box)`` against one
    truth box per image (``truth``); detections on images without truth are ignored. Boxes are
    ``[x0, y0, x1, y1]`` for the default ``iou`` (another ``iou`` takes rows of its own form,
    e.g. rotated boxes). See :func:`average_precision`."""
    kept = [d for d in detections if d[0] in truth]
    ids = [d[0] for d in kept]
    scores = [d[1] for d in kept]
    width = len(next(iter(truth.values()))) if truth else 4
    boxes = np.array([d[2] for d in kept], float).reshape(-1, width)
    gts = np.array([truth[i] for i in ids], float).reshape(-1, width)
    ious = iou(boxes, gts)
    aps = [average_precision(ids, scores, ious, len(truth), t) for t in IOU_THRESHOLDS]
    return aps[0], float(np.mean(aps))


def box_errors(chosen: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """90th percentiles over images of the chosen ROI's errors against the truth ROI (rows
    ``x0, y0, x1, y1, angle``, kdtoolkit.data.geometry's convention): the centre offset along
    the truth's width and across it, as fractions of its width and height (``shift_along_p90``,
    ``shift_across_p90``), and the relative size error of either side (``size_p90``)."""
    chosen, truth = np.asarray(chosen, float), np.asarray(truth, float)
    offset = (chosen[:, :2] + chosen[:, 2:4]) / 2 - (truth[:, :2] + truth[:, 2:4]) / 2
    sides = truth[:, 2:4] - truth[:, :2]
    along, across = roi_axes(truth[:, 4])
    shift = np.abs(np.stack([(offset * along).sum(1), (offset * across).sum(1)], 1)) / sides
    size = np.abs((chosen[:, 2:4] - chosen[:, :2]) / sides - 1).max(axis=1)
    p90 = [float(np.percentile(x, 90)) for x in (shift[:, 0], shift[:, 1], size)]
    return dict(zip(("shift_along_p90", "shift_across_p90", "size_p90"), p90, strict=True))
