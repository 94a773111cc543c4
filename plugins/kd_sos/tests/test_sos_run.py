"""The shipped SOS recipes validate, and a tiny SOS run produces the report and every figure."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from kdtoolkit.testing import kd_in_process

ROOT = Path(__file__).resolve().parents[3]
RECIPES = sorted((ROOT / "recipes").glob("sos*.toml"))


def kd(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return kd_in_process(*args, cwd=cwd)


def test_every_recipe_the_docs_name_is_shipped_and_every_shipped_one_is_documented():
    import re

    texts = [(ROOT / "README.md").read_text()]
    texts += [p.read_text() for p in sorted((ROOT / "docs").glob("*.md"))]
    # recipes/NAME.toml of this repository (not kd-molars/recipes/… of a generated plugin)
    named = {m for t in texts for m in re.findall(r"(?<![\w/-])recipes/([\w.-]+\.toml)", t)}
    shipped = {p.name for p in (ROOT / "recipes").glob("*.toml")}
    assert {"sos.toml", "sos-quick.toml"} <= shipped
    assert named - shipped == set(), "the docs name recipes that are not shipped"
    assert shipped - named == set(), "shipped recipes the docs never mention"


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_shipped_recipe_validates(recipe, tmp_path):
    result = kd("validate", str(recipe), "--show", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    resolved = json.loads(result.stdout)
    assert resolved["task"]["name"] == "sos"


def test_reference_recipe_keeps_the_paper_settings():
    """recipes/sos.toml is the paper's experiment, departing only where docs/results.md's
    departures table says so (from scratch, standard Grad-CAM by default, a YOLO11n detector,
    the crop-box jitter for the two-stage classifier alone)."""
    result = kd("validate", str(ROOT / "recipes" / "sos.toml"), "--show", cwd=ROOT)
    resolved = json.loads(result.stdout)
    terms = {lc["name"]: lc for lc in resolved["loss"]}
    assert {n: t["weight"] for n, t in terms.items()} == {
        "ce": 0.2,
        "kl": 0.8,
        "attention_mse": 0.01,
    }
    assert terms["kl"]["temperature"] == 3.0
    assert terms["attention_mse"].get("cam", "gradcam") == "gradcam"
    assert resolved["cv"]["folds"] == 5
    assert resolved["teacher"]["backbone"] == resolved["student"]["backbone"] == "convnext_attn"
    assert resolved["data"]["image_size"] == 512 and resolved["data"]["crop_size"] == [112, 224]
    assert resolved["teacher"]["pretrained"] is False and resolved["student"]["pretrained"] is False
    assert resolved["roi"]["provider"] == "yolo"
    assert resolved["experiment"]["paired"] is True
    departures = (ROOT / "docs" / "results.md").read_text().split("## Where the toolkit departs")[1]
    for documented in ("from scratch", 'cam = "paper"', "YOLO11n", "roi_shift", "two-stage"):
        assert documented in departures, documented


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
    # the quick-start says nothing a newcomer would read as a mistake
    assert "warning" not in result.stderr.lower()
    assert "two-stage classifier only" not in (run / "run.log").read_text()
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
