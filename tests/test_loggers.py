"""Run loggers (``experiment.loggers``): TensorBoard, MLflow and CSV read back with their own
readers against the run's own history and results; a resumed run logs no step twice; a
logger that raises is switched off with one warning; a missing package is one line at
validation; loggers stay out of the recipe digest."""

from __future__ import annotations

import csv
import json
import os
import re
import sys
import types
from collections import Counter
from pathlib import Path

import pytest

import kdtoolkit
from kdtoolkit import RunLogger, hookimpl, load_recipe
from kdtoolkit.config.recipe import RecipeError
from kdtoolkit.engine import stage as engine_stage
from kdtoolkit.engine import train
from kdtoolkit.errors import Interrupted
from kdtoolkit.testing import run_tiny_recipe
from tests.conftest import kd

pytest.importorskip("tensorboard")
pytest.importorskip("mlflow")

ALL = '["tensorboard","mlflow","csv"]'
STAGES = ("teacher", "baseline_full", "student")


def history(run: Path, stage: str) -> list[dict]:
    """The per-epoch history the engine stored with the stage's checkpoint (the reference)."""
    return json.loads((run / "fold_0" / stage / "model.json").read_text())["history"]


def test_loggers_log_every_stage_once_across_a_resume(tmp_path, tiny_recipe, monkeypatch):
    """Interrupted in the student's second epoch, then resumed by ``kd run``: every stage's
    epochs are in TensorBoard, MLflow and metrics.csv exactly once, with the engine's values;
    the final results are MLflow metrics; nothing is written outside the run folder."""
    overrides = ["cv.only=[0]", f"experiment.loggers={ALL}", "evaluate.cam_examples=0"]
    original = train.train_stage

    def interrupt_student(stage, *args, **kwargs):
        if stage.name == "student":
            on_epoch = kwargs["on_epoch"]

            def stop_after_first(epoch, record):
                on_epoch(epoch, record)
                raise KeyboardInterrupt

            kwargs["on_epoch"] = stop_after_first
        return original(stage, *args, **kwargs)

    monkeypatch.setattr(engine_stage, "train_stage", interrupt_student)
    with pytest.raises(Interrupted):
        kdtoolkit.run(load_recipe(tiny_recipe, overrides), quiet=True)
    run = tmp_path / "run"
    assert (run / "tb" / "fold_0" / "student").is_dir() and (run / "mlflow.json").exists()
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir(), cwd.mkdir()
    env = {**os.environ, "HOME": str(home), "XDG_CACHE_HOME": str(home / ".cache")}
    env.pop("MLFLOW_TRACKING_URI", None)
    sets = [a for o in overrides for a in ("--set", o)]
    result = kd("run", str(tiny_recipe), "--quiet", *sets, env=env, cwd=cwd)
    assert result.returncode == 0, result.stderr
    assert "resuming after epoch 1" in (run / "run.log").read_text()
    assert not list(home.rglob("*")) and not list(cwd.rglob("*")), "written outside the run"
    results = json.loads((run / "results.json").read_text())

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for stage in STAGES:
        want = [(r["epoch"], r["train_loss"]) for r in history(run, stage)]
        assert len(want) == 2
        events = EventAccumulator(str(run / "tb" / "fold_0" / stage))
        events.Reload()
        got = [(e.step, e.value) for e in events.Scalars("train/loss")]
        assert [s for s, _ in got] == [1, 2], stage
        assert got == pytest.approx(want, rel=1e-6)
        assert "val/accuracy" in events.Tags()["scalars"]

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(run / "mlruns").resolve().as_uri())
    experiment = client.get_experiment_by_name("tiny")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and len(runs) == 1 + len(STAGES)
    parent = parents[0]
    assert parent.info.run_id == json.loads((run / "mlflow.json").read_text())["run_id"]
    assert parent.info.status == "FINISHED"
    assert parent.data.params["student.epochs"] == "2"
    assert parent.data.params["loss.1.name"] == "kl"
    summary = results["summary"]["student"]["accuracy"]["mean"]
    assert parent.data.metrics["student/accuracy/mean"] == pytest.approx(summary)
    assert parent.data.metrics["gap_closure"] == pytest.approx(results["gap_closure"])
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"report.md", "results.json", "figures"} <= artifacts
    for child in (r for r in runs if r is not parent):
        stage = child.data.tags["kd.stage"].split("/")[1]
        steps = client.get_metric_history(child.info.run_id, "train_loss")
        want = [(r["epoch"], r["train_loss"]) for r in history(run, stage)]
        assert sorted((m.step, m.value) for m in steps) == pytest.approx(want, rel=1e-6)

    with open(run / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    keys = Counter((r["stage"], r["fold"], r["epoch"], r["name"]) for r in rows)
    assert max(keys.values()) == 1, "a step logged twice"
    for stage in STAGES:
        for record in history(run, stage):
            key = (stage, "0", str(record["epoch"]), "val_loss")
            assert keys[key] == 1
            value = next(float(r["value"]) for r in rows if tuple(r.values())[:4] == key)
            assert value == pytest.approx(record["val_loss"])
    final = {r["name"]: float(r["value"]) for r in rows if r["stage"] == "results"}
    assert final["student/accuracy/mean"] == pytest.approx(summary)


def test_a_repeated_epoch_is_logged_once(tmp_path):
    """An epoch sent again (its resume state lost after it was logged) leaves one step in
    each logger, reopened as a resumed run would."""
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from kdtoolkit import RunInfo
    from kdtoolkit.plugins.manager import registries

    info = RunInfo("t", tmp_path, {}, {"a.b": 1}, "d", False)
    for attempt in range(2):
        for name in ("csv", "tensorboard", "mlflow"):
            logger = registries().loggers[name]()
            logger.start(info)
            for epoch in (1, 2) if attempt == 0 else (2, 3):
                logger.log_epoch(0, "student", epoch, {"train_loss": 10.0 * epoch + attempt})
            logger.close("finished")
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv", newline="")))  # noqa: SIM115
    assert [(r["epoch"], r["value"]) for r in rows] == [("1", "10.0"), ("2", "20.0"), ("3", "31.0")]
    events = EventAccumulator(str(tmp_path / "tb" / "fold_0" / "student"))
    events.Reload()
    # TensorBoard keeps the latest attempt from its first step on (purge_step)
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(1, 10), (2, 21), (3, 31)]
    client = MlflowClient(tracking_uri=(tmp_path / "mlruns").resolve().as_uri())
    (child,) = client.search_runs(
        [client.get_experiment_by_name("t").experiment_id], "tags.`kd.stage` = 'fold_0/student'"
    )
    steps = client.get_metric_history(child.info.run_id, "train_loss")
    assert sorted((m.step, m.value) for m in steps) == [(1, 10), (2, 20), (3, 31)]


class Boom(RunLogger):
    calls = 0

    def log_epoch(self, fold, stage, epoch, scalars):
        Boom.calls += 1
        raise RuntimeError("disk on fire")


@hookimpl
def kd_register_loggers(registry):
    registry.register("boom", Boom)


def docs_logger() -> types.ModuleType:
    """The example logger of docs/tracking.md, as a plugin module."""
    text = (Path(__file__).parents[1] / "docs" / "tracking.md").read_text()
    source = next(b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "PrintLogger" in b)
    module = types.ModuleType("print_logger")
    exec(compile(source, "docs/tracking.md", "exec"), module.__dict__)
    return module


def test_a_logger_that_raises_is_switched_off_once(tmp_path, capsys):
    """A raising logger is named once in run.log and dropped; the others (and the docs'
    example logger) go on, and the run finishes."""
    loggers = ["boom", "csv", {"name": "print", "every": 1}]
    plugins = (sys.modules[__name__], docs_logger())
    result = run_tiny_recipe(tmp_path, *plugins, **{"experiment.loggers": loggers})
    log = (result.output / "run.log").read_text().splitlines()
    warnings = [line for line in log if "logger 'boom'" in line]
    assert len(warnings) == 1 and Boom.calls == 1
    assert "failed in log_epoch: RuntimeError: disk on fire; switched off" in warnings[0]
    rows = list(csv.DictReader(open(result.output / "metrics.csv", newline="")))  # noqa: SIM115
    assert {r["stage"] for r in rows} == {"teacher", "student", "results"}
    assert (result.output / "report.md").exists()
    printed = capsys.readouterr().out
    assert "fold 0 student epoch 1: loss " in printed and "fold 0 teacher epoch 1" in printed
    summary = result.results["summary"]["student"]["accuracy"]["mean"]
    saved = json.loads((result.output / "accuracy.json").read_text())
    assert saved == {"student": pytest.approx(summary)}


def test_missing_package_is_one_line_at_validate(tmp_path, tiny_recipe, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if not installed
    with pytest.raises(RecipeError) as e:
        load_recipe(tiny_recipe, ['experiment.loggers=["csv", "tensorboard", "tensorbord"]'])
    assert e.value.problems[0] == (
        "experiment.loggers[1]: the tensorboard logger needs tensorboard, which is not "
        'installed; pip install "kdtoolkit[tensorboard]"'
    )
    assert "experiment.loggers[2]: unknown logger 'tensorbord'" in e.value.problems[1]
    assert "'tensorboard'" in e.value.problems[1]
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text("import sys\nsys.modules['mlflow'] = None\n")
    path = os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path}
    result = kd("validate", str(tiny_recipe), "--set", 'experiment.loggers=["mlflow"]', env=env)
    assert result.returncode == 2
    line = "experiment.loggers[0]: the mlflow logger needs mlflow, which is not installed; "
    assert line + 'pip install "kdtoolkit[mlflow]"' in result.stderr
    assert "Traceback" not in result.stderr


def test_loggers_stay_out_of_the_digest(tiny_recipe):
    plain = load_recipe(tiny_recipe)
    logged = load_recipe(tiny_recipe, [f"experiment.loggers={ALL}"])
    assert plain.experiment.loggers == ["csv"]
    assert logged.experiment.loggers == ["tensorboard", "mlflow", "csv"]
    assert plain.digest() == logged.digest()


def test_only_rank_0_logs(tiny_recipe, monkeypatch):
    from kdtoolkit.engine.loggers import RunLoggers

    recipe = load_recipe(tiny_recipe)
    assert [n for n, _ in RunLoggers.open(recipe, print).loggers] == ["csv"]
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert RunLoggers.open(recipe, print).loggers == []


@pytest.mark.parametrize(
    "entry, option",
    [
        ('{name="csv", file="../metrics.csv"}', "file"),
        ('{name="tensorboard", folder="/tmp/tb"}', "folder"),
    ],
)
def test_a_logger_path_outside_the_run_folder_is_refused(tiny_recipe, entry, option):
    with pytest.raises(RecipeError) as e:
        load_recipe(tiny_recipe, [f"experiment.loggers=[{entry}]"])
    assert f"experiment.loggers[0]: {option} = " in str(e.value) and "inside it" in str(e.value)
    load_recipe(tiny_recipe, ['experiment.loggers=[{name="csv", file="logs/metrics.csv"}]'])
