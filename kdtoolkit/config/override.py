"""``--set a.b=value`` overrides and table merging, applied to raw recipe tables."""

from __future__ import annotations

import copy
import tomllib
from collections.abc import Mapping, Sequence
from typing import Any

from kdtoolkit.errors import KdError

# Sections whose extra keys are component options (validated by the component).
OPTION_SECTIONS = {"task": "name", "roi": "provider"}
FREE_KEYS = {"roi": {"mask"}}
#: A parsed override: the dotted key as parts, and its value.
Override = tuple[list[str], Any]


def parse_override(text: str) -> tuple[list[str], Any]:
    """``'a.b=value'`` -> (['a', 'b'], value); the value is read as TOML, else a string."""
    if "=" not in text:
        raise KdError(f"--set {text!r}: expected KEY=VALUE, e.g. --set cv.folds=3")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise KdError(f"--set {text!r}: the key must be dotted names, e.g. teacher.epochs")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.split("."), value


def flatten_values(values: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> list[Override]:
    """Python override values → ``(path, value)`` pairs: nested tables become dotted paths
    (``{"teacher": {"epochs": 2}}`` → ``(["teacher", "epochs"], 2)``); lists and scalars are
    values."""
    out: list[Override] = []
    for key, value in values.items():
        path = (*prefix, *str(key).split("."))
        if isinstance(value, Mapping) and value:
            out += flatten_values(value, path)
        else:
            out.append((list(path), value))
    return out


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str | Override]) -> dict[str, Any]:
    """Set each override in a copy of ``raw``: an ``"a.b=value"`` string (the value read as
    TOML) or an already parsed ``(["a", "b"], value)`` pair. ``loss.N.key`` indexes the loss
    list; N equal to its length appends a term (``loss.3.name=roi_ce`` after three terms).

    An override that names another component (``roi.provider``, ``task.name``) than ``raw``
    drops the options ``raw`` gave the old one (they belong to it); options set with
    overrides stay."""
    out = copy.deepcopy(raw)
    parsed = [
        (item, *parse_override(item))
        if isinstance(item, str)
        else (".".join(item[0]) + "=" + repr(item[1]), list(item[0]), item[1])
        for item in overrides
    ]
    for _text, path, value in parsed:
        section = path[0]
        table = out.get(section)
        switched = len(path) == 2 and OPTION_SECTIONS.get(section) == path[1]
        if switched and isinstance(table, dict) and table.get(path[1]) != value:
            keep = {path[1], *FREE_KEYS.get(section, ())}
            out[section] = {k: v for k, v in table.items() if k in keep}
    for text, path, value in parsed:
        node: Any = out
        for i, part in enumerate(path[:-1]):
            if isinstance(node, list):
                try:
                    if int(part) < 0:
                        raise IndexError(part)
                    if int(part) == len(node):  # the next index appends a table
                        node.append({})
                    node = node[int(part)]
                except (ValueError, IndexError):
                    raise KdError(
                        f"--set {text!r}: {'.'.join(path[: i + 1])} is not an index of a "
                        f"list of {len(node)}"
                    ) from None
                continue
            if not isinstance(node, dict):
                raise KdError(f"--set {text!r}: {'.'.join(path[:i])} is not a table")
            node = node.setdefault(part, {})
        if isinstance(node, list):
            raise KdError(f"--set {text!r}: use an index, e.g. loss.0.weight")
        node[path[-1]] = value
    return out


def deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """``top`` over ``base``, tables merged recursively, lists and values replaced."""
    out = copy.deepcopy(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out
