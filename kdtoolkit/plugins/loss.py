"""The loss-term interface and the composite loss a recipe's ``[[loss]]`` tables build."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn


@dataclass
class LossContext:
    """Everything a loss term may look at for one batch.

    Shapes: B batch, K classes, H×W student input, h×w student feature map.
    ``boxes`` are axis-aligned ROI boxes ``x0, y0, x1, y1`` in student-input pixels;
    ``masks`` are ROI masks in [0, 1] in student-input pixels (B×1×H×W).
    Teacher entries are None when no term needs the teacher; ``boxes`` and ``masks`` are None
    for a model trained on crops (the teacher).
    """

    student: nn.Module
    images: torch.Tensor
    features: torch.Tensor
    logits: torch.Tensor
    labels: torch.Tensor
    boxes: torch.Tensor | None
    masks: torch.Tensor | None
    teacher_logits: torch.Tensor | None = None
    teacher_features: torch.Tensor | None = None
    class_weights: torch.Tensor | None = None


class LossTerm(nn.Module):
    """Base class of a loss term. Subclasses declare options as keyword arguments of
    ``__init__`` and implement ``forward(ctx) -> scalar tensor``.

    ``needs_teacher``: the engine computes teacher logits and features for this term.
    ``setup(student_channels, teacher_channels)`` is called once before the optimiser is
    built, so a term can create an adapter sized to the models; its parameters are trained with
    the student and saved in the checkpoint.
    """

    needs_teacher: ClassVar[bool] = False

    def setup(self, student_channels: int, teacher_channels: int | None) -> None:
        """Create parameters that depend on the models' feature widths (default: none)."""

    def forward(self, ctx: LossContext) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError


class CompositeLoss(nn.Module):
    """Weighted sum of named terms; ``forward`` returns the total and each term's value."""

    def __init__(self, terms: list[tuple[str, float, LossTerm]]) -> None:
        super().__init__()
        self.names = [name for name, _, _ in terms]
        self.weights = [float(w) for _, w, _ in terms]
        self.terms = nn.ModuleList([t for _, _, t in terms])

    @property
    def needs_teacher(self) -> bool:
        return any(t.needs_teacher for t in self.terms)

    def setup(self, student_channels: int, teacher_channels: int | None) -> None:
        for term in self.terms:
            term.setup(student_channels, teacher_channels)

    def forward(self, ctx: LossContext) -> tuple[torch.Tensor, dict[str, float]]:
        total = ctx.logits.new_zeros(())
        parts: dict[str, float] = {}
        for i, (name, weight, term) in enumerate(
            zip(self.names, self.weights, self.terms, strict=False)
        ):
            value = term(ctx)
            total = total + weight * value
            key = name if self.names.count(name) == 1 else f"{name}_{i}"
            parts[key] = float(value.detach())
        return total, parts
