"""The ``yolo_obb`` ROI provider: the angle convention against ultralytics, rotated IoU, angle
error, labels, configuration, and a tiny offline training."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from kdtoolkit.builtin.yolo.metrics import box_errors, box_iou, detection_map
from kdtoolkit.builtin.yolo.obb import YoloObbProvider
from kdtoolkit.builtin.yolo.obb_geometry import (
    angle_error,
    canonical_roi,
    mean_angle,
    obb_label,
    reference_angle,
    roi_to_xywhr,
    rotated_iou,
    xywhr_to_roi,
)
from kdtoolkit.builtin.yolo.session import ultralytics_session
from kdtoolkit.config.option import check_options
from kdtoolkit.data.geometry import roi_corners
from kdtoolkit.errors import KdError
from kdtoolkit.plugins.manager import registries
from kdtoolkit.plugins.roi import RoiRequest
from kdtoolkit.report.markdown import ROI_METRICS
from tests import test_yolo
from tests.test_yolo import sample

offline, empty_home = test_yolo.offline, test_yolo.empty_home  # the same fixtures as ``yolo``

S30, C30 = 0.5, math.sqrt(3) / 2


def same_corners(a, b):
    """Two (4, 2) corner sets equal as sets of points."""
    a, b = np.asarray(a), np.asarray(b)
    return all(np.abs(b - p).sum(axis=1).min() < 1e-3 for p in a) and len(a) == len(b)


# --------------------------------------------------------------------------- angle convention


def test_xywhr_to_roi_by_hand():
    """ultralytics: width axis (cos r, sin r) with y down, i.e. clockwise on screen for r > 0;
    the manifest turns counter-clockwise, so r = 30° is angle −30°.

    cx, cy, w, h, r = 50, 40, 40, 20, 30°: vec1 = (20·cos30, 20·sin30) = (17.32, 10),
    vec2 = (−10·sin30, 10·cos30) = (−5, 8.66); corners ctr ± vec1 ± vec2."""
    roi = xywhr_to_roi([50, 40, 40, 20, math.radians(30)])
    np.testing.assert_allclose(roi, [30, 30, 70, 50, -30], atol=1e-9)
    v1, v2 = np.array([20 * C30, 20 * S30]), np.array([-10 * S30, 10 * C30])
    ctr = np.array([50.0, 40.0])
    by_hand = [ctr + v1 + v2, ctr + v1 - v2, ctr - v1 - v2, ctr - v1 + v2]
    assert same_corners(roi_corners(tuple(roi[:4]), roi[4]), by_hand)


def test_short_width_prediction_is_made_long_and_angle_mod_180():
    """ultralytics predictions have r in [0, π/2) with w possibly the short side: w=20, h=40,
    r=60° is the 40×20 rectangle whose long axis is at 150° (ultralytics) → −150° ≡ 30°."""
    roi = xywhr_to_roi([50, 40, 20, 40, math.radians(60)])
    np.testing.assert_allclose(roi, [30, 30, 70, 50, 30], atol=1e-9)
    ctr = np.array([50.0, 40.0])
    v1 = np.array([10 * math.cos(math.radians(60)), 10 * math.sin(math.radians(60))])
    v2 = np.array([-20 * math.sin(math.radians(60)), 20 * math.cos(math.radians(60))])
    by_hand = [ctr + v1 + v2, ctr + v1 - v2, ctr - v1 - v2, ctr - v1 + v2]
    assert same_corners(roi_corners(tuple(roi[:4]), roi[4]), by_hand)


def test_canonical_roi_makes_width_long_and_wraps_the_angle():
    np.testing.assert_allclose(canonical_roi((40, 20, 60, 60), 10), [30, 30, 70, 50, -80])
    np.testing.assert_allclose(canonical_roi((30, 30, 70, 50), 100), [30, 30, 70, 50, -80])
    np.testing.assert_allclose(canonical_roi((30, 30, 70, 50), -90), [30, 30, 70, 50, -90])
    for box, angle in (((40, 20, 60, 60), 10), ((30, 30, 70, 50), 100)):
        roi = canonical_roi(box, angle)
        assert same_corners(roi_corners(box, angle), roi_corners(tuple(roi[:4]), roi[4]))


def test_the_180_degree_ambiguity_is_resolved_towards_the_training_rois():
    """A rectangle at 100° is the same as at −80°; with training ROIs around 100° (a tall box at
    190° counts as a wide one at 100°) the prediction keeps 100°, so its crop is upright."""
    train = [((30, 30, 70, 50), 95.0), ((30, 30, 70, 50), 105.0), ((40, 20, 60, 60), 190.0)]
    assert reference_angle(train) == pytest.approx(100.0)
    assert reference_angle([]) == 0.0
    xywhr = roi_to_xywhr((30, 30, 70, 50), 100.0)
    np.testing.assert_allclose(xywhr_to_roi(xywhr), [30, 30, 70, 50, -80], atol=1e-9)
    np.testing.assert_allclose(xywhr_to_roi(xywhr, 100.0), [30, 30, 70, 50, 100], atol=1e-9)
    assert mean_angle(np.array([95.0, 105.0]), 100.0) == pytest.approx(100.0)


@pytest.mark.parametrize("angle", [-89.0, -57.0, -30.0, 0.0, 12.5, 45.0, 57.0, 88.0])
def test_round_trip_through_ultralytics_own_conversions(tmp_path, angle):
    """Our labels read by ultralytics (``xyxyxyxy2xywhr``, as its OBB dataset loads them),
    its prediction regularisation, and its corner drawing all agree with the manifest ROI."""
    import torch

    box, size = (30.0, 30.0, 70.0, 50.0), (100, 80)
    with ultralytics_session(tmp_path / "ul", lambda line: None):
        from ultralytics.utils import ops

        label = obb_label(box, angle, *size) * np.array(size)
        xywhr = ops.xyxyxyxy2xywhr(label.reshape(1, 8))[0]
        np.testing.assert_allclose(xywhr_to_roi(xywhr), [*box, angle], atol=1e-3)
        regular = ops.regularize_rboxes(torch.tensor(xywhr[None], dtype=torch.float64))[0]
        assert 0 <= float(regular[4]) < math.pi / 2
        np.testing.assert_allclose(xywhr_to_roi(regular.numpy()), [*box, angle], atol=1e-3)
        drawn = ops.xywhr2xyxyxyxy(roi_to_xywhr(box, angle)[None])[0]
    assert same_corners(drawn, roi_corners(box, angle))


def test_obb_label_is_relative_and_clipped():
    label = obb_label((30, 30, 70, 50), 0.0, 100, 80)
    np.testing.assert_allclose(label, [[0.3, 0.375], [0.7, 0.375], [0.7, 0.625], [0.3, 0.625]])
    assert obb_label((80, 60, 120, 90), 30.0, 100, 80).max() == 1.0


# --------------------------------------------------------------------------- metrics


def test_rotated_iou_by_hand_and_against_box_iou():
    # a 40×20 box and the same box turned by 90°: 20×20 overlap, union 800 + 800 − 400
    a = np.array([[30, 30, 70, 50, 0.0]])
    b = np.array([[30, 30, 70, 50, 90.0]])
    np.testing.assert_allclose(rotated_iou(a, b), [1 / 3])
    np.testing.assert_allclose(rotated_iou(a, a), [1.0])
    np.testing.assert_allclose(rotated_iou(a, np.array([[30, 30, 70, 50, 180.0]])), [1.0])
    # a 10×10 square and itself turned by 45° about its centre: overlap is a regular octagon
    # of inradius 5, area 8·5²·tan(22.5°) = 200(√2 − 1)
    sq, turned = np.array([[0, 0, 10, 10, 0.0]]), np.array([[0, 0, 10, 10, 45.0]])
    inter = 200 * (math.sqrt(2) - 1)
    np.testing.assert_allclose(rotated_iou(sq, turned), [inter / (200 - inter)])
    rng = np.random.default_rng(0)
    x0y0 = rng.uniform(0, 50, (20, 2))
    boxes = np.c_[x0y0, x0y0 + rng.uniform(5, 30, (20, 2))]
    other = boxes + rng.uniform(-10, 10, (20, 4))
    other[:, 2:] = np.maximum(other[:, 2:], other[:, :2] + 1)
    np.testing.assert_allclose(
        rotated_iou(np.c_[boxes, np.zeros(20)], np.c_[other, np.zeros(20)]),
        box_iou(boxes, other),
        atol=1e-9,
    )
    assert rotated_iou(np.array([[0, 0, 1, 1, 0.0]]), np.array([[5, 5, 6, 6, 30.0]]))[0] == 0


def test_angle_error_and_mean_are_modulo_180():
    a = np.array([[0, 0, 1, 1, 89.0], [0, 0, 1, 1, -30.0], [0, 0, 1, 1, 10.0]])
    b = np.array([[0, 0, 1, 1, -89.0], [0, 0, 1, 1, 150.0], [0, 0, 1, 1, 40.0]])
    np.testing.assert_allclose(angle_error(a, b), [2.0, 0.0, 30.0])
    assert mean_angle(np.array([89.0, -89.0])) == pytest.approx(-90.0)
    assert mean_angle(np.array([10.0, 30.0])) == pytest.approx(20.0)


def test_detection_map_with_rotated_iou():
    truth = {0: [30, 30, 70, 50, 30.0]}
    hit = (0, 0.9, [30, 30, 70, 50, -150.0])  # the same rectangle
    miss = (0, 0.95, [30, 30, 70, 50, -60.0])  # turned by 90°: IoU 1/3
    assert detection_map([hit], truth, rotated_iou) == (1.0, 1.0)
    map50, _ = detection_map([miss, hit], truth, rotated_iou)
    assert map50 == pytest.approx(0.5)


# --------------------------------------------------------------------------- configuration


def test_registered_with_declared_options_and_obb_models_only(tmp_path):
    assert registries().roi_providers.get("yolo_obb") is YoloObbProvider
    assert registries().roi_providers.get("yolo").__name__ == "YoloProvider"
    assert check_options(YoloObbProvider, {"epochs": 2, "model": "yolo11s-obb.yaml"}, "roi") == []
    assert YoloObbProvider().model == "yolo11n-obb.yaml"
    with pytest.raises(KdError, match="not an oriented-box .OBB. model .its head is Detect.*"):
        YoloObbProvider(model="yolo11n.yaml")
    with pytest.raises(KdError, match="yolo11n-obb.yaml"):
        YoloObbProvider(model="yolo11n-obbb.yaml")


def test_label_line_and_mean_fallback():
    provider = YoloObbProvider()
    s = sample(0, box=(30, 30, 70, 50), angle=0.0, size=(100, 80))
    assert provider.label_line(s) == (
        "0 0.300000 0.375000 0.700000 0.375000 0.700000 0.625000 0.300000 0.625000"
    )
    tall = sample(1, box=(40, 20, 60, 60), angle=10.0, size=(100, 80))  # = wide at −80°
    wide = sample(2, box=(30, 30, 70, 50), angle=-80.0, size=(100, 80))
    np.testing.assert_allclose(provider.mean_roi([tall, wide]), [0.5, 0.5, 0.4, 0.25, -80.0])


# --------------------------------------------------------------------------- tiny training


def bars(folder: Path, n: int, size: int = 64) -> list:
    """``n`` grey images with one bright rotated 2:1 bar each, the bar as the expert ROI."""
    rng = np.random.default_rng(0)
    folder.mkdir()
    out = []
    for i in range(n):
        image = Image.fromarray((rng.random((size, size)) * 40).astype(np.uint8))
        cx, cy = rng.uniform(22, size - 22, 2)
        box = (cx - 14, cy - 7, cx + 14, cy + 7)
        angle = float(rng.uniform(-80, 80))
        ImageDraw.Draw(image).polygon([tuple(p) for p in roi_corners(box, angle)], fill=230)
        path = folder / f"slice_{i}.png"
        image.save(path)
        out.append(sample(i, path, box, angle=angle, size=(size, size)))
    return out


@pytest.mark.slow
def test_tiny_obb_training_runs_offline_and_inside_the_run_folder(
    tmp_path,
    offline,
    empty_home,
    capfd,
):
    home, cwd = empty_home
    samples = bars(tmp_path / "images", 8)
    workdir = tmp_path / "run" / "fold_0" / "roi"
    lines: list[str] = []
    provider = YoloObbProvider(epochs=1, imgsz=64, batch=4, conf=0.05, workers=0)
    result = provider.provide(
        RoiRequest(0, samples, np.arange(6), np.arange(8), workdir, "cpu", 0, lines.append)
    )
    assert offline == [], f"network attempted: {offline}"
    assert list(home.iterdir()) == [] and list(cwd.iterdir()) == []
    assert capfd.readouterr().out == "", "ultralytics printed to the terminal"
    assert (workdir / "train" / "weights" / "best.pt").is_file()
    label = (workdir / "dataset" / "labels" / "train" / "000000.txt").read_text().split()
    assert len(label) == 9 and label[0] == "0"
    assert "task: obb" in (workdir / "train" / "args.yaml").read_text()
    assert any("yolo_obb fold 0: epoch 1/1" in line for line in lines)

    assert result.boxes.shape == (8, 4) and result.angles.shape == (8,)
    centre = provider.centre
    assert centre == pytest.approx(reference_angle([(s.box, s.angle) for s in samples[:6]]))
    assert ((result.angles >= centre - 90) & (result.angles < centre + 90)).all()
    widths = result.boxes[:, 2] - result.boxes[:, 0]
    assert (widths >= result.boxes[:, 3] - result.boxes[:, 1] - 1e-9).all()  # width is long
    mean = provider.mean_roi(samples[:6])
    for box, angle, found in zip(result.boxes, result.angles, result.found, strict=True):
        if not found:
            assert angle == pytest.approx(mean[4])
            assert (box[0] + box[2]) / 2 == pytest.approx(mean[0] * 64)
    expected = {"map50", "map50_95", "mean_iou", "angle_error_deg", "n_fallback", "latency_ms"}
    expected |= {"shift_along_p90", "shift_across_p90", "size_p90"}
    assert set(result.metrics) == expected
    assert expected <= set(ROI_METRICS)  # each has its meaning in the report
    assert 0 <= result.metrics["map50_95"] <= result.metrics["map50"] <= 1
    assert 0 <= result.metrics["angle_error_deg"] <= 90 and result.metrics["latency_ms"] > 0
    assert any("angle_error_deg" in line for line in lines)


def test_box_errors_are_read_in_the_truth_roi_frame() -> None:
    # truth: 40 × 20 px at (50, 50), turned 90° (its width runs up the screen)
    truth = np.array([[30.0, 40.0, 70.0, 60.0, 90.0]] * 10)
    chosen = truth.copy()
    chosen[:, [1, 3]] -= 4.0  # 4 px up the screen: along the truth's width, 10 % of it
    chosen[:, [0, 2]] += 3.0  # 3 px right: across it, 15 % of its height
    chosen[:, 2] += 8.0  # 8 px wider: 20 % of the width
    errors = box_errors(chosen, truth)
    assert errors["shift_along_p90"] == pytest.approx(0.1)
    assert errors["shift_across_p90"] == pytest.approx(0.15 + 4 / 20)  # the centre moved 4 more
    assert errors["size_p90"] == pytest.approx(0.2)
    spread = truth.copy()
    spread[:, [0, 2]] += np.arange(10)[:, None] * 0.2  # across: 0, 1, ..., 9 % of the height
    assert box_errors(spread, truth)["shift_across_p90"] == pytest.approx(
        np.percentile(np.arange(10) * 0.01, 90)
    )


def test_box_errors_at_an_oblique_angle_follow_the_roi_corners() -> None:
    """At 30° the signs of the axes matter (at 90° the absolute values hide them): the offset
    is built from the truth's corners, kdtoolkit.data.geometry's convention."""
    box, angle = (30.0, 40.0, 70.0, 60.0), 30.0
    corners = roi_corners(box, angle)
    along = (corners[1] - corners[0]) / 40.0
    across = (corners[3] - corners[0]) / 20.0
    offset = 0.1 * 40.0 * along + 0.3 * 20.0 * across  # 10% along, 30% across
    chosen = np.array([[*(np.array(box) + np.tile(offset, 2)), angle]])
    errors = box_errors(chosen, np.array([[*box, angle]]))
    assert errors["shift_along_p90"] == pytest.approx(0.1)
    assert errors["shift_across_p90"] == pytest.approx(0.3)
    assert errors["size_p90"] == pytest.approx(0.0, abs=1e-12)
