"""Serving latency of a trained student against the two-stage pipeline (detector + crop +
teacher), across runtimes and batch sizes, measured side by side in one run.

    python benchmarks/latency.py RUN_DIR [--fold 0] [--batch 1 --batch 8 --batch 32]
        [--runtime eager --runtime compile --runtime torchscript --runtime onnxruntime]
        [--warmup 3] [--iters 20] [--device auto] [--markdown]

Both pipelines start from decoded images in memory (file decoding is not counted, as in the
report) and end with probabilities on the CPU:

- student: letterbox + normalise each image, stack, the student;
- two-stage: the run's detector (``fold_K/roi/train/weights/best.pt``; without one, e.g. for
  manual boxes, an untrained ``--detector`` of the same kind: speed, not accuracy) on the
  batch, each image's best box cropped and resized as the teacher's crop, the teacher.

Runtimes of the classifiers (the detector is always ultralytics' PyTorch model): ``eager``
(``KdModel``'s network and probabilities), ``compile`` (``torch.compile`` of it, compiled for
each batch size during the warm-up), ``torchscript`` and ``onnxruntime`` (the files ``kd
export`` writes, parity-checked, loaded as a server would). fp32 throughout. Each row: after
``--warmup`` untimed calls, ``--iters`` timed calls; p50 and p95 of the per-call time (ms),
images/s over all timed calls, and the ratio of its p50 to the eager student's at that batch.
"""

from __future__ import annotations

import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch
import typer
from rich.console import Console
from rich.table import Table

from kdtoolkit import KdModel, export_model
from kdtoolkit.builtin.yolo.session import ultralytics_session
from kdtoolkit.data.imageio import load_image
from kdtoolkit.data.view import crop_roi, normalise, student_view
from kdtoolkit.engine.export_module import ServingModule
from kdtoolkit.fileio import read_json
from kdtoolkit.models.device import resolve_device
from kdtoolkit.serving.runtimes import load_runtime

RUNTIMES = ("eager", "compile", "torchscript", "onnxruntime")
Classifier = Callable[[torch.Tensor], np.ndarray]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def classifier(
    kd: KdModel, checkpoint: Path, runtime: str, scratch: Path, device: torch.device
) -> Classifier:
    """A batch (N×C×H×W, normalised, CPU) → probabilities (numpy) in ``runtime``."""
    if runtime in ("eager", "compile"):
        module = ServingModule(kd).eval().to(device)
        if runtime == "compile":
            module = torch.compile(module)

        def run(x: torch.Tensor) -> np.ndarray:
            with torch.inference_mode():
                return module(x.to(device)).float().cpu().numpy()

        return run
    fmt = {"torchscript": "torchscript", "onnxruntime": "onnx"}[runtime]
    suffix = {"torchscript": ".pt", "onnx": ".onnx"}[fmt]
    folder = scratch / f"{kd.metadata['role']}-{fmt}"
    result = export_model(checkpoint, folder / f"model{suffix}", fmt)  # parity-checked
    served = load_runtime(result.path, fmt)
    return lambda x: served(x.numpy())[0]


def detector_for(run: Path, fold: int, fallback: str, ultralytics: Any) -> tuple[Any, str]:
    """The fold's trained YOLO detector, else an untrained ``fallback`` model YAML."""
    best = run / f"fold_{fold}" / "roi" / "train" / "weights" / "best.pt"
    if best.is_file():
        return ultralytics.YOLO(str(best)), f"trained detector {best.relative_to(run)}"
    return ultralytics.YOLO(fallback), f"untrained {fallback} (no detector in the run)"


def timed(call: Callable[[], Any], warmup: int, iters: int, device: torch.device) -> np.ndarray:
    """Seconds of each of ``iters`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        call()
    sync(device)
    out = []
    for _ in range(iters):
        started = time.perf_counter()
        call()
        sync(device)
        out.append(time.perf_counter() - started)
    return np.array(out)


def main(
    run: Annotated[Path, typer.Argument(help="A run folder of kd run (students, teachers).")],
    fold: Annotated[int, typer.Option(help="Which fold's models and held-out images.")] = 0,
    batch: Annotated[list[int] | None, typer.Option(help="Batch sizes (repeatable).")] = None,
    runtime: Annotated[list[str] | None, typer.Option(help="Runtimes (repeatable).")] = None,
    warmup: Annotated[int, typer.Option(help="Untimed calls per row.")] = 3,
    iters: Annotated[int, typer.Option(help="Timed calls per row.")] = 20,
    imgsz: Annotated[int, typer.Option(help="Detector input size.")] = 320,
    detector: Annotated[str, typer.Option(help="Untrained detector when the run has none.")] = (
        "yolo11n.yaml"
    ),
    conf: Annotated[float, typer.Option(help="Detector confidence threshold.")] = 0.05,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N.")] = "cpu",
    markdown: Annotated[bool, typer.Option(help="Also print a Markdown table.")] = False,
) -> None:
    batches = batch or [1, 8, 32]
    runtimes = runtime or list(RUNTIMES)
    dev = resolve_device(device)
    folder = run / f"fold_{fold}"
    checkpoints = {role: folder / role / "model.safetensors" for role in ("student", "teacher")}
    student = KdModel.load(checkpoints["student"], "cpu")
    teacher = KdModel.load(checkpoints["teacher"], "cpu")
    rows = read_json(run / "folds.json", "fold list", "give a run folder")["samples"]
    paths = [Path(s["image"]) for s in rows if s["fold"] == fold][: max(batches)]
    decoded = [load_image(p, student.config.channels) for p in paths]
    while len(decoded) < max(batches):
        decoded += decoded[: max(batches) - len(decoded)]
    bgr = [
        np.ascontiguousarray((np.repeat(d.mean(2, keepdims=True), 3, 2) * 255).astype(np.uint8))
        for d in decoded
    ]
    console = Console()
    results: list[dict[str, Any]] = []
    with (
        tempfile.TemporaryDirectory(prefix="kd-latency-") as tmp,
        ultralytics_session(Path(tmp) / "ultralytics") as ultralytics,
    ):
        scratch = Path(tmp)
        yolo, detector_note = detector_for(run, fold, detector, ultralytics)
        args = {"imgsz": imgsz, "conf": conf, "max_det": 100, "verbose": False, "save": False}
        args["device"] = "cpu" if dev.type == "cpu" else str(dev.index or 0)
        crop_size = teacher.config.image_size

        def two_stage(run_teacher: Classifier, n: int) -> Callable[[], np.ndarray]:
            def call() -> np.ndarray:
                found = yolo.predict(bgr[:n], batch=n, **args)
                crops = []
                for image, r in zip(decoded[:n], found, strict=True):
                    h, w = image.shape[:2]
                    boxes = r.boxes.xyxy.cpu().numpy()
                    box = tuple(boxes[0]) if len(boxes) else (w / 4, h / 4, 3 * w / 4, 3 * h / 4)
                    crop = crop_roi(image, box, 0.0, crop_size)
                    crops.append(normalise(crop, teacher.config))
                return run_teacher(torch.stack(crops))

            return call

        for name in runtimes:
            started = time.perf_counter()
            models = {
                "student": classifier(student, checkpoints["student"], name, scratch, dev),
                "two-stage": classifier(teacher, checkpoints["teacher"], name, scratch, dev),
            }
            console.print(
                f"{name}: ready in {time.perf_counter() - started:.1f} s", highlight=False
            )
            for n in batches:
                run_student = models["student"]
                calls = {
                    "student": lambda n=n, f=run_student: f(
                        torch.stack([student_view(d, student.config) for d in decoded[:n]])
                    ),
                    "two-stage": two_stage(models["two-stage"], n),
                }
                for pipeline, call in calls.items():
                    seconds = timed(call, warmup, iters, dev)
                    results.append(
                        {
                            "pipeline": pipeline,
                            "runtime": name,
                            "batch": n,
                            "p50": 1000 * float(np.percentile(seconds, 50)),
                            "p95": 1000 * float(np.percentile(seconds, 95)),
                            "ips": n * len(seconds) / float(seconds.sum()),
                        }
                    )
    base = {
        r["batch"]: r["p50"]
        for r in results
        if (r["pipeline"], r["runtime"]) == ("student", "eager")
    }
    print_table(console, results, base, markdown)
    cpu = platform.processor() or platform.machine()
    gpu = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "none"
    console.print(
        f"device {dev} (CPU {cpu}, {torch.get_num_threads()} torch threads, GPU {gpu}); "
        f"student {student.metadata['backbone']} {list(student.config.image_size)}, "
        f"teacher {teacher.metadata['backbone']} {list(crop_size)}; {detector_note}, imgsz "
        f"{imgsz}; warm-up {warmup}, {iters} timed calls per row; torch {torch.__version__}",
        highlight=False,
    )


def print_table(console: Console, results: list[dict], base: dict[int, float], markdown: bool):
    table = Table(title="serving latency (ms per call), images/s, p50 ratio to the eager student")
    for column in ("pipeline", "runtime", "batch", "p50 ms", "p95 ms", "images/s", "× student"):
        table.add_column(column, justify="left" if column in ("pipeline", "runtime") else "right")
    lines = ["| pipeline | runtime | batch | p50 ms | p95 ms | images/s | × eager student |"]
    lines.append("|---|---|--:|--:|--:|--:|--:|")
    for r in sorted(results, key=lambda r: (r["pipeline"] != "student", r["batch"])):
        ratio = f"{r['p50'] / base[r['batch']]:.2f}" if r["batch"] in base else "-"
        cells = [
            r["pipeline"],
            r["runtime"],
            str(r["batch"]),
            f"{r['p50']:.1f}",
            f"{r['p95']:.1f}",
            f"{r['ips']:.1f}",
            ratio,
        ]
        table.add_row(*cells)
        lines.append("| " + " | ".join(cells) + " |")
    console.print(table)
    if markdown:
        print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(typer.run(main))
