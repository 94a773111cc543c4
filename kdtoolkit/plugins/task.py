"""Tasks: what a plugin knows about one anatomical staging problem."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Task:
    """A staging task registered by a plugin.

    ``classes``/``descriptions``: ordered class names and one-line descriptions.
    ``ordinal``: classes are ordered stages (QWK and MAE are meaningful).
    ``crop_aspect``: width / height of the teacher's crop (2.0 for a 2:1 crop).
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
