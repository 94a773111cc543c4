"""``[tune]``: the search space of ``kd tune`` and how it searches. Not part of the digest: it
says what to try, not how a run computes.

Dotted keys are the search space, each a ``--set`` key of a student setting (``loss.*``,
``student.*`` but its backbone) with a range or a list of choices::

    [tune]
    pruner = "median"                                      # "median", "halving" or "none"
    warmup = 4                                             # epochs before it may stop a trial
    folds = [0]                                            # default: every fold of the run
    "loss.0.weight" = {low = 0.05, high = 1.0, log = true}
    "loss.1.temperature" = {choices = [1, 2, 3, 4, 6]}
    "student.epochs" = {low = 5, high = 20, step = 5}      # integers: low and high whole

A range of whole numbers (``low``, ``high`` and ``step`` integers) tries integers only.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from kdtoolkit.config.option import check_value
from kdtoolkit.config.override import Override

SPEC_KEYS = {"low", "high", "log", "step", "choices"}
Pruner = Literal["median", "halving", "none"]


@dataclass
class TuneConfig:
    """``[tune]``: ``pruner`` (stops trials whose per-epoch validation score falls behind),
    ``warmup`` (epochs, counted over the tuned folds in turn, before it may stop one),
    ``folds`` (whose training parts the objective uses; empty: the run's folds) and ``space``
    (``{"loss.0.weight": {"low": 0.05, "high": 1.0, "log": True}, ...}``)."""

    pruner: Pruner = "median"
    warmup: int = 0
    folds: list[int] = field(default_factory=list)
    space: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """As written in TOML: the settings, then the space's dotted keys."""
        head = {"pruner": self.pruner, "warmup": self.warmup, "folds": list(self.folds)}
        return {**head, **self.space}


def is_number(value: Any) -> bool:
    """An int or a float (not a bool)."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def is_spec(value: Any) -> bool:
    """Whether a table is a range or a choice list (rather than a table of dotted keys): it
    has one of their keys."""
    return isinstance(value, dict) and bool(set(value) & SPEC_KEYS)


def flat_space(raw: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"loss": {"0": {"weight": {...}}}}`` (unquoted dotted TOML keys, ``--set tune.…``)
    → ``{"loss.0.weight": {...}}``."""
    out: dict[str, Any] = {}
    for key, value in raw.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value and not is_spec(value):
            out.update(flat_space(value, f"{name}."))
        else:
            out[name] = value
    return out


def build_tune(raw: Any, problems: list[str]) -> TuneConfig:
    """``[tune]`` from its raw table, recording problems with dotted key paths."""
    if not isinstance(raw, dict):
        problems.append(f"tune: expected a table, got {raw!r}")
        return TuneConfig()
    config = TuneConfig()
    annotations = {"pruner": Pruner, "warmup": int, "folds": list[int]}
    for key, annotation in annotations.items():
        if key in raw:
            if problem := check_value(raw[key], annotation):
                problems.append(f"tune.{key}: {problem}")
            elif key == "warmup" and raw[key] < 0:
                problems.append(f"tune.warmup: must be >= 0 (epochs), got {raw[key]}")
            else:
                setattr(config, key, raw[key])
    space = flat_space({k: v for k, v in raw.items() if k not in annotations})
    for key, spec in space.items():
        if "." not in key:
            problems.append(
                f"tune.{key}: unknown key; tune takes pruner, warmup, folds and dotted setting "
                'keys with a range or choices, e.g. "loss.0.weight" = {low = 0.05, high = 1.0}'
            )
        elif problem := spec_problem(key, spec):
            problems.append(f"tune.{key}: {problem}")
        else:
            config.space[key] = spec
    return config


def spec_problem(key: str, spec: Any) -> str | None:
    """What is wrong with one search-space entry (its key and its range or choices)."""
    path = key.split(".")
    head = path[0]
    if not ((head == "loss" and len(path) >= 3) or (head == "student" and path[1] != "backbone")):
        return (
            "only a student setting can be tuned (loss.N.KEY, student.KEY but its backbone): "
            "the folds, the teacher and the ROI stage are shared by every trial"
        )
    if not isinstance(spec, dict) or not spec:
        return f"expected {{low = …, high = …}} or {{choices = […]}}, got {spec!r}"
    if unknown := sorted(set(spec) - SPEC_KEYS):
        return f"unknown key(s) {', '.join(unknown)}; a range has low, high, log, step"
    if "choices" in spec:
        choices = spec["choices"]
        if set(spec) != {"choices"}:
            return "give either choices or a range (low, high), not both"
        scalar = (str, int, float, bool)
        if not isinstance(choices, list) or not choices:
            return f"choices must be a non-empty list, got {choices!r}"
        if not all(isinstance(c, scalar) for c in choices):
            return f"choices must be numbers, strings or booleans, got {choices!r}"
        if len({repr(c) for c in choices}) != len(choices):
            return f"choices repeat a value: {choices!r}"
        return None
    if "low" not in spec or "high" not in spec:
        return "a range needs low and high (or give choices = […])"
    low, high, step, log = spec["low"], spec["high"], spec.get("step"), spec.get("log", False)
    numbers = [v for v in (low, high, step) if v is not None]
    if not all(is_number(v) for v in numbers):
        return f"low, high and step must be numbers, got {spec!r}"
    if not all(math.isfinite(v) for v in numbers):
        return f"low, high and step must be finite, got {spec!r}"
    if not isinstance(log, bool):
        return f"log must be true or false, got {log!r}"
    if not low < high:
        return f"low must be below high, got low = {low}, high = {high}"
    if log and low <= 0:
        return f"a log range needs low > 0, got {low}"
    if step is not None and (step <= 0 or log):
        return "step must be above 0 and cannot go with log = true"
    return None


def is_integer_range(spec: dict[str, Any]) -> bool:
    """A range of whole numbers: low, high (and step) all integers."""
    values = [spec.get("low"), spec.get("high"), spec.get("step", 1)]
    return "choices" not in spec and all(isinstance(v, int) for v in values)


def endpoints(spec: dict[str, Any]) -> list[Any]:
    """The values that bound a search-space entry: its choices, or low and high."""
    return list(spec["choices"]) if "choices" in spec else [spec["low"], spec["high"]]


def recipe_values(recipe: dict[str, Any], space: dict[str, Any]) -> dict[str, Any] | None:
    """The recipe's own value (``recipe``: ``Recipe.to_dict()``) of every ``space`` key, or
    None when one is unset or outside its range or choices."""
    values: dict[str, Any] = {}
    for key, spec in space.items():
        node: Any = recipe
        for part in key.split("."):
            if isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            elif isinstance(node, dict) and part in node:
                node = node[part]
            else:
                return None
        if "choices" in spec:
            if node not in spec["choices"]:
                return None
            node = spec["choices"][spec["choices"].index(node)]
        elif not is_number(node) or not spec["low"] <= node <= spec["high"]:
            return None
        values[key] = node
    return values


def folds_problems(config: TuneConfig, folds: int) -> list[str]:
    """``tune.folds`` must exist (``folds``: how many the run has)."""
    if bad := [k for k in config.folds if not 0 <= k < folds]:
        return [f"tune.folds: folds {bad} do not exist (0..{folds - 1})"]
    return []


def tune_problems(config: TuneConfig, check: Callable[[list[Override]], list[str]]) -> list[str]:
    """Each entry's bounds must make a valid recipe (``check``: the problems of the recipe
    with some overrides applied)."""
    problems: list[str] = []
    for key, spec in config.space.items():
        found = [
            f"tune.{key}: {value!r} gives {p}"
            for value in endpoints(spec)
            for p in check([(key.split("."), value)])
        ]
        problems += found[:1]  # one line per key
        whole = not found and is_integer_range(spec) and "step" not in spec
        if whole and not check([(key.split("."), spec["low"] + 0.5)]):
            problems.append(
                f"tune.{key}: low and high are whole numbers, so only integers are tried, "
                f"but {key} takes fractions: write low = {float(spec['low'])}, high = "
                f"{float(spec['high'])} (or step = 1 for integers)"
            )
    return problems
