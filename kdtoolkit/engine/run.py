"""The run: a fold plan (teacher → ROI provider → student → baselines → evaluation) executed
on every fold, then results, figures and report.

Every stage writes its outputs into the run folder; a rerun of the same recipe skips finished
stages and resumes an interrupted one from its last epoch.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kdtoolkit.config.recipe import Recipe
from kdtoolkit.engine.context import RunContext
from kdtoolkit.engine.evaluate import evaluate_fold
from kdtoolkit.engine.lock import RunLock
from kdtoolkit.engine.loss import build_loss
from kdtoolkit.engine.outputs import row_models, write_outputs
from kdtoolkit.engine.plan import EvaluateSpec, FoldPlan, RoiSpec, TrainSpec, fold_plan
from kdtoolkit.engine.progress import RunProgress
from kdtoolkit.engine.stage import (
    checkpoint_digest,
    mask_rois_of,
    provide_rois,
    reusable,
    train_model,
)
from kdtoolkit.errors import Interrupted, KdError
from kdtoolkit.fileio import atomic_write_text
from kdtoolkit.models.checkpoint import load_model
from kdtoolkit.plugins.roi import RoiResult
from kdtoolkit.report.results import FoldResult, RunResults


@dataclass
class RunResult:
    """Where a run's outputs are, and its results."""

    output: Path
    report: Path
    run: RunResults

    @property
    def results(self) -> dict[str, Any]:
        """The ``results.json`` document."""
        return self.run.to_json()


def check_run_folder(recipe: Recipe, force: bool) -> None:
    """Refuse a run folder made by another recipe, unless ``force``."""
    path = recipe.output_dir / "recipe.resolved.json"
    if path.exists() and not force:
        try:
            saved = json.loads(path.read_text()).get("digest")
        except json.JSONDecodeError:
            saved = None
        if saved != recipe.digest():
            raise KdError(
                f"{recipe.output_dir}: this run folder belongs to a different recipe; choose "
                f"another experiment.output (--output) or pass --force to reuse it"
            )


def prepare_run_folder(recipe: Recipe, force: bool) -> Path:
    """Check (``check_run_folder``), create and stamp the run folder with the resolved recipe."""
    check_run_folder(recipe, force)
    out = recipe.output_dir
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(
        out / "recipe.resolved.json",
        json.dumps({"digest": recipe.digest(), "recipe": recipe.to_dict()}, indent=2),
    )
    return out


def run_fold(ctx: RunContext, plan: FoldPlan, k: int) -> FoldResult:
    """Execute ``plan`` on fold ``k``; each stage gets its inputs (the split, the teacher's
    model, the ROI provider's boxes) from the stages before it."""
    spec = plan.evaluation
    done = ctx.paths.evaluation(k)
    if spec.cache and done.exists() and evaluation_reusable(ctx, plan, k):
        ctx.log(f"fold {k}: evaluated before, reusing {done}")
        for _ in range(len(plan)):
            ctx.progress.advance_run()
        return FoldResult.read(done)
    train_idx, val_idx, test_idx = ctx.fold_indices(k)
    ctx.log(
        f"fold {k}: {len(train_idx)} train, {len(val_idx)} validation, {len(test_idx)} held out"
    )
    split = (train_idx, val_idx)
    needed = plan.teachers()
    checkpoints: dict[str, Path] = {}
    models: dict[str, torch.nn.Module] = {}
    rois: RoiResult | None = None
    learned = False
    result: FoldResult | None = None
    for stage in plan.stages:
        if isinstance(stage, TrainSpec):
            loss = build_loss(stage.loss, f"fold {k} {stage.role}")
            teacher = models[stage.teacher] if stage.teacher and loss.needs_teacher else None
            masks = mask_rois_of(rois) if stage.rois and rois is not None else None
            ckpt = train_model(ctx, k, stage, loss, split, teacher, masks)
            checkpoints[stage.role] = ckpt
            if stage.role in needed:
                models[stage.role] = load_model(ckpt, ctx.device)[0]
        elif isinstance(stage, RoiSpec):
            rois, learned = provide_rois(ctx, k, stage, train_idx)
        else:
            assert isinstance(stage, EvaluateSpec)
            two_stage = rois if (learned and stage.two_stage) else None
            teacher = models[stage.teacher]
            result = evaluate_fold(ctx, k, test_idx, stage, teacher, checkpoints, two_stage)
            result.roi = rois.metrics if rois is not None else {}
            if stage.cache:
                result.write(done)
            ctx.progress.advance_run()
    assert result is not None
    return result


def evaluation_reusable(ctx: RunContext, plan: FoldPlan, k: int) -> bool:
    """Whether fold ``k``'s saved evaluation may be reused: every model it evaluated was
    trained by this recipe (``reusable``)."""
    for stage in plan.stages:
        if isinstance(stage, TrainSpec):
            ckpt = ctx.paths.checkpoint(k, stage.role)
            want = (stage.recipe or ctx.recipe).digest()
            what = f"fold {k} {stage.role}"
            if not ckpt.exists() or not reusable(ctx, what, ckpt, checkpoint_digest(ckpt), want):
                return False
    return True


def interrupted(folder: Path) -> Interrupted:
    """The one line an interrupted run ends with: what is kept and how to resume."""
    return Interrupted(
        f"interrupted: finished stages and each stage's last finished epoch are kept in "
        f"{folder}; rerun the same command to resume"
    )


def run_folds(
    ctx: RunContext,
    plan: FoldPlan,
    folds: list[int],
    on_fold: Callable[[FoldResult], None] = lambda result: None,
) -> dict[int, FoldResult]:
    """``plan`` on each of ``folds``, with the run's progress bar over every stage."""
    ctx.progress.start_run(len(folds) * len(plan))
    out = {}
    for k in folds:
        out[k] = run_fold(ctx, plan, k)
        on_fold(out[k])
    return out


def finish_run(ctx: RunContext, per_fold: dict[int, FoldResult]) -> RunResult:
    """Aggregate the folds into results.json/csv, figures and report.md."""
    r = ctx.recipe
    results = RunResults(
        folds=list(per_fold.values()),
        classes=list(ctx.classes),
        models=row_models(r.teacher.backbone, r.student.backbone, r.roi.provider),
        recipe_digest=r.digest(),
    )
    path = write_outputs(ctx.paths, results, r.student.backbone, ctx.log)
    return RunResult(output=ctx.paths.root, report=path, run=results)


def run(recipe: Recipe, force: bool = False, quiet: bool = False) -> RunResult:
    """Run ``recipe`` into its run folder (locked while it runs) and write results, report
    and figures; Ctrl-C raises ``Interrupted`` (what is kept, how to resume)."""
    out = recipe.output_dir
    try:
        with RunLock(out) as lock:
            prepare_run_folder(recipe, force)
            with RunProgress(out / "run.log", quiet=quiet) as progress:
                if lock.recovered:
                    progress.log(lock.recovered)
                return run_in(recipe, progress, force)
    except KeyboardInterrupt:
        raise interrupted(out) from None


def run_in(recipe: Recipe, progress: RunProgress, force: bool) -> RunResult:
    """The body of ``run``, in the prepared and locked run folder."""
    out = recipe.output_dir
    progress.log(f"run {recipe.experiment.name} -> {out} (recipe {recipe.source})")
    ctx = RunContext.open(recipe, progress, force)
    progress.log(f"device {ctx.device}; {len(ctx.samples)} samples, {ctx.num_classes} classes")
    per_fold = run_folds(ctx, fold_plan(recipe), ctx.folds_to_run())
    for k in range(recipe.cv.folds):  # folds run earlier into this folder (runs in parts)
        done = ctx.paths.evaluation(k)
        if k not in per_fold and done.exists():
            progress.log(f"fold {k}: evaluated in an earlier run, included in the results")
            per_fold[k] = FoldResult.read(done)
    return finish_run(ctx, dict(sorted(per_fold.items())))
