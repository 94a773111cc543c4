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
from kdtoolkit.fileio import reading

FORMATS = ("yolo", "yolo-obb", "coco", "cvat")
YOLO_NAME_FILES = ("classes.txt", "obj.names", "data.yaml", "dataset.yaml")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


def read_yolo(source: Path, images: Path, obb: bool = False) -> list[Annotation]:
    """YOLO label files (``source``: a .txt file or a folder searched recursively): lines
    ``cls cx cy w h`` or, with ``obb``, ``cls x1 y1 x2 y2 x3 y3 x4 y4``, normalised to [0, 1].
    Class names from classes.txt / obj.names / data.yaml next to the labels (or one folder up),
    else the class index."""
    files = [source] if source.is_file() else sorted(source.rglob("*.txt"))
    files = [f for f in files if f.name not in YOLO_NAME_FILES and f.is_file()]
    root = source.parent if source.is_file() else source
    names = _yolo_names(root)
    index = _image_index(images)
    problems: list[str] = []
    found: list[Annotation] = []
    width = 9 if obb else 5
    for file in files:
        with reading(file, "YOLO label file", "save it as UTF-8 text"):
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
                cls = class_index(fields[0])
                values = np.array([float(x) for x in fields[1:]])
            except ValueError as exc:
                problems.append(f"{where}: {exc} — fix the line")
                continue
            if not np.isfinite(values).all():
                problems.append(f"{where}: coordinates are NaN or infinite — fix the line")
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


def class_index(field: str) -> int:
    """A YOLO class index: an integer, also written as a float (``0.0``, as some exporters
    do); else a ValueError saying what it is."""
    try:
        return int(field)
    except ValueError:
        pass
    try:
        value = float(field)
    except ValueError:
        raise ValueError(f"class {field!r} is not a number") from None
    if not value.is_integer() or value < 0:
        raise ValueError(f"class {field!r} is not a class index (0, 1, 2, ...)")
    return int(value)


def read_coco(source: Path, images: Path) -> list[Annotation]:
    """COCO JSON: ``bbox`` [x, y, w, h]; an optional ``rotation`` (clockwise degrees, as CVAT
    exports it in ``attributes``) is honoured; segmentations are ignored."""
    fix = "give the instances .json (UTF-8) with lists of images, annotations and categories"
    with reading(source, "COCO JSON", fix):
        data = json.loads(source.read_text(encoding="utf-8-sig"))
        if not isinstance(data, dict):
            raise TypeError(f"a JSON object expected, found {type(data).__name__}")
        for key in ("images", "annotations", "categories"):
            if not isinstance(data.get(key, []), list):
                raise TypeError(f"'{key}' is a {type(data[key]).__name__}, not a list")
        files = {img["id"]: img for img in data["images"]}
        categories = {cat["id"]: str(cat["name"]) for cat in data.get("categories", [])}
        annotations = data["annotations"]
    problems: list[str] = []
    found: list[Annotation] = []
    for number, ann in enumerate(annotations):
        if not isinstance(ann, dict):
            problems.append(f"{source}: annotation {number} is not a JSON object — fix it")
            continue
        where = f"{source}: annotation {ann.get('id', number)}"
        try:
            img = files[ann["image_id"]]
            x, y, w, h = (float(v) for v in ann["bbox"])
            if not all(np.isfinite((x, y, w, h))):
                raise ValueError(f"bbox {ann['bbox']} holds NaN or infinite values")
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
                if not all(np.isfinite((*coords, rotation))):
                    raise ValueError("coordinates are NaN or infinite")
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
                names = _yaml_names(file)
                if names is None:
                    continue
                return names
            with reading(file, "class names file", "save it as UTF-8 text, one name a line"):
                text = file.read_text(encoding="utf-8")
            return [n.strip() for n in text.splitlines() if n.strip()]
    return []


def _yaml_names(file: Path) -> list[str] | None:
    """The class names of a YOLO data.yaml (``names``: a list, or a mapping of class index
    to name); None when it has none."""
    import yaml

    fix = "give names as a list, or as a mapping of class index (0, 1, ...) to name"
    with reading(file, "YOLO data YAML", fix):
        try:
            data = yaml.safe_load(file.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise ValueError(f"not valid YAML: {str(exc).splitlines()[0]}") from None
        names = data.get("names") if isinstance(data, dict) else None
        if isinstance(names, dict):
            index = {int(k): str(v) for k, v in names.items()}
            if sorted(index) != list(range(len(index))):
                raise ValueError(f"names has classes {sorted(index)}, not 0..{len(index) - 1}")
            return [index[k] for k in range(len(index))]
        if isinstance(names, list):
            return [str(n) for n in names]
        if names is not None:
            raise TypeError(f"names is a {type(names).__name__}")
    return None


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
