"""Run loggers: plugins that receive a run's parameters, per-epoch scalars, final results and
artifacts (TensorBoard, MLflow, a CSV file, or your own).

A logger is a ``RunLogger`` subclass registered with ``kd_register_loggers``; its constructor
takes its options (the keys of its table in ``experiment.loggers``). The engine calls it on the
process that writes files (rank 0); a logger that raises is reported once and switched off, so
a logger never stops a run.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from kdtoolkit.config.option import check_options
from kdtoolkit.errors import KdError

if TYPE_CHECKING:
    from kdtoolkit.plugins.registry import Registry


@dataclass(frozen=True)
class RunInfo:
    """What a logger learns when a run starts."""

    name: str  # experiment.name
    run_dir: Path  # the run folder (write only there, unless told otherwise)
    recipe: dict[str, Any]  # the resolved recipe, nested (``Recipe.to_dict``)
    params: dict[str, Any]  # the same, flattened: ``{"student.lr": 0.001, "loss.0.name": "ce"}``
    digest: str  # the recipe digest (``Recipe.digest``)
    resumed: bool  # the run folder held an earlier run of this recipe
    job: int | None = None  # a fold run as a job (this process logs that fold only), else None


class RunLogger:
    """Base class of run loggers; every method does nothing unless overridden.

    ``requires`` maps each module the logger imports to the kdtoolkit extra that installs it
    (``{"tensorboard": "tensorboard"}``): ``kd validate`` names the extra when one is missing.
    """

    requires: ClassVar[dict[str, str]] = {}

    def start(self, run: RunInfo) -> None:
        """The run starts (or resumes) in ``run.run_dir``."""

    def log_epoch(self, fold: int, stage: str, epoch: int, scalars: dict[str, float]) -> None:
        """One finished epoch (1-based) of ``stage`` ("teacher", "student", ...) on ``fold``."""

    def log_results(self, metrics: dict[str, float], results: dict[str, Any]) -> None:
        """The run's results: ``metrics`` flattened (``"student/accuracy/mean"``),
        ``results`` the ``results.json`` document."""

    def log_artifacts(self, paths: list[Path]) -> None:
        """Files of the run folder worth keeping with the run (report, results, figures)."""

    def close(self, status: str) -> None:
        """The run ends: ``status`` is "finished", "failed" or "interrupted"."""


def logger_specs(entries: Sequence[Any]) -> list[tuple[str, dict[str, Any]]]:
    """``experiment.loggers`` as ``(name, options)`` pairs: an entry is a name or a table
    with ``name`` and the logger's options."""
    out = []
    for entry in entries:
        if isinstance(entry, Mapping):
            options = {k: v for k, v in entry.items() if k != "name"}
            out.append((str(entry.get("name", "")), options))
        else:
            out.append((str(entry), {}))
    return out


def missing_packages(logger: type[RunLogger]) -> list[tuple[str, str]]:
    """``(module, extra)`` of each module in ``logger.requires`` that cannot be imported."""
    out = []
    for module, extra in logger.requires.items():
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            out.append((module, extra))
    return out


def relative_inside(option: str, value: str) -> Path:
    """``value`` as a path relative to the run folder that stays inside it, else a KdError
    naming ``option`` (loggers write nothing outside the run folder)."""
    path = Path(value)
    if path.is_absolute() or ".." in path.parts or not path.parts:
        raise KdError(
            f"{option} = {value!r}: give a path relative to the run folder, inside it "
            "(no absolute path, no '..')"
        )
    return path


def logger_problems(entries: Sequence[Any], registry: Registry) -> list[str]:
    """Every problem of ``experiment.loggers``: unknown names, bad options, duplicates and
    missing optional packages (each naming the extra to install)."""
    problems, seen = [], set()
    for i, (name, options) in enumerate(logger_specs(entries)):
        path = f"experiment.loggers[{i}]"
        if name not in registry:
            problems.append(f"{path}: {registry.unknown_message(name)}")
            continue
        if name in seen:
            problems.append(f"{path}: logger {name!r} is listed twice")
        seen.add(name)
        cls = registry.get(name)
        option_problems = check_options(cls, options, path)
        problems += option_problems
        if not option_problems:
            try:  # a logger's constructor only checks and keeps its options
                cls(**options)
            except KdError as e:
                problems.append(f"{path}: {e}")
        for module, extra in missing_packages(cls):
            problems.append(
                f'{path}: the {name} logger needs {module}, which is not installed; pip install "'
                f'kdtoolkit[{extra}]"'
            )
    return problems


def flatten(data: Any, prefix: str = "", sep: str = ".", lists: bool = True) -> dict[str, Any]:
    """Nested dicts and lists as one level: ``{"a": {"b": [1, 2]}}`` → ``{"a.b.0": 1,
    "a.b.1": 2}``; an empty dict or list is kept as its value. ``lists=False``: a list is
    kept as a value unless it holds tables (``loss.0.name``)."""
    if isinstance(data, Mapping) and data:
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(flatten(value, f"{prefix}{sep}{key}" if prefix else str(key), sep, lists))
        return out
    if isinstance(data, list | tuple) and data:
        if not lists and not any(isinstance(v, Mapping) for v in data):
            return {prefix: list(data)}
        out = {}
        for i, value in enumerate(data):
            out.update(flatten(value, f"{prefix}{sep}{i}" if prefix else str(i), sep, lists))
        return out
    return {prefix: data}


def scalars_of(data: Mapping[str, Any]) -> dict[str, float]:
    """The finite numbers of a flat mapping (booleans and text left out), as floats."""
    return {
        k: float(v)
        for k, v in data.items()
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
    }
