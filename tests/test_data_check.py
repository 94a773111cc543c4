"""``kd data check``: every planted defect of a bad manifest in one run, exit 2, a contact sheet."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np

from kdtoolkit.data.check import check_data
from tests.conftest import kd, make_manifest


def bad_manifest(folder: Path) -> tuple[Path, dict[str, int]]:
    """A manifest with one defect of each kind; returns it and the row (line) of each."""
    make_manifest(folder, n=12)
    rows = list(csv.reader((folder / "manifest.csv").open()))[1:]
    for i, row in enumerate(rows):
        row.append(str(i % 2))  # fold
        row.append("")  # slice
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    shutil.copy(folder / "img_001.png", folder / "copy.png")
    volume = np.zeros((4, 32, 32), np.uint8)
    nib.save(nib.Nifti1Image(volume, np.eye(4)), str(folder / "scan.nii.gz"))
    planted = {
        "unreadable": ["broken.png", "low", 1, 1, 9, 9, "q1", 0, ""],
        "slice": ["scan.nii.gz", "mid", 1, 1, 9, 9, "q2", 1, 99],
        "outside": ["img_002.png", "high", 1, 1, 500, 9, "q3", 0, ""],
        "same file": ["img_003.png", "low", 1, 1, 9, 9, "q4", 1, ""],
        "same pixels": ["copy.png", "mid", 1, 1, 9, 9, "q5", 0, ""],
        "two folds": ["img_004.png", "mid", 1, 1, 9, 9, "p4", 1, ""],  # p4 is in fold 0
        "small class": ["img_005.png", "rare", 1, 1, 9, 9, "q6", 0, ""],
    }
    lines = {}
    for what, row in planted.items():
        rows.append([str(v) for v in row])
        lines[what] = len(rows) + 1
    path = folder / "manifest.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "label", "x0", "y0", "x1", "y1", "group", "fold", "slice"])
        writer.writerows(rows)
    return path, lines


def test_every_planted_defect_in_one_run(tmp_path):
    manifest, lines = bad_manifest(tmp_path / "data")
    sheet = tmp_path / "sheet.png"
    done = kd("data", "check", str(manifest), "--folds", "2", "--sheet", str(sheet))
    assert done.returncode == 2, done.stdout + done.stderr
    out = " ".join((done.stdout + done.stderr).split())
    expect = {
        "unreadable": "unreadable image 'broken.png'",
        "slice": "slice 99 out of range",
        "outside": "outside the image",
        "same file": "is also on row",
        "same pixels": "same pixels as row 3",
        "two folds": "patient 'p4' is in fold 1 here and in fold 0 on row 6",
    }
    for what, text in expect.items():
        assert f"manifest.csv:{lines[what]}: " in out and text in out, what
    assert "class 'rare' has 1 rows, fewer than the 2 folds" in out
    assert "classes" in out and "spacing" in out and "box width" in out
    assert sheet.is_file() and sheet.stat().st_size > 1000


def test_a_clean_manifest_passes(tmp_path):
    manifest = make_manifest(tmp_path / "data", n=9)
    result = check_data(manifest, folds=3)
    assert result.problems == []
    assert [t[0] for t in result.tables][:2] == ["classes", "groups"]
    done = kd("data", "check", str(manifest), "--folds", "3", "--sheet", str(tmp_path / "s.png"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "s.png").is_file()


def test_nan_voxels_are_named_with_their_row(tmp_path):
    manifest = make_manifest(tmp_path / "data", n=9)
    volume = np.random.default_rng(0).random((3, 32, 32)).astype(np.float32)
    volume[1, 4:8, 4:8] = np.nan  # the middle slice (the manifest's "mid")
    nib.save(nib.Nifti1Image(volume, np.eye(4)), str(manifest.parent / "nan.nii.gz"))
    rows = list(csv.reader(manifest.open()))
    header = [*rows[0], "slice"]
    body = [[*row, ""] for row in rows[1:]]
    body.append(["nan.nii.gz", "low", "1", "1", "9", "9", "q9", "mid"][: len(header)])
    with manifest.open("w", newline="") as handle:
        csv.writer(handle).writerows([header, *body])
    result = check_data(manifest, folds=3)
    row = len(body) + 1
    assert any(
        f"manifest.csv:{row}: " in line and "NaN or infinite voxels" in line
        for line in result.problems
    ), result.problems
    done = kd("data", "check", str(manifest), "--folds", "3", "--sheet", str(tmp_path / "s.png"))
    assert done.returncode == 2 and "Warning" not in done.stderr, done.stderr
    assert f"manifest.csv:{row}: " in " ".join(done.stdout.split())


def test_training_names_a_non_finite_input_batch_before_any_loss_term():
    import pytest
    import torch

    from kdtoolkit.engine.train import check_inputs
    from kdtoolkit.errors import KdError

    stage = type("S", (), {"label": "fold 0 teacher", "name": "teacher"})()
    image = torch.zeros(3, 1, 4, 4)
    image[2, 0, 1, 1] = float("nan")
    check_inputs(stage, 1, {"image": torch.zeros(3, 1, 4, 4), "index": torch.tensor([0, 1, 2])})
    with pytest.raises(KdError, match=r"fold 0 teacher epoch 1: the input batch .* index 7"):
        check_inputs(stage, 1, {"image": image, "index": torch.tensor([5, 6, 7])})
