"""Manifest reading: the data contract and every error, with file and row."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kdtoolkit.data.manifest import ManifestError, read_manifest
from kdtoolkit.errors import KdError

CLASSES = ("open", "partial", "fused")


def _png(path: Path, width: int = 40, height: int = 30) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((height, width), np.uint8)).save(path)
    return path


def _write(folder: Path, lines: list[str]) -> Path:
    manifest = folder / "manifest.csv"
    manifest.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return manifest


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    for name in ("a.png", "b.png", "c.png"):
        _png(tmp_path / "img" / name)
    _png(tmp_path / "crops" / "a.png", 20, 10)
    return tmp_path


def _problems(manifest: Path, **kwargs) -> list[str]:
    with pytest.raises(ManifestError) as info:
        read_manifest(manifest, **kwargs)
    assert isinstance(info.value, KdError)
    assert str(info.value) == "\n".join(info.value.problems)
    return info.value.problems


def _assert_line(line: str, manifest: Path, row: int, *fragments: str) -> None:
    assert re.match(rf"^{re.escape(str(manifest.resolve()))}:{row}: .+ — .+$", line), line
    for fragment in fragments:
        assert fragment in line, (fragment, line)


def test_reads_all_columns(folder: Path) -> None:
    manifest = _write(
        folder,
        [
            "image,label,x0,y0,x1,y1,angle,crop,group,fold",
            "img/a.png,fused,5,5,25,15,10,crops/a.png,p1,0",
            "",
            "img/b.png,open,0,0,40,30,,,p2,1",
        ],
    )
    m = read_manifest(folder, classes=CLASSES)  # a folder works too
    assert m.path == manifest.resolve()
    assert m.classes == CLASSES
    a, b = m.samples
    assert (a.index, a.row, a.label, b.index, b.row, b.label) == (0, 2, 2, 1, 4, 0)
    assert a.image == (folder / "img" / "a.png").resolve() and a.image.is_absolute()
    assert a.box == (5.0, 5.0, 25.0, 15.0) and a.angle == 10.0
    assert a.crop == (folder / "crops" / "a.png").resolve() and b.crop is None
    assert (a.group, a.fold, b.fold, b.angle) == ("p1", 0, 1, 0.0)
    assert (a.width, a.height) == (40, 30)


def test_classes_inferred_and_indices(folder: Path) -> None:
    _write(folder, ["image,label", "img/a.png,zeta", "img/b.png,alpha", "img/c.png,zeta"])
    m = read_manifest(folder, require_boxes=False)
    assert m.classes == ("alpha", "zeta")
    assert [s.label for s in m.samples] == [1, 0, 1]
    assert m.samples[0].box is None

    _write(folder, ["image,label", "img/a.png,2", "img/b.png,0"])
    m = read_manifest(folder, require_boxes=False)
    assert m.classes == ("0", "1", "2")
    assert [s.label for s in m.samples] == [2, 0]
    m = read_manifest(folder, classes=CLASSES, require_boxes=False)
    assert m.classes == CLASSES and [s.label for s in m.samples] == [2, 0]


def test_names_win_over_indices_when_classes_are_numbers(folder: Path) -> None:
    _write(folder, ["image,label", "img/a.png,1", "img/b.png,5"])
    m = read_manifest(folder, classes=("1", "2", "3", "4", "5"), require_boxes=False)
    assert [s.label for s in m.samples] == [0, 4]


BAD_CASES = {  # columns: image,label,x0,y0,x1,y1,angle,crop,group,fold
    "missing file": ("img/nope.png,open,1,1,5,5,0,,,0", "missing image file 'img/nope.png'"),
    "unreadable image": ("img/bad.png,open,1,1,5,5,0,,,0", "unreadable image 'img/bad.png'"),
    "box not numeric": ("img/a.png,open,1,abc,5,5,0,,,0", "box not numeric (y0='abc')"),
    "box empty": ("img/a.png,open,10,1,5,5,0,,,0", "box is empty"),
    "box blank": ("img/a.png,open,,,,,0,,,0", "box is empty"),
    "box outside": ("img/a.png,open,1,1,50,5,0,,,0", "outside the image (40x30)"),
    "rotated corners outside": (
        "img/a.png,open,2,10,38,20,45,,,0",
        "rotated ROI corners outside the image",
    ),
    "unknown label": ("img/a.png,parital,1,1,5,5,0,,,0", "unknown label 'parital'"),
    "bad angle": ("img/a.png,open,1,1,5,5,abc,,,0", "angle 'abc' is not a number"),
    "missing crop": ("img/a.png,open,1,1,5,5,0,crops/none.png,,0", "missing crop file"),
    "bad fold": ("img/a.png,open,1,1,5,5,0,,,x", "bad fold value 'x'"),
    "negative fold": ("img/a.png,open,1,1,5,5,0,,,-1", "bad fold value '-1'"),
    "too many fields": ("img/a.png,open,1,1,5,5,0,,,0,extra", "row has 11 fields"),
    "too few fields": ("img/a.png,open,1,1,5,5,0,,", "row has 9 fields"),  # + fold empty
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_each_bad_row_is_reported_with_file_and_row(folder: Path, case: str) -> None:
    (folder / "img" / "bad.png").write_text("not an image")
    line, fragment = BAD_CASES[case]
    manifest = _write(
        folder,
        ["image,label,x0,y0,x1,y1,angle,crop,group,fold", "img/b.png,open,1,1,5,5,0,,,0", line],
    )
    problems = _problems(manifest, classes=CLASSES)
    assert len(problems) == (2 if case == "too few fields" else 1), problems
    _assert_line(problems[0], manifest, 3, fragment)


def test_unknown_label_lists_classes_and_suggests(folder: Path) -> None:
    manifest = _write(folder, ["image,label", "img/a.png,parital"])
    (line,) = _problems(manifest, classes=CLASSES, require_boxes=False)
    assert "did you mean 'partial'" in line and "open, partial, fused" in line


def test_label_index_out_of_range(folder: Path) -> None:
    manifest = _write(folder, ["image,label", "img/a.png,0", "img/b.png,7"])
    (line,) = _problems(manifest, classes=CLASSES, require_boxes=False)
    _assert_line(line, manifest, 3, "label index 7 out of range", "0..2")


def test_missing_columns_name_the_columns_present(folder: Path) -> None:
    manifest = _write(folder, ["image,klass,x0,y0", "img/a.png,open,1,1"])
    problems = _problems(manifest, classes=CLASSES)
    assert len(problems) == 3  # label, x1, y1
    for line, column in zip(problems, ("label", "x1", "y1"), strict=True):
        _assert_line(line, manifest, 1, f"missing required column '{column}'")
        assert "columns present: image, klass, x0, y0" in line


def test_boxes_optional_but_incomplete_box_columns_reported(folder: Path) -> None:
    manifest = _write(folder, ["image,label,x0,y0", "img/a.png,open,1,1"])
    (line,) = _problems(manifest, classes=CLASSES, require_boxes=False)
    _assert_line(line, manifest, 1, "box columns incomplete")


def test_manifest_missing_or_empty(tmp_path: Path) -> None:
    (line,) = _problems(tmp_path / "nothing.csv")
    assert "manifest not found" in line and str(tmp_path / "nothing.csv") in line
    (line,) = _problems(tmp_path)  # folder without manifest.csv
    assert "manifest not found" in line
    manifest = _write(tmp_path, [""])
    (line,) = _problems(manifest)
    _assert_line(line, manifest, 1, "manifest is empty")
    manifest = _write(tmp_path, ["image,label,x0,y0,x1,y1"])
    (line,) = _problems(manifest)
    _assert_line(line, manifest, 1, "no data rows")


def test_partial_folds_are_reported(folder: Path) -> None:
    manifest = _write(folder, ["image,label,fold", "img/a.png,open,0", "img/b.png,open,"])
    (line,) = _problems(manifest, classes=CLASSES, require_boxes=False)
    _assert_line(line, manifest, 3, "fold is empty")


def test_all_problems_reported_together(folder: Path) -> None:
    manifest = _write(
        folder,
        [
            "image,label,x0,y0,x1,y1",
            "img/a.png,open,1,1,5,5",
            "img/gone.png,open,1,1,5,5",
            "img/b.png,stage9,1,1,5,5",
            "img/c.png,open,1,1,500,5",
            "img/missing.png,bogus,a,1,5,5",
        ],
    )
    problems = _problems(manifest, classes=CLASSES)
    assert len(problems) == 6
    _assert_line(problems[0], manifest, 3, "missing image file")
    _assert_line(problems[1], manifest, 4, "unknown label 'stage9'")
    _assert_line(problems[2], manifest, 5, "outside the image")
    rows = [int(line.split(":")[1]) for line in problems[3:]]
    assert rows == [6, 6, 6]  # one row, three problems: file, label, box


def test_separator_hint(folder: Path) -> None:
    manifest = _write(folder, ["image;label", "img/a.png;open"])
    problems = _problems(manifest, classes=CLASSES, require_boxes=False)
    assert "another separator" in problems[0]
