"""The ``sos`` task and the ``kd sos`` command that the kd-sos plugin registers."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import kd_sos.plugin
import numpy as np
import pluggy
import pytest
import typer
from kd_sos.phantom import PRESETS, STAGES, render, sample_rng, stage_order
from kd_sos.task import phantom_data
from PIL import Image
from typer.testing import CliRunner

import kdtoolkit.plugins.hookspec
from kdtoolkit.config.option import check_options
from kdtoolkit.errors import KdError
from kdtoolkit.plugins.registry import Registry


def read_manifest(path: Path) -> tuple[list[str], list[dict]]:
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        return list(reader.fieldnames or []), list(reader)


def fresh_manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager("kdtoolkit")
    pm.add_hookspecs(kdtoolkit.plugins.hookspec)
    pm.register(kd_sos.plugin)
    pm.check_pending()  # every hook implementation matches a hook
    return pm


def test_registers_the_sos_task(tmp_path):
    registry = Registry("task")
    fresh_manager().hook.kd_register_tasks(registry=registry)
    task = registry.get("sos")
    assert task.name == "sos" and task.classes == STAGES
    assert len(task.descriptions) == 5 and task.ordinal and task.crop_aspect == 2.0
    assert task.defaults["cv"] == {"folds": 5}
    weights = {term["name"]: term["weight"] for term in task.defaults["loss"]}
    assert weights == {"ce": 0.2, "kl": 0.8, "attention_mse": 0.01}
    good = {"n": 5, "seed": 1, "size": 64, "band_width": 0.1, "noise": 0.02}
    assert check_options(task.make_data, good, "task", ("out_dir",)) == []
    problems = check_options(task.make_data, {"n": 0, "sise": 64}, "task", ("out_dir",))
    assert len(problems) == 2
    manifest = task.make_data(tmp_path, n=5, seed=1, size=64)
    _, rows = read_manifest(manifest)
    assert len(rows) == 5
    assert task.make_data(tmp_path, n=5, seed=1, size=64) == manifest  # reused
    other = task.make_data(tmp_path, n=5, seed=2, size=64)  # beside it, not over it
    assert other.parent != manifest.parent and manifest.exists()


def test_difficulty_option(tmp_path):
    assert check_options(phantom_data, {"difficulty": "hard"}, "task", ("out_dir",)) == []
    problems = check_options(phantom_data, {"difficulty": "easy"}, "task", ("out_dir",))
    assert len(problems) == 1 and "\n" not in problems[0]
    assert problems[0].startswith("task.difficulty: must be one of 'paper', 'hard', got 'easy'")
    paper = phantom_data(tmp_path, n=3, size=64)
    hard = phantom_data(tmp_path, n=3, size=64, difficulty="hard", noise=0.02)
    assert paper.parent != hard.parent
    params = json.loads((hard.parent / "phantom.json").read_text())["difficulty"]
    assert params == {
        **json.loads((paper.parent / "phantom.json").read_text())["difficulty"],
        "age_cues": 0.0,
        "scale_jitter": 0.1,
        "noise": 0.02,
    }
    with pytest.raises(KdError, match="unknown difficulty"):
        phantom_data(tmp_path, n=3, size=64, difficulty="easy")


def test_phantom_command(tmp_path):
    app = typer.Typer()

    @app.callback()
    def main() -> None:
        """kd"""

    fresh_manager().hook.kd_register_commands(app=app)
    runner = CliRunner()
    out = tmp_path / "out"
    args = ["sos", "phantom", str(out), "--n", "4", "--seed", "2", "--size", "64"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert str(out / "manifest.csv") in result.output.replace("\n", "")
    assert len(read_manifest(out / "manifest.csv")[1]) == 4
    assert "reused" in runner.invoke(app, args).output
    bad = runner.invoke(app, ["sos", "phantom", str(out), "--n", "0"])
    assert isinstance(bad.exception, KdError) and "n must be >= 1" in str(bad.exception)
    assert len(read_manifest(out / "manifest.csv")[1]) == 4  # the old phantom is untouched
    bad = runner.invoke(app, ["sos", "phantom", str(out), "--n", "many"])
    assert bad.exit_code == 2
    bad = runner.invoke(app, ["sos", "phantom", str(out), "--difficulty", "easy"])
    assert str(bad.exception) == "phantom: unknown difficulty 'easy' (known: paper, hard)"
    hard = tmp_path / "hard"
    hard_args = ["sos", "phantom", str(hard), *args[3:], "--difficulty", "hard"]
    assert runner.invoke(app, hard_args).exit_code == 0
    rows = [(d, read_manifest(d / "manifest.csv")[1][0]) for d in (out, hard)]
    first = [np.asarray(Image.open(d / row["image"])) for d, row in rows]
    expected = render(sample_rng(2, 0), int(stage_order(4, 2)[0]), 64, PRESETS["hard"]).image
    assert np.array_equal(first[1], expected) and not np.array_equal(first[0], expected)
