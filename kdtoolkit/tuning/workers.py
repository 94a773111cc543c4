"""``kd tune --workers N``: processes that share one Optuna study through its journal file.

With ``launch.executor = "inline"`` (the default) the workers are N processes spawned on this
machine, one thread each. With ``"local"`` or ``"slurm"`` they are N submitit jobs, submitted,
followed and resubmitted as ``kd run`` does with its folds (``kdtoolkit.engine.jobs``, files in
the study folder's ``jobs/``): on a cluster, N nodes or GPUs tune one study. A worker stops at
its share of the trials, or earlier once the study holds the trials asked for (so a job that
SLURM requeues never runs more).
"""

from __future__ import annotations

import functools
import multiprocessing
import sys
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch

from kdtoolkit.config.recipe import Recipe
from kdtoolkit.engine.context import RunContext
from kdtoolkit.engine.loggers import run_loggers
from kdtoolkit.engine.progress import RunProgress
from kdtoolkit.errors import KdError


def worker_log(recipe: Recipe, index: int) -> str:
    return str(recipe.output_dir / "workers" / f"worker_{index}.log")


#: ``tune.optimize``: (context, folds, trials, worker index, total) -> None.
Optimize = Callable[[RunContext, list[int], int, int, int], Any]


def worker_main(
    optimize: Optimize, recipe: Recipe, folds: list[int], share: int, index: int, total: int
) -> None:
    """A worker: its own data context and loggers, ``optimize`` for at most ``share`` trials
    and none once the study holds ``total`` finished ones; logs to
    ``workers/worker_<index>.log``; a ``KdError`` exits 2 after one logged line."""
    if recipe.launch.executor == "inline":  # N processes on one machine: a core each
        torch.set_num_threads(1)
    with RunProgress(worker_log(recipe, index), quiet=True) as progress:
        try:
            ctx = RunContext.open(recipe, progress)
            with run_loggers(ctx, job=index):
                optimize(ctx, folds, share, index, total)
        except KdError as e:
            progress.log(f"error: {e}")
            sys.exit(2)
        except BaseException as e:
            progress.log(f"failed: {type(e).__name__}: {e}")
            raise


def worker_job(
    recipe: Recipe,
    index: int,
    force: bool,
    *,
    optimize: Optimize,
    folds: list[int],
    shares: list[int],
    total: int,
) -> None:
    """``worker_main`` as the body of a submitit job (``jobs.FoldJob``)."""
    worker_main(optimize, recipe, folds, shares[index], index, total)


def run_workers(
    optimize: Optimize,
    recipe: Recipe,
    folds: list[int],
    missing: int,
    total: int,
    workers: int,
    progress: RunProgress,
) -> None:
    """``missing`` more trials (``total`` finished in all) split over ``workers`` workers
    sharing the study: processes spawned here, or ``launch.executor`` jobs."""
    shares = [missing // workers + (i < missing % workers) for i in range(workers)]
    if recipe.launch.executor != "inline":
        return run_worker_jobs(optimize, recipe, folds, shares, total, progress)
    spawn = multiprocessing.get_context("spawn")
    procs = [
        spawn.Process(target=worker_main, args=(optimize, recipe, folds, n, i, total))
        for i, n in enumerate(shares)
        if n
    ]
    try:
        for p in procs:
            p.start()
        for p in procs:
            p.join()
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join()
    failed = [(i, p.exitcode) for i, p in enumerate(procs) if p.exitcode]
    if failed:
        logs = ", ".join(f"{worker_log(recipe, i)} (exit {c})" for i, c in failed)
        raise KdError(f"kd tune: {len(failed)} worker(s) failed; see {logs}")


def run_worker_jobs(
    optimize: Optimize,
    recipe: Recipe,
    folds: list[int],
    shares: list[int],
    total: int,
    progress: RunProgress,
) -> None:
    """The workers as submitit jobs of ``launch.executor``; a failed one ends the tune with
    one line naming its log (the trials it finished stay in the study)."""
    from kdtoolkit.engine.run import import_jobs

    jobs = import_jobs()
    out = recipe.output_dir.resolve()
    recipe = replace(recipe, experiment=replace(recipe.experiment, output=str(out)))
    body = functools.partial(worker_job, optimize=optimize, folds=folds, shares=shares, total=total)
    indices = [i for i, n in enumerate(shares) if n]
    launch = recipe.launch  # every worker at once unless launch.parallel says fewer
    launch = replace(launch, parallel=launch.parallel or len(indices))
    status = jobs.launch_folds(
        launch,
        out,
        indices,
        lambda i: jobs.FoldJob(body, recipe, i, False),
        progress,
        f"kd-tune-{recipe.experiment.name}",
        label="worker",
    )
    failed = [s for s in status.values() if s.state == "failed"]
    if failed:
        which = "; ".join(f"worker {s.fold}: {s.error} (log {s.log})" for s in failed)
        raise KdError(f"kd tune: {len(failed)} worker job(s) failed: {which}")
