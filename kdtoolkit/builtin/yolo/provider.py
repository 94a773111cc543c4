"""Built-in plugin: the ``yolo`` ROI provider, an ultralytics YOLO detector trained per fold on
the fold's training boxes only, then run on every image.

Per fold, in ``request.workdir``: ``dataset/`` (the fold's detection dataset, see
:mod:`kdtoolkit.builtin.yolo.dataset`), ``train/`` (ultralytics' training run,
``weights/best.pt``, built from a model YAML, optionally starting from a local ``.pt``) and
``config/`` (ultralytics' settings; nothing goes to the user's home). ultralytics runs inside
:func:`kdtoolkit.builtin.yolo.session.ultralytics_session`, offline and quiet, with its
warnings passed to ``request.log``.

Detections are axis-aligned (angle 0). An image without a detection at ``conf`` gets the
fallback box (``mean_box``: the mean training box, in relative coordinates, scaled to the image;
``whole_image``) and ``found = False``. Metrics (:mod:`kdtoolkit.builtin.yolo.metrics`) are
detection mAP@0.5 and mAP@0.5:0.95 on the held-out images (``predict`` minus ``train``) against
their expert enclosing boxes, counting detections down to confidence 0.001 as ultralytics'
validation does; plus the mean IoU of the chosen boxes (``mean_iou``), their centre and size
errors in the expert ROI's frame (``shift_along_p90``, ``shift_across_p90``, ``size_p90``: what a
crop classifier's ``augment.roi_*`` jitter should cover), the number of fallbacks
(``n_fallback``) and the detector's mean per-image latency (``latency_ms``: batch of one,
decoded image in, boxes out, after a warm-up; see :func:`detector_latency_ms`), which the
two-stage latency adds to the crop + teacher time.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Annotated, Any, Literal

import numpy as np
from PIL import Image

from kdtoolkit.builtin.yolo.dataset import (
    label_line,
    roi_of,
    split_samples,
    stage_image,
    truth_box,
    write_dataset,
    yolo_label,
)
from kdtoolkit.builtin.yolo.metrics import MAP_CONF, box_errors, box_iou, detection_map
from kdtoolkit.builtin.yolo.options import (
    DETECT_HEADS,
    models_dir,
    resolve_model_yaml,
    resolve_weights,
    ultralytics_device,
)
from kdtoolkit.builtin.yolo.session import ultralytics_session
from kdtoolkit.config.option import Range
from kdtoolkit.errors import KdError
from kdtoolkit.plugins.hookspec import hookimpl
from kdtoolkit.plugins.roi import RoiProvider, RoiRequest, RoiResult

#: Held-out images timed for ``latency_ms``, and untimed warm-up calls before them.
LATENCY_IMAGES, LATENCY_WARMUP = 16, 2
#: A detection: ``(score, [x0, y0, x1, y1, angle])``, the box before its rotation by ``angle``
#: degrees (:mod:`kdtoolkit.data.geometry`); angle 0 for axis-aligned detectors.
Detection = tuple[float, np.ndarray]


class YoloProvider(RoiProvider):
    """A YOLO detector trained per fold on the training boxes (see the module docstring).

    ``model``: an ultralytics model YAML name (``yolo11n.yaml``) or a local ``.yaml`` path,
    built from scratch unless ``weights`` names a local ``.pt`` to start from. ``conf``: the
    lowest confidence accepted as a detection. ``val_fraction``: share of the training part
    held back to validate (and pick the best epoch). ``workers``: data-loader processes on
    CUDA (ultralytics uses 0 on CPU).

    A subclass for another ultralytics task (``yolo_obb``) sets ``name``, ``task``, ``heads``
    and overrides the label, reading, truth and IoU methods below.
    """

    learned = True
    name, task, heads, example = "yolo", "detect", DETECT_HEADS, "yolo11n.yaml"

    def __init__(
        self,
        model: str = "yolo11n.yaml",
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
        if models_dir() is None:
            raise KdError(
                "the yolo ROI provider needs ultralytics, which is not installed "
                '(pip install ultralytics), or use roi.provider = "manual"'
            )
        self.model = resolve_model_yaml(model, self.heads, self.example)
        self.weights = resolve_weights(weights)
        self.epochs, self.imgsz, self.batch, self.patience = epochs, imgsz, batch, patience
        self.conf, self.val_fraction, self.fallback = conf, val_fraction, fallback
        self.workers = workers

    def provide(self, request: RoiRequest) -> RoiResult:
        workdir, log = Path(request.workdir).resolve(), request.log
        tag = f"{self.name} fold {request.fold}"
        train = [request.samples[int(i)] for i in request.train]
        boxed = [s for s in train if s.box is not None]
        if not boxed:
            raise KdError(f"{tag}: the {self.name} ROI provider needs training images with boxes")
        if len(boxed) < len(train):
            log(f"{tag}: {len(train) - len(boxed)} training images without a box left out")
        for stale in ("dataset", "predict"):  # from an interrupted earlier attempt
            shutil.rmtree(workdir / stale, ignore_errors=True)
        fit, val = split_samples(boxed, self.val_fraction, request.seed)
        data, staged = write_dataset(workdir / "dataset", fit, val, self.label_line)
        log(f"{tag}: training {self.model} on {len(fit)} images, validating on {len(val)}")
        mean_label = self.mean_roi(boxed)

        predict = [request.samples[int(i)] for i in request.predict]
        pending = [s for s in predict if int(s.index) not in staged]
        staged |= {int(s.index): stage_image(s, workdir / "predict") for s in pending}

        in_train = {int(i) for i in request.train}
        unseen = [staged[int(s.index)] for s in predict if int(s.index) not in in_train]
        timed = (unseen or [staged[int(s.index)] for s in predict])[:LATENCY_IMAGES]
        with ultralytics_session(workdir, log) as ultralytics:
            detections, latency = self._fit_predict(
                ultralytics, request, workdir, data, predict, staged, timed
            )

        rois = np.zeros((len(predict), 5))  # x0, y0, x1, y1, angle
        found = np.zeros(len(predict), dtype=bool)
        for k, (s, dets) in enumerate(zip(predict, detections, strict=True)):
            best = max(dets, key=lambda d: d[0], default=None)
            if best is not None and best[0] >= self.conf:
                rois[k], found[k] = best[1], True
            elif self.fallback == "whole_image":
                rois[k] = (0, 0, s.width, s.height, 0)
            else:  # the mean training label, scaled to this image
                cx, cy, w, h, angle = mean_label
                scale = np.array([s.width, s.height, s.width, s.height])
                box = np.array([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]) * scale
                rois[k] = (*box, angle)
        boxes = rois[:, :4]

        metrics: dict[str, float] = {"n_fallback": float(np.sum(~found))}
        if latency is not None:
            metrics["latency_ms"] = latency
            log(f"{tag}: detector latency {latency:.1f} ms / image ({len(timed)} images)")
        held = [
            k for k, s in enumerate(predict) if int(s.index) not in in_train and s.box is not None
        ]
        if not held:
            log(f"{tag}: no held-out images with boxes, so no detection mAP")
        else:
            truth = {k: self.truth(predict[k]) for k in held}
            flat = [(k, score, roi) for k in held for score, roi in detections[k]]
            metrics["map50"], metrics["map50_95"] = detection_map(flat, truth, self.iou)
            chosen, expert = rois[held], np.array([truth[k] for k in held])
            metrics["mean_iou"] = float(self.iou(chosen, expert).mean())
            more = box_errors(chosen, expert) | self.extra_metrics(chosen, expert)
            metrics |= more
            extra = "".join(f", {k} {v:.3f}" for k, v in more.items())
            log(
                f"{tag}: held-out mAP50 {metrics['map50']:.3f}, mAP50-95 "
                f"{metrics['map50_95']:.3f}, mean IoU {metrics['mean_iou']:.3f}{extra} "
                f"({len(held)} images); {int(metrics['n_fallback'])} of {len(predict)} images "
                "fell back"
            )
        return RoiResult(boxes=boxes, angles=rois[:, 4].copy(), found=found, metrics=metrics)

    # ----------------------------------------------------------- what a subclass changes

    def label_line(self, sample: Any) -> str:
        """The training label line of ``sample`` (``0 cx cy w h``, the enclosing box)."""
        return label_line(sample)

    def mean_roi(self, boxed: Sequence[Any]) -> np.ndarray:
        """The fallback ROI ``(cx, cy, w, h, angle)``, sizes relative to the image: the mean
        training label, angle 0."""
        return np.array([*np.mean([yolo_label(*roi_of(s)) for s in boxed], axis=0), 0.0])

    def read_result(self, result: Any) -> list[Detection]:
        """One ultralytics result's detections: axis-aligned boxes, angle 0."""
        xyxy = result.boxes.xyxy.cpu().numpy().astype(float)
        scores = result.boxes.conf.cpu().numpy().astype(float)
        return [(float(c), np.array([*b, 0.0])) for c, b in zip(scores, xyxy, strict=True)]

    def truth(self, sample: Any) -> np.ndarray:
        """The expert ROI as a detection's box ``[x0, y0, x1, y1, 0]``: its enclosing box."""
        return np.array([*truth_box(*roi_of(sample)), 0.0])

    def iou(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Row-wise IoU of detection boxes (axis-aligned: the angle column is 0)."""
        return box_iou(np.asarray(a)[:, :4], np.asarray(b)[:, :4])

    def extra_metrics(self, chosen: np.ndarray, truth: np.ndarray) -> dict[str, float]:
        """Held-out metrics besides mAP and mean IoU (none for axis-aligned boxes)."""
        return {}

    def _fit_predict(
        self,
        ultralytics: ModuleType,
        request: RoiRequest,
        workdir: Path,
        data: Path,
        predict: list[Any],
        staged: dict[int, Path],
        timed: list[Path],
    ) -> tuple[list[list[Detection]], float | None]:
        """Train on ``data``; return each ``predict`` image's detections and the mean
        per-image latency (ms) on the ``timed`` images (None when there are none)."""
        import torch

        device = ultralytics_device(request.device)
        cuda = device not in ("cpu", "mps")
        # AMP: ultralytics' fp16 check downloads yolo26n.pt; bf16 (or fp32) skips the check.
        amp: bool | str = "bf16" if cuda and torch.cuda.is_bf16_supported() else False
        model = ultralytics.YOLO(self.model, task=self.task)
        if self.weights:
            model.load(self.weights)
        _EpochLog(request.log, request.fold, self.name).attach(model)
        model.train(
            data=str(data),
            epochs=self.epochs,
            imgsz=self.imgsz,
            batch=self.batch,
            patience=self.patience,
            device=device,
            workers=self.workers,
            seed=int(request.seed),
            deterministic=True,
            amp=amp,
            plots=False,
            verbose=False,
            project=str(workdir),
            name="train",
            exist_ok=True,
        )
        trainer = model.trainer
        best = Path(trainer.best) if Path(trainer.best).is_file() else Path(trainer.last)
        del model, trainer
        detector = ultralytics.YOLO(str(best), task=self.task)
        sources = [str(staged[int(s.index)]) for s in predict]
        out: list[list[Detection]] = []
        for start in range(0, len(sources), 256):
            results = detector.predict(
                sources[start : start + 256],
                conf=min(MAP_CONF, self.conf),
                imgsz=self.imgsz,
                device=device,
                batch=self.batch,
                max_det=100,
                stream=True,
                verbose=False,
                save=False,
                project=str(workdir),
                name="predict_run",
                exist_ok=True,
            )
            out += [self.read_result(r) for r in results]
        run_args = {"project": str(workdir), "name": "predict_run", "exist_ok": True}
        latency = detector_latency_ms(detector, timed, self.imgsz, device, self.conf, **run_args)
        del detector
        if cuda:
            torch.cuda.empty_cache()
        return out, latency


def _bgr(path: Path) -> np.ndarray:
    """A staged (8-bit) image decoded as ultralytics takes arrays: H×W×3 BGR uint8."""
    with Image.open(path) as im:
        return np.ascontiguousarray(np.asarray(im.convert("RGB"))[:, :, ::-1])


def detector_latency_ms(
    detector: Any,
    images: Sequence[Path],
    imgsz: int,
    device: str,
    conf: float,
    warmup: int = LATENCY_WARMUP,
    **predict_args: Any,
) -> float | None:
    """Mean time (ms) of one ``detector.predict`` call per image, batch of one: an image
    already decoded in memory → preprocessing, inference and NMS → boxes on the CPU (as the
    two-stage pipeline would use them; file decoding is not counted, as for the classifiers).
    ``warmup`` untimed calls on the first image come first. None when ``images`` is empty."""
    import torch

    if not images:
        return None
    cuda = device not in ("cpu", "mps")
    arrays = [_bgr(p) for p in images]
    args = {"imgsz": imgsz, "device": device, "conf": conf, "batch": 1, "max_det": 100}
    args |= {"verbose": False, "save": False, **predict_args}

    def detect(array: np.ndarray) -> None:
        for r in detector.predict(array, **args):
            obb = getattr(r, "obb", None)  # oriented boxes (``yolo_obb``), else plain ones
            (obb.xywhr if obb is not None else r.boxes.xyxy).cpu()  # waits for the device
        if cuda:
            torch.cuda.synchronize()

    for _ in range(warmup):
        detect(arrays[0])
    started = time.perf_counter()
    for array in arrays:
        detect(array)
    return 1000 * (time.perf_counter() - started) / len(arrays)


class _EpochLog:
    """ultralytics callbacks that write one line per epoch, and one for the final validation
    of ``best.pt`` (an ``on_fit_epoch_end`` without a training epoch before it), to ``log``."""

    def __init__(self, log: Callable[[str], None], fold: int, name: str = "yolo") -> None:
        self.log, self.fold, self.name, self.training = log, fold, name, False

    def attach(self, model: Any) -> None:
        model.add_callback("on_train_epoch_start", self.epoch_start)
        model.add_callback("on_fit_epoch_end", self.fit_epoch_end)

    def epoch_start(self, trainer: Any) -> None:
        self.training = True

    def fit_epoch_end(self, trainer: Any) -> None:
        map50 = float((trainer.metrics or {}).get("metrics/mAP50(B)", float("nan")))
        if not self.training:
            self.log(f"{self.name} fold {self.fold}: best weights, val mAP50 {map50:.3f}")
            return
        self.training = False
        loss = trainer.tloss
        if isinstance(loss, dict):  # ultralytics 8.4: {name: mean loss}
            loss = sum(float(v) for v in loss.values())
        loss = float("nan") if loss is None else float(loss.sum() if hasattr(loss, "sum") else loss)
        epoch = f"{trainer.epoch + 1}/{trainer.epochs}"
        self.log(
            f"{self.name} fold {self.fold}: epoch {epoch}, loss {loss:.3f}, val mAP50 {map50:.3f}"
        )


@hookimpl
def kd_register_roi_providers(registry):
    registry.register("yolo", YoloProvider)
