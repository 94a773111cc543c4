"""``kd tune``: an Optuna study over the recipe's ``[tune]`` space, scored on validation only.

Each trial trains one student per tuned fold on that fold's training part and scores it on the
validation split carved out of that part (``RunContext.fold_indices``: train, validation,
held out); the held-out fold is never loaded. The score is the student's ``select_by`` metric
at its selected epoch, averaged over the folds; each epoch's validation score goes to the
pruner. The teacher and ROI stage are trained once per fold (as ``kd compare`` shares them)
before any trial. The study is a journal file in the run folder: a rerun resumes it, and
``workers`` processes share it (Optuna's storage coordinates them).
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdtoolkit.config.recipe import Recipe, load_recipe
from kdtoolkit.config.tune import recipe_values
from kdtoolkit.engine.context import RunContext
from kdtoolkit.engine.folder import check_run_folder, stamped
from kdtoolkit.engine.lock import RunLock
from kdtoolkit.engine.loggers import run_loggers
from kdtoolkit.engine.plan import fold_plan
from kdtoolkit.engine.progress import RunProgress
from kdtoolkit.engine.run import interrupted
from kdtoolkit.errors import KdError
from kdtoolkit.tuning.objective import (
    Objective,
    import_optuna,
    metric_of,
    train_shared,
    tuned_folds,
)

STUDY_FILE = "study.journal"
STUDY_NAME = "kd-tune"


@dataclass
class TuneResult:
    """A study's outcome: its trials (``number``, ``state``, ``value``, ``params``, fold
    scores), the best trial, and the files written."""

    output: Path
    metric: str
    direction: str
    trials: list[dict[str, Any]]
    ran: int
    best: dict[str, Any] | None = None
    best_toml: Path | None = None
    files: list[Path] = field(default_factory=list)


def tune_output(recipe: Recipe) -> Path:
    """The study's run folder by default: the recipe's run folder + ``-tune``."""
    return Path(f"{recipe.output_dir}-tune")


def open_storage(output: Path) -> Any:
    """The study's storage: Optuna's journal file in ``output`` (file locks coordinate the
    processes that share it)."""
    import_optuna()
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    return JournalStorage(JournalFileBackend(str(output / STUDY_FILE)))


def open_study(recipe: Recipe, storage: Any) -> Any:
    """The study in ``storage`` (made when new) with the ``tune.pruner``; a study made for
    another search space, metric or folds is refused."""
    optuna = import_optuna()
    warmup = recipe.tune.warmup
    pruner = {
        "median": lambda: optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=warmup),
        "halving": lambda: optuna.pruners.SuccessiveHalvingPruner(min_resource=warmup or "auto"),
        "none": optuna.pruners.NopPruner,
    }[recipe.tune.pruner]()
    study = optuna.create_study(
        storage=storage,
        study_name=STUDY_NAME,
        direction=metric_of(recipe)[1],
        pruner=pruner,
        load_if_exists=True,
    )
    if check_stamp(study, recipe):
        study.set_user_attr("stamp", study_stamp(recipe))
    return study


def study_stamp(recipe: Recipe) -> dict[str, Any]:
    """What a study belongs to: the space, the metric and the folds."""
    return {"space": recipe.tune.space, "metric": metric_of(recipe)[0], "folds": recipe.tune.folds}


def check_stamp(study: Any, recipe: Recipe) -> bool:
    """Refuse a study made for another space, metric or folds; True when it has no stamp."""
    saved = study.user_attrs.get("stamp")
    if saved is not None and saved != study_stamp(recipe):
        raise KdError(
            f"{recipe.output_dir / STUDY_FILE}: the study was made for another [tune] space, "
            "metric or folds; choose another --output, or pass --force to start a new study"
        )
    return saved is None


def enqueue_recipe(study: Any, recipe: Recipe, log: Callable[[str], None]) -> None:
    """A new study's first trial is the recipe's own values (user attribute ``recipe``), so
    the table shows what the search gains over them on the same validation splits."""
    if study.trials:
        return
    values = recipe_values(recipe.to_dict(), recipe.tune.space)
    if values is None:
        log("the recipe's own values lie outside the [tune] space: not tried as a trial")
        return
    study.enqueue_trial(values, user_attrs={"recipe": True})
    log(f"trial 0: the recipe's own values {values}")


def finished(study: Any) -> int:
    """Trials that count towards ``--trials``: complete and pruned ones."""
    states = import_optuna().trial.TrialState
    return len(study.get_trials(deepcopy=False, states=(states.COMPLETE, states.PRUNED)))


def requeue_interrupted(study: Any, storage: Any, log: Callable[[str], None]) -> None:
    """Trials an earlier ``kd tune`` did not finish have their values queued again, once:
    those left running by a killed process (the run lock says none runs now; marked failed
    here) and those stopped by Ctrl-C or SIGTERM (failed, with user attribute
    ``interrupted``). The queued trial records ``retry_of``."""
    states = import_optuna().trial.TrialState
    study_id = storage.get_study_id_from_name(STUDY_NAME)
    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs.get("retry_of") for t in trials}
    for t in trials:
        if t.state == states.RUNNING:
            trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, t.number)
            storage.set_trial_state_values(trial_id, states.FAIL)
        elif not (t.state == states.FAIL and t.user_attrs.get("interrupted")):
            continue
        if t.number in retried:
            continue
        user_attrs = {"retry_of": t.number}
        if t.user_attrs.get("recipe"):
            user_attrs["recipe"] = True
        study.enqueue_trial(t.params, user_attrs=user_attrs)
        log(f"trial {t.number}: interrupted before; its values are tried again")


def optimize(
    ctx: RunContext, folds: list[int], n_trials: int, worker: int = 0, total: int = 0
) -> None:
    """``n_trials`` trials of the study in this process (``worker``: its index), fewer when
    the study reaches ``total`` finished trials first. The sampler's seed is
    ``experiment.seed`` moved on by the trials so far and the worker, so neither a rerun nor
    another worker draws the values drawn before."""
    optuna = import_optuna()
    study = open_study(ctx.recipe, open_storage(ctx.paths.root))
    if total and finished(study) >= total:
        return
    seed = ctx.recipe.experiment.seed + len(study.trials) + 7919 * worker
    study.sampler = optuna.samplers.TPESampler(seed=seed)
    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    stop = [optuna.study.MaxTrialsCallback(total, states=states)] if total else []
    study.optimize(Objective(ctx, folds), n_trials=n_trials, callbacks=stop, gc_after_trial=True)


def trial_rows(study: Any) -> list[dict[str, Any]]:
    """Every trial as a row: number, state, value, params, fold scores, seconds."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        seconds = t.duration.total_seconds() if t.duration is not None else None
        rows.append(
            {
                "number": t.number,
                "state": t.state.name.lower(),
                "value": t.value,
                "params": dict(t.params),
                "folds": {k: v for k, v in t.user_attrs.items() if k.startswith("fold_")},
                "recipe": bool(t.user_attrs.get("recipe")),
                "seconds": seconds,
            }
        )
    return rows


def tune(
    recipe_path: Path,
    trials: int,
    sets: list[str] | None = None,
    workers: int = 1,
    output: Path | None = None,
    force: bool = False,
    quiet: bool = False,
) -> TuneResult:
    """Run the study of ``recipe_path``'s ``[tune]`` space until ``trials`` trials are
    finished (complete or pruned; a rerun adds only the missing ones), then write the trials
    table, the plots and ``best.toml`` into the output folder (default: ``tune_output``)."""
    import_optuna()
    sets = list(sets or [])
    forced = ["evaluate.cam_examples=0"]
    if output is None:
        output = tune_output(load_recipe(recipe_path, sets))
    forced.append(f"experiment.output={json.dumps(str(output))}")
    base = load_recipe(recipe_path, [*sets, *forced])
    if not base.tune.space:
        raise KdError(
            f"{recipe_path}: no [tune] search space; add one, e.g. [tune] "
            '"loss.0.weight" = {low = 0.05, high = 1.0, log = true} (docs/tuning.md)'
        )
    try:
        with RunLock(output) as lock:
            check_run_folder(base, force)
            with RunProgress(output / "tune.log", quiet=quiet, held=True) as progress:
                if lock.recovered:
                    progress.log(lock.recovered)
                ctx = RunContext.open(base, progress, force)
                folds = tuned_folds(ctx)
                if not force and (output / STUDY_FILE).exists():  # read only
                    check_stamp(load_saved_study(output), base)
                with stamped(ctx, fold_plan(base), folds):
                    if force:  # a new study, now that nothing refused it
                        (output / STUDY_FILE).unlink(missing_ok=True)
                    return run_study(ctx, folds, trials, workers, recipe_path, sets)
    except KeyboardInterrupt:
        raise interrupted(output) from None


def load_saved_study(output: Path) -> Any:
    """The study of ``output/study.journal``; a damaged journal (cut short, emptied, not
    Optuna's) is one line naming it."""
    optuna = import_optuna()
    try:
        lines = (output / STUDY_FILE).read_bytes().decode().split("\n")
        if lines[-1]:  # each record ends its line: a last line without one was cut short
            raise ValueError("its last record is cut short")
        for line in lines[:-1]:
            json.loads(line)
        return optuna.load_study(study_name=STUDY_NAME, storage=open_storage(output))
    except Exception as e:  # noqa: BLE001 - any reader's error on a damaged file is one line
        first = (str(e).strip().splitlines() or [""])[0][:120]
        raise KdError(
            f"{output / STUDY_FILE}: damaged, not an Optuna journal of kd tune "
            f"({type(e).__name__}: {first}); restore it, or pass --force to start a new study "
            "(its trials are lost)"
        ) from None


def run_study(
    ctx: RunContext,
    folds: list[int],
    trials: int,
    workers: int,
    recipe_path: Path,
    sets: list[str],
) -> TuneResult:
    """The body of ``tune`` in its stamped folder: the shared stages, the missing trials (in
    this process or ``workers`` processes), then the outputs."""
    from kdtoolkit.tuning.outputs import logged_results, write_outputs
    from kdtoolkit.tuning.workers import run_workers

    base, output, log = ctx.recipe, ctx.paths.root, ctx.progress.log
    log(f"tune {recipe_path} -> {output}: folds {folds}, {trials} trials")
    with run_loggers(ctx) as loggers:
        train_shared(ctx, folds)
        storage = open_storage(output)
        study = open_study(base, storage)
        requeue_interrupted(study, storage, log)
        enqueue_recipe(study, base, log)
        missing = max(0, trials - finished(study))
        log(f"{finished(study)} trials finished before; running {missing}")
        if missing and workers == 1:
            optimize(ctx, folds, missing)
        elif missing:
            with contextlib.redirect_stdout(sys.stderr):
                total = finished(study) + missing
                run_workers(optimize, base, folds, missing, total, workers, ctx.progress)
        study = open_study(base, open_storage(output))
        metric, direction = metric_of(base)
        result = TuneResult(output, metric, direction, trial_rows(study), missing)
        write_outputs(result, study, recipe_path, sets, log)
        loggers.call("log_results", *logged_results(result))
        loggers.call("log_artifacts", list(result.files))
    return result
