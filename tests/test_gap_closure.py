"""``kd compare`` (and benchmarks/gap_closure.py): variants against one teacher and baseline,
at a tiny size."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from kdtoolkit.config.variants import check_shared, load_variant_recipe
from kdtoolkit.engine import compare as gc
from kdtoolkit.engine.plan import EvaluateSpec, RoiSpec, TrainSpec, compare_plan, fold_plan
from kdtoolkit.errors import KdError
from kdtoolkit.report.comparison import Comparison, VariantInfo, write_comparison
from kdtoolkit.report.results import FoldResult, RunResults

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gap_closure.py"
ADD_ROI_FEATURE = "roi_feature:loss.3.name=roi_feature,loss.3.weight=0.5,loss.3.metric='mse'"


def test_variant_syntax_and_appended_loss_terms(tiny_recipe: Path) -> None:
    v = gc.parse_variant(
        "x:data.crop_size=[16,32],student.backbone_options={a=1,b='c,d'},cv.folds=3"
    )
    assert v.overrides == [
        "data.crop_size=[16,32]",
        "student.backbone_options={a=1,b='c,d'}",
        "cv.folds=3",
    ]
    assert gc.parse_variant("paper:").overrides == gc.parse_variant("paper").overrides == []
    with pytest.raises(KdError, match="snake_case"):
        gc.parse_variant("Bad Name:cv.folds=2")
    recipe = load_variant_recipe(tiny_recipe, ADD_ROI_FEATURE.split(":", 1)[1].split(","))
    assert [(t.name, t.weight) for t in recipe.loss][-1] == ("roi_feature", 0.5)
    assert len(recipe.loss) == 4 and recipe.loss[3].options == {"metric": "mse"}
    base = load_variant_recipe(tiny_recipe, [])
    check_shared(base, v.name, load_variant_recipe(tiny_recipe, ["student.lr=0.01"]))
    with pytest.raises(KdError, match="teacher.epochs"):
        check_shared(base, v.name, load_variant_recipe(tiny_recipe, ["teacher.epochs=5"]))


def test_compare_is_the_fold_plan_with_student_variants(tiny_recipe: Path) -> None:
    base = load_variant_recipe(tiny_recipe, [])
    kl = load_variant_recipe(tiny_recipe, ["loss.0.weight=0"])
    run = fold_plan(base)
    assert [(type(s).__name__, getattr(s, "role", None)) for s in run.stages] == [
        ("TrainSpec", "teacher"),
        ("RoiSpec", "roi"),
        ("TrainSpec", "student"),
        ("TrainSpec", "baseline_full"),
        ("EvaluateSpec", None),
    ]
    plan = compare_plan(base, [("paper", base), ("kl", kl)])
    roles = [s.role for s in plan.stages if isinstance(s, TrainSpec | RoiSpec)]
    assert roles == ["teacher", "roi", "student_paper", "student_kl", "baseline_full"]
    teacher, _, paper, kl_stage, baseline = plan.stages[:5]
    assert teacher.loss == () and baseline.loss == ()  # the engine's cross-entropy
    assert (paper.teacher, paper.rois, kl_stage.recipe) == ("teacher", True, kl)
    assert kl_stage.loss[0].weight == 0 and paper.loss[0].weight == 0.2
    assert isinstance(plan.evaluation, EvaluateSpec) and not plan.evaluation.cache
    assert plan.evaluation.rows == (
        ("baseline_full", "baseline_full"),
        ("student_paper", "student_paper"),
        ("student_kl", "student_kl"),
    )
    assert plan.teachers() == {"teacher"}


def test_gap_closure_script_tiny(tmp_path: Path, tiny_recipe: Path) -> None:
    out = tmp_path / "gap"
    args = [sys.executable, str(SCRIPT), str(tiny_recipe), "--output", str(out), "--quiet"]
    args += ["--set", "teacher.epochs=1", "--set", "student.epochs=1"]
    args += ["--set", "student.batch_size=4"]  # a few steps, so the rows differ
    args += ["--set", "cv.only=[0]"]  # one fold: what is checked is per fold
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}

    def script(*variants: str) -> subprocess.CompletedProcess:
        extra = [item for v in variants for item in ("--variant", v)]
        return subprocess.run(
            args + extra, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600
        )

    result = script("paper:", ADD_ROI_FEATURE)
    assert result.returncode == 0, result.stderr

    rows = ["teacher_crop", "baseline_full", "paper", "roi_feature"]
    lines = result.stdout.splitlines()
    assert any("gap closure" in line for line in lines), result.stdout
    table_rows = {
        row: next(line for line in lines if line.strip("│| ").startswith(row + " ")) for row in rows
    }

    data = json.loads((out / "gap_closure.json").read_text())
    assert data["rows"] == rows and data["folds_run"] == [0]
    mean = {
        row: float(np.mean([f["metrics"][row]["accuracy"] for f in data["folds"]])) for row in rows
    }
    # the gap closures from the per-fold accuracies (which branch runs depends on the tiny
    # training; test_gap_closure_by_hand pins both, a gap and none, on made-up folds)
    gap = mean["teacher_crop"] - mean["baseline_full"]
    for name in ("paper", "roi_feature"):
        expected = (mean[name] - mean["baseline_full"]) / gap if gap > 0 else None
        assert data["gap_closure"][name] == pytest.approx(expected, abs=1e-12)
        text = "n/a" if expected is None else f"{100 * expected:.1f}%"
        assert text in table_rows[name]
        acc = data["summary"][name]["accuracy"]
        assert f"{100 * acc['mean']:.2f} ± {100 * acc['std']:.2f}" in table_rows[name]

    for k in (0,):
        fold = out / f"fold_{k}"
        for role in ("teacher", "baseline_full", "student_paper", "student_roi_feature"):
            assert (fold / role / "model.safetensors").is_file(), role
        meta = json.loads((fold / "student_roi_feature" / "model.json").read_text())
        assert [t["name"] for t in meta["recipe"]["loss"]][-1] == "roi_feature"
    report = (out / "gap_closure.md").read_text()
    assert all(f"| {row} |" in report for row in rows)
    # the statistics of the pooled predictions, variants named, in the file, report and terminal
    pairs = [(c["a"], c["b"], c["metric"]) for c in data["comparisons"]]
    assert pairs == [
        (a, b, m)
        for m in ("accuracy", "pointing_game")
        for a, b in (
            ("paper", "baseline_full"),
            ("roi_feature", "baseline_full"),
            ("roi_feature", "paper"),
        )
    ]
    assert set(data["gap_closure_ci95"]) == {"paper", "roi_feature"}
    assert data["bootstrap"]["unit"] == "group" and set(data["pooled"]) == set(rows)
    assert "## Is the student better?" in report and "Is the student better?" in result.stdout

    # a rerun with one of the variants trains nothing and gives the same figures
    checkpoint = out / "fold_0" / "student_paper" / "model.safetensors"
    stamp = checkpoint.stat().st_mtime_ns
    rerun = script("paper:")
    assert rerun.returncode == 0, rerun.stderr
    again = json.loads((out / "gap_closure.json").read_text())
    assert again["rows"] == rows[:3] and again["folds"][0]["metrics"] == {
        row: data["folds"][0]["metrics"][row] for row in rows[:3]
    }
    assert checkpoint.stat().st_mtime_ns == stamp
    assert "trained in" not in (out / "gap_closure.log").read_text().split("gap closure of")[-1]


def fold(k: int, accuracy: dict[str, float], n: int = 20) -> FoldResult:
    """A fold of ``n`` samples of two classes whose rows get ``accuracy`` right."""
    labels = [i % 2 for i in range(n)]
    predictions: dict = {"index": list(range(n)), "label": labels, "group": [None] * n}
    for row, acc in accuracy.items():
        right = round(acc * n)
        predictions[row] = [y if i < right else 1 - y for i, y in enumerate(labels)]
    metrics = {row: {"accuracy": acc, "f1": acc} for row, acc in accuracy.items()}
    return FoldResult(fold=k, n_test=n, metrics=metrics, predictions=predictions)


@pytest.mark.parametrize(
    ("teacher", "baseline", "student", "closure", "cell"),
    [
        # gap 0.85 - 0.55 = 0.30, student 0.65 - 0.55 = 0.10: a third of the gap
        ((0.9, 0.8), (0.5, 0.6), (0.7, 0.6), 1 / 3, "33.3%"),
        # the student beyond the teacher: more than all of the gap
        ((0.6, 0.7), (0.5, 0.5), (0.8, 0.8), 2.0, "200.0%"),
        # the teacher no better than the baseline: no gap to close
        ((0.5, 0.6), (0.6, 0.5), (0.7, 0.6), None, "n/a"),
        ((0.4, 0.4), (0.5, 0.5), (0.7, 0.6), None, "n/a"),
    ],
)
def test_gap_closure_by_hand(tmp_path: Path, teacher, baseline, student, closure, cell) -> None:
    folds = [
        fold(k, {"teacher_crop": t, "baseline_full": b, "student_paper": s})
        for k, (t, b, s) in enumerate(zip(teacher, baseline, student, strict=True))
    ]
    info = VariantInfo("paper", [], "d", [{"name": "kl", "weight": 1.0}], {})
    comparison = Comparison(
        "r.toml", "d", tmp_path, RunResults(folds, ["a", "b"]), [info], "t", "s"
    )
    write_comparison(comparison)
    data = json.loads((tmp_path / "gap_closure.json").read_text())
    assert data["gap_closure"]["paper"] == pytest.approx(closure, abs=1e-12)
    row = next(
        x for x in (tmp_path / "gap_closure.md").read_text().splitlines() if "| paper |" in x
    )
    assert row.rstrip().endswith(f"| {cell} |"), row


def test_compare_across_student_architectures(tmp_path: Path, tiny_recipe: Path) -> None:
    """A ``roi_zoom`` variant (and an ``input_gradient`` one) against the shared plain
    baseline: each row names its architecture, and the table carries Holm-adjusted p over
    the variants."""
    sets = ["teacher.epochs=1", "student.epochs=1", "cv.only=[0]", "student.batch_size=4"]
    zoom = gc.parse_variant(
        'zoom:student.backbone="roi_zoom",student.init_from_teacher=true,'
        'student.backbone_options={locator="resnet10t",classifier="resnet10t",'
        "crop_size=[16,32]},loss.2.name=roi_box,loss.2.weight=1.0"
    )
    guided = gc.parse_variant("guided:loss.2.name=input_gradient,loss.2.weight=10.0")
    out = tmp_path / "gap"
    comparison = gc.compare(tiny_recipe, [zoom, guided], sets, output=out, quiet=True)
    data = json.loads((out / "gap_closure.json").read_text())
    assert data["architectures"] == {
        "teacher_crop": "resnet10t",
        "baseline_full": "resnet10t",
        "zoom": "roi_zoom",
        "guided": "resnet10t",
    }
    meta = json.loads((out / "fold_0" / "student_zoom" / "model.json").read_text())
    assert meta["recipe"]["student"]["backbone"] == "roi_zoom"
    family = [
        c for c in data["comparisons"] if c["b"] == "baseline_full" and c["metric"] == "accuracy"
    ]
    assert [c["a"] for c in family] == ["zoom", "guided"]
    p = sorted(float(c["p"]) for c in family)
    assert sorted(c["p_holm"] for c in family) == pytest.approx(
        [min(1, 2 * p[0]), max(min(1, 2 * p[0]), p[1])]
    )
    assert set(data["dead_cam"]) == {"baseline_full", "zoom", "guided"}
    for row, share in data["dead_cam"].items():  # one fold: its own share
        assert share == data["folds"][0]["metrics"][row]["dead_cam"]
        assert isinstance(share, float) and 0 <= share <= 1
    report = (out / "gap_closure.md").read_text()
    assert "## Variants against the baseline" in report
    assert "| zoom | roi_zoom |" in report and "| guided | resnet10t |" in report
    assert "2 variants compared with the baseline" in report
    assert comparison.architecture("zoom") == "roi_zoom"


def test_holm_by_hand() -> None:
    from kdtoolkit.report.comparison import holm

    # m = 4: sorted 0.01, 0.02, 0.03, 0.5 -> 0.04, 0.06, max(0.06, 0.06), min(1, 0.5)
    assert holm([0.03, 0.01, 0.5, 0.02]) == pytest.approx([0.06, 0.04, 0.5, 0.06])
    assert holm([0.4, 0.3]) == pytest.approx([0.6, 0.6])  # monotone: max with the one before
    assert holm([]) == []
