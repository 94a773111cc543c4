"""Component options: declared as keyword parameters of the component's constructor.

A component (backbone factory, loss term, ROI provider, task data source) declares its options
as keyword parameters with type hints and defaults; ``Range`` inside ``Annotated`` adds bounds
(``gt``/``ge`` below, ``lt``/``le`` above, any combination)::

    class KLLoss(LossTerm):
        def __init__(
            self,
            temperature: Annotated[float, Range(gt=0)] = 3.0,
            clip: Annotated[float, Range(ge=0, le=1)] = 1.0,
        ): ...

Recipes are checked against these declarations before anything runs, and ``kd plugins
--options NAME`` prints them (``describe_options``).
"""

from __future__ import annotations

import inspect
import math
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from kdtoolkit.errors import suggestion

#: How :meth:`Range.check` problems start: the value had the right type, outside the bounds.
RANGE_PROBLEMS = ("must be >", "must be <", "must be a finite")


@dataclass(frozen=True)
class Range:
    """Numeric bounds for an option: ``gt``/``ge`` below, ``lt``/``le`` above."""

    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    le: float | None = None

    def check(self, value: float) -> str | None:
        if isinstance(value, float) and not math.isfinite(value):
            return "must be a finite number"
        if self.gt is not None and not value > self.gt:
            return f"must be > {self.gt}"
        if self.ge is not None and not value >= self.ge:
            return f"must be >= {self.ge}"
        if self.lt is not None and not value < self.lt:
            return f"must be < {self.lt}"
        if self.le is not None and not value <= self.le:
            return f"must be <= {self.le}"
        return None

    def describe(self) -> str:
        """The bounds as text, e.g. ``'> 0, <= 1'``."""
        ops = ((">", self.gt), (">=", self.ge), ("<", self.lt), ("<=", self.le))
        return ", ".join(f"{op} {bound:g}" for op, bound in ops if bound is not None)


def declared_options(
    component: Callable[..., Any], reserved: tuple[str, ...] = ()
) -> dict[str, inspect.Parameter]:
    """Keyword parameters of ``component`` (a class uses its ``__init__``), minus ``reserved``."""
    signature = inspect.signature(component)
    hints = typing.get_type_hints(
        component.__init__ if inspect.isclass(component) else component, include_extras=True
    )
    out = {}
    for name, p in signature.parameters.items():
        if name in reserved or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        out[name] = p.replace(annotation=hints.get(name, p.annotation))
    return out


def type_name(annotation: Any) -> str:
    """A readable type: ``float``, ``int | list[int]``, ``'kl' | 'bce'``, ``float | None``."""
    base, _ = _split_annotated(annotation)
    origin, args = typing.get_origin(base), typing.get_args(base)
    if origin is Literal:
        return " | ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if base is type(None):
        return "None"
    if origin is not None and args:
        return f"{getattr(origin, '__name__', str(origin))}[{', '.join(map(type_name, args))}]"
    if isinstance(base, type):
        return base.__name__
    return str(base).replace("typing.", "")


def bounds_of(annotation: Any) -> str:
    """The ``Range`` bounds of an option's annotation as text ('' when none); bounds on the
    items of a list read ``each >= 8``."""
    base, extras = _split_annotated(annotation)
    parts = [e.describe() for e in extras if isinstance(e, Range)]
    for arg in typing.get_args(base):
        inner = bounds_of(arg)
        if inner and typing.get_origin(base) in (list, tuple):
            parts.append(f"each {inner}")
        elif inner:
            parts.append(inner)
    return "; ".join(dict.fromkeys(p for p in parts if p))


@dataclass(frozen=True)
class OptionInfo:
    """One declared option, as ``kd plugins --options`` prints it."""

    name: str
    type: str
    bounds: str
    default: str  # repr of the default; "required" when there is none
    required: bool


def describe_options(
    component: Callable[..., Any], reserved: tuple[str, ...] = ()
) -> list[OptionInfo]:
    """The options ``check_options`` validates against, with type, bounds and default."""
    out = []
    for name, p in declared_options(component, reserved).items():
        required = p.default is inspect.Parameter.empty
        default = "required" if required else repr(p.default)
        out.append(
            OptionInfo(name, type_name(p.annotation), bounds_of(p.annotation), default, required)
        )
    return out


def _split_annotated(annotation: Any) -> tuple[Any, list[Any]]:
    if typing.get_origin(annotation) is Annotated:
        base, *extras = typing.get_args(annotation)
        return base, extras
    return annotation, []


def check_value(value: Any, annotation: Any) -> str | None:
    """None when ``value`` fits ``annotation``; else what is wrong, as a short phrase."""
    base, extras = _split_annotated(annotation)
    if base is inspect.Parameter.empty or base is Any:
        return None
    origin = typing.get_origin(base)
    if origin in (typing.Union, types.UnionType):
        problems = [check_value(value, a) for a in typing.get_args(base)]
        if all(problems):  # a range problem of the alternative whose type fits, else the types
            bounds = [p for p in problems if p and p.startswith(RANGE_PROBLEMS)]
            if bounds:
                return bounds[0]
            return f"expected {type_name(base)}, got {type(value).__name__} {value!r}"
        problem = None
    elif origin is Literal:
        allowed = typing.get_args(base)
        problem = (
            None
            if value in allowed
            else (
                f"must be one of {', '.join(repr(a) for a in allowed)}, got {value!r}"
                + suggestion(str(value), [str(a) for a in allowed])
            )
        )
    elif origin in (list, tuple):
        if not isinstance(value, list | tuple):
            return f"expected a list, got {type(value).__name__} {value!r}"
        args = typing.get_args(base)
        item = args[0] if args else Any
        problem = next((p for p in (check_value(v, item) for v in value) if p), None)
    elif origin is dict:
        problem = None if isinstance(value, dict) else f"expected a table, got {value!r}"
    elif base is type(None):
        problem = None if value is None else f"expected nothing, got {value!r}"
    elif base is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        problem = None if ok else f"expected a number, got {type(value).__name__} {value!r}"
    elif base is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        problem = None if ok else f"expected an integer, got {type(value).__name__} {value!r}"
    elif isinstance(base, type):
        ok = isinstance(value, base)
        problem = (
            None if ok else (f"expected {base.__name__}, got {type(value).__name__} {value!r}")
        )
    else:
        problem = None
    if problem:
        return problem
    for extra in extras:
        if isinstance(extra, Range) and isinstance(value, int | float):
            problem = extra.check(value)
            if problem:
                return f"{problem}, got {value!r}"
    return None


def check_options(
    component: Callable[..., Any],
    options: dict[str, Any],
    path: str,
    reserved: tuple[str, ...] = (),
) -> list[str]:
    """Every problem of ``options`` against ``component``'s declaration, each as
    ``'path.key: message'``."""
    declared = declared_options(component, reserved)
    problems = []
    for key, value in options.items():
        if key not in declared:
            known = ", ".join(declared) or "none"
            problems.append(
                f"{path}.{key}: unknown option{suggestion(key, declared)} (known: {known})"
            )
            continue
        problem = check_value(value, declared[key].annotation)
        if problem:
            problems.append(f"{path}.{key}: {problem}")
    for key, p in declared.items():
        if p.default is inspect.Parameter.empty and key not in options:
            problems.append(f"{path}.{key}: required option is missing")
    return problems
