"""The final model (``kd run --final``): after cross-validation, one more student trained on
every labelled sample for deployment, into ``RUN_DIR/final/``, with the stages it needs
before it (the teacher when a loss term or ``init_from_teacher`` uses it, the ROI provider
for its masks). Its epoch is selected, and its temperature fitted, on a validation split of
``cv.val_fraction`` carved from all samples as a fold's is from its training part; nothing is
held out, so it has no held-out evaluation (the folds' results estimate its performance)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from kdtoolkit.data.fold import split_validation
from kdtoolkit.engine.context import RunContext, RunPaths, fold_count
from kdtoolkit.engine.loss import build_loss
from kdtoolkit.engine.plan import FoldPlan, RoiSpec, StageSpec, TrainSpec
from kdtoolkit.engine.stage import mask_rois_of, provide_rois, train_model
from kdtoolkit.models.checkpoint import load_model
from kdtoolkit.plugins.roi import RoiResult
from kdtoolkit.report.results import STUDENT

#: The final model's folder in a run folder.
FINAL = "final"


@dataclass(frozen=True)
class FinalPaths(RunPaths):
    """A run folder whose fold folder is ``final/`` (for the final model's stages)."""

    def fold(self, k: int) -> Path:
        return self.root / FINAL


def final_stages(plan: FoldPlan) -> list[StageSpec]:
    """The stages of ``plan`` the student needs: its teacher, the ROI provider, itself."""
    student = next(s for s in plan.stages if isinstance(s, TrainSpec) and s.role == STUDENT)
    teacher = [s for s in plan.stages if isinstance(s, TrainSpec) and s.role == student.teacher]
    roi = [s for s in plan.stages if isinstance(s, RoiSpec) and student.rois]
    return [*teacher, *roi, student]


def final_split(ctx: RunContext) -> tuple[np.ndarray, np.ndarray, int]:
    """(train, validation, id) of the final model: every sample, a ``cv.val_fraction`` share
    (groups whole, stratified) for validation; the id (the number of CV folds) seeds it."""
    k = fold_count(ctx.recipe)
    r = ctx.recipe
    train, val = split_validation(
        np.arange(len(ctx.samples)),
        ctx.labels,
        ctx.groups,
        r.cv.val_fraction,
        r.experiment.seed + k,
    )
    return np.asarray(train), np.asarray(val), k


def train_final(ctx: RunContext, plan: FoldPlan) -> Path:
    """Train the final student (and what it needs) into ``final/``; finished stages are
    reused on a rerun. Returns the student's checkpoint."""
    train, val, k = final_split(ctx)
    final = replace(ctx, paths=FinalPaths(ctx.paths.root))
    ctx.log(f"final model: {len(train)} train, {len(val)} validation, all labelled samples")
    stages = final_stages(plan)
    ctx.progress.start_run(len(stages))
    wanted = {s.teacher for s in stages if isinstance(s, TrainSpec) and s.teacher}
    models: dict[str, torch.nn.Module] = {}
    rois: RoiResult | None = None
    ckpt = final.paths.checkpoint(k, STUDENT)
    for stage in stages:
        if isinstance(stage, RoiSpec):
            rois, _ = provide_rois(final, k, stage, train)
            continue
        assert isinstance(stage, TrainSpec)
        loss = build_loss(stage.loss, f"final {stage.role}")
        teacher = models.get(stage.teacher or "") if loss.needs_teacher else None
        masks = mask_rois_of(rois) if stage.rois and rois is not None else None
        ckpt = train_model(final, k, stage, loss, (train, val), teacher, masks)
        if stage.role in wanted:
            models[stage.role] = load_model(ckpt, ctx.device)[0]
    ctx.log(f"final model: {ckpt}")
    return ckpt
