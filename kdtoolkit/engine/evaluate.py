"""Held-out evaluation of one fold's models, and the run's results, figures and report."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from kdtoolkit.data.view import crop_roi, load_image, normalise, student_view
from kdtoolkit.engine.device import autocast
from kdtoolkit.engine.train import predict_logits
from kdtoolkit.models.gradcam import cam_for_images
from kdtoolkit.plugins.roi import RoiResult
from kdtoolkit.report.metrics import (
    ROWS,
    attention_metrics,
    classification_metrics,
    confusion,
    gap_closure,
    summarise,
)

if TYPE_CHECKING:
    from kdtoolkit.engine.run import Runner


def _row(runner: Runner, labels: np.ndarray, logits: np.ndarray) -> dict[str, float]:
    return classification_metrics(labels, logits.argmax(1), runner.num_classes, runner.ordinal)


def cams_of(model: torch.nn.Module, loader, device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """Grad-CAMs (of the predicted class, image resolution) and student-view boxes."""
    cams, boxes = [], []
    for batch in loader:
        cams.append(cam_for_images(model, batch["image"].to(device)).float().cpu())
        boxes.append(batch["box"])
    return torch.cat(cams).numpy(), torch.cat(boxes).numpy()


def two_stage_logits(
    runner: Runner, teacher: torch.nn.Module, test_idx: np.ndarray, rois: RoiResult
) -> tuple[np.ndarray, float]:
    """Teacher logits on crops cut at the provider's boxes, with exactly the teacher's crop
    geometry, and the mean per-image crop + classify time (ms)."""
    cfg = runner.cfg
    logits, seconds = [], 0.0
    for i in test_idx:
        image = load_image(runner.samples[i].image, cfg.channels)
        started = time.perf_counter()
        crop = crop_roi(image, tuple(rois.boxes[i]), float(rois.angles[i]), cfg.crop_size)
        x = normalise(crop, cfg).unsqueeze(0).to(runner.device)
        with torch.no_grad(), autocast(runner.device):
            out = teacher(x).float().cpu()
        if runner.device.type == "cuda":
            torch.cuda.synchronize()
        seconds += time.perf_counter() - started
        logits.append(out)
    return torch.cat(logits).numpy(), 1000 * seconds / max(1, len(test_idx))


def student_latency_ms(runner: Runner, model: torch.nn.Module, test_idx: np.ndarray) -> float:
    """Mean per-image time of the student alone on a full image (batch of one)."""
    cfg = runner.cfg
    n = min(16, len(test_idx))
    seconds = 0.0
    for i in test_idx[:n]:
        image = load_image(runner.samples[i].image, cfg.channels)
        started = time.perf_counter()
        x = student_view(image, cfg).unsqueeze(0).to(runner.device)
        with torch.no_grad(), autocast(runner.device):
            model(x)
        if runner.device.type == "cuda":
            torch.cuda.synchronize()
        seconds += time.perf_counter() - started
    return 1000 * seconds / max(1, n)


def evaluate_fold(
    runner: Runner,
    k: int,
    test_idx: np.ndarray,
    teacher: torch.nn.Module,
    teacher_ckpt: Path,
    student_ckpt: Path,
    baseline_ckpt: Path | None,
    rois: RoiResult | None,
) -> dict[str, Any]:
    """Every row's metrics on the held-out fold ``k`` (never seen in training or selection)."""
    r, device = runner.recipe, runner.device
    loader = runner.loader(test_idx, False, r.student.batch_size, seed=k)
    metrics: dict[str, dict[str, float]] = {}
    matrices: dict[str, list] = {}
    predictions: dict[str, Any] = {}

    logits, labels, indices = predict_logits(teacher, loader, "crop", device)
    metrics["teacher_crop"] = _row(runner, labels, logits)
    matrices["teacher_crop"] = confusion(labels, logits.argmax(1), runner.num_classes).tolist()
    predictions["index"] = indices.tolist()
    predictions["label"] = labels.tolist()
    predictions["teacher_crop"] = logits.argmax(1).tolist()

    cams: dict[str, np.ndarray] = {}
    boxes = None
    image_models = [("student", student_ckpt)]
    if baseline_ckpt is not None:
        image_models.append(("baseline_full", baseline_ckpt))
    latency: dict[str, float] = {}
    for row, ckpt in image_models:
        model = runner.load_model(ckpt)
        logits, labels, _ = predict_logits(model, loader, "image", device)
        metrics[row] = _row(runner, labels, logits)
        matrices[row] = confusion(labels, logits.argmax(1), runner.num_classes).tolist()
        predictions[row] = logits.argmax(1).tolist()
        if row == "student":
            predictions["student_probabilities"] = torch.softmax(
                torch.from_numpy(logits), 1
            ).tolist()
            latency["student"] = student_latency_ms(runner, model, test_idx)
        cams[row], boxes = cams_of(model, loader, device)
        metrics[row].update(
            attention_metrics(list(cams[row]), list(boxes), image_shape=cams[row].shape[1:])
        )

    if rois is not None:
        logits, crop_ms = two_stage_logits(runner, teacher, test_idx, rois)
        metrics["two_stage"] = _row(runner, labels, logits)
        matrices["two_stage"] = confusion(labels, logits.argmax(1), runner.num_classes).tolist()
        predictions["two_stage"] = logits.argmax(1).tolist()
        # the provider's own per-image time (a detector's), measured on held-out images
        detector_ms = rois.metrics.get("latency_ms")
        if detector_ms is not None:
            latency["two_stage"] = float(detector_ms) + crop_ms
            latency["two_stage_detector"] = float(detector_ms)
        latency["two_stage_crop"] = crop_ms

    n = min(r.evaluate.cam_examples, len(test_idx))
    if n and boxes is not None:
        images = torch.stack([loader.dataset[j]["image"] for j in range(n)]).numpy()
        np.savez_compressed(
            runner.out / f"fold_{k}" / "cams.npz",
            images=images,
            boxes=boxes[:n],
            labels=labels[:n],
            **{row: cam[:n] for row, cam in cams.items()},
        )
    return {
        "fold": k,
        "n_test": len(test_idx),
        "metrics": metrics,
        "confusion": matrices,
        "predictions": predictions,
        "latency_ms": latency,
    }


def _history(runner: Runner, k: int) -> dict[str, list[dict]]:
    out = {}
    for role in ("teacher", "baseline_full", "student"):
        meta = runner.out / f"fold_{k}" / role / "model.json"
        if meta.exists():
            out[role] = json.loads(meta.read_text()).get("history", [])
    return out


def finish_run(runner: Runner, per_fold: dict[int, dict[str, Any]]):
    """Aggregate the folds into results.json/csv, figures and report.md."""
    from kdtoolkit.engine.run import RunResult
    from kdtoolkit.report import writer as report

    out = runner.out
    folds = [per_fold[k]["metrics"] for k in sorted(per_fold)]
    summary = summarise(folds)
    gap = gap_closure(summary)
    figures_dir = out / "figures"
    figures_dir.mkdir(exist_ok=True)
    figures: dict[str, str] = {}
    rows = [row for row in ROWS if row in summary]
    matrices = {
        row: np.sum(
            [
                np.array(per_fold[k]["confusion"][row])
                for k in per_fold
                if row in per_fold[k]["confusion"]
            ],
            axis=0,
        )
        for row in rows
    }
    report.plot_confusions(figures_dir / "confusion.png", matrices, list(runner.classes))
    figures["confusion matrices"] = "figures/confusion.png"
    model_name = runner.recipe.student.backbone
    report.plot_results_table(figures_dir / "results_table.png", summary, model_name)
    figures["results table"] = "figures/results_table.png"
    first = min(per_fold)
    report.plot_curves(figures_dir / "curves.png", _history(runner, first))
    figures[f"training curves (fold {first})"] = "figures/curves.png"
    cams_path = out / f"fold_{first}" / "cams.npz"
    if cams_path.exists():
        data = np.load(cams_path)
        if "baseline_full" in data and "student" in data:
            classes = list(runner.classes)
            report.plot_cam_pairs(
                figures_dir / "gradcam.png",
                [np.transpose(im, (1, 2, 0)) for im in data["images"]],
                list(data["baseline_full"]),
                list(data["student"]),
                list(data["boxes"]),
                [classes[int(y)] for y in data["labels"]],
            )
            figures[f"Grad-CAM, baseline vs student (fold {first})"] = "figures/gradcam.png"
    extra = {
        "gap_closure": gap,
        "classes": list(runner.classes),
        "folds_run": sorted(per_fold),
        "roi": {str(k): per_fold[k].get("roi", {}) for k in sorted(per_fold)},
        "latency_ms": _mean_latency(per_fold),
        "recipe_digest": runner.recipe.digest(),
        "models": {
            "teacher_crop": runner.recipe.teacher.backbone,
            "two_stage": f"{runner.recipe.roi.provider} → {runner.recipe.teacher.backbone}",
            "baseline_full": runner.recipe.student.backbone,
            "student": runner.recipe.student.backbone,
        },
    }
    report.write_results(out, folds, summary, extra)
    path = report.write_report(out, summary, folds, list(runner.classes), figures, extra)
    results = json.loads((out / "results.json").read_text())
    runner.progress.log(
        "gap closure: " + ("n/a" if gap is None else f"{100 * gap:.1f}%") + f"; report {path}"
    )
    return RunResult(output=out, report=path, results=results)


def _mean_latency(per_fold: dict[int, dict[str, Any]]) -> dict[str, float]:
    keys = {key for result in per_fold.values() for key in result.get("latency_ms", {})}
    return {
        key: float(
            np.mean(
                [r["latency_ms"][key] for r in per_fold.values() if key in r.get("latency_ms", {})]
            )
        )
        for key in sorted(keys)
    }
