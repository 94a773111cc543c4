"""The loss-term interface and the composite loss a recipe's ``[[loss]]`` tables build.

Per training step the engine forwards the model (and the frozen teacher when a term
``needs_teacher``), builds a ``LossContext`` and calls the ``CompositeLoss``, which checks every
term's output (a finite floating scalar tensor) and names the term on failure.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import torch
from torch import nn

from kdtoolkit.errors import KdError, suggestion
from kdtoolkit.plugins.registry import PluginError, Registry, failure

KIND = "loss"


@dataclass
class LossContext:
    """Everything a loss term may look at for one batch (tensors on the training device).

    Shapes: B batch, C input channels (``data.channels``), K classes, H×W student input,
    F×h×w student feature map, Ft×ht×wt teacher feature map (of the teacher's crop).

    - ``student``: the model being trained (``forward_features``, ``forward_head``,
      ``num_features``; may be wrapped, e.g. compiled);
    - ``images``: B×C×H×W float, normalised pixels;
    - ``features``: B×F×h×w float, ``student.forward_features(images)``;
    - ``logits``: B×K float, ``student.forward_head(features)``;
    - ``labels``: (B,) int64 class indices;
    - ``boxes``: B×4 float, the axis-aligned box ``x0, y0, x1, y1`` around each (rotated) ROI in
      student-input pixels, or None;
    - ``masks``: B×1×H×W float in [0, 1], each ROI drawn in student-input pixels (``roi.mask``:
      "box" or "gaussian"), or None;
    - ``teacher_logits``: B×K float, ``teacher_features``: B×Ft×ht×wt float, computed without
      gradients from the ROI crops; None unless a term ``needs_teacher``;
    - ``class_weights``: (K,) float inverse-frequency weights (``class_weights = true``) or None.

    ``boxes`` and ``masks`` are None for a model trained on crops (the teacher). Logits and
    features may be float16/bfloat16 under autocast; cast with ``.float()`` when precision
    matters.
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

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        names = [f.name for f in fields(self)]
        raise AttributeError(
            f"'LossContext' object has no attribute {name!r}{suggestion(name, names)}; "
            f"its fields are {', '.join(names)} (docs/plugins.md)"
        )


class LossTerm(nn.Module):
    """Base class of a loss term. Subclasses declare options as keyword arguments of
    ``__init__`` and implement ``forward(ctx) -> scalar tensor``.

    ``needs_teacher``: the engine computes teacher logits and features for this term.
    ``needs_input_grad``: in training, the engine marks ``ctx.images`` as requiring grad
    before the forward, so the term can differentiate with respect to the input.
    ``setup(student_channels, teacher_channels)`` is called once before the optimiser is
    built, so a term can create an adapter sized to the models; its parameters are trained with
    the student and saved in the checkpoint. ``bind(student)`` is called once before training
    (after ``setup``, with the model that will be trained), so a term can hook a module of the
    student (e.g. a forward hook that keeps an earlier stage's output); a problem is a
    ``KdError`` whose message starts with the option at fault (``"cam_layer = -2: ..."``), which
    the composite loss prefixes with the term's key (``loss.2.``).
    """

    needs_teacher: ClassVar[bool] = False
    needs_input_grad: ClassVar[bool] = False

    def setup(self, student_channels: int, teacher_channels: int | None) -> None:
        """Create parameters that depend on the models' feature widths (default: none)."""

    def bind(self, student: nn.Module) -> None:
        """Attach to the student before training, e.g. register hooks (default: nothing)."""

    def forward(self, ctx: LossContext) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError


def loss_value_problem(value: Any) -> str | None:
    """What is wrong with a term's output (a tensor, not its value), or None."""
    if not isinstance(value, torch.Tensor):
        return f"forward() must return a scalar tensor, got {type(value).__name__}"
    if value.ndim != 0:
        return f"forward() returned shape {tuple(value.shape)}, expected a scalar (e.g. .mean())"
    if not value.is_floating_point():
        return f"forward() returned dtype {value.dtype}, expected a floating scalar"
    return None


class CompositeLoss(nn.Module):
    """Weighted sum of named terms; ``forward`` returns the total and each term's value.

    Each term's output is checked: a floating scalar tensor with a finite value, else a
    one-line ``PluginError`` naming the term, its plugin (``plugins[i]``) and ``where`` (set by
    the engine, e.g. "fold 0 student"). An exception from a term's code other than a
    ``KdError`` becomes a ``PluginError`` too (the original is its ``__cause__``).

    With ``keep_terms`` set, ``forward`` keeps each weighted term ``weight · value`` (with its
    graph) in ``self.weighted`` (keys as in the returned parts) until the next forward, for the
    engine's gradient-share measurement; otherwise ``self.weighted`` is empty.
    """

    def __init__(
        self,
        terms: list[tuple[str, float, LossTerm]],
        plugins: list[str] | None = None,
        where: str = "",
    ) -> None:
        super().__init__()
        self.names = [name for name, _, _ in terms]
        self.weights = [float(w) for _, w, _ in terms]
        self.terms = nn.ModuleList([t for _, _, t in terms])
        self.plugins = list(plugins) if plugins is not None else [""] * len(terms)
        self.where = where
        self.keep_terms = False
        self.weighted: dict[str, torch.Tensor] = {}

    @classmethod
    def from_registry(
        cls, registry: Registry, terms: Iterable[tuple[str, float, dict[str, Any]]], where: str = ""
    ) -> CompositeLoss:
        """Build the terms ``(name, weight, options)`` from a loss registry, remembering each
        term's plugin for error messages."""
        terms = list(terms)
        built = [(name, weight, registry.get(name)(**options)) for name, weight, options in terms]
        return cls(built, [registry.owner(name) for name, _, _ in terms], where)

    def _fail(self, i: int, problem: str) -> PluginError:
        return PluginError(KIND, self.names[i], self.plugins[i], problem, self.where)

    @property
    def needs_teacher(self) -> bool:
        return any(t.needs_teacher for t in self.terms)

    @property
    def needs_input_grad(self) -> bool:
        return any(t.needs_input_grad for t in self.terms)

    def setup(self, student_channels: int, teacher_channels: int | None) -> None:
        for term in self.terms:
            term.setup(student_channels, teacher_channels)

    def bind(self, student: nn.Module) -> None:
        """Call every term's ``bind(student)``; a ``KdError`` is re-raised on one line naming
        the term's key in the recipe (``loss.<i>.<message>``) and ``where``."""
        for i, term in enumerate(self.terms):
            try:
                term.bind(student)
            except KdError as exc:
                prefix = f"{self.where}: " if self.where else ""
                raise KdError(f"{prefix}loss.{i}.{exc}") from exc

    def forward(self, ctx: LossContext) -> tuple[torch.Tensor, dict[str, float]]:
        total = ctx.logits.new_zeros(())
        parts: dict[str, float] = {}
        self.weighted = {}
        for i, (name, weight, term) in enumerate(
            zip(self.names, self.weights, self.terms, strict=False)
        ):
            try:
                value = term(ctx)
            except (KdError, MemoryError, torch.OutOfMemoryError):
                raise
            except Exception as exc:
                raise self._fail(i, failure(exc)) from exc
            problem = loss_value_problem(value)
            if problem:
                raise self._fail(i, problem)
            number = float(value.detach())
            if not math.isfinite(number):
                raise self._fail(
                    i, f"forward() returned {number} (a bug in the term, or a diverging run)"
                )
            total = total + weight * value
            key = name if self.names.count(name) == 1 else f"{name}_{i}"
            parts[key] = number
            if self.keep_terms:
                self.weighted[key] = weight * value
        return total, parts
