"""Tasks: what a plugin knows about one anatomical staging problem."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: A recipe crop size agrees with ``crop_aspect`` when its width is within this fraction (or
#: one pixel) of height × crop_aspect.
ASPECT_TOLERANCE = 0.05


@dataclass(frozen=True)
class Task:
    """A staging task registered by a plugin.

    ``name``: the registered name (lower_snake_case). ``classes``/``descriptions``: ordered
    class names and one-line descriptions (same length, or no descriptions).
    ``ordinal``: classes are ordered stages (QWK and MAE are meaningful).
    ``crop_aspect``: width / height of the teacher's crop (2.0 for a 2:1 crop). A recipe naming
    the task without ``data.crop_size`` gets ``default_crop_size``: the longer side of
    ``data.image_size`` along the crop's longer side (2.0 with a 224 image: [112, 224]); a
    ``data.crop_size`` of another aspect is a validation error.
    ``defaults``: recipe values (nested dict) applied under the user's recipe.
    ``make_data``: optional built-in data source, ``make_data(out_dir, **options) -> manifest``;
    its keyword parameters are the recipe's ``[task]`` options. Used when ``data.manifest``
    is not set.
    """

    name: str
    classes: tuple[str, ...]
    descriptions: tuple[str, ...] = ()
    ordinal: bool = False
    crop_aspect: float = 1.0
    defaults: dict[str, Any] = field(default_factory=dict)
    make_data: Callable[..., Path] | None = None

    def default_crop_size(self, image_size: tuple[int, int]) -> list[int]:
        """[height, width] of the teacher crop for a student input of ``image_size`` (h, w):
        the longer side is the image's longer side, the other follows ``crop_aspect``."""
        side = max(image_size)
        if self.crop_aspect >= 1:
            return [max(8, round(side / self.crop_aspect)), side]
        return [side, max(8, round(side * self.crop_aspect))]

    def crop_problem(self, crop_size: tuple[int, int]) -> str | None:
        """Why a crop of ``crop_size`` (h, w) does not have this task's ``crop_aspect``."""
        height, width = crop_size
        expected = height * self.crop_aspect
        if abs(width - expected) <= max(1.0, ASPECT_TOLERANCE * expected):
            return None
        return (
            f"[{height}, {width}] is not the {self.crop_aspect:g}:1 (width:height) crop of task "
            f"{self.name!r}; use e.g. [{height}, {round(expected)}], or leave data.crop_size "
            "unset to derive it from data.image_size"
        )


def crop_problems(task: Task, data: Any, raw_data: Any) -> list[str]:
    """Apply ``task.crop_aspect`` to a validated ``[data]`` section (``image_size`` and
    ``crop_size``, one int or [height, width]): derive ``crop_size`` when the recipe's raw
    ``[data]`` table does not set it, else check it; the problems, as ``'data.crop_size: ...'``."""
    sizes = [data.image_size, data.crop_size]
    if any(isinstance(v, list) and len(v) != 2 for v in sizes):
        return []  # reported by the size check
    image, crop = ((v, v) if isinstance(v, int) else (v[0], v[1]) for v in sizes)
    if not (isinstance(raw_data, dict) and "crop_size" in raw_data):
        data.crop_size = task.default_crop_size(image)
        return []
    problem = task.crop_problem(crop)
    return [f"data.crop_size: {problem}"] if problem else []
