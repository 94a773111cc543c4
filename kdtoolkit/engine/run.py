"""The run: a fold plan (teacher → ROI provider → student → baselines → evaluation) executed
on every fold, then results, figures and report.

Every stage writes its outputs into the run folder; a rerun of the same recipe skips finished
stages and resumes an interrupted one from its last epoch. Launched as several processes
(``torchrun``, ``kd run --nproc``), every rank trains each stage on its part of the batches and
rank 0 alone locks the folder, evaluates and writes (``engine.distributed``).
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from kdtoolkit.config.recipe import Recipe
from kdtoolkit.engine.context import RunContext, RunPaths, fold_count
from kdtoolkit.engine.distributed import (
    barrier,
    broadcast,
    is_main,
    launched,
    start,
    stop,
    world,
)
from kdtoolkit.engine.evaluate import evaluate_fold
from kdtoolkit.engine.final import train_final
from kdtoolkit.engine.folder import check_run_folder, stamped
from kdtoolkit.engine.lock import RunLock
from kdtoolkit.engine.loggers import run_loggers
from kdtoolkit.engine.loss import build_loss
from kdtoolkit.engine.outputs import finished_folds, row_models, write_outputs
from kdtoolkit.engine.plan import (
    EvaluateSpec,
    FoldPlan,
    RoiSpec,
    TrainSpec,
    fold_plan,
    two_stage_crops,
)
from kdtoolkit.engine.progress import RunProgress
from kdtoolkit.engine.stage import (
    checkpoint_digest,
    mask_rois_of,
    provide_rois,
    reusable,
    train_model,
)
from kdtoolkit.errors import Interrupted, KdError
from kdtoolkit.models.checkpoint import load_model, read_metadata
from kdtoolkit.models.device import resolve_device
from kdtoolkit.plugins.manager import registries
from kdtoolkit.plugins.roi import RoiResult
from kdtoolkit.report.results import FoldResult, RunResults


@dataclass
class RunResult:
    """Where a run's outputs are, and its results."""

    output: Path
    report: Path
    run: RunResults
    final: Path | None = None  # the final student's checkpoint (``--final``)

    @property
    def results(self) -> dict[str, Any]:
        """The ``results.json`` document."""
        return self.run.to_json()


def run_fold(ctx: RunContext, plan: FoldPlan, k: int) -> FoldResult:
    """Execute ``plan`` on fold ``k``; each stage gets its inputs (the split, the teacher's
    model, the ROI provider's boxes) from the stages before it."""
    spec = plan.evaluation
    done = ctx.paths.evaluation(k)
    if spec.cache and done.exists() and evaluation_reusable(ctx, plan, k):
        try:
            saved = FoldResult.read(done)
        except KdError as e:
            if not ctx.force:
                raise
            ctx.log(f"{e} (--force: evaluating again)")
        else:
            ctx.log(f"fold {k}: evaluated before, reusing {done}")
            for _ in range(len(plan)):
                ctx.progress.advance_run()
            return saved
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
            classifier = models[stage.two_stage_model]
            if is_main():  # launched as several processes: rank 0 evaluates
                result = evaluate_fold(
                    ctx, k, test_idx, stage, (teacher, classifier), checkpoints, two_stage
                )
                result.roi = rois.metrics if rois is not None else {}
                if stage.cache:
                    result.write(done)
            result = broadcast(result)
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
            if not ckpt.exists():
                return False
            digest, data = checkpoint_digest(ctx, what, ckpt)
            if not reusable(ctx, what, ckpt, digest, want, data):
                return False
    return True


def of_this_data(ctx: RunContext, plan: FoldPlan, k: int) -> bool:
    """Whether fold ``k``'s models (evaluated in an earlier run) were trained on this run's
    data; when not, the log says the fold is left out of the results."""
    for stage in plan.stages:
        ckpt = ctx.paths.checkpoint(k, stage.role) if isinstance(stage, TrainSpec) else None
        if ckpt is None or not ckpt.exists():
            continue
        try:
            data = read_metadata(ckpt).get("data_digest")
        except KdError:
            continue
        if data and ctx.data_digest and data != ctx.data_digest:
            ctx.log(
                f"fold {k}: evaluated on other data (the manifest or its images changed); "
                "left out of the results until it is run again"
            )
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


def two_stage_of(ctx: RunContext) -> str | None:
    """``two_stage_crops`` of the run's recipe, ROI provider and samples: the crops of the
    two-stage row's own classifier, None when the row uses the teacher."""
    provider = registries().roi_providers.get(ctx.recipe.roi.provider)
    return two_stage_crops(ctx.recipe, provider, ctx.samples)


def run_plan(ctx: RunContext) -> FoldPlan:
    """The run's fold plan (``fold_plan``), with a note when the crop-box jitter is set but
    there is no two-stage classifier for it to apply to."""
    r = ctx.recipe
    crops = two_stage_of(ctx)
    if r.augment.crop_jitter and crops is None:
        learned = getattr(registries().roi_providers.get(r.roi.provider), "learned", False)
        why = "evaluate.two_stage is off" if learned else f"the {r.roi.provider} provider has none"
        ctx.log(
            "augment.roi_shift/roi_scale/roi_degrees apply to the two-stage classifier only; "
            f"{why} (the teacher trains on exact crops)"
        )
    return fold_plan(r, crops)


def finish_run(ctx: RunContext, per_fold: dict[int, FoldResult]) -> RunResult:
    """Aggregate the folds into results.json/csv, figures and report.md."""
    r = ctx.recipe
    results = RunResults(
        folds=list(per_fold.values()),
        classes=list(ctx.classes),
        models=row_models(
            r.teacher.backbone,
            r.student.backbone,
            r.roi.provider,
            two_stage_of(ctx),
            r.augment.crop_jitter,
        ),
        recipe_digest=r.digest(),
    )
    path = ctx.paths.root / "report.md"
    if is_main():
        path = write_outputs(ctx.paths, results, r.student.backbone, ctx.log)
        ctx.loggers.results(ctx.paths.root)
    return RunResult(output=ctx.paths.root, report=path, run=results)


def run(recipe: Recipe, force: bool = False, quiet: bool = False, final: bool = False) -> RunResult:
    """Run ``recipe`` into its run folder (locked while it runs) and write results, report
    and figures; each fold in this process, or as a job (``[launch]``, ``run_as_jobs``);
    Ctrl-C raises ``Interrupted`` (what is kept, how to resume). Launched as several
    processes, rank 0 locks, prepares and logs while the others wait and log nowhere.
    ``final``: then the final model (``engine.final``), inline only."""
    out = recipe.output_dir
    main = is_main()
    if launched() and recipe.launch.executor != "inline":
        raise KdError(
            "launch.executor: several processes per run (torchrun, --nproc) train each stage "
            "together; folds as jobs need one process: use --executor inline"
        )
    if final and recipe.launch.executor != "inline":
        raise KdError(
            "--final trains in this process: run the folds first, then kd run --final "
            "--executor inline (finished folds are reused)"
        )
    try:
        start(resolve_device(recipe.experiment.device))
        if main:
            check_run_folder(recipe, force)
        with RunLock(out) if main else contextlib.nullcontext() as lock:
            if main:
                check_run_folder(recipe, force)  # again, now that no other run can stamp it
            barrier()
            log = out / "run.log" if main else Path(os.devnull)
            with RunProgress(log, quiet=quiet or not main, held=True) as progress:
                if lock is not None and lock.recovered:
                    progress.log(lock.recovered)
                if recipe.launch.executor != "inline":
                    return run_as_jobs(recipe, progress, force)
                return run_in(recipe, progress, force, final)
    except KeyboardInterrupt:
        raise interrupted(out) from None
    finally:
        stop()


def run_in(recipe: Recipe, progress: RunProgress, force: bool, final: bool = False) -> RunResult:
    """The body of ``run``, in the prepared and locked run folder."""
    out = recipe.output_dir
    progress.log(f"run {recipe.experiment.name} -> {out} (recipe {recipe.source})")
    ctx = RunContext.open(recipe, progress, force)
    progress.log(f"device {ctx.device}; {len(ctx.samples)} samples, {ctx.num_classes} classes")
    if launched():
        progress.log(f"{world().size} processes train each stage, each on its part of a batch")
    plan, folds = run_plan(ctx), ctx.folds_to_run()
    with stamped(ctx, plan, folds), run_loggers(ctx):
        per_fold = run_folds(ctx, plan, folds)
        for k in range(fold_count(recipe)):  # folds run earlier into this folder (runs in parts)
            done = ctx.paths.evaluation(k)
            if k not in per_fold and done.exists() and of_this_data(ctx, plan, k):
                progress.log(f"fold {k}: evaluated in an earlier run, included in the results")
                per_fold[k] = FoldResult.read(done)
        result = finish_run(ctx, dict(sorted(per_fold.items())))
        if final:
            result.final = train_final(ctx, plan)
        return result


def run_as_jobs(recipe: Recipe, progress: RunProgress, force: bool) -> RunResult:
    """The body of ``run`` with ``launch.executor`` local or slurm: the data and the fold
    assignment are checked here once (on the CPU), each fold not evaluated before becomes a job
    (``run_fold_job``), and the report covers every finished fold; failed jobs end it with
    ``FoldsFailed`` (after the report of the others)."""
    import_jobs()  # submitit is there before anything is read
    out = recipe.output_dir.resolve()
    recipe = replace(recipe, experiment=replace(recipe.experiment, output=str(out)))
    progress.log(f"run {recipe.experiment.name} -> {out} (recipe {recipe.source})")
    cpu = replace(recipe, experiment=replace(recipe.experiment, device="cpu"))
    ctx = RunContext.open(cpu, progress, force)
    progress.log(f"{len(ctx.samples)} samples, {ctx.num_classes} classes")
    plan = run_plan(ctx)
    with stamped(ctx, plan, ctx.folds_to_run()), run_loggers(ctx):
        return run_jobs_in(ctx, plan, recipe, progress, force)


def run_jobs_in(
    ctx: RunContext, plan: FoldPlan, recipe: Recipe, progress: RunProgress, force: bool
) -> RunResult:
    """The body of ``run_as_jobs`` in its stamped run folder."""
    jobs = import_jobs()
    out = recipe.output_dir
    todo = []
    for k in ctx.folds_to_run():
        done = ctx.paths.evaluation(k)
        if plan.evaluation.cache and done.exists() and evaluation_reusable(ctx, plan, k):
            progress.log(f"fold {k}: evaluated before, reusing {done}")
        else:
            todo.append(k)
    status: dict[int, Any] = {}
    if todo:

        def job_of(k: int) -> Any:
            return jobs.FoldJob(run_fold_job, recipe, k, force)

        name = f"kd-{recipe.experiment.name}"
        status = jobs.launch_folds(recipe.launch, out, todo, job_of, progress, name)
    per_fold = finished_folds(ctx.paths, fold_count(recipe))
    per_fold = {k: r for k, r in per_fold.items() if k in status or of_this_data(ctx, plan, k)}
    for k in per_fold:
        if k not in status and k not in ctx.folds_to_run():
            progress.log(f"fold {k}: evaluated in an earlier run, included in the results")
    failed = [s for s in status.values() if s.state == "failed"]
    if failed:
        per_fold = {k: r for k, r in per_fold.items() if k not in {s.fold for s in failed}}
        if per_fold:
            finish_run(ctx, per_fold)
        raise jobs.folds_failed(failed, list(per_fold))
    return finish_run(ctx, per_fold)


def run_fold_job(recipe: Recipe, k: int, force: bool) -> str:
    """Fold ``k`` of ``recipe`` in a job's process (``jobs.FoldJob``), its fold folder locked,
    its log in ``jobs/fold_<k>.log``; returns the path of its ``eval.json``."""
    paths = RunPaths(recipe.output_dir)
    log = import_jobs().job_log(paths.root, k)
    with RunLock(paths.fold(k)) as lock, RunProgress(log, quiet=True) as progress:
        progress.log(f"fold {k}: job started on {socket.gethostname()} (pid {os.getpid()})")
        if lock.recovered:
            progress.log(lock.recovered)
        try:
            ctx = RunContext.open(recipe, progress, force)
            ctx.write_folds()
            progress.log(f"device {ctx.device}; {len(ctx.samples)} samples")
            with run_loggers(ctx, job=k):
                run_folds(ctx, run_plan(ctx), [k])
        except BaseException as e:
            why = (
                "stopped (preempted or timed out); requeued jobs resume"
                if isinstance(e, SystemExit)
                else f"failed: {type(e).__name__}: {e}"
            )
            progress.log(f"fold {k}: {why}")
            raise
        progress.log(f"fold {k}: job done")
    return str(paths.evaluation(k))


def import_jobs() -> ModuleType:
    """``kdtoolkit.engine.jobs`` (imported when used: it needs submitit)."""
    try:
        from kdtoolkit.engine import jobs
    except ImportError as e:
        if e.name != "submitit":
            raise
        raise KdError(
            "launch.executor: folds as jobs need submitit, which is not installed; "
            "pip install submitit, or run with --executor inline"
        ) from None
    return jobs
