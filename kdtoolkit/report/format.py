"""Number formatting shared by the Markdown report, the figures and the tables."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

#: (metric, heading) of the results table, shown in percent.
TABLE_METRICS = (("accuracy", "acc"), ("precision", "prec"), ("recall", "rec"), ("f1", "F1"))


def mean_std(value: Any) -> tuple[float, float | None] | None:
    """``(mean, std)`` from ``{"mean", "std"}``, a list of per-fold values, or a plain number
    (std None: shown without "± std")."""
    if value is None:
        return None
    if isinstance(value, Mapping):
        if "mean" not in value or value["mean"] is None:
            return None
        return float(value["mean"]), float(value.get("std") or 0.0)
    if isinstance(value, list | tuple | np.ndarray):
        arr = np.asarray([v for v in value if v is not None], dtype=np.float64)
        if arr.size == 0:
            return None
        return float(arr.mean()), float(arr.std(ddof=1)) if arr.size >= 2 else 0.0
    return float(value), None


def fmt(ms: tuple[float, float | None] | None, percent: bool, digits: int | None = None) -> str:
    """``mean ± std`` (percent: ×100, 2 digits; else 3), "–" for nothing."""
    if ms is None:
        return "–"
    mean, std = ms
    d = (2 if percent else 3) if digits is None else digits
    k = 100 if percent else 1
    return f"{k * mean:.{d}f}" + ("" if std is None else f" ± {k * std:.{d}f}")


def model_of(models: Mapping[str, str] | str | None, row: str) -> str:
    """The model name of ``row``: from ``{row: name}``, or one name for every row."""
    if isinstance(models, str):
        return models
    return str((models or {}).get(row, ""))


def md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """A Markdown table's lines."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return lines
