"""Folds as jobs (``[launch] executor = "local" | "slurm"``): each fold is a submitit job,
processes on this machine or SLURM jobs, and the ``kd run`` process waits for them with a live
view (done / running / waiting / failed).

A job runs ``FoldJob``, a ``submitit.helpers.Checkpointable``: when SLURM preempts it, or its time
limit nears, submitit requeues it with the same arguments, and the engine's resume makes the
rerun continue from the stages and epochs already finished. A job that ends without a result
(killed, node failure, preempted where the cluster does not requeue) is resubmitted up to
``launch.retries`` times; a job whose fold raised an error is not: its fold is reported failed
with its log, and the other folds go on. The jobs' logs and submitit's files are kept in the run
folder's ``jobs/``. This module knows nothing of what a fold computes: ``kdtoolkit.engine.run``
gives it the job's body.
"""

from __future__ import annotations

import os
import re
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import submitit
import torch
from submitit.core.utils import FailedJobError, UncompletedJobError

from kdtoolkit.config.launch import LaunchConfig
from kdtoolkit.config.recipe import Recipe
from kdtoolkit.engine.progress import RunProgress
from kdtoolkit.errors import KdError

JOBS_FOLDER = "jobs"
#: SLURM states in which a job's fold is computing (others: waiting in the queue).
RUNNING_STATES = {"RUNNING", "COMPLETING"}


def jobs_folder(root: Path) -> Path:
    """The run folder's ``jobs/``: submitit's files and each job's logs."""
    return Path(root) / JOBS_FOLDER


def job_log(root: Path, k: int) -> Path:
    """The log a fold's job writes (``jobs/fold_<k>.log``), next to submitit's own logs."""
    return jobs_folder(root) / f"fold_{k}.log"


class FoldJob(submitit.helpers.Checkpointable):
    """Fold ``fold`` of ``recipe`` as a job: ``body(recipe, fold, force)``, whatever it
    returns. Requeued as it is on preemption or near its time limit (``checkpoint``): all its
    state lives in the run folder."""

    def __init__(
        self, body: Callable[[Recipe, int, bool], Any], recipe: Recipe, fold: int, force: bool
    ) -> None:
        self.body = body
        self.recipe = recipe
        self.fold = fold
        self.force = force

    def __call__(self) -> Any:
        return self.body(self.recipe, self.fold, self.force)


class FoldsFailed(KdError):
    """Some fold jobs failed (the others are kept): one line naming each and its log, exit 1."""

    exit_code = 1


@dataclass
class FoldStatus:
    """Where one fold's job stands: ``state`` queued, waiting, running, done or failed;
    ``tries``: submissions so far; ``error`` and ``log`` when it failed."""

    fold: int
    job: Any = None
    slot: int = -1
    tries: int = 0
    state: str = "queued"
    error: str = ""
    log: str = ""


def visible_gpus() -> list[int]:
    """This machine's GPUs as ``CUDA_VISIBLE_DEVICES`` numbers them (all when it is unset)."""
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    listed = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")
    if count and all(part.strip().isdigit() for part in listed):
        return [int(part) for part in listed][:count]
    return list(range(count))


def local_slots(launch: LaunchConfig, gpus: list[int]) -> list[tuple[int, ...]]:
    """The GPUs of each concurrent local job: one slot per group of ``gpus_per_node`` GPUs
    (``parallel`` slots when set, sharing the groups round robin); without GPUs, ``parallel``
    slots (default one) with none."""
    size = launch.gpus_per_node
    groups = (
        [tuple(gpus[i : i + size]) for i in range(0, len(gpus) - size + 1, size)] if size else []
    )
    if gpus and size and not groups:  # fewer GPUs than asked: all of them
        groups = [tuple(gpus)]
    if not groups:
        return [()] * max(launch.parallel, 1)
    return [groups[i % len(groups)] for i in range(launch.parallel or len(groups))]


def make_executor(launch: LaunchConfig, folder: Path) -> submitit.Executor:
    """A submitit executor for ``launch`` writing into ``folder``, with the job resources
    (SLURM: partition, GPUs, CPUs, memory, time limit, extra ``#SBATCH`` options, setup)."""
    if launch.executor == "local":
        executor: submitit.Executor = submitit.LocalExecutor(folder)
        executor.update_parameters(timeout_min=launch.timeout_min)
        if launch.setup:
            executor.update_parameters(setup=list(launch.setup))
        return executor
    try:
        executor = submitit.AutoExecutor(folder, cluster="slurm")
    except RuntimeError:
        raise KdError(
            'launch.executor = "slurm": no SLURM here (srun not found); run kd on the '
            "cluster's login node, or use --executor local"
        ) from None
    params: dict[str, Any] = {"timeout_min": launch.timeout_min}
    params["gpus_per_node"] = launch.gpus_per_node
    if launch.cpus_per_task:
        params["cpus_per_task"] = launch.cpus_per_task
    if launch.mem_gb:
        params["mem_gb"] = launch.mem_gb
    if launch.partition:
        params["slurm_partition"] = launch.partition
    if launch.slurm_additional:
        params["slurm_additional_parameters"] = dict(launch.slurm_additional)
    if launch.setup:
        params["slurm_setup"] = list(launch.setup)
    executor.update_parameters(**params)
    return executor


def error_line(problem: Exception) -> str:
    """The line that says why a job failed: the last line of its fold's traceback, or that
    the job ended without a result."""
    text = str(problem)
    if lost(problem):
        state = re.search(r"\(state: ([^)]*)\)", text)
        return f"the job ended without a result (state {state[1] if state else '?'})"
    parts = text.split("-" * 22)
    trace = parts[1] if len(parts) > 2 else text
    lines = [line.strip() for line in trace.splitlines() if line.strip()]
    last = lines[-1] if lines else "unknown error"
    name, sep, rest = last.partition(": ")
    return f"{name.rsplit('.', 1)[-1]}{sep}{rest}"


def lost(problem: Exception) -> bool:
    """Whether a job ended without a result (killed, node failure, not requeued), rather than
    with its fold's error."""
    return isinstance(problem, UncompletedJobError) and not isinstance(problem, FailedJobError)


def wait_for_folds(
    folds: list[int],
    submit: Callable[[int, int], Any],
    slots: int,
    retries: int,
    log: Callable[[str], None],
    show: Callable[[Counter[str]], None] = lambda counts: None,
    poll_s: float = 1.0,
    label: str = "fold",
) -> dict[int, FoldStatus]:
    """Submit a job per fold (``submit(fold, slot)`` → a submitit job), at most ``slots`` at
    once, and follow them until each is done or failed; a job that ended without a result is
    resubmitted up to ``retries`` times. On any exception (Ctrl-C included) the jobs still
    queued or running are cancelled."""
    status = {k: FoldStatus(k) for k in folds}
    free = list(range(slots))
    try:
        while True:
            for s in status.values():
                if s.state == "queued" and free:
                    s.slot = free.pop(0)
                    s.job, s.tries, s.state = submit(s.fold, s.slot), s.tries + 1, "waiting"
                    where = s.job.paths.stderr.parent
                    log(f"{label} {s.fold}: job {s.job.job_id} submitted ({where})")
            for s in status.values():
                if s.state in ("waiting", "running"):
                    follow(s, retries, log, label)
                    if s.state not in ("waiting", "running"):
                        free.append(s.slot)
            counts = Counter(s.state for s in status.values())
            show(counts)
            if counts["done"] + counts["failed"] == len(status):
                return status
            time.sleep(poll_s)
    finally:
        for s in status.values():
            if s.state in ("waiting", "running"):
                s.job.cancel(check=False)
                log(f"{label} {s.fold}: job {s.job.job_id} cancelled")


def follow(s: FoldStatus, retries: int, log: Callable[[str], None], label: str = "fold") -> None:
    """Update ``s`` from its job: running, done, failed, or queued again (resubmission)."""
    job = s.job
    if not job.done():
        state = str(job.state).upper()
        if s.state == "waiting" and state in RUNNING_STATES:
            log(f"{label} {s.fold}: job {job.job_id} running")
        s.state = "running" if state in RUNNING_STATES else s.state
        return
    problem = job.exception()
    if problem is None:
        s.state = "done"
        log(f"{label} {s.fold}: job {job.job_id} done")
    elif lost(problem) and s.tries <= retries:
        s.state = "queued"
        log(f"{label} {s.fold}: job {job.job_id}: {error_line(problem)}; resubmitting it")
    else:
        s.state, s.error, s.log = "failed", error_line(problem), str(job.paths.stderr)
        log(f"{label} {s.fold}: job {job.job_id} failed: {s.error}; log {s.log}")


def launch_folds(
    launch: LaunchConfig,
    root: Path,
    folds: list[int],
    job_of: Callable[[int], FoldJob],
    progress: RunProgress,
    name: str = "kd",
    poll_s: float | None = None,
    label: str = "fold",
) -> dict[int, FoldStatus]:
    """Run ``job_of(k)`` for each of ``folds`` as ``launch.executor`` jobs with files in
    ``root/jobs/``, showing their states in ``progress``; returns each fold's final status.
    ``label`` names what a job runs in the log ("fold", or "worker" for ``kd tune``)."""
    executor = make_executor(launch, jobs_folder(root))
    if launch.executor == "local":
        slots = local_slots(launch, visible_gpus())
    else:
        slots = [()] * (min(launch.parallel, len(folds)) if launch.parallel else len(folds))

    def submit(k: int, slot: int) -> Any:
        if launch.executor == "local":
            gpus = slots[slot]
            executor.update_parameters(gpus_per_node=len(gpus), visible_gpus=gpus)
        else:
            executor.update_parameters(name=f"{name}-{label}{k}")
        return executor.submit(job_of(k))

    view = progress.progress.add_task(f"{label} jobs", total=len(folds), info="")

    def show(counts: Counter[str]) -> None:
        states = ("done", "running", "waiting", "failed")
        info = " · ".join(f"{counts[s]} {s}" for s in states if counts[s])
        progress.progress.update(view, completed=counts["done"] + counts["failed"], info=info)

    wait = poll_s if poll_s is not None else (1.0 if launch.executor == "local" else 15.0)
    how = f"{launch.executor} jobs, {len(slots)} at a time"
    which = f"{label}{'s' if len(folds) > 1 else ''} {', '.join(map(str, folds))}"
    progress.log(f"{which} as {how}; files in {jobs_folder(root)}")
    retries = launch.retries
    return wait_for_folds(folds, submit, len(slots), retries, progress.log, show, wait, label)


def folds_failed(failed: list[FoldStatus], reported: list[int]) -> FoldsFailed:
    """The one line a run with failed fold jobs ends with."""
    which = "; ".join(f"fold {s.fold}: {s.error} (log {s.log})" for s in failed)
    kept = (
        f"the report covers fold(s) {', '.join(map(str, reported))}"
        if reported
        else "no fold finished"
    )
    return FoldsFailed(
        f"{len(failed)} fold job(s) failed: {which}; {kept}; fix the cause and rerun the same "
        "command (finished folds and stages are reused)"
    )
