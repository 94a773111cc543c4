"""``--set a.b=value`` overrides and table merging, applied to raw recipe tables."""

from __future__ import annotations

import copy
import tomllib
from typing import Any

from kdtoolkit.errors import KdError

# Sections whose extra keys are component options (validated by the component).
OPTION_SECTIONS = {"task": "name", "roi": "provider"}
FREE_KEYS = {"roi": {"mask"}}


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


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set each ``a.b=value`` in a copy of ``raw``. ``loss.N.key`` indexes the loss list.

    An override that names another component (``roi.provider``, ``task.name``) than ``raw``
    drops the options ``raw`` gave the old one (they belong to it); options set with
    ``--set`` stay."""
    out = copy.deepcopy(raw)
    parsed = [(text, *parse_override(text)) for text in overrides]
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
