"""User-facing errors: one line, a clear fix, exit code 2."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class KdError(Exception):
    """An error caused by the user's input (recipe, manifest, files, options).

    The CLI prints ``str(error)`` as one line and exits with ``exit_code``; no traceback
    unless ``KD_DEBUG=1``.
    """

    exit_code = 2


class Interrupted(KdError):
    """The user interrupted a command (Ctrl-C): one line saying what is kept, exit 130."""

    exit_code = 130


def close_matches(name: str, candidates: Iterable[str], n: int = 3) -> list[str]:
    """Names in ``candidates`` that look like ``name`` (difflib), best first."""
    return difflib.get_close_matches(name, list(candidates), n=n, cutoff=0.6)


def suggestion(name: str, candidates: Iterable[str]) -> str:
    """' (did you mean 'x'?)' or '' when nothing is close."""
    matches = close_matches(name, candidates)
    if not matches:
        return ""
    return " (did you mean " + " or ".join(repr(m) for m in matches) + "?)"
