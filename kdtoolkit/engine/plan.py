"""The per-fold plan: the stages a run trains and evaluates on each fold, in order, each with
its explicit inputs.

A plan is data: ``fold_plan(recipe)`` gives teacher → roi → student → baselines → evaluate;
``compare_plan(recipe, variants)`` replaces the student by one student stage per variant.
``kdtoolkit.engine.run.run_fold`` executes a plan on one fold.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from kdtoolkit.config.recipe import LossConfig, ModelConfig, Recipe
from kdtoolkit.engine.train import View
from kdtoolkit.report.results import (
    BASELINE_FULL,
    ROI,
    STUDENT,
    TEACHER,
    TWO_STAGE_CLASSIFIER,
    variant_row,
)


@dataclass(frozen=True)
class TrainSpec:
    """Train one model into ``fold_<k>/<role>/`` (reused when its checkpoint exists).

    ``view``: what it sees ("crop": the teacher's ROI crops, "image": full images).
    ``loss``: the ``[[loss]]`` terms (from the loss registry); empty: the engine's
    cross-entropy. Inputs: ``teacher`` names the stage whose model feeds the terms that need a
    teacher (and ``init_from_teacher``); ``rois`` puts the ROI stage's boxes into the views'
    ROI masks. ``crops``: the teacher-view ROIs, "expert" (rotated as annotated) or
    "enclosure" (the axis-aligned box around each, as an axis-aligned detector cuts).
    ``jitter``: its training crops are cut at boxes moved by the crop-box jitter
    (``augment.roi_*``, the two-stage classifier only); otherwise exactly at the ROIs.
    ``recipe``: the recipe stamped into the checkpoint (a variant's own; None: the run's).
    """

    role: str
    view: View
    config: ModelConfig
    loss: tuple[LossConfig, ...] = ()
    teacher: str | None = None
    rois: bool = False
    crops: str = "expert"
    jitter: bool = False
    recipe: Recipe | None = None


@dataclass(frozen=True)
class RoiSpec:
    """Boxes for every sample from the ROI provider ``provider``, fitted on the training split
    (cached in ``fold_<k>/roi/``)."""

    provider: str
    options: dict[str, Any] = field(default_factory=dict)
    role: str = ROI


@dataclass(frozen=True)
class EvaluateSpec:
    """Held-out evaluation of fold ``k``: the ``teacher`` stage on crops (``teacher_crop``),
    each image model ``(row, role)`` on full images and, with ``two_stage``, the
    ``two_stage_model`` stage (the teacher, or the two-stage classifier) on the crops a
    learned ROI provider cut (``two_stage``). ``cam_examples`` Grad-CAMs are kept
    for the figures; ``cache``: write ``fold_<k>/eval.json`` and reuse it on a rerun."""

    rows: tuple[tuple[str, str], ...]
    batch_size: int
    teacher: str = TEACHER
    two_stage: bool = True
    two_stage_model: str = TEACHER
    cam_examples: int = 0
    cache: bool = True


StageSpec = TrainSpec | RoiSpec | EvaluateSpec


@dataclass(frozen=True)
class FoldPlan:
    """The stages of one fold, in the order they run; the last one evaluates."""

    stages: tuple[StageSpec, ...]

    def __post_init__(self) -> None:
        roles = [s.role for s in self.stages if not isinstance(s, EvaluateSpec)]
        if len(set(roles)) != len(roles):
            raise ValueError(f"plan: stage roles must be unique, got {roles}")
        if not isinstance(self.stages[-1], EvaluateSpec):
            raise ValueError("plan: the last stage must evaluate")

    def __len__(self) -> int:
        return len(self.stages)

    @property
    def evaluation(self) -> EvaluateSpec:
        stage = self.stages[-1]
        assert isinstance(stage, EvaluateSpec)
        return stage

    def teachers(self) -> set[str]:
        """Roles whose models later stages take as input."""
        used = {s.teacher for s in self.stages if isinstance(s, TrainSpec) and s.teacher}
        evaluation = self.evaluation
        return used | {evaluation.teacher, evaluation.two_stage_model}


def teacher_spec(recipe: Recipe) -> TrainSpec:
    """The crop teacher: ``teacher.*``, trained with the engine's cross-entropy on the exact
    expert crops (never the crop-box jitter: it is the distillation source and the crop
    upper bound)."""
    return TrainSpec(TEACHER, "crop", recipe.teacher)


def roi_spec(recipe: Recipe) -> RoiSpec:
    return RoiSpec(recipe.roi.provider, dict(recipe.roi.options))


def student_spec(recipe: Recipe, role: str = STUDENT, stamp: bool = False) -> TrainSpec:
    """A full-image student: ``student.*`` with the recipe's ``[[loss]]`` terms, distilled from
    the teacher, its ROI masks from the ROI provider; ``stamp``: the checkpoint records this
    recipe (a variant's) rather than the run's."""
    return TrainSpec(
        role,
        "image",
        recipe.student,
        tuple(recipe.loss),
        teacher=TEACHER,
        rois=True,
        recipe=recipe if stamp else None,
    )


def baseline_spec(recipe: Recipe) -> TrainSpec:
    """The full-image baseline: the student's settings, cross-entropy, no teacher, no ROI."""
    return TrainSpec(BASELINE_FULL, "image", recipe.student)


def two_stage_spec(recipe: Recipe, crops: str) -> TrainSpec:
    """The two-stage classifier: the teacher's settings, trained on the crops a learned ROI
    provider cuts: ``crops`` "enclosure" (the axis-aligned enclosures of the expert ROIs, for
    an axis-aligned provider on rotated ROIs) or "expert"; their boxes moved by the crop-box
    jitter when it is on (``augment.roi_*``), as a detector's boxes are."""
    return TrainSpec(
        TWO_STAGE_CLASSIFIER, "crop", recipe.teacher, crops=crops, jitter=recipe.augment.crop_jitter
    )


def two_stage_crops(recipe: Recipe, provider: type, samples: Sequence[Any]) -> str | None:
    """The crops the two-stage row's own classifier trains on, or None when the row uses the
    teacher (or there is no such row). A learned ROI ``provider`` (a class) that predicts no
    angle (not ``oriented``) on rotated expert ROIs: "enclosure" (the teacher's crops are not
    what its boxes cut). Any other learned provider: "expert" with the crop-box jitter on,
    None (the teacher) with it off. No classifier for a provider that learns nothing or with
    ``evaluate.two_stage`` off."""
    if not (getattr(provider, "learned", False) and recipe.evaluate.two_stage):
        return None
    rotated = any(s.box is not None and s.angle != 0 for s in samples)
    if rotated and not getattr(provider, "oriented", False):
        return "enclosure"
    return "expert" if recipe.augment.crop_jitter else None


def fold_plan(recipe: Recipe, two_stage: str | None = None) -> FoldPlan:
    """A run's plan: teacher → roi → student → baseline (``evaluate.baseline``) → evaluate;
    ``two_stage`` (``two_stage_crops``: "enclosure" or "expert") adds the two-stage
    classifier on those crops (``two_stage_spec``) that the two-stage row uses instead of the
    teacher."""
    stages: list[StageSpec] = [teacher_spec(recipe), roi_spec(recipe), student_spec(recipe)]
    crops = two_stage if recipe.evaluate.two_stage else None
    if crops is not None:
        stages.insert(2, two_stage_spec(recipe, crops))
    rows = [(STUDENT, STUDENT)]
    if recipe.evaluate.baseline:
        stages.append(baseline_spec(recipe))
        rows.append((BASELINE_FULL, BASELINE_FULL))
    evaluation = EvaluateSpec(
        rows=tuple(rows),
        batch_size=recipe.student.batch_size,
        two_stage=recipe.evaluate.two_stage,
        two_stage_model=TWO_STAGE_CLASSIFIER if crops is not None else TEACHER,
        cam_examples=recipe.evaluate.cam_examples,
    )
    return FoldPlan((*stages, evaluation))


def compare_plan(recipe: Recipe, variants: Sequence[tuple[str, Recipe]]) -> FoldPlan:
    """Student variants against one teacher and one baseline: teacher → roi → one student
    ``student_<name>`` per ``(name, variant recipe)`` → baseline → evaluate (rows
    ``baseline_full`` and ``student_<name>``; no two-stage row, no CAM files, no evaluation
    cache, since the set of variants may change between runs)."""
    students = [student_spec(v, variant_row(name), stamp=True) for name, v in variants]
    rows = [(BASELINE_FULL, BASELINE_FULL), *((s.role, s.role) for s in students)]
    evaluation = EvaluateSpec(
        rows=tuple(rows),
        batch_size=recipe.student.batch_size,
        two_stage=False,
        cam_examples=0,
        cache=False,
    )
    stages = (teacher_spec(recipe), roi_spec(recipe), *students, baseline_spec(recipe))
    return FoldPlan((*stages, evaluation))
