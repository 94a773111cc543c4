"""The ``[data]`` section of a recipe: its keys and the checks that span several of them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Literal

from kdtoolkit.config.option import Range

Size = Annotated[int, Range(ge=8)] | list[Annotated[int, Range(ge=8)]]


@dataclass
class DataConfig:
    manifest: str = ""
    classes: list[str] = field(default_factory=list)
    image_size: Size = 224
    crop_size: Size = 224
    channels: Literal[1, 3] = 1
    letterbox: bool = True
    limit: Annotated[int, Range(ge=0)] = 0
    cache: str = ".kdcache"
    workers: Annotated[int, Range(ge=-1)] = -1
    loader: Literal["auto", "device", "workers"] = "auto"
    # scans (DICOM, NIfTI): which slice, intensity, pixel size (docs/recipes.md)
    axis: Literal["sagittal", "coronal", "axial"] = "sagittal"
    slice: int | str = "mid"
    slab: Annotated[int, Range(ge=1)] = 1
    projection: Literal["max", "mean", "min"] = "max"
    window: list[float] = field(default_factory=list)
    percentiles: list[Annotated[float, Range(ge=0, le=100)]] = field(default_factory=list)
    spacing_mm: Annotated[float, Range(ge=0)] = 0.0


#: ``[data]`` keys of scans: at their defaults they stay out of the digest (runs made before
#: they existed keep theirs).
SCAN_KEYS = ("axis", "slice", "slab", "projection", "window", "percentiles", "spacing_mm")


def data_problems(data: DataConfig) -> list[str]:
    """Problems of ``[data]`` that one key's type cannot express, with dotted key paths."""
    problems = []
    for key in ("image_size", "crop_size"):
        value = getattr(data, key)
        if isinstance(value, list) and len(value) != 2:
            problems.append(f"data.{key}: expected one size or [height, width], got {value!r}")
    if data.slice != "mid" and not (isinstance(data.slice, int) and data.slice >= 0):
        problems.append(f"data.slice: expected a 0-based slice index or 'mid', got {data.slice!r}")
    if data.window and (len(data.window) != 2 or not data.window[1] > 0):
        problems.append(
            f"data.window: expected [level, width] with width > 0 (HU for CT, e.g. [40, 400]), "
            f"got {data.window!r}"
        )
    pct = data.percentiles
    if pct and (len(pct) != 2 or not pct[0] < pct[1]):
        problems.append(
            f"data.percentiles: expected [low, high] with low < high, e.g. [0.5, 99.5], got {pct!r}"
        )
    if data.window and data.percentiles:
        problems.append("data.percentiles: data.window is set too — keep one of the two")
    return problems
