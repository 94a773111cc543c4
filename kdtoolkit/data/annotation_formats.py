"""Readers of box annotation files: YOLO, YOLO-OBB, COCO JSON, CVAT for images 1.1 XML.

Each returns :class:`~kdtoolkit.data.annotation.Annotation` boxes already in the manifest's ROI
convention (see :mod:`kdtoolkit.data.annotation`), or raises an ``AnnotationError`` listing
every problem.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path

import numpy as np
from PIL import Image

from kdtoolkit.data.annotation import (
    Annotation,
    AnnotationError,
    Box,
    from_clockwise,
    rect_from_corners,
)
from kdtoolkit.errors import KdError, suggestion

FORMATS = ("yolo", "yolo-obb", "coco", "cvat")
YOLO_NAME_FILES = ("classes.txt", "obj.names", "data.yaml", "dataset.yaml")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


def read_yolo(source: Path, images: Path, obb: bool = False) -> list[Annotation]:
    """YOLO label files (``source``: a .txt file or a folder searched recursively): lines
    ``cls cx cy w h`` or, with ``obb``, ``cls x1 y1 x2 y2 x3 y3 x4 y4``, normalised to [0, 1].
    Class names from classes.txt / obj.names / data.yaml next to the labels (or one folder up),
    else the class index."""
    files = [source] if source.is_file() else sorted(source.rglob("*.txt"))
    files = [f for f in files if f.name not in YOLO_NAME_FILES]
    root = source.parent if source.is_file() else source
    names = _yolo_names(root)
    index = _image_index(images)
    problems: list[str] = []
    found: list[Annotation] = []
    width = 9 if obb else 5
    for file in files:
        lines = file.read_text(encoding="utf-8-sig").splitlines()
        if not any(line.strip() for line in lines):
            continue
        image = _find_image(file, root, images, index)
        if image is None:
            problems.append(
                f"{file}: no image named '{file.stem}.*' under {images} — put the "
                "images there or pass --images"
            )
            continue
        try:
            with Image.open(image) as im:
                size = im.size
        except (OSError, ValueError) as exc:
            problems.append(f"{image}: cannot read the image size ({exc}) — use PNG/JPEG/TIFF")
            continue
        for number, line in enumerate(lines, start=1):
            fields = line.split()
            if not fields:
                continue
            where = f"{file}:{number}"
            if len(fields) != width:
                other = "yolo" if obb else "yolo-obb"
                hint = f" — is it {other}?" if len(fields) == (5 if obb else 9) else ""
                problems.append(
                    f"{where}: {len(fields)} values, expected {width}{hint} — fix "
                    "the line or pick the right format"
                )
                continue
            try:
                cls = int(fields[0])
                values = np.array([float(x) for x in fields[1:]])
            except ValueError:
                problems.append(f"{where}: values are not numbers — fix the line")
                continue
            if names and not 0 <= cls < len(names):
                problems.append(
                    f"{where}: class {cls} not in the {len(names)} class names — "
                    "fix the class index or the names file"
                )
                continue
            label = names[cls] if names else str(cls)
            if obb:
                try:
                    box, angle = rect_from_corners(values.reshape(4, 2) * size)
                except ValueError as exc:
                    problems.append(f"{where}: {exc} — give the 4 corners of a rectangle")
                    continue
            else:
                cx, cy, w, h = values * (size[0], size[1], size[0], size[1])
                box, angle = (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2), 0.0
            found.append(Annotation(image, label, _floats(box), angle, where, size))
    if problems:
        raise AnnotationError(problems)
    return found


def read_coco(source: Path, images: Path) -> list[Annotation]:
    """COCO JSON: ``bbox`` [x, y, w, h]; an optional ``rotation`` (clockwise degrees, as CVAT
    exports it in ``attributes``) is honoured; segmentations are ignored."""
    try:
        data = json.loads(source.read_text(encoding="utf-8-sig"))
        files = {img["id"]: img for img in data["images"]}
        categories = {cat["id"]: str(cat["name"]) for cat in data.get("categories", [])}
        annotations = data["annotations"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise AnnotationError(
            [
                f"{source}: not COCO JSON ({exc}) — give the instances .json "
                "with images, annotations and categories"
            ]
        ) from None
    problems: list[str] = []
    found: list[Annotation] = []
    for number, ann in enumerate(annotations):
        where = f"{source}: annotation {ann.get('id', number)}"
        try:
            img = files[ann["image_id"]]
            x, y, w, h = (float(v) for v in ann["bbox"])
            attributes = ann.get("attributes") or {}
            rotation = float(attributes.get("rotation", ann.get("rotation", 0.0)))
            size = (int(img["width"]), int(img["height"]))
        except (KeyError, TypeError, ValueError) as exc:
            problems.append(
                f"{where}: incomplete annotation ({exc!r}) — needs image_id and "
                "bbox [x, y, w, h] of a listed image with width and height"
            )
            continue
        cat = ann.get("category_id")
        label = categories.get(cat, str(cat))
        box, angle = from_clockwise((x, y, x + w, y + h), rotation)
        found.append(
            Annotation((images / str(img["file_name"])).resolve(), label, box, angle, where, size)
        )
    if problems:
        raise AnnotationError(problems)
    return found


def read_cvat(source: Path, images: Path) -> list[Annotation]:
    """CVAT for images 1.1 XML: ``<image name width height><box label xtl ytl xbr ybr
    rotation>``; other shapes are ignored."""
    try:
        root = ET.parse(source).getroot()
    except (ET.ParseError, OSError) as exc:
        raise AnnotationError(
            [f"{source}: not readable XML ({exc}) — export 'CVAT for images 1.1'"]
        ) from None
    problems: list[str] = []
    found: list[Annotation] = []
    for image in root.iter("image"):
        name = image.get("name", "")
        for number, box in enumerate(image.findall("box"), start=1):
            where = f"{source}: image '{name}' box {number}"
            try:
                coords = tuple(float(box.attrib[k]) for k in ("xtl", "ytl", "xbr", "ybr"))
                rotation = float(box.get("rotation", 0.0))
                size = (int(image.attrib["width"]), int(image.attrib["height"]))
            except (KeyError, ValueError) as exc:
                problems.append(
                    f"{where}: missing or bad attribute ({exc}) — re-export as "
                    "'CVAT for images 1.1'"
                )
                continue
            box_, angle = from_clockwise(_floats(coords), rotation)
            found.append(
                Annotation(
                    (images / name).resolve(), box.get("label", ""), box_, angle, where, size
                )
            )
    if problems:
        raise AnnotationError(problems)
    return found


def read_annotations(fmt: str, source: str | Path, images: str | Path) -> list[Annotation]:
    """Read ``source`` in format ``fmt`` (one of :data:`FORMATS`); images live under ``images``."""
    source, images = Path(source).expanduser().resolve(), Path(images).expanduser().resolve()
    if fmt not in FORMATS:
        raise KdError(
            f"unknown annotation format '{fmt}'{suggestion(fmt, FORMATS)} — use one "
            f"of: {', '.join(FORMATS)}"
        )
    if not source.exists():
        raise KdError(f"{source}: annotations not found — check the path")
    if not images.is_dir():
        raise KdError(f"{images}: images folder not found — pass --images DIR")
    if fmt in ("yolo", "yolo-obb"):
        return read_yolo(source, images, obb=fmt == "yolo-obb")
    if source.is_dir():
        raise KdError(f"{source}: is a folder — give the {fmt.upper()} annotation file")
    return read_coco(source, images) if fmt == "coco" else read_cvat(source, images)


def _yolo_names(root: Path) -> list[str]:
    for folder in (root, root.parent):
        for name in YOLO_NAME_FILES:
            file = folder / name
            if not file.is_file():
                continue
            if file.suffix == ".yaml":
                import yaml

                names = (yaml.safe_load(file.read_text(encoding="utf-8")) or {}).get("names")
                if isinstance(names, dict):
                    return [str(names[k]) for k in sorted(names)]
                if isinstance(names, list):
                    return [str(n) for n in names]
                continue
            return [n.strip() for n in file.read_text(encoding="utf-8").splitlines() if n.strip()]
    return []


def _image_index(images: Path) -> dict[str, list[Path]]:
    index: dict[str, list[Path]] = defaultdict(list)
    for file in images.rglob("*"):
        if file.suffix.lower() in IMAGE_SUFFIXES and file.is_file():
            index[file.stem].append(file.resolve())
    return index


def _find_image(label_file: Path, root: Path, images: Path, index: dict) -> Path | None:
    """The image of a YOLO label file: same relative folder and stem, else a unique stem."""
    relative = label_file.parent.relative_to(root) if label_file.is_relative_to(root) else Path()
    for candidate in index.get(label_file.stem, []):
        if candidate.parent == (images / relative).resolve():
            return candidate
    matches = index.get(label_file.stem, [])
    return matches[0] if len(matches) == 1 else None


def _floats(values) -> Box:
    x0, y0, x1, y1 = (float(v) for v in values)
    return x0, y0, x1, y1
