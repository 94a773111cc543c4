"""One trial of ``kd tune``: a student per tuned fold, trained on that fold's training part
and scored on its validation split (the held-out fold is never loaded); Optuna's import."""

from __future__ import annotations

import shutil
import statistics
from collections.abc import Callable
from types import ModuleType
from typing import Any

import torch

from kdtoolkit.config.recipe import Recipe, load_recipe
from kdtoolkit.engine.context import RunContext
from kdtoolkit.engine.loss import build_loss
from kdtoolkit.engine.plan import roi_spec, student_spec, teacher_spec
from kdtoolkit.engine.stage import mask_rois_of, provide_rois, train_model
from kdtoolkit.engine.train import DivergedError
from kdtoolkit.errors import Interrupted, KdError
from kdtoolkit.models.checkpoint import load_model, read_metadata

INSTALL = 'pip install "kdtoolkit[tune]"'


def import_optuna() -> ModuleType:
    """``optuna`` (an optional extra), or a one-line error naming the install."""
    try:
        import optuna
    except ImportError:
        raise KdError(f"kd tune needs optuna, which is not installed; {INSTALL}") from None
    # ERROR: a trial stopped by Ctrl-C is logged by Optuna as a failure with its traceback;
    # kd tune says what happened in one line of its own
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    return optuna


def metric_of(recipe: Recipe) -> tuple[str, str]:
    """The validation metric the student is selected by and the study's direction
    (``select_by = "last"``: the last epoch's validation accuracy)."""
    select = recipe.student.select_by
    if select == "last":
        return "val_accuracy", "maximize"
    return f"val_{select}", "minimize" if select == "loss" else "maximize"


def tuned_folds(ctx: RunContext) -> list[int]:
    """``tune.folds``, or the run's folds (``cv.only`` or every fold)."""
    return list(ctx.recipe.tune.folds) or ctx.folds_to_run()


def trial_recipe(base: Recipe, params: dict[str, Any]) -> Recipe:
    """``base`` with a trial's values (dotted keys) applied, validated like ``--set``."""
    return load_recipe(base.to_dict(), **params)


def suggest(trial: Any, key: str, spec: dict[str, Any]) -> Any:
    """A trial's value for one ``[tune]`` entry."""
    if "choices" in spec:
        return trial.suggest_categorical(key, spec["choices"])
    low, high, log, step = spec["low"], spec["high"], spec.get("log", False), spec.get("step")
    if all(isinstance(v, int) for v in (low, high, step if step is not None else 1)):
        return trial.suggest_int(key, low, high, step=step or 1, log=log)
    return trial.suggest_float(key, float(low), float(high), step=step, log=log)


def train_shared(ctx: RunContext, folds: list[int]) -> None:
    """The teacher and the ROI stage of each fold, trained (or reused) once for every trial."""
    for k in folds:
        train_idx, val_idx, _ = ctx.fold_indices(k)
        spec = teacher_spec(ctx.recipe)
        train_model(ctx, k, spec, build_loss(spec.loss, f"fold {k} teacher"), (train_idx, val_idx))
        provide_rois(ctx, k, roi_spec(ctx.recipe), train_idx)


class Objective:
    """One trial: a student per tuned fold, scored on that fold's validation split."""

    def __init__(self, ctx: RunContext, folds: list[int]) -> None:
        self.ctx, self.folds = ctx, folds
        self.teachers: dict[int, torch.nn.Module] = {}
        self.optuna = import_optuna()

    def teacher(self, k: int) -> torch.nn.Module:
        if k not in self.teachers:
            ckpt = self.ctx.paths.checkpoint(k, teacher_spec(self.ctx.recipe).role)
            self.teachers[k] = load_model(ckpt, self.ctx.device)[0]
        return self.teachers[k]

    def __call__(self, trial: Any) -> float:
        ctx = self.ctx
        space = ctx.recipe.tune.space
        params = {key: suggest(trial, key, spec) for key, spec in space.items()}
        recipe = trial_recipe(ctx.recipe, params)
        metric, direction = metric_of(recipe)
        pick = min if direction == "minimize" else max
        role = f"student_t{trial.number}"  # a student's seed: trials differ only in params
        epochs = recipe.student.epochs
        ctx.log(f"trial {trial.number}: {params}")
        scores = []
        try:
            for i, k in enumerate(self.folds):
                train_idx, val_idx, _ = ctx.fold_indices(k)  # the held-out part stays unread
                spec = student_spec(recipe, role, stamp=True)
                loss = build_loss(spec.loss, f"fold {k} {role}")
                teacher = self.teacher(k) if loss.needs_teacher else None
                rois, _ = provide_rois(ctx, k, roi_spec(ctx.recipe), train_idx)
                report = self.reporter(trial, metric, i * epochs, f"fold {k}")
                ckpt = train_model(
                    ctx, k, spec, loss, (train_idx, val_idx), teacher, mask_rois_of(rois), report
                )
                history = read_metadata(ckpt)["history"]
                last = recipe.student.select_by == "last"
                scores.append(pick(float(r[metric]) for r in (history[-1:] if last else history)))
                trial.set_user_attr(f"fold_{k}", scores[-1])
        except DivergedError as e:  # a setting that diverges is a finished, poor trial
            trial.set_user_attr("diverged", str(e))
            ctx.log(f"trial {trial.number}: {e}")
            raise self.optuna.TrialPruned(str(e)) from None
        except self.optuna.TrialPruned:
            ctx.log(f"trial {trial.number}: pruned")
            raise
        except (KeyboardInterrupt, Interrupted):  # stored failed: the rerun tries its values
            trial.set_user_attr("interrupted", True)
            raise
        finally:
            for k in self.folds:  # only the score is kept
                shutil.rmtree(ctx.paths.stage(k, role), ignore_errors=True)
        value = statistics.fmean(scores)
        ctx.log(f"trial {trial.number}: {metric} {value:.4f} ({scores})")
        return value

    def reporter(
        self, trial: Any, metric: str, offset: int, where: str
    ) -> Callable[[int, dict[str, Any]], None]:
        """Each epoch's validation score to the pruner (step: epochs of the folds so far)."""

        def report(epoch: int, record: dict[str, Any]) -> None:
            trial.report(float(record[metric]), offset + epoch)
            if trial.should_prune():
                raise self.optuna.TrialPruned(f"{where} epoch {epoch}")

        return report
