"""Results files, report and figures."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest

from kdtoolkit import fileio
from kdtoolkit.data.geometry import roi_corners
from kdtoolkit.errors import KdError
from kdtoolkit.fileio import atomic_path, atomic_write_bytes, atomic_write_text
from kdtoolkit.report.figures import (
    plot_cam_pairs,
    plot_confusions,
    plot_curves,
    plot_results_table,
)
from kdtoolkit.report.markdown import write_report
from kdtoolkit.report.metrics import summarise
from kdtoolkit.report.results import FoldResult, RunResults, read_results, write_results

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CLASSES = ["stage1", "stage2", "stage3", "stage4", "stage5"]


def _fold(teacher: float, baseline: float, student: float) -> dict[str, dict[str, float]]:
    def row(acc: float) -> dict[str, float]:
        return {
            "accuracy": acc,
            "precision": acc + 0.01,
            "recall": acc,
            "f1": acc - 0.01,
            "macro_f1": acc - 0.02,
            "qwk": acc + 0.05,
            "mae": 1 - acc,
        }

    return {
        "teacher_crop": row(teacher),
        "baseline_full": row(baseline),
        "two_stage": row((teacher + baseline) / 2),
        "student": {**row(student), "pointing_game": 0.9, "cam_iou": 0.4},
    }


@pytest.fixture
def folds() -> list[dict]:
    folds = [_fold(0.8824 + d, 0.7997 + d, 0.8375 + d) for d in (-0.01, 0.0, 0.01)]
    folds[0]["baseline_full"].update(pointing_game=0.3, cam_iou=0.1)
    return folds


def _assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert len(data) > 5000


def _results(folds: list[dict], ids: list[int] | None = None, **fields) -> RunResults:
    ids = list(range(len(folds))) if ids is None else ids
    return RunResults(
        folds=[FoldResult(fold=k, n_test=10, metrics=m) for k, m in zip(ids, folds, strict=True)],
        classes=CLASSES,
        **fields,
    )


def test_write_results_shape(tmp_path: Path, folds: list[dict]) -> None:
    results = _results(folds, [4, 2, 3])  # folds keep their ids, and are sorted by them
    for f in results.folds:
        f.latency_ms = {"student": 12.8}
    path = write_results(tmp_path, results)
    assert path == tmp_path / "results.json"
    doc = json.loads(path.read_text())
    assert list(doc) == [
        "summary",
        "folds",
        "gap_closure",
        "classes",
        "folds_run",
        "roi",
        "latency_ms",
        "dead_cam",
        "recipe_digest",
        "models",
        "calibration",
    ]
    assert set(doc["summary"]) == {"teacher_crop", "baseline_full", "two_stage", "student"}
    for row in doc["summary"].values():
        for stats in row.values():
            assert set(stats) == {"mean", "std"}
    assert doc["summary"]["student"]["accuracy"]["mean"] == pytest.approx(0.8375)
    assert doc["summary"]["student"]["accuracy"]["std"] == pytest.approx(0.01)
    assert doc["folds_run"] == [2, 3, 4] and len(doc["folds"]) == 3
    assert doc["folds"][0]["student"]["accuracy"] == pytest.approx(0.8375)  # fold 2
    assert doc["gap_closure"] == pytest.approx(0.457, abs=5e-4)
    assert doc["latency_ms"] == {"student": pytest.approx(12.8)}
    assert doc["roi"] == {"2": {}, "3": {}, "4": {}}

    with open(tmp_path / "results.csv", newline="") as fh:
        lines = list(csv.DictReader(fh))
    assert len(lines) == 3 * 4 + 2 * 4
    assert [r["fold"] for r in lines[:12:4]] == ["2", "3", "4"]
    assert lines[0]["row"] == "teacher_crop"
    mean_student = next(r for r in lines if r["fold"] == "mean" and r["row"] == "student")
    assert float(mean_student["accuracy"]) == pytest.approx(0.8375)
    assert float(mean_student["pointing_game"]) == pytest.approx(0.9)
    teacher0 = lines[0]
    assert teacher0["pointing_game"] == ""  # metric the row lacks
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary files left behind

    again = read_results(tmp_path)
    assert again.fold_ids == [2, 3, 4] and again.summary == results.summary
    assert again.gap_closure() == results.gap_closure()
    assert again.to_json() == doc


def test_write_results_json_is_strict(tmp_path: Path) -> None:
    results = _results([{"student": {"accuracy": np.float32(0.5), "qwk": float("nan")}}])
    results.folds[0].roi = {"map50": np.float64(0.7)}
    write_results(tmp_path, results)
    text = (tmp_path / "results.json").read_text()
    assert "NaN" not in text
    doc = json.loads(text)
    assert doc["folds"][0]["student"]["qwk"] is None
    assert doc["roi"] == {"0": {"map50": 0.7}}


def test_fold_result_round_trip(tmp_path: Path) -> None:
    fold = FoldResult(
        fold=3,
        n_test=2,
        metrics={"student": {"accuracy": 0.5}},
        confusion={"student": [[1, 0], [1, 0]]},
        predictions={"index": [4, 9], "student": [0, 0]},
        latency_ms={"student": 1.5},
        roi={"mean_iou": 0.8},
    )
    fold.write(tmp_path / "eval.json")
    doc = json.loads((tmp_path / "eval.json").read_text())
    assert list(doc) == [
        "fold",
        "n_test",
        "metrics",
        "confusion",
        "predictions",
        "latency_ms",
        "roi",
    ]
    assert FoldResult.read(tmp_path / "eval.json") == fold


def test_write_report(tmp_path: Path, folds: list[dict]) -> None:
    results = _results(
        folds, [0, 1, 3], models={"teacher_crop": "convnext_tiny", "student": "convnext_tiny"}
    )
    for f, roi in zip(
        results.folds, ({"map50": 0.72, "latency_ms": 5.0}, {"map50": 0.74}, {}), strict=True
    ):
        f.roi = roi
        f.latency_ms = {"student": 12.8, "two_stage": 26.3}
    (tmp_path / "figures").mkdir()
    path = write_report(
        tmp_path,
        results,
        figures={
            "Confusion matrices": "figures/confusion.png",
            "Grad-CAM": tmp_path / "figures" / "cams.png",
        },
    )
    assert path == tmp_path / "report.md"
    text = path.read_text()
    assert "| setting | model | acc | prec | rec | F1 |" in text
    assert "| crops (teacher, upper bound) | convnext_tiny | 88.24 ± 1.00 |" in text
    assert "| full image, baseline |  | 79.97 ± 1.00 |" in text
    assert "| two-stage: ROI crop → classifier |" in text
    assert "| full image, student (KD) | convnext_tiny | 83.75 ± 1.00 | 84.75 ± 1.00 |" in text
    assert (
        "The student closes 45.7% of the gap between the full-image baseline and the crop teacher"
        in text
    )
    assert "macro F1" in text and "QWK" in text and "MAE" in text
    assert "pointing game" in text and "CAM IoU" in text
    assert "| full image, student (KD) | 90.00 ± 0.00 | 0.400 ± 0.000 |" in text
    assert "| full image, baseline | 30.00 ± 0.00 | 0.100 ± 0.000 |" in text
    assert "| metric | mean ± std | fold 0 | fold 1 | fold 3 | meaning |" in text
    assert "| map50 | 73.00 ± 1.41 % | 72.00 | 74.00 | – |" in text
    assert "| latency_ms | 5.000 ± 0.000 |" in text
    assert "| student alone, full image | 12.8 |" in text
    assert "| two-stage: ROI provider + crop + teacher | 26.3 |" in text
    per_fold = text.split("## Accuracy per fold (%)")[1].split("##")[0]
    assert [line.split(" | ")[0] for line in per_fold.splitlines() if line[:2] == "| "] == [
        "| fold",
        "| 0",
        "| 1",
        "| 3",
    ]
    assert "![Confusion matrices](figures/confusion.png)" in text
    assert "![Grad-CAM](figures/cams.png)" in text  # absolute path made relative


def test_write_report_partial_rows(tmp_path: Path) -> None:
    folds = [{"baseline_full": {"accuracy": 0.7, "precision": 0.7, "recall": 0.7, "f1": 0.7}}]
    text = write_report(tmp_path, _results(folds)).read_text()
    assert "full image, baseline" in text
    assert "crops (teacher" not in text and "student (KD)" not in text
    assert "Gap closure: not available" in text
    assert "QWK" not in text and "pointing game" not in text


def test_figures_are_pngs(tmp_path: Path, folds: list[dict]) -> None:
    fig_dir = tmp_path / "figures"
    summary = summarise(folds)
    _assert_png(plot_results_table(fig_dir / "table.png", summary, {"student": "convnext_tiny"}))
    _assert_png(plot_results_table(fig_dir / "table2.png", summary, "resnet18"))

    rng = np.random.default_rng(0)
    per_fold = [rng.integers(0, 10, (5, 5)) for _ in range(3)]
    _assert_png(
        plot_confusions(
            fig_dir / "confusion.png",
            {"student": per_fold, "baseline_full": np.sum(per_fold, axis=0)},
            CLASSES,
        )
    )

    images = [rng.random((64, 96)), rng.random((64, 96, 3)), rng.random((3, 64, 96))]
    cams_a = [rng.random((8, 12)) for _ in images]
    cams_b = [rng.random((64, 96)), np.zeros((8, 12)), rng.random((1, 8, 12))]
    boxes = [(10, 20, 50, 40), roi_corners((30, 20, 70, 40), 20.0), None]
    _assert_png(
        plot_cam_pairs(fig_dir / "cams.png", images, cams_a, cams_b, boxes, ["a", "b", "c"])
    )
    with pytest.raises(ValueError, match="same length"):
        plot_cam_pairs(fig_dir / "x.png", images, cams_a, cams_b[:2], boxes, ["a", "b", "c"])

    history = {
        "teacher": [
            {"epoch": e, "loss": 1 / e, "ce": 1 / e, "val_accuracy": 0.5 + 0.1 * e, "lr": 1e-3}
            for e in range(1, 4)
        ],
        "student": [
            {
                "loss": 1.2 / e,
                "kd": 0.5 / e,
                "cam": 0.1 / e,
                "ce": 0.6 / e,
                "val_accuracy": 0.4 + 0.1 * e,
                "val_loss": 1.0 / e,
            }
            for e in range(1, 5)
        ],
        "empty": [],
    }
    _assert_png(plot_curves(fig_dir / "curves.png", history))
    assert not list(fig_dir.glob(".*"))


def test_atomic_write_keeps_old_file_on_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "results.json"
    atomic_write_text(target, "old")

    def broken_replace(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(fileio.os, "replace", broken_replace)
    with pytest.raises(KdError, match=r"results.json: cannot be written \(disk full\)"):
        atomic_write_text(target, "new")
    with pytest.raises(KdError, match="disk full"):
        write_results(tmp_path, RunResults([], []))
    monkeypatch.undo()
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


def test_atomic_write_bytes_and_path(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "blob.bin"
    assert atomic_write_bytes(target, b"\x00\x01") == target
    assert target.read_bytes() == b"\x00\x01"
    assert oct(target.stat().st_mode & 0o777) == oct(0o644) or os.name == "nt"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("writer crashed")
    assert target.read_bytes() == b"\x00\x01"
    with atomic_path(target) as tmp:
        assert tmp.parent == target.parent and tmp.suffix == ".bin"
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new"
    assert sorted(p.name for p in target.parent.iterdir()) == ["blob.bin"]


def test_roi_section_shows_angles_in_degrees_and_box_errors_as_shares() -> None:
    from kdtoolkit.report.markdown import roi_section

    folds = {
        "0": {"angle_error_deg": 0.8, "shift_along_p90": 0.25, "size_p90": 0.2},
        "1": {"angle_error_deg": 0.6, "shift_along_p90": 0.35, "size_p90": 0.2},
    }
    text = "\n".join(roi_section(folds))
    assert "| angle_error_deg | 0.700 ± 0.141 | 0.800 | 0.600 | mean angle error" in text  # not %
    assert "| shift_along_p90 | 30.00 ± 7.07 % | 25.00 | 35.00 | 90% of box centres" in text
    assert "| size_p90 | 20.00 ± 0.00 % | 20.00 | 20.00 | 90% of boxes have both sides" in text


def test_attention_section_shows_the_pointing_ceiling():
    from kdtoolkit.report.markdown import attention_section

    cell = {"mean": 0.5, "std": 0.0}
    summary = {"student": {"pointing_game": cell, "pointing_ceiling": cell, "cam_iou": cell}}
    text = "\n".join(attention_section(summary, ["student"]))
    assert "| setting | pointing game (%) | pointing ceiling (%) | CAM IoU |" in text
    assert "Pointing ceiling:" in text
