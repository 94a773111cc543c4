"""The shipped SOS recipes validate, and a tiny SOS run produces the report and every figure."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
RECIPES = sorted((ROOT / "recipes").glob("sos*.toml"))


def kd(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "kdtoolkit.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=900,
    )


def test_recipes_are_shipped():
    names = {p.name for p in RECIPES}
    assert {"sos.toml", "sos-quick.toml"} <= names


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_shipped_recipe_validates(recipe, tmp_path):
    result = kd("validate", str(recipe), "--show", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    resolved = json.loads(result.stdout)
    assert resolved["task"]["name"] == "sos"


def test_reference_recipe_keeps_the_paper_settings():
    result = kd("validate", str(ROOT / "recipes" / "sos.toml"), "--show", cwd=ROOT)
    resolved = json.loads(result.stdout)
    weights = {lc["name"]: lc["weight"] for lc in resolved["loss"]}
    assert weights == {"ce": 0.2, "kl": 0.8, "attention_mse": 0.01}
    assert next(lc for lc in resolved["loss"] if lc["name"] == "kl")["temperature"] == 3.0
    assert resolved["cv"]["folds"] == 5
    assert resolved["teacher"]["backbone"] == resolved["student"]["backbone"] == "convnext_attn"


def test_tiny_sos_run_writes_report_and_every_figure(tmp_path):
    result = kd(
        "run",
        str(ROOT / "recipes" / "sos-quick.toml"),
        "--quiet",
        "--output",
        str(tmp_path / "run"),
        "--set",
        "task.n=30",
        "--set",
        "task.size=64",
        "--set",
        "data.image_size=64",
        "--set",
        "teacher.epochs=1",
        "--set",
        "student.epochs=1",
        "--set",
        'teacher.backbone="resnet10t"',
        "--set",
        'student.backbone="resnet10t"',
        "--set",
        "evaluate.cam_examples=2",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    run = tmp_path / "run"
    results = json.loads((run / "results.json").read_text())
    assert {"teacher_crop", "baseline_full", "student"} <= set(results["summary"])
    assert "pointing_game" in results["summary"]["student"]
    assert "cam_iou" in results["summary"]["baseline_full"]
    assert "gap_closure" in results
    report = (run / "report.md").read_text()
    for figure in ("results_table.png", "confusion.png", "gradcam.png", "curves.png"):
        assert (run / "figures" / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"figures/{figure}" in report
    assert "Pointing game" in report or "pointing game" in report
    assert (tmp_path / ".kdcache" / "sos").is_dir()  # phantom generated into the cache
