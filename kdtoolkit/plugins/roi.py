"""The ROI-provider interface: where is the region of interest in each full image?

Per fold the engine builds the provider with its ``[roi]`` options, calls
``run_provider(provider, request, name, plugin)`` (``provide`` plus ``check_roi_result``) and
uses the boxes for the student's ROI masks and, for a ``learned`` provider, the two-stage
baseline on held-out images.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from kdtoolkit.errors import KdError, suggestion
from kdtoolkit.plugins.isolation import torch_state
from kdtoolkit.plugins.registry import PluginError

#: How far (pixels) a returned ROI may stick out of its image, as in a manifest.
BOUNDS_TOLERANCE = 0.5
KIND = "ROI provider"


def _no_attribute(obj: object, name: str) -> AttributeError:
    """An AttributeError that lists the dataclass's fields (and a close match)."""
    names = [f.name for f in fields(obj)]  # type: ignore[arg-type]
    return AttributeError(
        f"{type(obj).__name__!r} object has no attribute {name!r}{suggestion(name, names)}; "
        f"its fields are {', '.join(names)} (docs/plugins.md)"
    )


@dataclass
class RoiRequest:
    """One fold's request to an ROI provider.

    ``fold``: the fold number (0-based). ``samples``: the whole manifest, a list of
    ``kdtoolkit.Sample`` (``samples[i].image`` path, ``.width``/``.height`` pixels, ``.box``
    x0 y0 x1 y1 or None, ``.angle``, ``.label``, ``.group``, ...); index it with the two arrays:
    ``train`` (int64, the fold's training part: the only samples a provider may learn from, their
    boxes included) and ``predict`` (int64, every sample that needs a box, training ones
    included). ``workdir``: the provider's own folder in the run folder (created; write only
    there). ``device``: "cpu", "cuda", "cuda:N" or "mps". ``seed``: the fold's seed.
    ``log(line)``: write a line to the run log.
    """

    fold: int
    samples: list[Any]
    train: np.ndarray
    predict: np.ndarray
    workdir: Path
    device: str = "cpu"
    seed: int = 0
    log: Callable[[str], None] = print

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        raise _no_attribute(self, name)


@dataclass
class RoiResult:
    """Boxes for ``request.predict``, row ``i`` for sample ``request.predict[i]``.

    ``boxes``: float array N×4 (N = ``len(request.predict)``), ``x0, y0, x1, y1`` in full-image
    pixels (x right, y down, x0 < x1, y0 < y1), the ROI before its rotation; ``angles``: float
    array (N,), degrees counter-clockwise about the box centre (0 for axis-aligned boxes; see
    ``kdtoolkit.data.geometry``); the rotated ROI lies inside its image. ``found``: bool array
    (N,), False where the provider found nothing and returned its fallback box. ``metrics``:
    ``{name: float}`` reported in results.json (e.g. held-out detection mAP; ``latency_ms``:
    milliseconds per image, added to the two-stage latency). All NumPy arrays, finite.
    """

    boxes: np.ndarray
    angles: np.ndarray
    found: np.ndarray
    metrics: dict[str, float] = field(default_factory=dict)


class RoiProvider:
    """Base class: subclasses take their recipe options as ``__init__`` keyword arguments and
    implement ``provide``. ``learned`` providers are fitted per fold on training images only
    (their held-out boxes make the two-stage baseline); ``oriented`` ones predict the ROI's
    angle (else their angles are 0, and the two-stage row uses a classifier trained on
    axis-aligned crops, see ``kdtoolkit.engine.plan.two_stage_spec``)."""

    learned: bool = False
    oriented: bool = False

    def provide(self, request: RoiRequest) -> RoiResult:  # pragma: no cover - interface
        raise NotImplementedError


def _array(value: Any, what: str, shape: tuple[int, ...], kinds: str) -> str | None:
    """The problem of one ``RoiResult`` array, or None."""
    if not isinstance(value, np.ndarray):
        return f"{what} must be a NumPy array of shape {shape}, got {type(value).__name__}"
    if value.shape != shape:
        return (
            f"{what} has shape {value.shape}, expected {shape} "
            f"(one row per index of request.predict, in its order)"
        )
    if value.dtype.kind not in kinds:
        return f"{what} has dtype {value.dtype}, expected {'bool' if kinds == 'b' else 'float'}"
    if value.dtype.kind == "f" and not np.isfinite(value).all():
        row = int(np.argwhere(~np.isfinite(value))[0][0])
        return f"{what} is not finite at row {row}"
    return None


def _corners(boxes: np.ndarray, angles: np.ndarray) -> np.ndarray:
    """(N, 4, 2) corners of the rotated ROIs (``kdtoolkit.data.geometry.roi_corners``)."""
    cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
    hw, hh = (boxes[:, 2] - boxes[:, 0]) / 2, (boxes[:, 3] - boxes[:, 1]) / 2
    a = np.radians(angles)
    c, s = np.cos(a)[:, None], np.sin(a)[:, None]
    dx = np.stack([-hw, hw, hw, -hw], 1)
    dy = np.stack([-hh, -hh, hh, hh], 1)
    return np.stack([cx[:, None] + dx * c + dy * s, cy[:, None] - dx * s + dy * c], -1)


def _geometry(boxes: np.ndarray, angles: np.ndarray, request: RoiRequest) -> str | None:
    bad = np.flatnonzero((boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1]))
    if bad.size:
        i = int(bad[0])
        return f"box {boxes[i].tolist()} (row {i}) is empty: expected x0 < x1 and y0 < y1"
    samples = [request.samples[int(j)] for j in request.predict]
    if not all(hasattr(s, "width") and hasattr(s, "height") for s in samples):
        return None
    size = np.array([[s.width, s.height] for s in samples], dtype=np.float64)
    corners = _corners(boxes, angles)
    tol = BOUNDS_TOLERANCE
    out = (corners < -tol).any((1, 2)) | (corners > size[:, None, :] + tol).any((1, 2))
    if out.any():
        i = int(np.flatnonzero(out)[0])
        w, h = int(size[i, 0]), int(size[i, 1])
        return (
            f"ROI {boxes[i].tolist()} at {float(angles[i]):g}° (row {i}, image "
            f"{getattr(samples[i], 'image', '?')}) is outside its {w}x{h} image"
        )
    return None


def roi_result_problem(result: Any, request: RoiRequest) -> str | None:
    """What is wrong with a provider's ``result`` for ``request``, or None."""
    if not isinstance(result, RoiResult):
        return f"provide() must return a RoiResult, got {type(result).__name__}"
    n = len(request.predict)
    problem = (
        _array(result.boxes, "boxes", (n, 4), "fiu")
        or _array(result.angles, "angles", (n,), "fiu")
        or _array(result.found, "found", (n,), "b")
    )
    if problem:
        return problem
    if not isinstance(result.metrics, dict):
        return f"metrics must be a dict of floats, got {type(result.metrics).__name__}"
    for key, value in result.metrics.items():
        ok = isinstance(value, int | float | np.floating | np.integer) and not isinstance(
            value, bool
        )
        if not isinstance(key, str) or not ok or not math.isfinite(float(value)):
            return f"metrics[{key!r}] must be a finite number, got {value!r}"
    if "latency_ms" in result.metrics and not float(result.metrics["latency_ms"]) > 0:
        return "metrics['latency_ms'] must be > 0 (ms per image); leave it out when not measured"
    return _geometry(result.boxes.astype(np.float64), result.angles.astype(np.float64), request)


def check_roi_result(
    result: Any, request: RoiRequest, provider: str, plugin: str = ""
) -> RoiResult:
    """``result`` with float64 boxes and angles, bool ``found`` and float metrics, after
    checking it against ``request``; else a one-line ``PluginError`` naming the provider, its
    plugin, the fold and the problem."""
    problem = roi_result_problem(result, request)
    if problem:
        raise PluginError(KIND, provider, plugin, problem, f"fold {request.fold}")
    return RoiResult(
        boxes=result.boxes.astype(np.float64),
        angles=result.angles.astype(np.float64),
        found=result.found.astype(bool),
        metrics={k: float(v) for k, v in result.metrics.items()},
    )


def run_provider(
    provider: RoiProvider, request: RoiRequest, name: str, plugin: str = ""
) -> RoiResult:
    """``provider.provide(request)`` inside ``torch_state`` (the torch settings it changes are
    restored), checked (``check_roi_result``). An exception from the
    provider's code becomes a ``PluginError`` naming the provider, its plugin and the fold
    (the original is its ``__cause__``, shown with ``KD_DEBUG=1``); its own ``KdError`` (a
    deliberate message to the user) passes unchanged."""
    try:
        with torch_state():  # what the provider's code sets process-wide stays with it
            result = provider.provide(request)
    except (KdError, MemoryError):
        raise
    except Exception as exc:
        raise PluginError.wrap(exc, KIND, name, plugin, f"fold {request.fold}") from exc
    return check_roi_result(result, request, name, plugin)
