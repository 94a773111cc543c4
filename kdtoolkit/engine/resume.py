"""Exact resume of a stage: every random-number state the epoch loop draws from (Python,
NumPy, torch, CUDA and the loaders' generators), saved with ``last.pt`` and restored from it,
and a damaged ``last.pt`` recognised, set aside and reported."""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdtoolkit.fileio import first_line
from kdtoolkit.models.checkpoint import load_state

#: What a resume state must hold (``train_stage`` writes these after every epoch).
STATE_KEYS = ("model", "loss", "optimizer", "scheduler", "rng", "epoch", "best_score", "best")


def generator_of(loader: Any) -> torch.Generator | None:
    """The generator a loader draws its order (and worker seeds) from, or None."""
    gen = getattr(loader, "generator", None)
    if gen is None:
        sampler = getattr(getattr(loader, "batch_sampler", None), "sampler", None)
        gen = getattr(sampler, "generator", None)
    return gen


def rng_states(loaders: Sequence[Any]) -> dict[str, Any]:
    """The random states to save with an epoch's resume state."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    out: dict[str, Any] = {
        "rng": torch.get_rng_state(),
        "rng_python": random.getstate(),
        "rng_numpy": [kind, [int(k) for k in keys], int(pos), int(has_gauss), float(cached)],
        "rng_loaders": [
            None if (g := generator_of(loader)) is None else g.get_state() for loader in loaders
        ],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["rng_cuda"] = torch.cuda.get_rng_state_all()
    return out


def restore_rng(state: dict[str, Any], loaders: Sequence[Any]) -> None:
    """Put back the random states of ``rng_states`` (older states: torch's alone)."""
    torch.set_rng_state(state["rng"])
    if "rng_python" in state:
        version, internal, gauss = state["rng_python"]
        random.setstate((version, tuple(internal), gauss))
    if "rng_numpy" in state:
        kind, keys, pos, has_gauss, cached = state["rng_numpy"]
        np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    for loader, saved in zip(loaders, state.get("rng_loaders", []), strict=False):
        gen = generator_of(loader)
        if gen is not None and saved is not None:
            gen.set_state(saved)
    if "rng_cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng_cuda"])


def set_aside(path: Path, reason: str, log: Callable[[str], None]) -> None:
    """Move a damaged resume state to ``<name>.corrupt`` (kept for inspection) and say so."""
    aside = path.with_name(path.name + ".corrupt")
    os.replace(path, aside)
    log(f"{path}: damaged resume state ({reason}); set aside as {aside.name}, stage restarts")


def read_state(path: Path, log: Callable[[str], None]) -> dict[str, Any] | None:
    """The resume state at ``path``; None when there is none, or when it is damaged (empty,
    truncated, not a state file, missing keys): then it is set aside and the stage restarts."""
    if not path.exists():
        return None
    try:
        state = load_state(path)
    except Exception as e:  # any unreadable file: a torch, zip or pickle error
        set_aside(path, first_line(e) if str(e) else f"{type(e).__name__}: empty", log)
        return None
    missing = [k for k in STATE_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        set_aside(path, f"missing {', '.join(missing)}", log)
        return None
    return state
