"""Model selection over epochs: the selection key of an epoch's validation metrics, and an
exponential moving average of the weights (``select_by``, ``ema``; docs/methods.md)."""

from __future__ import annotations

import math
from typing import Any

from torch import nn


def select(select_by: str, val: dict[str, float]) -> list[float]:
    """An epoch's selection key, compared as a list (higher is better): the ``select_by``
    metric (``"loss"``: the negated validation loss), ties broken by the lower validation loss
    (``"last"`` keeps every epoch over the one before, whatever its key)."""
    if select_by == "last":
        return [0.0, -val["loss"]]
    return [-val["loss"] if select_by == "loss" else val[select_by], -val["loss"]]


def weight_average(model: nn.Module, decay: float) -> nn.Module | None:
    """timm's ``ModelEmaV3`` of ``model`` with ``decay``, warmed up (``min(decay, 1 −
    t^(−2/3))`` at optimiser step t ≥ 1, so a short run is not dominated by its initial
    weights), or None when ``decay`` is 0. The copy runs its own eager trunk: a compiled
    ``forward_features`` (``experiment.compile``) is bound to ``model`` and is dropped."""
    if not decay:
        return None
    from timm.utils import ModelEmaV3  # timm takes seconds to import

    ema = ModelEmaV3(model, decay=decay, use_warmup=True)
    ema.module.__dict__.pop("forward_features", None)
    return ema


def best_score_of(state: dict[str, Any]) -> list[float]:
    """The selection key saved in a resume state (a single number in older states: its
    tie-break is then unknown, the lowest)."""
    saved = state["best_score"]
    if isinstance(saved, int | float):
        return [float(saved), -math.inf]
    return [float(v) for v in saved]
