"""What each registry accepts, checked when a plugin registers a component.

A backbone is a factory ``factory(num_classes, in_chans, **options)`` (not a loss term or an ROI
provider); a loss is a ``LossTerm`` subclass, an ROI provider a ``RoiProvider`` subclass, a task
a ``Task`` instance, a run logger a ``RunLogger`` subclass. Option names that a recipe table
uses for itself (``RESERVED``) are refused: a loss option ``weight`` would be shadowed by the
``[[loss]]`` weight.
"""

from __future__ import annotations

import inspect
import math
from typing import Any

from kdtoolkit.config.option import OptionInfo, declared_options, describe_options
from kdtoolkit.plugins.logger import RunLogger
from kdtoolkit.plugins.loss import LossTerm
from kdtoolkit.plugins.roi import RoiProvider
from kdtoolkit.plugins.task import Task

#: Recipe keys of each component's table, which its options may not be called.
RESERVED: dict[str, tuple[str, ...]] = {
    "backbone": (),
    "loss": ("name", "weight"),
    "roi_provider": ("provider", "mask"),
    "task": ("name",),
    "logger": ("name",),
}
#: Parameters the engine passes itself (not options).
ENGINE_ARGS: dict[str, tuple[str, ...]] = {
    "backbone": ("num_classes", "in_chans"),
    "task": ("out_dir",),
}
TABLES = {
    "loss": "[[loss]]",
    "roi_provider": "[roi]",
    "task": "[task]",
    "logger": "experiment.loggers",
}


def _describe(obj: object) -> str:
    if isinstance(obj, type):
        return f"class {obj.__qualname__}"
    return f"{type(obj).__name__} {obj!r}"[:80]


def reserved_problem(component: Any, kind: str) -> str | None:
    """The first option of ``component`` named like a recipe key of its table, or None."""
    try:
        options = declared_options(component, ENGINE_ARGS.get(kind, ()))
    except (TypeError, ValueError, NameError):
        return "its options cannot be read (type hints that do not resolve?)"
    for name in options:
        if name in RESERVED[kind]:
            return (
                f"option {name!r} clashes with the recipe key {name!r} of its {TABLES[kind]} "
                f"table; rename the option"
            )
    return None


def _subclass_problem(obj: object, base: type, kind: str) -> str | None:
    if isinstance(obj, type) and issubclass(obj, base):
        return reserved_problem(obj, kind)
    if isinstance(obj, base):
        return f"register the class {type(obj).__qualname__}, not an instance"
    return f"expected a subclass of kdtoolkit.{base.__name__}, got {_describe(obj)}"


def check_backbone(obj: object) -> str | None:
    """A callable ``factory(num_classes, in_chans, **options)`` returning a backbone."""
    wrong = (LossTerm, RoiProvider)
    if isinstance(obj, (Task, *wrong)) or (isinstance(obj, type) and issubclass(obj, wrong)):
        return f"expected a backbone factory, got {_describe(obj)} (register it in its own hook)"
    if not callable(obj):
        return f"expected a backbone factory, got {_describe(obj)}"
    try:
        inspect.signature(obj).bind(1, 1)
    except (TypeError, ValueError):
        return (
            f"expected a backbone factory(num_classes, in_chans, **options), got "
            f"{_describe(obj)}, which cannot be called that way"
        )
    return None


def check_loss(obj: object) -> str | None:
    """A ``LossTerm`` subclass whose options avoid ``name`` and ``weight``."""
    return _subclass_problem(obj, LossTerm, "loss")


def check_roi_provider(obj: object) -> str | None:
    """A ``RoiProvider`` subclass whose options avoid ``provider`` and ``mask``."""
    return _subclass_problem(obj, RoiProvider, "roi_provider")


def check_task(obj: object) -> str | None:
    """A ``Task`` instance with classes, a positive ``crop_aspect`` and a usable data source."""
    if not isinstance(obj, Task):
        return f"expected a kdtoolkit.Task instance, got {_describe(obj)}"
    if not obj.classes:
        return "a task needs at least one class"
    if obj.descriptions and len(obj.descriptions) != len(obj.classes):
        return f"{len(obj.descriptions)} descriptions for {len(obj.classes)} classes"
    aspect = obj.crop_aspect
    if isinstance(aspect, bool) or not isinstance(aspect, int | float):
        return f"crop_aspect must be a number, got {aspect!r}"
    if not math.isfinite(aspect) or aspect <= 0:
        return f"crop_aspect must be a positive number (width / height), got {aspect!r}"
    if obj.make_data is not None:
        return reserved_problem(obj.make_data, "task")
    return None


def check_logger(obj: object) -> str | None:
    """A ``RunLogger`` subclass whose options avoid ``name``."""
    return _subclass_problem(obj, RunLogger, "logger")


def component_options(component: Any, kind: str) -> list[OptionInfo]:
    """The recipe options of a component of ``kind`` (a task's are its ``make_data``'s)."""
    if kind == "task":
        component = component.make_data
        if component is None:
            return []
    return describe_options(component, ENGINE_ARGS.get(kind, ()))


CHECKS = {
    "backbone": check_backbone,
    "loss": check_loss,
    "roi_provider": check_roi_provider,
    "task": check_task,
    "logger": check_logger,
}
"""The check of each registry kind (keys as in ``Registries.kinds()``)."""
