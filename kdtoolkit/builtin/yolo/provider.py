"""The ``yolo`` ROI provider: an ultralytics YOLO detector trained per fold on the fold's
training boxes only, then run on every image.

Per fold, in ``request.workdir``:

- ``dataset/``: the training samples as an ultralytics detection dataset (images symlinked, or
  converted to 8-bit PNG when they are 16-bit/float; one label ``0 cx cy w h`` per image, the
  axis-aligned box around the rotated expert ROI, see :func:`yolo_label`), a validation split
  carved from the training part (by ``group`` when given), and ``data.yaml`` (one class ``roi``).
- ``train/``: ultralytics' training run (``weights/best.pt``), built from a model YAML, optionally
  starting from a local ``.pt``.
- ``config/``: ultralytics' settings (``YOLO_CONFIG_DIR``); nothing goes to the user's home.

Ultralytics runs offline and quietly inside :func:`ultralytics_session`: no update checks,
analytics, font or AMP-check downloads, pip installs or hub calls, and its log lines go to
``request.log`` (warnings) instead of the terminal.

Detections are axis-aligned (angle 0). An image without a detection at ``conf`` gets the
fallback box (``mean_box``: the mean training box, in relative coordinates, scaled to the image;
``whole_image``) and ``found = False``. Metrics (:func:`detection_map`) are detection mAP@0.5 and
mAP@0.5:0.95 on the held-out images (``predict`` minus ``train``) against their expert enclosing
boxes, counting detections down to confidence 0.001 as ultralytics' validation does; plus the
mean IoU of the chosen boxes (``mean_iou``), the number of fallbacks (``n_fallback``) and the
detector's mean per-image latency (``latency_ms``: batch of one, decoded image in, boxes out,
after a warm-up; see :func:`detector_latency_ms`), which the two-stage latency adds to the
crop + teacher time.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import Annotated, Any, Literal

import numpy as np
from PIL import Image

from kdtoolkit.config.option import Range
from kdtoolkit.data.geometry import enclosing_box
from kdtoolkit.errors import KdError, suggestion
from kdtoolkit.plugins.roi import RoiProvider, RoiRequest, RoiResult

Box = tuple[float, float, float, float]

#: IoU thresholds of mAP@0.5:0.95 (COCO): 0.50, 0.55, ..., 0.95.
IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)
#: Confidence down to which detections count for mAP (as ultralytics' own validation).
MAP_CONF = 0.001
#: Head modules of the packaged model YAMLs that plain ``YOLO`` trains as detectors.
_DETECT_HEADS = {"Detect", "v10Detect"}
#: Image files ultralytics reads as they are (8-bit); anything else is converted to PNG.
_READABLE = {".bmp", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp"}
_MODES = {"1", "L", "LA", "P", "RGB", "RGBA"}
#: Settings pointed into the run folder / switched off for the duration of a session.
_OFF = ("sync", "clearml", "comet", "dvc", "mlflow", "raytune", "tensorboard", "wandb")
_OFF += ("vscode_msg", "openvino_msg")
#: Held-out images timed for ``latency_ms``, and untimed warm-up calls before them.
LATENCY_IMAGES, LATENCY_WARMUP = 16, 2


# --------------------------------------------------------------------------- geometry, metrics


def yolo_label(
    box: Box, angle: float, width: int, height: int
) -> tuple[float, float, float, float]:
    """YOLO label ``(cx, cy, w, h)``, relative to the image size, of the axis-aligned box
    around the ROI ``box`` rotated by ``angle`` (see :mod:`kdtoolkit.data.geometry`), clipped to
    the image."""
    x0, y0, x1, y1 = enclosing_box(box, angle)
    x0, x1 = np.clip([x0, x1], 0.0, width)
    y0, y1 = np.clip([y0, y1], 0.0, height)
    return (
        float((x0 + x1) / 2 / width),
        float((y0 + y1) / 2 / height),
        float((x1 - x0) / width),
        float((y1 - y0) / height),
    )


def truth_box(box: Box, angle: float, width: int, height: int) -> np.ndarray:
    """The expert box a detector should find: ``[x0, y0, x1, y1]`` around the rotated ROI,
    clipped to the image (the pixel form of :func:`yolo_label`)."""
    cx, cy, w, h = yolo_label(box, angle, width, height)
    return np.array(
        [(cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width, (cy + h / 2) * height]
    )


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
    detections: Sequence[tuple[int, float, Sequence[float]]], truth: dict[int, Sequence[float]]
) -> tuple[float, float]:
    """``(mAP@0.5, mAP@0.5:0.95)`` of ``detections`` ``(image id, score, [x0, y0, x1, y1])``
    against one truth box per image (``truth``); detections on images without truth are
    ignored. See :func:`average_precision`."""
    kept = [d for d in detections if d[0] in truth]
    ids = [d[0] for d in kept]
    scores = [d[1] for d in kept]
    boxes = np.array([d[2] for d in kept], float).reshape(-1, 4)
    gts = np.array([truth[i] for i in ids], float).reshape(-1, 4)
    ious = box_iou(boxes, gts)
    aps = [average_precision(ids, scores, ious, len(truth), t) for t in IOU_THRESHOLDS]
    return aps[0], float(np.mean(aps))


# --------------------------------------------------------------------------- configuration


def ultralytics_device(device: str) -> str:
    """A torch device name (``cpu``, ``cuda``, ``cuda:1``, ``mps``) in ultralytics' form
    (``cpu``, ``0``, ``1``, ``mps``)."""
    device = str(device).strip().lower()
    if device == "cuda":
        return "0"
    if device.startswith("cuda:"):
        return device.removeprefix("cuda:")
    return device


def _models_dir() -> Path | None:
    """ultralytics' packaged ``cfg/models`` folder, found without importing ultralytics."""
    spec = importlib.util.find_spec("ultralytics")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "cfg" / "models"


def _unscaled(name: str) -> str:
    """ultralytics' scale rule: ``yolo11n.yaml`` is ``yolo11.yaml`` at scale ``n``."""
    return re.sub(r"(\d+)([nslmx])(.+)?$", r"\1\3", name)


def _read_yaml(path: Path) -> dict[str, Any]:
    import yaml  # an ultralytics dependency

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise KdError(f"yolo model {str(path)!r}: unreadable YAML ({exc})") from None
    return data if isinstance(data, dict) else {}


def _head(data: dict[str, Any]) -> str | None:
    try:
        return str(data["head"][-1][2])
    except (KeyError, IndexError, TypeError):
        return None


def packaged_detect_models() -> list[str]:
    """Names of ultralytics' packaged detection model YAMLs, with their scales
    (``yolo11n.yaml`` … ``yolo11x.yaml``, ``yolov8s-p2.yaml``, ...)."""
    folder = _models_dir()
    names = []
    for path in sorted(folder.rglob("*.yaml")) if folder else []:
        data = _read_yaml(path)
        if _head(data) not in _DETECT_HEADS:
            continue
        names.append(path.name)
        if _unscaled(path.stem) == path.stem:  # a scalable YAML: yolo11 → yolo11n, ...
            for scale in data.get("scales") or {}:
                names.append(re.sub(r"^(\D*\d+)", rf"\g<1>{scale}", path.name, count=1))
    return names


def resolve_model_yaml(model: str) -> str:
    """Check ``model`` (a packaged model YAML name or a local ``.yaml`` path) and return what
    ``ultralytics.YOLO`` should be given; raises a one-line :class:`KdError`."""
    if Path(model).suffix.lower() not in (".yaml", ".yml"):
        raise KdError(
            f"yolo model {model!r}: expected a model YAML such as 'yolo11n.yaml' "
            "(start from a .pt file with weights=...)"
        )
    path = Path(model).expanduser()
    if path.is_file() or len(path.parts) > 1:  # a local file
        unscaled = path.with_name(_unscaled(path.name))
        found = path if path.is_file() else unscaled if unscaled.is_file() else None
        if found is None:
            raise KdError(f"yolo model {model!r}: no such file")
        head = _head(_read_yaml(found))
        if head not in _DETECT_HEADS:
            raise KdError(f"yolo model {model!r}: not a detection model (its head is {head})")
        return str(path.resolve())
    folder = _models_dir()
    packaged = {p.name: p for p in folder.rglob("*.yaml")} if folder else {}
    found = packaged.get(model) or packaged.get(_unscaled(model))
    if found is None:
        raise KdError(
            f"yolo model {model!r}: no such ultralytics model YAML"
            f"{suggestion(model, packaged_detect_models())} (or give a path to a .yaml file)"
        )
    head = _head(_read_yaml(found))
    if head not in _DETECT_HEADS:
        raise KdError(
            f"yolo model {model!r}: not a detection model (its head is {head}); "
            "use e.g. 'yolo11n.yaml'"
        )
    return model


def resolve_weights(weights: str | None) -> str | None:
    """Check that ``weights`` is an existing local ``.pt`` file; its absolute path."""
    if weights is None:
        return None
    path = Path(weights).expanduser()
    if path.suffix.lower() != ".pt":
        raise KdError(f"yolo weights {weights!r}: expected a local .pt file")
    if not path.is_file():
        raise KdError(f"yolo weights {weights!r}: no such file (nothing is downloaded)")
    return str(path.resolve())


# --------------------------------------------------------------------------- ultralytics, offline


class _Forward(logging.Filter):
    """On ultralytics' logger: warnings and errors go to ``log``, nothing to the terminal."""

    def __init__(self, log: Callable[[str], None] | None) -> None:
        super().__init__()
        self.log = log

    def filter(self, record: logging.LogRecord) -> bool:
        if self.log is not None and record.levelno >= logging.WARNING:
            message = record.getMessage().strip()
            if message:
                self.log(f"yolo: {message.splitlines()[0]}")
        return False


@contextlib.contextmanager
def _environ(**values: str | None) -> Iterator[None]:
    """Set (a value) or unset (None) environment variables for the block, then restore."""

    def apply(items: dict[str, str | None]) -> None:
        for k, v in items.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v

    saved = {k: os.environ.get(k) for k in values}
    try:
        apply(values)
        yield
    finally:
        apply(saved)


def _patch(stack: contextlib.ExitStack, obj: Any, name: str, value: Any) -> None:
    """``obj.name = value`` until ``stack`` closes (skipped when ``obj`` has no ``name``)."""
    if not hasattr(obj, name):
        return
    stack.callback(setattr, obj, name, getattr(obj, name))
    setattr(obj, name, value)


@contextlib.contextmanager
def ultralytics_session(
    folder: Path, log: Callable[[str], None] | None = None
) -> Iterator[ModuleType]:
    """Import ultralytics and keep it offline, quiet and inside ``folder`` for the block.

    - First import: ``YOLO_CONFIG_DIR=folder/config`` (so its ``settings.json`` is created
      there, not in the home folder), ``YOLO_OFFLINE`` (no DNS probe), ``YOLO_AUTOINSTALL=0``.
    - For the block: its settings file is ``folder/config/Ultralytics/settings.json`` with
      ``datasets_dir``/``weights_dir``/``runs_dir`` inside ``folder`` and ``sync`` and every
      integration off; ``ONLINE`` and auto-install are off (no update check, analytics, pip);
      the font check (an ``Arial.ttf`` download) is a no-op; ``ULTRALYTICS_API_KEY`` is hidden
      (no Platform streaming); requirement checks are skipped; its logger is silenced, with
      warnings passed to ``log``.

    Everything is restored afterwards, except the import-time directory, which stays the
    first session's ``folder/config/Ultralytics``. Yields the ``ultralytics`` module.
    """
    folder = Path(folder).resolve()
    config = folder / "config"
    config.mkdir(parents=True, exist_ok=True)
    ul_logger = logging.getLogger("ultralytics")
    with contextlib.ExitStack() as stack:
        stack.enter_context(
            _environ(
                YOLO_CONFIG_DIR=str(config),
                YOLO_OFFLINE="1",
                YOLO_AUTOINSTALL="0",
                ULTRALYTICS_SKIP_REQUIREMENTS_CHECKS="1",
                ULTRALYTICS_API_KEY=None,
            )
        )
        forward = _Forward(log)
        ul_logger.addFilter(forward)  # also silences the import's "Creating settings" lines
        stack.callback(ul_logger.removeFilter, forward)
        from PIL import Image

        pil_open = Image.open
        import ultralytics
        import ultralytics.data.utils
        import ultralytics.utils
        import ultralytics.utils.checks
        import ultralytics.utils.events
        import ultralytics.utils.plotting

        # ultralytics replaces PIL.Image.open process-wide (a HEIF fallback that tries to
        # import pi_heif on any unreadable file); keep PIL as the rest of kdtoolkit expects.
        Image.open = pil_open

        stack.callback(ul_logger.setLevel, ul_logger.level)
        ul_logger.setLevel(logging.WARNING)  # above INFO also turns progress bars off
        utils, checks = ultralytics.utils, ultralytics.utils.checks

        settings = utils.SETTINGS
        saved = dict(settings)
        for attr in ("file", "file_path"):
            _patch(stack, settings, attr, config / "Ultralytics" / "settings.json")
        stack.callback(lambda: (dict.clear(settings), dict.update(settings, saved)))
        dirs = {
            name: folder / name.removesuffix("_dir")
            for name in ("datasets_dir", "weights_dir", "runs_dir")
        }
        wanted: dict[str, Any] = {k: str(v) for k, v in dirs.items()}
        wanted |= {k: False for k in _OFF} | {"api_key": ""}
        settings.update({k: v for k, v in wanted.items() if k in settings.defaults})
        for module in (utils, ultralytics.data.utils):
            for name, path in dirs.items():
                _patch(stack, module, name.upper(), path)
        for module in (utils, checks, ultralytics.utils.events):
            _patch(stack, module, "ONLINE", False)
        for module in (utils, checks):
            _patch(stack, module, "AUTOINSTALL", False)
        _patch(stack, ultralytics.utils.events.events, "enabled", False)
        for module in (checks, ultralytics.data.utils, ultralytics.utils.plotting):
            _patch(stack, module, "check_font", lambda *args, **kwargs: None)
        yield ultralytics


# --------------------------------------------------------------------------- dataset


def _stage_image(sample: Any, folder: Path) -> Path:
    """``sample.image`` where ultralytics can read it: a symlink (or copy) in ``folder``, or
    an 8-bit PNG (min–max scaled) when the image is 16-bit, 32-bit or float."""
    source = Path(sample.image)
    stem = f"{int(sample.index):06d}"
    folder.mkdir(parents=True, exist_ok=True)
    with Image.open(source) as im:
        if im.mode.startswith("I") or im.mode == "F":  # 16/32-bit integer or float grey
            arr = np.asarray(im, dtype=np.float64)
            lo, hi = float(arr.min()), float(arr.max())
            arr = (arr - lo) / (hi - lo) * 255 if hi > lo else np.zeros_like(arr)
            target = folder / f"{stem}.png"
            Image.fromarray(np.round(arr).astype(np.uint8)).save(target)
            return target
        if im.mode not in _MODES or source.suffix.lower() not in _READABLE:
            target = folder / f"{stem}.png"
            im.convert("RGB").save(target)
            return target
    target = folder / f"{stem}{source.suffix.lower()}"
    target.unlink(missing_ok=True)
    try:
        target.symlink_to(source.resolve())
    except OSError:  # e.g. no symlink rights on Windows
        shutil.copyfile(source, target)
    return target


def split_validation(samples: Sequence[Any], fraction: float, seed: int) -> tuple[list, list]:
    """``(train, val)``: about ``fraction`` of ``samples`` for validation, whole groups at a
    time (a sample without ``group`` is its own group). With ``fraction == 0`` or a single
    group, validation reuses the training samples."""
    groups: dict[str, list] = {}
    for s in samples:
        groups.setdefault(s.group if s.group is not None else f"#{s.index}", []).append(s)
    if fraction <= 0 or len(groups) < 2:
        return list(samples), list(samples)
    keys = sorted(groups)
    np.random.default_rng(seed).shuffle(keys)
    target = max(1, round(fraction * len(samples)))
    val: list = []
    for taken, key in enumerate(keys, 1):
        if len(val) >= target or taken == len(keys):
            break
        val += groups[key]
    held = {id(s) for s in val}
    return [s for s in samples if id(s) not in held], val


def write_dataset(
    folder: Path, train: Sequence[Any], val: Sequence[Any]
) -> tuple[Path, dict[int, Path]]:
    """An ultralytics detection dataset in ``folder``: ``images/{train,val}``,
    ``labels/{train,val}`` and ``data.yaml``; returns the YAML and each sample's staged image."""
    staged: dict[int, Path] = {}
    for split, samples in (("train", train), ("val", val)):
        images, labels = folder / "images" / split, folder / "labels" / split
        labels.mkdir(parents=True, exist_ok=True)
        for s in samples:
            image = _stage_image(s, images)
            staged.setdefault(int(s.index), image)
            cx, cy, w, h = yolo_label(*_roi(s))
            (labels / f"{image.stem}.txt").write_text(f"0 {cx:.6f} {cy:.6f} {w:.6f} {h:.6f}\n")
    data = folder / "data.yaml"
    data.write_text(
        f"path: {json.dumps(str(folder.resolve()))}\n"
        "train: images/train\nval: images/val\nnc: 1\nnames:\n  0: roi\n",
        encoding="utf-8",
    )
    return data, staged


# --------------------------------------------------------------------------- provider


class YoloProvider(RoiProvider):
    """A YOLO detector trained per fold on the training boxes (see the module docstring).

    ``model``: an ultralytics model YAML name (``yolo11n.yaml``) or a local ``.yaml`` path,
    built from scratch unless ``weights`` names a local ``.pt`` to start from. ``conf``: the
    lowest confidence accepted as a detection. ``val_fraction``: share of the training part
    held back to validate (and pick the best epoch). ``workers``: data-loader processes on
    CUDA (ultralytics uses 0 on CPU).
    """

    learned = True

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
        if _models_dir() is None:
            raise KdError(
                "the yolo ROI provider needs ultralytics, which is not installed "
                '(pip install ultralytics), or use roi.provider = "manual"'
            )
        self.model = resolve_model_yaml(model)
        self.weights = resolve_weights(weights)
        self.epochs, self.imgsz, self.batch, self.patience = epochs, imgsz, batch, patience
        self.conf, self.val_fraction, self.fallback = conf, val_fraction, fallback
        self.workers = workers

    def provide(self, request: RoiRequest) -> RoiResult:
        workdir, log = Path(request.workdir).resolve(), request.log
        tag = f"yolo fold {request.fold}"
        train = [request.samples[int(i)] for i in request.train]
        boxed = [s for s in train if s.box is not None]
        if not boxed:
            raise KdError(f"{tag}: the yolo ROI provider needs training images with boxes")
        if len(boxed) < len(train):
            log(f"{tag}: {len(train) - len(boxed)} training images without a box left out")
        for stale in ("dataset", "predict"):  # from an interrupted earlier attempt
            shutil.rmtree(workdir / stale, ignore_errors=True)
        fit, val = split_validation(boxed, self.val_fraction, request.seed)
        data, staged = write_dataset(workdir / "dataset", fit, val)
        log(f"{tag}: training {self.model} on {len(fit)} images, validating on {len(val)}")
        mean_label = np.mean([yolo_label(*_roi(s)) for s in boxed], axis=0)

        predict = [request.samples[int(i)] for i in request.predict]
        pending = [s for s in predict if int(s.index) not in staged]
        staged |= {int(s.index): _stage_image(s, workdir / "predict") for s in pending}

        in_train = {int(i) for i in request.train}
        unseen = [staged[int(s.index)] for s in predict if int(s.index) not in in_train]
        timed = (unseen or [staged[int(s.index)] for s in predict])[:LATENCY_IMAGES]
        with ultralytics_session(workdir, log) as ultralytics:
            detections, latency = self._fit_predict(
                ultralytics, request, workdir, data, predict, staged, timed
            )

        boxes = np.zeros((len(predict), 4))
        found = np.zeros(len(predict), dtype=bool)
        for k, (s, dets) in enumerate(zip(predict, detections, strict=True)):
            best = max(dets, key=lambda d: d[0], default=None)
            if best is not None and best[0] >= self.conf:
                boxes[k], found[k] = best[1], True
            elif self.fallback == "whole_image":
                boxes[k] = (0, 0, s.width, s.height)
            else:  # the mean training label, scaled to this image
                cx, cy, w, h = mean_label
                scale = np.array([s.width, s.height, s.width, s.height])
                boxes[k] = np.array([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]) * scale

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
            truth = {k: truth_box(*_roi(predict[k])) for k in held}
            flat = [(k, score, box) for k in held for score, box in detections[k]]
            metrics["map50"], metrics["map50_95"] = detection_map(flat, truth)
            ious = box_iou(boxes[held], np.array([truth[k] for k in held]))
            metrics["mean_iou"] = float(ious.mean())
            log(
                f"{tag}: held-out mAP50 {metrics['map50']:.3f}, mAP50-95 "
                f"{metrics['map50_95']:.3f}, mean IoU {metrics['mean_iou']:.3f} ({len(held)} "
                f"images); {int(metrics['n_fallback'])} of {len(predict)} images fell back"
            )
        return RoiResult(boxes=boxes, angles=np.zeros(len(predict)), found=found, metrics=metrics)

    def _fit_predict(
        self,
        ultralytics: ModuleType,
        request: RoiRequest,
        workdir: Path,
        data: Path,
        predict: list[Any],
        staged: dict[int, Path],
        timed: list[Path],
    ) -> tuple[list[list[tuple[float, np.ndarray]]], float | None]:
        """Train on ``data``; return each ``predict`` image's ``(score, box)`` detections and
        the mean per-image latency (ms) on the ``timed`` images (None when there are none)."""
        import torch

        device = ultralytics_device(request.device)
        cuda = device not in ("cpu", "mps")
        # AMP: ultralytics' fp16 check downloads yolo26n.pt; bf16 (or fp32) skips the check.
        amp: bool | str = "bf16" if cuda and torch.cuda.is_bf16_supported() else False
        model = ultralytics.YOLO(self.model, task="detect")
        if self.weights:
            model.load(self.weights)
        _EpochLog(request.log, request.fold).attach(model)
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
        detector = ultralytics.YOLO(str(best), task="detect")
        sources = [str(staged[int(s.index)]) for s in predict]
        out: list[list[tuple[float, np.ndarray]]] = []
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
            for r in results:
                xyxy = r.boxes.xyxy.cpu().numpy().astype(float)
                scores = r.boxes.conf.cpu().numpy().astype(float)
                out.append(list(zip(scores.tolist(), xyxy, strict=True)))
        run_args = {"project": str(workdir), "name": "predict_run", "exist_ok": True}
        latency = detector_latency_ms(detector, timed, self.imgsz, device, self.conf, **run_args)
        del detector
        if cuda:
            torch.cuda.empty_cache()
        return out, latency


def _roi(s: Any) -> tuple[Box, float, int, int]:
    return s.box, s.angle, s.width, s.height


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
            r.boxes.xyxy.cpu()  # waits for the device
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

    def __init__(self, log: Callable[[str], None], fold: int) -> None:
        self.log, self.fold, self.training = log, fold, False

    def attach(self, model: Any) -> None:
        model.add_callback("on_train_epoch_start", self.epoch_start)
        model.add_callback("on_fit_epoch_end", self.fit_epoch_end)

    def epoch_start(self, trainer: Any) -> None:
        self.training = True

    def fit_epoch_end(self, trainer: Any) -> None:
        map50 = float((trainer.metrics or {}).get("metrics/mAP50(B)", float("nan")))
        if not self.training:
            self.log(f"yolo fold {self.fold}: best weights, val mAP50 {map50:.3f}")
            return
        self.training = False
        loss = trainer.tloss
        if isinstance(loss, dict):  # ultralytics 8.4: {name: mean loss}
            loss = sum(float(v) for v in loss.values())
        loss = float("nan") if loss is None else float(loss.sum() if hasattr(loss, "sum") else loss)
        epoch = f"{trainer.epoch + 1}/{trainer.epochs}"
        self.log(f"yolo fold {self.fold}: epoch {epoch}, loss {loss:.3f}, val mAP50 {map50:.3f}")


__all__ = [
    "YoloProvider",
    "average_precision",
    "box_iou",
    "detection_map",
    "detector_latency_ms",
    "packaged_detect_models",
    "resolve_model_yaml",
    "resolve_weights",
    "split_validation",
    "truth_box",
    "ultralytics_device",
    "ultralytics_session",
    "write_dataset",
    "yolo_label",
]
