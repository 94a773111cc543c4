"""Folds as jobs (``[launch]``, submitit), ``kd report`` and the launch keys: a real 2-fold run
through submitit's local executor against the in-process run, a failed job, a preempted job
requeued, the SLURM parameters in the sbatch script, and the wait loop's rules."""

from __future__ import annotations

import importlib
import json
import os
import shutil
import sys
import textwrap
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import submitit
import torch
from submitit.core.utils import FailedJobError, UncompletedJobError

import kdtoolkit
from kdtoolkit.cli import app, run_app
from kdtoolkit.config.launch import LaunchConfig
from kdtoolkit.config.recipe import load_recipe
from kdtoolkit.engine import jobs
from kdtoolkit.engine.outputs import rebuild_report
from kdtoolkit.errors import KdError
from kdtoolkit.models.checkpoint import read_metadata, save_checkpoint
from kdtoolkit.testing import tiny_manifest
from tests.conftest import RECIPE as TINY

#: The tests' tiny recipe (tests/conftest.py), 2 folds of 12 images at 32 px, with teacher and
#: student 1 epoch, no baseline and no Grad-CAM figure.
RECIPE = TINY.replace("epochs = 2", "epochs = 1").replace(
    "cam_examples = 2", "cam_examples = 0\nbaseline = false"
)
assert RECIPE.count("epochs = 1") == 2 and "baseline = false" in RECIPE


def comparable(results: dict) -> dict:
    """results.json without what may differ between two runs of one recipe (timings)."""
    return {k: v for k, v in results.items() if k != "latency_ms"}


def assert_same_evaluation(a: dict, b: dict) -> None:
    """Two eval.json files of one recipe agree: the same metrics and predicted classes, and
    probabilities equal up to float summation order (processes may use other thread counts)."""
    assert a["metrics"] == b["metrics"]
    pa, pb = a["predictions"], b["predictions"]
    assert pa.keys() == pb.keys()
    for key in pa:
        if key.endswith("_probabilities"):
            np.testing.assert_allclose(pa[key], pb[key], atol=1e-3)
        else:
            assert pa[key] == pb[key], key


def kd_here(*args: str) -> SimpleNamespace:
    """``kd ARGS`` run by the CLI's own entry code in this process (no interpreter start):
    ``returncode``; the output is left to ``capsys``."""
    saved = sys.argv
    sys.argv = ["kd", *args]
    try:
        run_app(app)
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    finally:
        sys.argv = saved
    return SimpleNamespace(returncode=code)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> SimpleNamespace:
    """The tiny recipe run twice: in this process, and with ``kd run --executor local`` (its
    two fold jobs at once)."""
    root = tmp_path_factory.mktemp("jobs")
    recipe = root / "tiny.toml"
    recipe.write_text(RECIPE.format(output=root / "inline", manifest=tiny_manifest(root / "d")))
    inline = kdtoolkit.run(load_recipe(recipe), quiet=True)
    out = root / "jobs_run"
    args = ["--executor", "local", "--output", str(out), "--set", "launch.parallel=2"]
    cli = kd_here("run", str(recipe), "--quiet", *args)
    return SimpleNamespace(recipe=recipe, inline=inline, cli=cli, out=out)


@pytest.mark.slow
def test_local_executor_runs_each_fold_as_a_job_with_the_same_results(runs):
    assert runs.cli.returncode == 0
    out = runs.out
    results = json.loads((out / "results.json").read_text())
    assert results["folds_run"] == [0, 1]
    assert comparable(results) == comparable(runs.inline.results)
    for k in (0, 1):
        a = json.loads((runs.inline.output / f"fold_{k}" / "eval.json").read_text())
        b = json.loads((out / f"fold_{k}" / "eval.json").read_text())
        assert_same_evaluation(a, b)
        log = jobs.job_log(out, k).read_text()  # each fold ran in its own process
        assert f"fold {k}: job started" in log and f"fold {k}: job done" in log
        assert not (out / f"fold_{k}" / "run.lock").exists()
    assert len(list((out / "jobs").glob("*_0_log.err"))) == 2  # submitit's logs, in the run
    log = (out / "run.log").read_text()
    assert "as local jobs" in log and "fold 1: job" in log and "done" in log


@pytest.mark.slow
def test_a_failed_fold_job_names_its_fold_and_log_and_keeps_the_others(runs, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(runs.out, out)
    (out / "fold_1" / "eval.json").unlink()
    teacher = out / "fold_1" / "teacher" / "model.safetensors"
    # this recipe's digest, weights of no backbone: refused only when the job loads it
    save_checkpoint(teacher, {"w": torch.zeros(1)}, read_metadata(teacher))
    sets = ["--output", str(out), "--set", "cv.only=[1]"]
    assert kd_here("run", str(runs.recipe), "--quiet", "--executor", "local", *sets).returncode == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "1 fold job(s) failed: fold 1: KdError:" in error
    assert "do not fit backbone" in error and "_0_log.err" in error
    assert "the report covers fold(s) 0" in error and "rerun the same command" in error
    assert json.loads((out / "results.json").read_text())["folds_run"] == [0]
    assert (out / "fold_0" / "eval.json").exists()


@pytest.mark.slow
def test_kd_report_rebuilds_from_the_finished_folds_and_names_the_missing(runs, tmp_path, capsys):
    out = tmp_path / "copied"
    shutil.copytree(runs.out, out)
    expected = json.loads((out / "results.json").read_text())
    for name in ("results.json", "results.csv", "report.md"):
        (out / name).unlink()
    shutil.rmtree(out / "figures")
    assert kd_here("report", str(out)).returncode == 0
    assert comparable(json.loads((out / "results.json").read_text())) == comparable(expected)
    assert (out / "figures" / "confusion.png").is_file() and (out / "report.md").is_file()
    assert "missing" not in capsys.readouterr().out

    (out / "fold_1" / "eval.json").unlink()  # fold 1 not finished
    assert kd_here("report", str(out)).returncode == 0
    stdout = capsys.readouterr().out
    lines = [line for line in stdout.splitlines() if "missing" in line]
    assert len(lines) == 1 and "fold 1 not finished" in lines[0], stdout
    assert "covers fold(s) 0" in lines[0]
    assert json.loads((out / "results.json").read_text())["folds_run"] == [0]
    assert "Mean ± std over 1 fold." in (out / "report.md").read_text()


@pytest.mark.slow
def test_kd_report_without_a_finished_fold_is_a_one_line_error(runs, tmp_path, capsys):
    out = tmp_path / "empty"
    out.mkdir()
    assert kd_here("report", str(out)).returncode == 2
    err = capsys.readouterr().err
    assert "not a run folder (no recipe.resolved.json)" in err and len(err.splitlines()) == 1
    shutil.copy(runs.out / "recipe.resolved.json", out)
    assert kd_here("report", str(out)).returncode == 2
    err = capsys.readouterr().err
    assert "no finished fold (no fold_<k>/eval.json for k in 0..1)" in err
    assert "copy finished fold folders into it" in err and "Traceback" not in err
    with pytest.raises(KdError, match="no finished fold"):
        rebuild_report(out)


def test_kd_validate_checks_the_launch_keys(tmp_path, capsys):
    path = tmp_path / "r.toml"
    text = RECIPE.format(output=tmp_path / "run", manifest=tiny_manifest(tmp_path / "d", n=6))
    path.write_text(text + '\n[launch]\nexecutor = "slurmm"\npartition = 3\n')
    assert kd_here("validate", str(path)).returncode == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert (
        "  launch.executor: must be one of 'inline', 'local', 'slurm', got 'slurmm' "
        "(did you mean 'slurm'?)\n" in err
    )
    assert "  launch.partition: expected str, got int 3\n" in err
    path.write_text(text + '\n[launch]\nexecutor = "slurm"\npartition = "gpu"\n')
    recipe = load_recipe(path)
    assert recipe.launch.partition == "gpu"
    assert recipe.digest() == load_recipe(path, ['launch.executor="local"']).digest()
    with pytest.raises(KdError, match=r"launch.slurm_additional.qos: expected a string"):
        load_recipe(path, ['launch.executor="slurm"', "launch.slurm_additional.qos=[1]"])


PREEMPTED_ONCE = '''
import os, signal, time
from pathlib import Path

def body(marks, fold, force):
    """Notes each start; on the first, receives what SLURM sends a preempted job."""
    path = Path(marks)
    starts = path.read_text().count("start") + 1 if path.exists() else 1
    with open(path, "a") as f:
        f.write("start\\n")
    if starts == 1:
        os.kill(os.getpid(), signal.SIGUSR2)
        time.sleep(60)  # the signal ends this start first
    return starts
'''


def test_a_preempted_fold_job_is_requeued_with_the_same_arguments(tmp_path, monkeypatch):
    (tmp_path / "preempted_once.py").write_text(textwrap.dedent(PREEMPTED_ONCE))
    monkeypatch.syspath_prepend(str(tmp_path))
    paths = [str(tmp_path), os.environ.get("PYTHONPATH", "")]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in paths if p))
    body = importlib.import_module("preempted_once").body
    executor = jobs.make_executor(LaunchConfig(executor="local", timeout_min=5), tmp_path / "j")
    marks = tmp_path / "marks.txt"
    fold_job = jobs.FoldJob(body, str(marks), 0, False)  # type: ignore[arg-type]
    assert isinstance(fold_job, submitit.helpers.Checkpointable)
    job = executor.submit(fold_job)
    assert job.result() == 2
    assert marks.read_text() == "start\nstart\n"
    assert "Requeued job" in (job.stdout() or "") + (job.stderr() or "")


def test_slurm_parameters_reach_the_sbatch_script(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", "exit 0"), ("sbatch", 'cp "$1" "$SBATCH_COPY"; echo "job 4242"')):
        (bin_dir / name).write_text(f"#!/bin/sh\n{text}\n")
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SBATCH_COPY", str(tmp_path / "script.sh"))
    launch = LaunchConfig(
        executor="slurm",
        partition="gpu",
        gpus_per_node=2,
        cpus_per_task=8,
        mem_gb=32,
        timeout_min=90,
        slurm_additional={"account": "lab", "qos": "high"},
        setup=["source .venv/bin/activate"],
    )
    executor = jobs.make_executor(launch, tmp_path / "jobs")
    executor.update_parameters(name="kd-tiny-fold3")
    job = executor.submit(jobs.FoldJob(print, "recipe", 3, False))  # type: ignore[arg-type]
    assert job.job_id == "4242"
    script = (tmp_path / "script.sh").read_text()
    for flag in (
        "--partition=gpu",
        "--gpus-per-node=2",
        "--cpus-per-task=8",
        "--mem=32GB",
        "--time=90",
        "--account=lab",
        "--qos=high",
        "--job-name=kd-tiny-fold3",
        "--signal=USR2@90",
    ):
        assert f"#SBATCH {flag}" in script, flag
    assert "source .venv/bin/activate" in script
    assert str(tmp_path / "jobs" / "%j_0_log.err") in script

    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))
    with pytest.raises(KdError, match=r'launch.executor = "slurm": no SLURM here'):
        jobs.make_executor(launch, tmp_path / "jobs")


class FakeJob:
    """A submitit job that is done after ``polls`` looks, with ``problem`` as its outcome."""

    count = 0

    def __init__(self, problem: Exception | None, polls: int = 1) -> None:
        FakeJob.count += 1
        self.job_id = str(FakeJob.count)
        self.problem, self.polls, self.cancelled = problem, polls, False
        self.state = "PENDING"
        self.paths = SimpleNamespace(stderr=Path(f"/run/jobs/{self.job_id}_0_log.err"))

    def done(self) -> bool:
        self.polls -= 1
        self.state = "RUNNING"
        return self.polls < 0

    def exception(self) -> Exception | None:
        return self.problem

    def cancel(self, check: bool = True) -> None:
        self.cancelled = True


FAILED = FailedJobError(
    "Job (task=0) failed during processing with trace:\n----------------------\n"
    "Traceback (most recent call last):\n  File x\nkdtoolkit.errors.KdError: fold 1: boom\n\n"
    "----------------------\nYou can check full logs"
)
LOST = UncompletedJobError(
    "Job 7 (task: 0) with path x\nhas not produced any output (state: NODE_FAIL)\nlog…"
)


def test_wait_loop_resubmits_lost_jobs_and_reports_failed_ones():
    outcomes = {0: [LOST, None], 1: [FAILED], 2: [LOST, LOST, LOST]}
    submitted: list[tuple[int, int]] = []

    def submit(fold: int, slot: int) -> FakeJob:
        submitted.append((fold, slot))
        return FakeJob(outcomes[fold].pop(0))

    lines: list[str] = []
    shown: list[Counter] = []
    status = jobs.wait_for_folds([0, 1, 2], submit, 2, 2, lines.append, shown.append, 0)
    assert {k: s.state for k, s in status.items()} == {0: "done", 1: "failed", 2: "failed"}
    assert status[1].error == "KdError: fold 1: boom" and status[1].log.endswith("_0_log.err")
    assert status[2].error == "the job ended without a result (state NODE_FAIL)"
    assert [s.tries for s in status.values()] == [2, 1, 3]
    assert max(c["waiting"] + c["running"] for c in shown) <= 2  # never more than the slots
    assert {slot for _, slot in submitted} == {0, 1}
    assert sum("resubmitting" in line for line in lines) == 3
    error = str(jobs.folds_failed([status[1], status[2]], [0]))
    assert error.startswith("2 fold job(s) failed: fold 1: KdError: fold 1: boom (log /run/")
    assert "\n" not in error and jobs.FoldsFailed.exit_code == 1


def test_wait_loop_cancels_its_jobs_when_interrupted():
    made: list[FakeJob] = []

    def submit(fold: int, slot: int) -> FakeJob:
        made.append(FakeJob(None, polls=10**6))
        return made[-1]

    def interrupt(counts: Counter) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        jobs.wait_for_folds([0, 1, 2], submit, 2, 0, lambda line: None, interrupt, 0)
    assert len(made) == 2 and all(job.cancelled for job in made)


def test_local_jobs_get_a_group_of_gpus_each():
    def slots(gpus: list[int], **launch) -> list[tuple[int, ...]]:
        return jobs.local_slots(LaunchConfig(executor="local", **launch), gpus)

    assert slots([]) == [()]  # no GPU: one fold at a time, unless parallel says otherwise
    assert slots([], parallel=3) == [(), (), ()]
    assert slots([0, 1, 2, 3]) == [(0,), (1,), (2,), (3,)]
    assert slots([4, 5, 6, 7], gpus_per_node=2) == [(4, 5), (6, 7)]
    assert slots([0, 1], gpus_per_node=4) == [(0, 1)]
    assert slots([0, 1], parallel=3) == [(0,), (1,), (0,)]
    assert slots([0, 1], gpus_per_node=0, parallel=2) == [(), ()]
