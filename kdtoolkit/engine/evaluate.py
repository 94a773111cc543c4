"""Held-out evaluation of one fold's models: every row's metrics, confusion matrices,
predictions, latency and Grad-CAMs, as a typed ``FoldResult``."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from kdtoolkit.data.imageio import load_image
from kdtoolkit.data.manifest import Sample
from kdtoolkit.data.view import ViewConfig, crop_roi, normalise, student_view
from kdtoolkit.engine.context import RunContext
from kdtoolkit.engine.loaders import Loader
from kdtoolkit.engine.plan import EvaluateSpec
from kdtoolkit.engine.train import predict_logits
from kdtoolkit.models.checkpoint import load_model, read_metadata
from kdtoolkit.models.device import autocast
from kdtoolkit.models.gradcam import cam_for_images, unwrap
from kdtoolkit.models.temperature import probabilities_of
from kdtoolkit.plugins.roi import RoiResult
from kdtoolkit.report.calibration import row_calibration
from kdtoolkit.report.metrics import (
    attention_metrics,
    classification_metrics,
    confusion,
    pointing_ceiling,
)
from kdtoolkit.report.results import (
    CALIBRATED,
    RAW,
    STUDENT,
    TEACHER_CROP,
    TWO_STAGE,
    FoldResult,
)


def cams_of(
    model: torch.nn.Module, loader: Loader, device: torch.device
) -> tuple[np.ndarray, np.ndarray, tuple[int, int] | None]:
    """Grad-CAMs (of the predicted class, image resolution), student-view boxes and the
    feature grid h×w the CAMs are upsampled from (None for a model whose maps are its own
    ``image_attention``)."""
    cams, boxes, grid = [], [], None
    plain = unwrap(model)
    for batch in loader:
        images = batch["image"].to(device)
        cams.append(cam_for_images(model, images).float().cpu())
        boxes.append(batch["box"])
        if grid is None and not hasattr(plain, "image_attention"):
            with torch.no_grad(), autocast(device):
                grid = tuple(plain.forward_features(images[:1]).shape[-2:])
    return torch.cat(cams).numpy(), torch.cat(boxes).numpy(), grid


def two_stage_logits(
    teacher: torch.nn.Module,
    samples: Sequence[Sample],
    test_idx: np.ndarray,
    rois: RoiResult,
    cfg: ViewConfig,
    device: torch.device,
) -> tuple[np.ndarray, float]:
    """Logits of ``teacher`` (the teacher or the two-stage classifier) on crops cut at the
    provider's boxes, with exactly the teacher's crop geometry, and the mean per-image crop +
    classify time (ms)."""
    logits, seconds = [], 0.0
    for i in test_idx:
        image = load_image(samples[i], cfg.channels)
        started = time.perf_counter()
        crop = crop_roi(image, tuple(rois.boxes[i]), float(rois.angles[i]), cfg.crop_size)
        x = normalise(crop, cfg).unsqueeze(0).to(device)
        with torch.no_grad(), autocast(device):
            out = teacher(x).float().cpu()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds += time.perf_counter() - started
        logits.append(out)
    return torch.cat(logits).numpy(), 1000 * seconds / max(1, len(test_idx))


def student_latency_ms(
    model: torch.nn.Module,
    samples: Sequence[Sample],
    test_idx: np.ndarray,
    cfg: ViewConfig,
    device: torch.device,
) -> float:
    """Mean per-image time of the student alone on a full image (batch of one)."""
    n = min(16, len(test_idx))
    seconds = 0.0
    for i in test_idx[:n]:
        image = load_image(samples[i], cfg.channels)
        started = time.perf_counter()
        x = student_view(image, cfg).unsqueeze(0).to(device)
        with torch.no_grad(), autocast(device):
            model(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds += time.perf_counter() - started
    return 1000 * seconds / max(1, n)


def temperature_of(checkpoint: Path | None) -> float:
    """The temperature stored with a checkpoint (1.0: none, a checkpoint made before
    calibration)."""
    if checkpoint is None:
        return 1.0
    return float(read_metadata(checkpoint).get("temperature", 1.0))


def evaluate_fold(
    ctx: RunContext,
    k: int,
    test_idx: np.ndarray,
    spec: EvaluateSpec,
    crop_models: tuple[torch.nn.Module, torch.nn.Module],
    checkpoints: Mapping[str, Path],
    rois: RoiResult | None,
) -> FoldResult:
    """Every row's metrics on the held-out fold ``k`` (never seen in training or selection):
    the teacher on crops, each ``spec.rows`` model (``checkpoints[role]``) on full images and,
    given ``rois`` (a learned provider's boxes), the two-stage pipeline: the provider's crops
    classified by the second of ``crop_models = (teacher, two-stage classifier)``."""
    teacher, classifier = crop_models
    device, n_classes = ctx.device, ctx.num_classes
    loader = ctx.loaders(test_idx, False, spec.batch_size, seed=k)
    result = FoldResult(fold=k, n_test=len(test_idx), metrics={})

    def add(row: str, labels: np.ndarray, logits: np.ndarray, role: str | None) -> None:
        predicted = logits.argmax(1)
        result.metrics[row] = classification_metrics(labels, predicted, n_classes, ctx.ordinal)
        result.confusion[row] = confusion(labels, predicted, n_classes).tolist()
        result.predictions[row] = predicted.tolist()
        # calibration: the temperature fitted on the validation split of the row's model
        t = temperature_of(checkpoints.get(role) if role else None)
        calibration = row_calibration(logits, labels, t)
        result.metrics[row].update({k: calibration[k] for k in ("ece", "ece_calibrated")})
        result.predictions.setdefault("logits", {})[row] = logits.tolist()
        result.predictions.setdefault("temperature", {})[row] = t

    logits, labels, indices = predict_logits(teacher, loader, "crop", device)
    result.predictions["index"] = indices.tolist()
    result.predictions["label"] = labels.tolist()
    # what the bootstrap resamples: the groups folds keep whole (None: the sample alone)
    groups = ctx.groups or [s.group for s in ctx.samples]
    result.predictions["group"] = [groups[int(i)] for i in indices]
    add(TEACHER_CROP, labels, logits, spec.teacher)

    cams: dict[str, np.ndarray] = {}
    boxes = None
    for row, role in spec.rows:
        model = load_model(checkpoints[role], device)[0]
        logits, labels, _ = predict_logits(model, loader, "image", device)
        add(row, labels, logits, role)
        if row == STUDENT:  # what kd predict gives with --no-calibrated, and by default
            z = torch.from_numpy(logits)
            t = result.predictions["temperature"][row]
            result.predictions[RAW] = probabilities_of(z, 1.0).tolist()
            result.predictions[CALIBRATED] = probabilities_of(z, t).tolist()
            result.latency_ms[STUDENT] = student_latency_ms(
                model, ctx.samples, test_idx, ctx.view, device
            )
        cams[row], boxes, grid = cams_of(model, loader, device)
        hits: list[bool] = []
        shape = cams[row].shape[1:]
        result.metrics[row].update(
            attention_metrics(list(cams[row]), list(boxes), image_shape=shape, hits=hits)
        )
        if grid is not None:
            result.metrics[row]["pointing_ceiling"] = pointing_ceiling(list(boxes), grid, shape)
        # per held-out sample, in predictions["index"] order (for paired tests)
        result.predictions.setdefault("pointing", {})[row] = [int(h) for h in hits]

    if rois is not None:
        logits, crop_ms = two_stage_logits(
            classifier, ctx.samples, test_idx, rois, ctx.view, device
        )
        add(TWO_STAGE, labels, logits, spec.two_stage_model)
        # the provider's own per-image time (a detector's), measured on held-out images
        detector_ms = rois.metrics.get("latency_ms")
        if detector_ms is not None:
            result.latency_ms[TWO_STAGE] = float(detector_ms) + crop_ms
            result.latency_ms["two_stage_detector"] = float(detector_ms)
        result.latency_ms["two_stage_crop"] = crop_ms

    n = min(spec.cam_examples, len(test_idx))
    if n and boxes is not None:
        images = torch.stack([loader.dataset[j]["image"] for j in range(n)]).numpy()
        np.savez_compressed(
            ctx.paths.cams(k),
            images=images,
            boxes=boxes[:n],
            labels=labels[:n],
            **{row: cam[:n] for row, cam in cams.items()},
        )
    return result
