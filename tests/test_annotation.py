"""Annotation import (YOLO, YOLO-OBB, COCO, CVAT) to manifest rows, and ``kd data import``."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kdtoolkit.cli import app, run_app
from kdtoolkit.data.annotation import AnnotationError, rect_from_corners, to_rows, write_manifest
from kdtoolkit.data.annotation_formats import read_annotations
from kdtoolkit.data.geometry import roi_corners
from kdtoolkit.data.manifest import read_manifest

R3 = math.sqrt(3)
SIZE = 100  # images are SIZE x SIZE

# Hand-made boxes: (unrotated box, clockwise rotation in degrees as CVAT stores it, class).
BOXES = {
    "a.png": ((10.0, 20.0, 50.0, 40.0), 30.0, "lesion"),
    "b.png": ((60.0, 10.0, 90.0, 70.0), 0.0, "normal"),
    "c.png": ((30.0, 55.0, 70.0, 65.0), 90.0, "lesion"),
}
# Their corners TL, TR, BR, BL (of the unrotated box) turned clockwise on screen (y down),
# computed by hand: offset (dx, dy) -> (dx cos r - dy sin r, dx sin r + dy cos r).
CORNERS = {
    # centre (30, 30), half sizes 20 x 10, r = 30: cos = √3/2, sin = 1/2
    "a.png": [(35 - 10 * R3, 20 - 5 * R3), (35 + 10 * R3, 40 - 5 * R3),
              (25 + 10 * R3, 40 + 5 * R3), (25 - 10 * R3, 20 + 5 * R3)],
    "b.png": [(60, 10), (90, 10), (90, 70), (60, 70)],
    # centre (50, 60), half sizes 20 x 5, r = 90: (dx, dy) -> (-dy, dx)
    "c.png": [(55, 40), (55, 80), (45, 80), (45, 40)],
}  # fmt: skip


@pytest.fixture
def images(tmp_path: Path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    for name in [*BOXES, "d.png"]:
        Image.fromarray(np.zeros((SIZE, SIZE), np.uint8)).save(folder / name)
    return folder


def manifest_corners(path: Path) -> dict[str, np.ndarray]:
    """Corners of every ROI of a written manifest, read back by the manifest reader."""
    manifest = read_manifest(path, require_boxes=False)
    return {
        s.image.name: roi_corners(s.box, s.angle) for s in manifest.samples if s.box is not None
    }


def import_to_manifest(fmt: str, source: Path, images: Path, **kwargs) -> Path:
    rows = to_rows(read_annotations(fmt, source, images), images, **kwargs)
    return write_manifest(rows, images / "manifest.csv")


def same_corner_set(got: np.ndarray, want) -> bool:
    want = np.asarray(want, dtype=np.float64)
    return all(np.min(np.hypot(*(got - w).T)) < 1e-6 for w in want)


def write_cvat(path: Path, boxes: dict) -> None:
    parts = ['<?xml version="1.0" encoding="utf-8"?>\n<annotations><version>1.1</version>']
    for i, (name, ((x0, y0, x1, y1), rotation, label)) in enumerate(boxes.items()):
        parts.append(f'<image id="{i}" name="{name}" width="{SIZE}" height="{SIZE}">')
        parts.append(
            f'<box label="{label}" occluded="0" source="manual" xtl="{x0}" ytl="{y0}" '
            f'xbr="{x1}" ybr="{y1}" rotation="{rotation}" z_order="0"></box>'
        )
        parts.append('<polygon label="x" points="1,1;2,2;3,1"></polygon></image>')
    path.write_text("\n".join(parts) + "\n</annotations>\n")


def write_coco(path: Path, boxes: dict) -> None:
    names = sorted({label for _, _, label in boxes.values()})
    data = {
        "images": [
            {"id": i, "file_name": name, "width": SIZE, "height": SIZE}
            for i, name in enumerate(boxes)
        ],
        "categories": [{"id": i + 1, "name": n} for i, n in enumerate(names)],
        "annotations": [
            {
                "id": 10 + i,
                "image_id": i,
                "category_id": names.index(label) + 1,
                "bbox": [x0, y0, x1 - x0, y1 - y0],
                "attributes": {"rotation": rotation, "occluded": False},
            }
            for i, ((x0, y0, x1, y1), rotation, label) in enumerate(boxes.values())
        ],
    }
    path.write_text(json.dumps(data))


# -- the angle convention ------------------------------------------------------------------


def test_roi_corners_sign_convention_by_hand():
    """docs/data.md: box (0, 0, 4, 2) at +30° counter-clockwise on screen."""
    c, s = R3 / 2, 0.5
    want = [(2 - 2 * c - s, 1 + 2 * s - c), (2 + 2 * c - s, 1 - 2 * s - c),
            (2 + 2 * c + s, 1 - 2 * s + c), (2 - 2 * c + s, 1 + 2 * s + c)]  # fmt: skip
    np.testing.assert_allclose(roi_corners((0, 0, 4, 2), 30), want, atol=1e-12)
    np.testing.assert_allclose(want, [(-0.23, 1.13), (3.23, -0.87), (4.23, 0.87), (0.77, 2.87)],
                               atol=0.01)  # fmt: skip


def test_clockwise_rotation_is_the_negative_manifest_angle():
    for name, (box, rotation, _) in BOXES.items():
        np.testing.assert_allclose(roi_corners(box, -rotation), CORNERS[name], atol=1e-12)


def test_rect_from_corners_any_order_and_rejects_other_shapes():
    want = CORNERS["a.png"]
    for order in ([0, 1, 2, 3], [1, 2, 3, 0], [3, 2, 1, 0], [2, 1, 0, 3]):
        box, angle = rect_from_corners(np.array(want)[order])
        assert -45 < angle <= 45
        assert same_corner_set(roi_corners(box, angle), want)
    box, angle = rect_from_corners(np.array(CORNERS["c.png"]))
    assert angle == 0.0 and box == pytest.approx((45, 40, 55, 80))
    with pytest.raises(ValueError, match="not a rectangle"):
        rect_from_corners(np.array([(0, 0), (10, 0), (14, 10), (4, 10)]))


# -- round trips: write the annotation, import, read the manifest back ---------------------


def test_cvat_round_trip(images: Path, tmp_path: Path):
    write_cvat(tmp_path / "annotations.xml", BOXES)
    path = import_to_manifest("cvat", tmp_path / "annotations.xml", images)
    corners = manifest_corners(path)
    assert set(corners) == set(BOXES)
    for name, want in CORNERS.items():
        np.testing.assert_allclose(corners[name], want, atol=1e-6)
    text = path.read_text().splitlines()
    assert text[0] == "image,label,x0,y0,x1,y1,angle"
    assert "a.png,lesion,10,20,50,40,-30" in text


def test_coco_round_trip(images: Path, tmp_path: Path):
    write_coco(tmp_path / "instances.json", BOXES)
    path = import_to_manifest("coco", tmp_path / "instances.json", images)
    corners = manifest_corners(path)
    for name, want in CORNERS.items():
        np.testing.assert_allclose(corners[name], want, atol=1e-6)
    assert read_manifest(path).classes == ("lesion", "normal")


def test_yolo_obb_round_trip(images: Path, tmp_path: Path):
    labels = tmp_path / "labels"
    labels.mkdir()
    (labels / "classes.txt").write_text("lesion\nnormal\n")
    for name, (_, _, label) in BOXES.items():
        order = [1, 2, 3, 0] if name == "a.png" else [0, 1, 2, 3]
        values = " ".join(f"{v / SIZE:.12f}" for p in np.array(CORNERS[name])[order] for v in p)
        cls = ["lesion", "normal"].index(label)
        (labels / f"{Path(name).stem}.txt").write_text(f"{cls} {values}\n")
    path = import_to_manifest("yolo-obb", labels, images)
    corners = manifest_corners(path)
    for name, want in CORNERS.items():
        assert same_corner_set(corners[name], want), name
    rows = {r.image.name: r for r in to_rows(read_annotations("yolo-obb", labels, images), images)}
    assert rows["a.png"].angle == pytest.approx(-30) and rows["c.png"].angle == 0.0
    assert rows["a.png"].box == pytest.approx(BOXES["a.png"][0])
    assert rows["c.png"].label == "lesion" and rows["b.png"].label == "normal"


def test_yolo_round_trip_in_split_folders(tmp_path: Path):
    root = tmp_path / "dataset"
    for split in ("train", "val"):
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
    Image.new("L", (200, 100)).save(root / "images" / "train" / "x.png")
    Image.new("L", (200, 100)).save(root / "images" / "val" / "y.jpg")
    (root / "labels" / "train" / "x.txt").write_text("1 0.25 0.5 0.1 0.2\n")
    (root / "labels" / "val" / "y.txt").write_text("\n0 0.5 0.5 1.0 1.0\n")
    (root / "data.yaml").write_text("names:\n  0: benign\n  1: malignant\n")
    rows = to_rows(read_annotations("yolo", root / "labels", root / "images"), root / "images")
    path = write_manifest(rows, root / "manifest.csv")
    corners = manifest_corners(path)
    np.testing.assert_allclose(corners["x.png"], [(40, 40), (60, 40), (60, 60), (40, 60)])
    np.testing.assert_allclose(corners["y.jpg"], [(0, 0), (200, 0), (200, 100), (0, 100)])
    assert "images/train/x.png,malignant,40,40,60,60,0" in path.read_text()


# -- labels, one ROI per image, problems ---------------------------------------------------


def test_labels_csv_gives_the_rows(images: Path, tmp_path: Path):
    write_cvat(tmp_path / "a.xml", BOXES)
    labels = tmp_path / "labels.csv"
    labels.write_text("Image,Label\nc.png,stage1\nb.png,stage2\na.png,stage3\nd.png,stage1\n")
    path = import_to_manifest("cvat", tmp_path / "a.xml", images, labels=labels)
    manifest = read_manifest(path, require_boxes=False)
    assert [s.image.name for s in manifest.samples] == ["c.png", "b.png", "a.png", "d.png"]
    assert [manifest.classes[s.label] for s in manifest.samples] == [
        "stage1", "stage2", "stage3", "stage1"
    ]  # fmt: skip
    assert manifest.samples[3].box is None
    np.testing.assert_allclose(manifest_corners(path)["a.png"], CORNERS["a.png"], atol=1e-6)


def test_problems_are_collected_naming_file_and_fix(images: Path, tmp_path: Path):
    boxes = dict(BOXES)
    boxes["missing.png"] = ((1.0, 1.0, 5.0, 5.0), 0.0, "lesion")
    boxes["d.png"] = ((80.0, 80.0, 120.0, 90.0), 0.0, "lesion")  # outside the 100x100 image
    write_cvat(tmp_path / "a.xml", boxes)
    labels = tmp_path / "labels.csv"
    labels.write_text("image,label\na.png,x\nb.png,y\nnope.png,z\n")
    with pytest.raises(AnnotationError) as info:
        to_rows(read_annotations("cvat", tmp_path / "a.xml", images), images, labels=labels)
    text = str(info.value)
    assert "image 'missing.png' box 1: image" in text and "not found" in text
    assert "image 'd.png' box 1: box is outside the image (100x100)" in text
    assert "labels.csv:4: image 'nope.png' not found" in text
    assert "c.png: has a box but no row in labels.csv" in text
    assert all(" — " in line for line in info.value.problems)


def test_several_boxes_per_image_need_roi_class(images: Path, tmp_path: Path):
    labels = tmp_path / "labels"
    labels.mkdir()
    (labels / "a.txt").write_text("0 0.5 0.5 0.2 0.2\n1 0.3 0.3 0.1 0.1\n")
    with pytest.raises(AnnotationError, match=r"2 boxes .*a.txt:1; .*a.txt:2\) — the manifest"):
        to_rows(read_annotations("yolo", labels, images), images)
    rows = to_rows(read_annotations("yolo", labels, images), images, roi_class="1")
    assert len(rows) == 1 and rows[0].box == pytest.approx((25, 25, 35, 35))


def test_yolo_format_mix_up_is_explained(images: Path, tmp_path: Path):
    labels = tmp_path / "labels"
    labels.mkdir()
    (labels / "a.txt").write_text("0 0.1 0.1 0.3 0.1 0.3 0.3 0.1 0.3\n")
    with pytest.raises(AnnotationError, match=r"a.txt:1: 9 values, expected 5 — is it yolo-obb"):
        read_annotations("yolo", labels, images)


# -- the command line ----------------------------------------------------------------------


def kd(monkeypatch, *args: str) -> int:
    monkeypatch.setattr(sys, "argv", ["kd", *args])
    try:
        run_app(app)
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


def test_cli_import(monkeypatch, images: Path, tmp_path: Path, capsys):
    write_coco(tmp_path / "instances.json", BOXES)
    out = tmp_path / "out" / "manifest.csv"
    args = ["data", "import", "coco", str(tmp_path / "instances.json"), "--images", str(images)]
    assert kd(monkeypatch, *args, "-o", str(out)) == 0
    assert "3 rows, 3 with a box (2 rotated)" in capsys.readouterr().out
    assert "../images/a.png,lesion,10,20,50,40,-30" in out.read_text()
    np.testing.assert_allclose(manifest_corners(out)["a.png"], CORNERS["a.png"], atol=1e-6)
    # an existing manifest needs --force; errors are one line and exit 2
    assert kd(monkeypatch, *args, "-o", str(out)) == 2
    assert "already exists — pass --force" in capsys.readouterr().err
    assert kd(monkeypatch, *args, "-o", str(out), "--force") == 0
    assert kd(monkeypatch, "data", "import", "cocoo", str(tmp_path), "--images", str(images)) == 2
    assert "did you mean 'coco'" in capsys.readouterr().err
