"""``kd tune``: the ``[tune]`` section, the validation-only objective, pruning, the shared
study (workers, resume) and ``best.toml``, at a tiny size."""

from __future__ import annotations

import csv
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from kdtoolkit.config.recipe import load_recipe
from kdtoolkit.config.tune import recipe_values
from kdtoolkit.engine.folder import STAMP
from kdtoolkit.engine.loaders import Loaders
from kdtoolkit.errors import KdError
from kdtoolkit.testing import kd_cli, kd_in_process
from kdtoolkit.tuning import objective as objective_mod
from kdtoolkit.tuning import study as tune_mod

optuna = pytest.importorskip("optuna")

SPACE = """
[tune]
pruner = "none"
folds = [0]
"loss.0.weight" = {low = 0.05, high = 1.0, log = true}
"loss.1.temperature" = {choices = [1, 2, 4]}
"""
FAST = ["teacher.epochs=1", "student.epochs=2"]


@pytest.fixture
def tune_recipe(tiny_recipe: Path) -> Path:
    tiny_recipe.write_text(tiny_recipe.read_text() + SPACE)
    return tiny_recipe


def problems(recipe: Path, *sets: str) -> str:
    with pytest.raises(KdError) as e:
        load_recipe(recipe, list(sets))
    return str(e.value)


def test_tune_section_is_validated_and_outside_the_digest(tune_recipe: Path) -> None:
    plain = load_recipe(tune_recipe, ["tune={}"])
    recipe = load_recipe(tune_recipe)
    assert recipe.digest() == plain.digest()  # what to try is not what a run computes
    assert recipe.tune.space == {
        "loss.0.weight": {"low": 0.05, "high": 1.0, "log": True},
        "loss.1.temperature": {"choices": [1, 2, 4]},
    }
    assert load_recipe(recipe.to_dict()).tune == recipe.tune  # round trip
    nested = load_recipe(tune_recipe, ["tune.student.lr={low=0.001,high=0.01}"])
    assert nested.tune.space["student.lr"] == {"low": 0.001, "high": 0.01}
    cases = {
        "tune.teacher.lr={low=0.001,high=0.01}": "tune.teacher.lr: only a student setting",
        "tune.student.backbone={choices=['resnet18']}": "tune.student.backbone: only a student",
        "tune.student.lrr={low=0.001,high=0.01}": "tune.student.lrr: 0.001 gives student.lrr: "
        "unknown key",
        "tune.loss.1.temperature={choices=[0.01,2]}": "tune.loss.1.temperature: 0.01 gives "
        "loss[1].temperature: must be >= 0.05",
        "tune.loss.2.weight={low=0.5,high=0.1}": "tune.loss.2.weight: low must be below high",
        "tune.loss.2.weight={low=0.0,high=1.0,log=true}": "a log range needs low > 0",
        "tune.loss.2.weight={low=0,high=1}": "only integers are tried, but loss.2.weight takes "
        "fractions",
        "tune.loss.9.weight={low=0.1,high=1.0}": "tune.loss.9.weight: 0.1 gives",
        "tune.loss.2.weight={low=0.1,hi=1.0}": "unknown key(s) hi",
        "tune.folds=[7]": "tune.folds: folds [7] do not exist (0..1)",
        "tune.pruner='hyperband'": "tune.pruner: must be one of 'median', 'halving', 'none'",
        "tune.trials=3": "tune.trials: unknown key",
        "tune.warmup=-1": "tune.warmup: must be >= 0 (epochs), got -1",
        "tune.warmup=1.5": "tune.warmup: ",
    }
    for override, message in cases.items():
        text = problems(tune_recipe, override)
        assert "1 problem(s)" in text and message in text, (override, text)
    # a whole-number key takes an integer range
    assert load_recipe(tune_recipe, ["tune.student.epochs={low=1,high=3}"]).tune.space
    result = kd_in_process(
        "validate", str(tune_recipe), "--set", "tune.loss.0.weight={low=2.0,high=1}"
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "tune.loss.0.weight: low must be below high" in result.stderr


def test_space_becomes_optuna_distributions(tune_recipe: Path) -> None:
    from optuna.distributions import (
        CategoricalDistribution,
        FloatDistribution,
        IntDistribution,
    )

    space = {
        "a.x": {"low": 0.05, "high": 1.0, "log": True},
        "a.y": {"choices": [1, 2, 4]},
        "a.z": {"low": 2, "high": 10, "step": 4},
        "a.w": {"low": 0.0, "high": 1.0, "step": 0.25},
    }
    study = optuna.create_study()
    trial = study.ask()
    values = {k: objective_mod.suggest(trial, k, v) for k, v in space.items()}
    assert trial.distributions == {
        "a.x": FloatDistribution(0.05, 1.0, log=True),
        "a.y": CategoricalDistribution([1, 2, 4]),
        "a.z": IntDistribution(2, 10, step=4),
        "a.w": FloatDistribution(0.0, 1.0, step=0.25),
    }
    assert values["a.z"] in (2, 6, 10) and values["a.w"] in (0.0, 0.25, 0.5, 0.75, 1.0)


@pytest.mark.parametrize("warmup", [0, 3])
def test_the_median_pruner_waits_warmup_epochs(tune_recipe: Path, tmp_path: Path, warmup) -> None:
    """After three trials scoring 0.9 at every epoch, a trial scoring 0.1 is stopped at its
    first epoch, or only once it has trained ``tune.warmup`` epochs."""
    sets = ["tune.pruner='median'", f"tune.warmup={warmup}", f"experiment.output='{tmp_path}'"]
    recipe = load_recipe(tune_recipe, sets)
    study = tune_mod.open_study(recipe, tune_mod.open_storage(tmp_path))
    for _ in range(3):
        trial = study.ask()
        for step in range(1, 6):
            trial.report(0.9, step)
        study.tell(trial, 0.9)
    trial = study.ask()
    stopped = []
    for step in range(1, 6):
        trial.report(0.1, step)
        stopped.append(trial.should_prune())
    assert stopped.index(True) + 1 == max(warmup, 1)


def test_missing_optuna_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "optuna", None)
    with pytest.raises(KdError, match=re.escape('pip install "kdtoolkit[tune]"')):
        objective_mod.import_optuna()


def held_out_of(output: Path, fold: int) -> set[int]:
    """The samples of held-out fold ``fold``, from the run folder's folds.json."""
    samples = json.loads((output / "folds.json").read_text())["samples"]
    return {s["index"] for s in samples if s["fold"] == fold}


def test_tuning_never_loads_a_held_out_sample(
    tune_recipe: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every loader the study makes (teacher, every trial's student and its validation) is
    recorded with the fold being trained; none may hold a sample of that fold's held-out part.
    The objective is checked by hand: the mean over folds of each fold's last reported
    validation accuracy (``select_by = "last"``, the default)."""
    calls: list[tuple[int, set[int]]] = []
    current: list[int] = []
    original_call, original_train = Loaders.__call__, objective_mod.train_model

    def spy_loader(self, indices, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append((current[-1], {int(i) for i in indices}))
        return original_call(self, indices, *args, **kwargs)

    def spy_train(ctx, fold, *args, **kwargs):  # type: ignore[no-untyped-def]
        current.append(fold)
        return original_train(ctx, fold, *args, **kwargs)

    monkeypatch.setattr(Loaders, "__call__", spy_loader)
    monkeypatch.setattr(objective_mod, "train_model", spy_train)
    out = tmp_path / "study"
    sets = [*FAST, "tune.folds=[0,1]"]
    result = tune_mod.tune(tune_recipe, 2, sets, output=out, quiet=True)
    assert [r["state"] for r in result.trials] == ["complete", "complete"]
    assert len(calls) == 2 * 2 + 2 * 2 * 2  # teacher (train, val) per fold; 2 trials × 2 folds
    for fold, indices in calls:
        assert not indices & held_out_of(out, fold), f"fold {fold} loaded held-out samples"
    seen = set().union(*(i for f, i in calls if f == 0))
    assert seen == set(range(30)) - held_out_of(out, 0)  # the spy sees the whole training part
    for t in optuna.load_study(
        study_name=tune_mod.STUDY_NAME, storage=tune_mod.open_storage(out)
    ).trials:
        steps = t.intermediate_values
        assert sorted(steps) == [1, 2, 3, 4]  # fold 0: epochs 1-2, fold 1: steps 3-4
        best = [steps[2], steps[4]]  # select_by = "last": each fold's last epoch
        assert t.value == pytest.approx(np.mean(best))
        assert [t.user_attrs["fold_0"], t.user_attrs["fold_1"]] == pytest.approx(best)
    assert not list(out.glob("fold_*/student_t*"))  # trial students are not kept
    toml = load_recipe(result.best_toml)
    assert "[tune]" not in result.best_toml.read_text() and not toml.tune.space
    params = result.best["params"]
    want = load_recipe(tune_recipe, [*sets, *(f"{k}={v}" for k, v in params.items())])
    assert toml.digest() == want.digest()
    assert toml.output_dir == out / "best"


def test_pruned_trials_stop_and_count(
    tune_recipe: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pruner that stops every trial at its first report: each trial trains one epoch,
    counts as finished, and no best.toml is written (no complete trial)."""
    monkeypatch.setattr(
        optuna.pruners, "MedianPruner", lambda **kw: optuna.pruners.ThresholdPruner(lower=2.0)
    )
    out = tmp_path / "study"
    sets = [*FAST, "tune.pruner='median'"]
    result = tune_mod.tune(tune_recipe, 2, sets, output=out, quiet=True)
    assert [r["state"] for r in result.trials] == ["pruned", "pruned"]
    assert result.best_toml is None and not (out / "best.toml").exists()
    study = optuna.load_study(study_name=tune_mod.STUDY_NAME, storage=tune_mod.open_storage(out))
    assert [sorted(t.intermediate_values) for t in study.trials] == [[1], [1]]
    assert "no complete trial" in (out / "tune.log").read_text()
    again = tune_mod.tune(tune_recipe, 2, sets, output=out, quiet=True)
    assert again.ran == 0 and len(again.trials) == 2
    other = [*sets, "tune.loss.2.weight={low=0.001,high=0.1}"]
    with pytest.raises(KdError, match=r"study.journal: the study was made for another \[tune\]"):
        tune_mod.tune(tune_recipe, 3, other, output=out, quiet=True)


def test_interrupted_trials_are_tried_again(tune_recipe: Path, tmp_path: Path) -> None:
    """A trial left running (its process killed) fails and its values are queued again."""
    recipe = load_recipe(tune_recipe, [f"experiment.output='{tmp_path}'"])
    storage = tune_mod.open_storage(tmp_path)
    study = tune_mod.open_study(recipe, storage)
    trial = study.ask()
    value = objective_mod.suggest(trial, "loss.0.weight", recipe.tune.space["loss.0.weight"])
    lines: list[str] = []
    tune_mod.requeue_interrupted(study, storage, lines.append)
    states = [t.state for t in study.trials]
    assert states == [optuna.trial.TrialState.FAIL, optuna.trial.TrialState.WAITING]
    assert study.trials[1].params == {} and study.trials[1].system_attrs["fixed_params"] == {
        "loss.0.weight": value
    }
    assert lines == ["trial 0: interrupted before; its values are tried again"]
    assert tune_mod.finished(study) == 0


def test_recipe_values_are_read_by_key_and_checked_against_the_space() -> None:
    """The recipe's value of each key, by hand: list indices, a choice written 3.0 for 3,
    and None when a key is unset or a value lies outside its range or choices."""
    recipe = {"loss": [{"weight": 0.2}, {"weight": 0.8, "temperature": 3.0}], "student": {}}
    space = {
        "loss.0.weight": {"low": 0.05, "high": 1.0, "log": True},
        "loss.1.temperature": {"choices": [1, 2, 3]},
    }
    values = recipe_values(recipe, space)
    assert values == {"loss.0.weight": 0.2, "loss.1.temperature": 3}
    assert isinstance(values["loss.1.temperature"], int)  # the choice itself, as Optuna has it
    assert recipe_values(recipe, {"loss.0.weight": {"low": 0.3, "high": 1.0}}) is None
    assert recipe_values(recipe, {"loss.1.weight": {"low": 0.1, "high": 0.79}}) is None
    assert recipe_values(recipe, {"loss.1.temperature": {"choices": [1, 2, 4]}}) is None
    assert recipe_values(recipe, {"loss.2.weight": {"low": 0.1, "high": 1.0}}) is None
    assert recipe_values(recipe, {"student.lr": {"low": 0.1, "high": 1.0}}) is None


def test_the_first_trial_is_the_recipe_as_written(tune_recipe: Path, tmp_path: Path) -> None:
    """A new study tries the recipe's own values first (its row says so), so the table shows
    what the search gains over them; a rerun does not queue them again."""
    out = tmp_path / "study"
    sets = [*FAST, "tune.loss.1.temperature={choices=[1,3]}", "loss.0.weight=0.3"]
    sets.append('experiment.loggers=["csv"]')
    result = tune_mod.tune(tune_recipe, 1, sets, output=out, quiet=True)
    rows = read_trials(out / "trials.csv")
    assert [(r["number"], r["recipe"]) for r in rows] == [("0", "true")]
    assert float(rows[0]["loss.0.weight"]) == 0.3 and rows[0]["loss.1.temperature"] == "3"
    assert result.best["recipe"] and result.best["number"] == 0
    log = (out / "tune.log").read_text()
    assert "trial 0: the recipe's own values {'loss.0.weight': 0.3, 'loss.1.temperature': 3}" in log
    assert re.search(r"the recipe's own values, trial 0: 0\.\d{4}", log)
    with open(out / "metrics.csv", newline="") as f:  # the loggers see every trial
        logged = list(csv.DictReader(f))
    epochs = {(r["stage"], r["fold"], r["epoch"]) for r in logged if r["name"] == "val_accuracy"}
    assert epochs == {("teacher", "0", "1"), ("student_t0", "0", "1"), ("student_t0", "0", "2")}
    results = {r["name"]: float(r["value"]) for r in logged if r["stage"] == "results"}
    value = float(rows[0]["value"])
    assert results == {
        "trial_0/val_accuracy": value,
        "recipe/val_accuracy": value,
        "best/val_accuracy": value,
        "best/trial": 0.0,
        "best/loss.0.weight": 0.3,
        "best/loss.1.temperature": 3.0,
    }
    tune_mod.tune(tune_recipe, 2, sets, output=out, quiet=True)
    assert [r["recipe"] for r in read_trials(out / "trials.csv")] == ["true", "false"]


def test_a_tune_that_stops_before_its_study_leaves_no_stamp(
    tune_recipe: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The folder is stamped only once every check passed, and the stamp of a new folder is
    taken back when the tune stops (here: the shared stages fail), as in ``kd run``; a
    study of another space is refused before anything is written."""

    def broken(*args: object) -> None:
        raise KdError("the shared stages failed")

    out = tmp_path / "study"
    monkeypatch.setattr(tune_mod, "train_shared", broken)
    with pytest.raises(KdError, match="the shared stages failed"):
        tune_mod.tune(tune_recipe, 1, FAST, output=out, quiet=True)
    assert not (out / STAMP).exists()
    assert "stopped: the shared stages failed" in (out / "tune.log").read_text()
    monkeypatch.undo()
    tune_mod.tune(tune_recipe, 1, FAST, output=out, quiet=True)
    before = {p: p.read_bytes() for p in (out / STAMP, out / tune_mod.STUDY_FILE)}
    other = [*FAST, "tune.loss.2.weight={low=0.001,high=0.1}"]
    with pytest.raises(KdError, match=r"the study was made for another \[tune\]"):
        tune_mod.tune(tune_recipe, 2, other, output=out, quiet=True)
    assert {p: p.read_bytes() for p in before} == before


def read_trials(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_cli_two_workers_then_resume(tune_recipe: Path, tmp_path: Path) -> None:
    """kd tune with 3 trials on 2 worker processes, rerun with 4: only the fourth runs; the
    study's earlier trials are kept as they were; best.toml passes kd validate."""
    out = tmp_path / "study"
    args = ["tune", str(tune_recipe), "--output", str(out), "--quiet"]
    args += [item for s in FAST for item in ("--set", s)]
    first = kd_cli(*args, "--trials", "3", "--workers", "2")
    assert first.returncode == 0, first.stderr[-2000:]
    rows = read_trials(out / "trials.csv")
    assert [r["number"] for r in rows] == ["0", "1", "2"]
    assert {r["state"] for r in rows} == {"complete"}
    values = {(r["loss.0.weight"], r["loss.1.temperature"]) for r in rows}
    assert len(values) == 3  # the workers draw different values
    assert sorted(p.name for p in (out / "workers").iterdir()) == ["worker_0.log", "worker_1.log"]
    assert "ran 3 trial(s)" in first.stdout and "kd run " in first.stdout
    second = kd_in_process(*args, "--trials", "4")
    assert second.returncode == 0, second.stderr[-2000:]
    assert "3 trials finished before; running 1" in (out / "tune.log").read_text()
    assert "ran 1 trial(s)" in second.stdout
    again = read_trials(out / "trials.csv")
    assert again[:3] == rows and again[3]["state"] == "complete"
    assert (out / "figures" / "tune_history.png").stat().st_size > 0
    assert (out / "figures" / "tune_importance.png").stat().st_size > 0
    checked = kd_in_process("validate", str(out / "best.toml"))
    assert checked.returncode == 0, checked.stderr


@pytest.mark.slow
def test_workers_as_local_jobs_share_the_study(tune_recipe: Path, tmp_path: Path) -> None:
    """``launch.executor = "local"``: the workers are submitit jobs that run at once and
    together finish the trials asked for; a worker started once the study holds them runs
    none (as a job that SLURM requeues)."""
    out = tmp_path / "study"
    sets = [*FAST, 'launch.executor="local"']
    result = tune_mod.tune(tune_recipe, 3, sets, workers=2, output=out, quiet=True)
    assert sorted(r["number"] for r in result.trials) == [0, 1, 2]
    assert {r["state"] for r in result.trials} == {"complete"}
    log = (out / "tune.log").read_text()
    assert "workers 0, 1 as local jobs, 2 at a time" in log
    assert "worker 0: job" in log and "worker 1: job" in log and log.count(" done\n") >= 2
    assert list((out / "jobs").glob("*_log.err"))  # submitit's own files
    trials = {r["number"]: r["seconds"] for r in result.trials}
    from kdtoolkit.tuning.workers import worker_main

    recipe = load_recipe(tune_recipe, [*sets, f"experiment.output={json.dumps(str(out))}"])
    worker_main(tune_mod.optimize, recipe, [0], 2, 5, total=3)
    again = tune_mod.tune(tune_recipe, 3, sets, output=out, quiet=True)
    assert again.ran == 0 and {r["number"]: r["seconds"] for r in again.trials} == trials


def interrupt_trial_1(args: list[str], out: Path, sig: int) -> subprocess.CompletedProcess:
    """``kd ARGS`` stopped with ``sig`` once trial 1 has started (its line in tune.log)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "kdtoolkit.cli", *args], stderr=subprocess.PIPE, text=True
    )
    started, log = time.monotonic(), out / "tune.log"
    while not (log.exists() and "trial 1: {" in log.read_text()):
        assert proc.poll() is None and time.monotonic() - started < 300
        time.sleep(0.05)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(args, proc.returncode, "", err)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupted_trial_is_tried_again_with_its_values(tune_recipe, tmp_path, sig):
    """Ctrl-C (or SIGTERM) during trial 1 of three: one line, no traceback, exit 130 (143);
    the same command then runs trial 1's values again, completed, and one new trial (three
    finished, as asked)."""
    out = tmp_path / "study"
    args = ["tune", str(tune_recipe), "--output", str(out), "--quiet", "--trials", "3"]
    args += [item for s in FAST for item in ("--set", s)]
    stopped = interrupt_trial_1(args, out, sig)
    assert stopped.returncode == (130 if sig == signal.SIGINT else 143), stopped.stderr
    assert "Traceback" not in stopped.stderr and len(stopped.stderr.strip().splitlines()) == 1
    assert "rerun the same command to resume" in stopped.stderr
    again = kd_in_process(*args)
    assert again.returncode == 0, again.stderr[-2000:]
    rows = read_trials(out / "trials.csv")
    values = [(r["loss.0.weight"], r["loss.1.temperature"]) for r in rows]
    assert [r["state"] for r in rows] == ["complete", "fail", "complete", "complete"]
    assert values[2] == values[1] and values.count(values[1]) == 2  # tried again, once
    assert len(set(values)) == 3
    assert "trial 1: interrupted before; its values are tried again" in (
        (out / "tune.log").read_text()
    )


@pytest.mark.parametrize(
    "damage",
    [
        lambda b: bytes(range(256)) * 4,  # random bytes
        lambda b: b[: 2 * len(b) // 3],  # cut short
        lambda b: b"",  # emptied
    ],
    ids=["garbage", "truncated", "empty"],
)
def test_a_damaged_journal_is_one_line_naming_it(tune_recipe, tmp_path, damage):
    """A study journal that is not Optuna's: exit 2, one line naming it and --force."""
    out = tmp_path / "study"
    recipe = load_recipe(tune_recipe, [f"experiment.output='{out}'"])
    out.mkdir()
    study = tune_mod.open_study(recipe, tune_mod.open_storage(out))
    for _ in range(3):
        trial = study.ask()
        study.tell(trial, objective_mod.suggest(trial, "loss.0.weight", {"low": 0.1, "high": 1}))
    journal = out / tune_mod.STUDY_FILE
    journal.write_bytes(damage(journal.read_bytes()))
    args = ["tune", str(tune_recipe), "--output", str(out), "--quiet", "--trials", "1"]
    result = kd_in_process(*args, *(item for s in FAST for item in ("--set", s)))
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert f"{journal}: damaged, not an Optuna journal of kd tune" in lines[0]
    assert "pass --force to start a new study" in lines[0]
