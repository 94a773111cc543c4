"""Metrics against hand-computed values and independent numpy formulas."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest

from kdtoolkit.data.geometry import roi_corners
from kdtoolkit.report.metrics import (
    attention_metrics,
    box_mask,
    cam_box_iou,
    classification_metrics,
    confusion,
    gap_closure,
    is_dead,
    pointing_ceiling,
    pointing_game,
    summarise,
)

# Worked example, 5 classes, class 4 absent. Per class (precision, recall, F1, support):
# 0: 2/3, 2/3, 2/3, 3 | 1: 2/3, 1, 4/5, 2 | 2: 1, 1/2, 2/3, 4 | 3: 1/2, 1, 2/3, 1 | 4: 0, 0, 0, 0
Y_TRUE = [0, 0, 0, 1, 1, 2, 2, 2, 2, 3]
Y_PRED = [0, 0, 1, 1, 1, 2, 2, 3, 0, 3]


def test_classification_metrics_hand_computed() -> None:
    m = classification_metrics(Y_TRUE, Y_PRED, num_classes=5, ordinal=True)
    assert set(m) == {"accuracy", "precision", "recall", "f1", "macro_f1", "qwk", "mae"}
    assert m["accuracy"] == pytest.approx(7 / 10)
    assert m["precision"] == pytest.approx((3 * 2 / 3 + 2 * 2 / 3 + 4 * 1 + 1 * 1 / 2) / 10)
    assert m["recall"] == pytest.approx((3 * 2 / 3 + 2 * 1 + 4 * 1 / 2 + 1 * 1) / 10)
    assert m["f1"] == pytest.approx((3 * 2 / 3 + 2 * 4 / 5 + 4 * 2 / 3 + 1 * 2 / 3) / 10)
    assert m["macro_f1"] == pytest.approx((2 / 3 + 4 / 5 + 2 / 3 + 2 / 3 + 0) / 5)
    # |t - p| = 0,0,1,0,0,0,0,1,2,0
    assert m["mae"] == pytest.approx(0.4)
    # Σ W·O = 1 + 1 + 4 = 6; Σ W·E = Σ (i-j)² t_i p_j / n = 222 / 10 → κ = 1 − 60/222 = 27/37
    assert m["qwk"] == pytest.approx(27 / 37)
    assert all(isinstance(v, float) for v in m.values())


def test_nominal_task_has_no_ordinal_metrics() -> None:
    m = classification_metrics(Y_TRUE, Y_PRED, num_classes=5, ordinal=False)
    assert "qwk" not in m and "mae" not in m


def _reference(t: np.ndarray, p: np.ndarray, k: int) -> dict[str, float]:
    """Independent numpy formulas (no sklearn)."""
    cm = np.zeros((k, k))
    np.add.at(cm, (t, p), 1)
    tp = np.diag(cm)
    support, predicted = cm.sum(1), cm.sum(0)
    prec = np.divide(tp, predicted, out=np.zeros(k), where=predicted > 0)
    rec = np.divide(tp, support, out=np.zeros(k), where=support > 0)
    f1 = np.divide(2 * prec * rec, prec + rec, out=np.zeros(k), where=(prec + rec) > 0)
    w = support / support.sum()
    expected = np.outer(support, predicted) / cm.sum()
    i, j = np.indices((k, k))
    weights = (i - j) ** 2
    return {
        "accuracy": tp.sum() / cm.sum(),
        "precision": float(w @ prec),
        "recall": float(w @ rec),
        "f1": float(w @ f1),
        "macro_f1": float(f1.mean()),
        "qwk": 1 - (weights * cm).sum() / (weights * expected).sum(),
        "mae": float(np.abs(t - p).mean()),
    }


@pytest.mark.parametrize("seed", range(5))
def test_classification_metrics_match_numpy_reference(seed: int) -> None:
    rng = np.random.default_rng(seed)
    t = rng.integers(0, 5, 60)
    p = np.where(rng.random(60) < 0.6, t, rng.integers(0, 5, 60))
    got = classification_metrics(t, p, 5, ordinal=True)
    want = _reference(t, p, 5)
    for key, value in want.items():
        assert got[key] == pytest.approx(value), key


def test_qwk_single_class_perfect_agreement_is_one() -> None:
    m = classification_metrics([2, 2, 2], [2, 2, 2], num_classes=5, ordinal=True)
    assert m["qwk"] == 1.0 and m["accuracy"] == 1.0 and m["mae"] == 0.0


def test_bad_labels_are_rejected() -> None:
    with pytest.raises(ValueError, match="outside"):
        classification_metrics([0, 5], [0, 1], 5, False)
    with pytest.raises(ValueError, match="labels"):
        classification_metrics([0, 1], [0], 5, False)
    with pytest.raises(ValueError, match="integer"):
        classification_metrics([0.5], [0], 5, False)
    with pytest.raises(ValueError, match="no samples"):
        classification_metrics([], [], 5, False)


def test_confusion() -> None:
    cm = confusion(Y_TRUE, Y_PRED, 5)
    assert cm.shape == (5, 5) and cm.dtype == np.int64
    assert cm.sum() == 10 and np.trace(cm) == 7
    assert cm[2, 3] == 1 and cm[2, 0] == 1 and cm[0, 1] == 1
    assert cm[4].sum() == 0 and cm[:, 4].sum() == 0


def test_summarise_sample_std() -> None:
    folds = [
        {"student": {"accuracy": 0.8, "f1": 0.7}, "teacher_crop": {"accuracy": 0.9}},
        {"student": {"accuracy": 0.9, "f1": 0.8}},
        {"student": {"accuracy": 1.0, "f1": None}, "teacher_crop": {"accuracy": 0.7}},
    ]
    s = summarise(folds)
    assert list(s) == ["student", "teacher_crop"]
    assert s["student"]["accuracy"]["mean"] == pytest.approx(0.9)
    assert s["student"]["accuracy"]["std"] == pytest.approx(0.1)  # ddof=1: sqrt(0.02 / 2)
    assert s["student"]["f1"] == {
        "mean": pytest.approx(0.75),
        "std": pytest.approx(math.sqrt(0.005)),
    }
    assert s["teacher_crop"]["accuracy"]["mean"] == pytest.approx(0.8)
    one = summarise([{"student": {"accuracy": 0.5}}])
    assert one == {"student": {"accuracy": {"mean": 0.5, "std": 0.0}}}


def _summary(student: float, baseline: float, teacher: float) -> dict:
    return {
        row: {"accuracy": {"mean": v, "std": 0.0}}
        for row, v in (("student", student), ("baseline_full", baseline), ("teacher_crop", teacher))
    }


def test_gap_closure_design_numbers() -> None:
    assert gap_closure(_summary(83.75, 79.97, 88.24)) == pytest.approx(0.457, abs=5e-4)
    assert gap_closure(_summary(0.8375, 0.7997, 0.8824)) == pytest.approx(0.457, abs=5e-4)


def test_gap_closure_undefined() -> None:
    assert gap_closure(_summary(0.8, 0.85, 0.85)) is None  # no gap
    assert gap_closure(_summary(0.8, 0.9, 0.85)) is None  # teacher below baseline
    partial = _summary(0.8, 0.7, 0.9)
    del partial["student"]
    assert gap_closure(partial) is None


def test_box_mask_pixel_centres() -> None:
    m = box_mask((6, 8), (2, 1, 5, 3))
    assert m.sum() == 3 * 2
    assert m[1:3, 2:5].all()
    # Rotated square (45°) as a polygon: a diamond around (4, 4).
    diamond = [(4, 1), (7, 4), (4, 7), (1, 4)]
    d = box_mask((8, 8), diamond)
    assert d[3, 3] and d[4, 4] and not d[0, 0] and not d[7, 7]
    # Box in 64×64 image pixels applied to an 8×8 map.
    assert (
        box_mask((8, 8), (16, 16, 32, 48), image_shape=(64, 64)) == box_mask((8, 8), (2, 2, 4, 6))
    ).all()
    # roi_corners polygon with angle 0 equals the plain box.
    assert (box_mask((6, 8), roi_corners((2, 1, 5, 3))) == m).all()


def test_pointing_game() -> None:
    cam = np.zeros((10, 10))
    cam[4, 6] = 1.0  # pixel centre (6.5, 4.5)
    assert pointing_game(cam, (5, 3, 8, 6))
    assert not pointing_game(cam, (0, 0, 5, 5))
    assert pointing_game(cam, [(6, 4), (7, 4), (7, 5), (6, 5)])  # polygon
    assert not pointing_game(np.zeros((10, 10)), (0, 0, 10, 10))  # flat map: no maximum
    # 5×5 CAM for a 50×50 image: max at cell (1, 3) → image (35, 15)
    small = np.zeros((5, 5))
    small[1, 3] = 2.0
    assert pointing_game(small, (30, 10, 40, 20), image_shape=(50, 50))


def test_pointing_ceiling_by_hand() -> None:
    """A 4×4 grid on a 64×64 image: cell centres at 8, 24, 40, 56 on each axis. A box that holds
    none (10..20) cannot be hit by any upsampled grid CAM; one that holds (24, 24) can."""
    import torch
    import torch.nn.functional as F

    miss, hit = (10, 10, 20, 20), (20, 20, 30, 30)
    assert pointing_ceiling([miss, hit], (4, 4), (64, 64)) == 0.5
    assert pointing_ceiling([[(23, 23), (25, 23), (25, 25), (23, 25)]], (4, 4), (64, 64)) == 1
    assert pointing_ceiling([miss], (8, 8), (64, 64)) == 1  # a finer grid: centre (12, 12)
    hits = {True: 0, False: 0}
    for cell in range(16):  # every one-hot grid CAM, upsampled as cam_for_images does
        grid = torch.zeros(1, 1, 4, 4)
        grid.view(-1)[cell] = 1
        cam = F.interpolate(grid, size=(64, 64), mode="bilinear", align_corners=False)[0, 0]
        assert not pointing_game(cam.numpy(), miss)
        hits[pointing_game(cam.numpy(), hit)] += 1
    assert hits[True] == 1  # the cell (1, 1) whose centre the box holds
    with pytest.raises(ValueError, match="no boxes"):
        pointing_ceiling([], (4, 4), (64, 64))


def test_cam_box_iou_hand_built() -> None:
    cam = np.zeros((10, 10))
    cam[0:4, 0:5] = 1.0  # exactly the top 20 % (20 pixels)
    assert cam_box_iou(cam, (0, 0, 5, 4)) == pytest.approx(1.0)
    # Box = 12 of the 20 hot pixels: I = 12, U = 20.
    assert cam_box_iou(cam, (0, 0, 3, 4)) == pytest.approx(12 / 20)
    assert cam_box_iou(cam, (6, 6, 10, 10)) == 0.0
    # Box = the hot area plus two more rows of 5 cold pixels: I = 20, U = 30.
    assert cam_box_iou(cam, (0, 0, 5, 6)) == pytest.approx(20 / 30)
    # Graded map: the top 20 % are exactly the 20 highest values.
    graded = np.arange(100, dtype=float).reshape(10, 10)  # rows 8–9 are the top 20
    assert cam_box_iou(graded, (0, 8, 10, 10)) == pytest.approx(1.0)
    assert cam_box_iou(graded, (0, 9, 10, 10)) == pytest.approx(10 / 20)
    # Sparse map: only its positive support is selected, never the zero floor.
    sparse = np.zeros((10, 10))
    sparse[2, 2] = 1.0
    assert cam_box_iou(sparse, (2, 2, 3, 3)) == pytest.approx(1.0)
    assert cam_box_iou(np.ones((10, 10)), (0, 0, 10, 10)) == 0.0  # flat map selects nothing


def test_attention_metrics() -> None:
    cam = np.zeros((10, 10))
    cam[0:4, 0:5] = 1.0
    hits: list[bool] = []
    out = attention_metrics([cam, cam], [(0, 0, 5, 4), (6, 6, 10, 10)], hits=hits)
    assert out == {"pointing_game": 0.5, "cam_iou": 0.5, "dead_cam": 0.0}
    assert hits == [True, False]


def test_dead_cams_are_constant_or_not_finite() -> None:
    live = np.zeros((4, 4))
    live[1, 2] = 0.3
    dead = [np.zeros((4, 4)), np.full((4, 4), 0.7), np.full((4, 4), np.nan)]
    assert not is_dead(live)
    assert [is_dead(c) for c in dead] == [True, True, True]
    box = (0, 0, 4, 4)
    out = attention_metrics([live, *dead], [box] * 4)
    assert out["dead_cam"] == 0.75
    assert out["pointing_game"] == 0.25  # a dead CAM points nowhere


# -- edge cases (each one a wrong number or message that no test above would notice) ----------


@pytest.mark.parametrize(
    ("t", "p"),
    [
        ([0, 1, 4, 4, 1, 0], [1, 1, 4, 0, 0, 0]),  # classes 2 and 3 absent: QWK keeps distances
        ([0, 1, 1, 2], [0, 0, 0, 0]),  # true classes never predicted: precision 0, not 1
        ([2, 2, 2], [2, 2, 1]),  # one true class, not perfect agreement: QWK 0, not 1
    ],
)
def test_classification_metrics_edge_cases_match_numpy_reference(t, p) -> None:
    got = classification_metrics(t, p, 5, ordinal=True)
    want = _reference(np.array(t), np.array(p), 5)
    for key, value in want.items():
        assert got[key] == pytest.approx(value), key


def test_labels_may_be_a_matrix_or_whole_floats() -> None:
    flat = classification_metrics([0, 1, 2, 0], [0, 2, 2, 1], 3, ordinal=True)
    assert classification_metrics([[0, 1], [2, 0]], [[0, 2], [2, 1]], 3, ordinal=True) == flat
    assert classification_metrics([0.0, 1.0, 2.0, 0.0], [0, 2, 2, 1], 3, ordinal=True) == flat
    assert classification_metrics([0, 0], [0, 0], 1, ordinal=False)["accuracy"] == 1.0


def test_bad_labels_full_messages() -> None:
    def fails(message, *args):
        with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
            classification_metrics(*args, ordinal=False)

    fails("y_true holds class indices outside 0..4", [0, 5], [0, 1], 5)
    fails("y_pred holds class indices outside 0..4", [0, 1], [-1, 1], 5)
    fails("y_true must hold integer class indices", ["a"], [0], 5)
    fails("y_pred must hold integer class indices", [0], [float("nan")], 5)
    fails("num_classes must be at least 1", [0], [0], 0)
    fails("no samples to score", [], [], 5)


def test_summarise_skips_a_metric_without_values_and_keeps_the_next() -> None:
    s = summarise([{"student": {"qwk": None, "accuracy": 0.5}}, {"student": {"qwk": math.nan}}])
    assert s == {"student": {"accuracy": {"mean": 0.5, "std": 0.0}}}


def test_box_mask_shapes_scale_and_polygons_by_hand() -> None:
    m = box_mask((6, 8), (2, 1, 5, 3))
    assert m.shape == (6, 8) and m.dtype == bool
    # A 40×80 (H×W) image onto a 4×8 map: 10 pixels per cell on both axes.
    scaled = box_mask((4, 8), (20, 10, 50, 30), image_shape=(40, 80))
    assert (scaled == box_mask((4, 8), (2, 1, 5, 3))).all()
    # Right triangle (0,0), (4,0), (0,4): the centres with x + y ≤ 4, i.e. c + r ≤ 3.
    tri = box_mask((5, 5), [(0, 0), (4, 0), (0, 4)])
    assert (tri == (np.add.outer(np.arange(5), np.arange(5)) <= 3)).all()
    # Edges are included, whichever way the polygon turns: centres 0.5..2.5 on both axes.
    square = [(0.5, 0.5), (2.5, 0.5), (2.5, 2.5), (0.5, 2.5)]
    want = np.zeros((4, 4), dtype=bool)
    want[:3, :3] = True
    assert (box_mask((4, 4), square) == want).all()
    assert (box_mask((4, 4), square[::-1]) == want).all()
    assert (box_mask((4, 4), (0.5, 0.5, 2.5, 2.5)) == want).all()


def test_box_mask_of_a_degenerate_polygon_is_empty() -> None:
    for poly in ([(0, 0), (2, 2), (6, 6)], [(0, 0), (2, 1), (6, 3)], (1, 1, 1, 5)):
        m = box_mask((8, 8), poly)
        assert m.shape == (8, 8) and m.dtype == bool and not m.any()


@pytest.mark.parametrize("box", [np.zeros(6), np.zeros((4, 3)), np.zeros((2, 2))])
def test_box_mask_rejects_other_shapes_by_name(box) -> None:
    message = f"box must be x0, y0, x1, y1 or an N×2 polygon, got shape {box.shape}"
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        box_mask((4, 4), box)


def test_cam_nan_pixels_never_win() -> None:
    cam = -np.ones((6, 6))
    cam[0, 0] = np.nan
    cam[4, 4] = -0.5
    assert pointing_game(cam, (4, 4, 5, 5)) and not pointing_game(cam, (0, 0, 1, 1))
    with pytest.raises(ValueError, match=r"^cam must be an h×w map, got shape \(2, 3, 4\)$"):
        pointing_game(np.zeros((2, 3, 4)), (0, 0, 1, 1))


def test_cam_box_iou_top_bounds_and_scaling() -> None:
    graded = np.arange(100, dtype=float).reshape(10, 10)
    assert cam_box_iou(graded, (9, 9, 10, 10), top=0.01) == 1.0  # k = 1: the maximum alone
    assert cam_box_iou(graded, (0, 0, 10, 10), top=1.0) == pytest.approx(99 / 100)  # not the min
    for top in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match=r"^top must be in \(0, 1\]$"):
            cam_box_iou(graded, (0, 0, 1, 1), top=top)
    # A 100×100 image box onto the 10×10 map: the top row of cells.
    assert cam_box_iou(graded, (0, 80, 100, 100), image_shape=(100, 100)) == pytest.approx(1.0)
    assert cam_box_iou(np.ones((4, 4)), (1, 1, 1, 3)) == 0.0  # nothing selected, empty box


def test_attention_metrics_scale_boxes_and_check_pairs() -> None:
    cam = np.zeros((10, 10))
    cam[0:4, 0:5] = 1.0
    out = attention_metrics([cam], [(0, 0, 50, 40)], image_shape=(100, 100))
    assert out == {"pointing_game": 1.0, "cam_iou": 1.0, "dead_cam": 0.0}
    far = np.zeros((10, 10))
    far[7, 7] = 1.0  # a box away from the origin: read unscaled, it misses the 10×10 map
    assert attention_metrics([far], [(60, 60, 100, 100)], image_shape=(100, 100)) == {
        "pointing_game": 1.0,
        "cam_iou": pytest.approx(1 / 16),  # top 20% = the one peak; the box covers 4×4 cells
        "dead_cam": 0.0,
    }
    with pytest.raises(ValueError):
        attention_metrics([cam, cam], [(0, 0, 5, 4)])
    with pytest.raises(ValueError, match="^no CAMs to score$"):
        attention_metrics([], [])
    with pytest.raises(ValueError, match="^no boxes to score$"):
        pointing_ceiling([], (4, 4), (64, 64))
