"""The ``[launch]`` section of a recipe: where the folds of a run are computed.

``inline``: one after another in the ``kd run`` process. ``local`` and ``slurm``: each fold is a
submitit job (processes on this machine, or SLURM cluster jobs) with the resources below; the
``kd run`` process waits for them and writes the report. Launching never changes what a run
computes, so ``[launch]`` stays out of the recipe digest.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from kdtoolkit.config.option import Range

EXECUTORS = ("inline", "local", "slurm")


@dataclass
class LaunchConfig:
    """``executor``: inline, local or slurm. ``parallel``: at most this many fold jobs at once
    (0: every fold on SLURM; one per group of ``gpus_per_node`` GPUs on this machine, or one at a
    time without GPUs). ``retries``: resubmissions of a job that ended without a result
    (preempted, node failure, killed). The rest are the job's resources: ``partition`` (SLURM),
    ``gpus_per_node``, ``cpus_per_task`` and ``mem_gb`` (0: the cluster's default),
    ``timeout_min`` (a job near its limit is requeued and resumes), ``slurm_additional`` (more
    ``#SBATCH`` options, e.g. ``{account = "lab", qos = "high"}``) and ``setup`` (shell lines run
    before each job, e.g. ``"source .venv/bin/activate"``)."""

    executor: Literal["inline", "local", "slurm"] = "inline"
    parallel: Annotated[int, Range(ge=0)] = 0
    retries: Annotated[int, Range(ge=0, le=100)] = 2
    partition: str = ""
    gpus_per_node: Annotated[int, Range(ge=0, le=64)] = 1
    cpus_per_task: Annotated[int, Range(ge=0, le=1024)] = 0
    mem_gb: Annotated[float, Range(ge=0)] = 0.0
    timeout_min: Annotated[int, Range(ge=1)] = 240
    slurm_additional: dict[str, Any] = field(default_factory=dict)
    setup: list[str] = field(default_factory=list)


def launch_problems(launch: LaunchConfig) -> list[str]:
    """Problems of ``[launch]`` that one key's type cannot express, with dotted key paths."""
    problems = []
    for key, value in launch.slurm_additional.items():
        if not isinstance(value, str | int | float | bool) or not str(key).strip():
            problems.append(
                f"launch.slurm_additional.{key}: expected a string, number or boolean (an "
                f"#SBATCH option), got {value!r}"
            )
    return problems
