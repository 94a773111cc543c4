"""Built-in plugin: the ``yolo_obb`` ROI provider, an ultralytics oriented-box (OBB task)
detector trained per fold on the fold's training ROIs only, offline, inside the run folder,
exactly like ``yolo`` (:mod:`kdtoolkit.builtin.yolo.provider`: same dataset split, session,
options, fallbacks and latency), but with rotated boxes.

Labels are ``0 x1 y1 x2 y2 x3 y3 x4 y4``: the 4 corners of the expert ROI
(``kdtoolkit.data.geometry.roi_corners``) relative to the image size. Predictions (ultralytics
``xywhr``) come back in the manifest's convention (:mod:`kdtoolkit.builtin.yolo.obb_geometry`):
width the long side, angle modulo 180° taken within 90° of the training ROIs' mean direction (a
rectangle does not tell 180° turns apart; this keeps crops the way up the teacher saw them). So
``RoiResult.angles`` rotates the student's masks and the two-stage crop
(``kdtoolkit.data.view.crop_roi``) exactly as for expert ROIs. The ``mean_box`` fallback is the
mean training ROI (mean centre and sides relative to the image, axial mean angle).

Metrics on the held-out images (``predict`` minus ``train``) against the expert ROIs: ``map50``
and ``map50_95`` (single-class AP with the exact rotated IoU of the two rectangles, detections
down to confidence 0.001), ``mean_iou`` (rotated IoU of the chosen boxes), ``angle_error_deg``
(mean absolute angle difference of the chosen boxes, modulo 180°), plus ``n_fallback`` and
``latency_ms`` as for ``yolo``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any, Literal

import numpy as np

from kdtoolkit.builtin.yolo.dataset import roi_of
from kdtoolkit.builtin.yolo.obb_geometry import (
    angle_error,
    canonical_roi,
    mean_angle,
    obb_label,
    reference_angle,
    rotated_iou,
    xywhr_to_roi,
)
from kdtoolkit.builtin.yolo.options import OBB_HEADS
from kdtoolkit.builtin.yolo.provider import Detection, YoloProvider
from kdtoolkit.config.option import Range
from kdtoolkit.plugins.hookspec import hookimpl
from kdtoolkit.plugins.roi import RoiRequest, RoiResult


class YoloObbProvider(YoloProvider):
    """An oriented-box YOLO trained per fold on the training ROIs (see the module docstring).
    Options as for ``yolo``; ``model`` is an OBB model YAML (``yolo11n-obb.yaml``)."""

    name, task, heads, example = "yolo_obb", "obb", OBB_HEADS, "yolo11n-obb.yaml"
    oriented = True

    def __init__(
        self,
        model: str = "yolo11n-obb.yaml",
        weights: str | None = None,
        epochs: Annotated[int, Range(ge=1)] = 30,
        imgsz: Annotated[int, Range(ge=32)] = 320,
        batch: Annotated[int, Range(ge=1)] = 16,
        patience: Annotated[int, Range(ge=0)] = 10,
        conf: Annotated[float, Range(ge=0, le=1)] = 0.05,
        val_fraction: Annotated[float, Range(ge=0, lt=1)] = 0.15,
        fallback: Literal["mean_box", "whole_image"] = "mean_box",
        workers: Annotated[int, Range(ge=0)] = 8,
    ) -> None:
        super().__init__(
            model, weights, epochs, imgsz, batch, patience, conf, val_fraction, fallback, workers
        )

    centre: float = 0.0  # the training ROIs' reference angle, set by ``provide``

    def provide(self, request: RoiRequest) -> RoiResult:
        train = [request.samples[int(i)] for i in request.train]
        self.centre = reference_angle([(s.box, s.angle) for s in train if s.box is not None])
        return super().provide(request)

    def label_line(self, sample: Any) -> str:
        corners = obb_label(*roi_of(sample))
        return "0 " + " ".join(f"{v:.6f}" for v in corners.ravel())

    def mean_roi(self, boxed: Sequence[Any]) -> np.ndarray:
        rois = np.array([canonical_roi(s.box, s.angle, self.centre) for s in boxed])
        size = np.array([[s.width, s.height] for s in boxed], float)
        centre = (rois[:, :2] + rois[:, 2:4]) / 2 / size
        sides = (rois[:, 2:4] - rois[:, :2]) / size
        return np.array(
            [*centre.mean(axis=0), *sides.mean(axis=0), mean_angle(rois[:, 4], self.centre)]
        )

    def read_result(self, result: Any) -> list[Detection]:
        obb = result.obb
        xywhr = obb.xywhr.cpu().numpy().astype(float)
        scores = obb.conf.cpu().numpy().astype(float)
        rois = [xywhr_to_roi(r, self.centre) for r in xywhr]
        return [(float(c), roi) for c, roi in zip(scores, rois, strict=True)]

    def truth(self, sample: Any) -> np.ndarray:
        return canonical_roi(sample.box, sample.angle, self.centre)

    def iou(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return rotated_iou(a, b)

    def extra_metrics(self, chosen: np.ndarray, truth: np.ndarray) -> dict[str, float]:
        return {"angle_error_deg": float(angle_error(chosen, truth).mean())}


@hookimpl
def kd_register_roi_providers(registry):
    registry.register("yolo_obb", YoloObbProvider)
