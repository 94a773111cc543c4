"""The ROI-provider interface: where is the region of interest in each full image?"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


@dataclass
class RoiRequest:
    """One fold's request to an ROI provider.

    ``samples`` is the whole manifest (``kdtoolkit.data.manifest.Sample`` list); a provider may
    learn only from ``samples[i]`` for ``i in train`` (the fold's training part) and must
    return a box for every index in ``predict``. ``workdir`` is the provider's folder inside
    the run folder; everything it writes goes there.
    """

    fold: int
    samples: list[Any]
    train: np.ndarray
    predict: np.ndarray
    workdir: Path
    device: str = "cpu"
    seed: int = 0
    log: Callable[[str], None] = print


@dataclass
class RoiResult:
    """Boxes for ``request.predict``, in the same order, in full-image pixels.

    ``boxes`` (N×4, x0 y0 x1 y1) with ``angles`` (N, degrees, see ``kdtoolkit.data.geometry``);
    ``found[i]`` is False where the provider found nothing and used its fallback.
    ``metrics`` are reported in results.json (e.g. detection mAP on held-out images).
    """

    boxes: np.ndarray
    angles: np.ndarray
    found: np.ndarray
    metrics: dict[str, float] = field(default_factory=dict)


class RoiProvider:
    """Base class: subclasses take their recipe options as ``__init__`` keyword arguments and
    implement ``provide``. ``learned`` providers are fitted per fold on training images only."""

    learned: bool = False

    def provide(self, request: RoiRequest) -> RoiResult:  # pragma: no cover - interface
        raise NotImplementedError
