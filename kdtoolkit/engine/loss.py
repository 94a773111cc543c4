"""The losses the engine trains with: its own cross-entropy (teacher and baselines) and the
composite loss of a recipe's ``[[loss]]`` tables, built from the loss registry."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from kdtoolkit.config.recipe import LossConfig
from kdtoolkit.plugins.loss import CompositeLoss, LossContext, LossTerm
from kdtoolkit.plugins.manager import registries

#: The name the engine's cross-entropy is logged under (``train_ce`` in a stage's history).
CE = "ce"


class CrossEntropy(LossTerm):
    """``CE(y, z)`` weighted by ``ctx.class_weights`` when set; the same numbers as the
    built-in ``ce`` term without label smoothing, but owned by the engine, so a run trains its
    teacher and baselines whichever loss plugins are enabled."""

    def forward(self, ctx: LossContext) -> torch.Tensor:
        weight = ctx.class_weights
        if weight is not None:
            weight = weight.to(ctx.logits.device, torch.float32)
        return F.cross_entropy(ctx.logits.float(), ctx.labels, weight=weight, label_smoothing=0.0)


def cross_entropy(where: str = "") -> CompositeLoss:
    """The loss of the teacher and the full-image baseline: cross-entropy alone."""
    return CompositeLoss([(CE, 1.0, CrossEntropy())], ["kdtoolkit"], where)


def build_loss(terms: Sequence[LossConfig], where: str = "") -> CompositeLoss:
    """The composite loss of ``[[loss]]`` tables, each term from the loss registry (its errors
    name the term, its plugin and ``where``, e.g. ``fold 0 student``); no terms: the engine's
    cross-entropy."""
    if not terms:
        return cross_entropy(where)
    return CompositeLoss.from_registry(
        registries().losses, ((t.name, t.weight, t.options) for t in terms), where
    )
