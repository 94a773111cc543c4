"""Shared fixtures: a tiny generic manifest (no task knowledge) and a recipe for it."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kdtoolkit.testing import kd_cli as kd  # noqa: F401  (the tests' ``kd`` helper)

CLASSES = ["low", "mid", "high"]


def make_manifest(folder: Path, n: int = 30, size: int = 32, seed: int = 0) -> Path:
    """``n`` grey images; a bright 2:1 ROI whose inner stripe count encodes the class."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        label = i % len(CLASSES)
        image = rng.integers(0, 60, (size, size), dtype=np.uint8)
        w, h = size // 2, size // 4
        x0 = int(rng.integers(1, size - w - 1))
        y0 = int(rng.integers(1, size - h - 1))
        image[y0 : y0 + h, x0 : x0 + w] = 200
        for s in range(label + 1):
            x = x0 + 2 + 4 * s
            image[y0 : y0 + h, x : x + 2] = 40
        name = f"img_{i:03d}.png"
        Image.fromarray(image).save(folder / name)
        rows.append([name, CLASSES[label], x0, y0, x0 + w, y0 + h, f"p{i}"])
    path = folder / "manifest.csv"
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "label", "x0", "y0", "x1", "y1", "group"])
        writer.writerows(rows)
    return path


RECIPE = """
[experiment]
name = "tiny"
output = "{output}"
seed = 0
device = "cpu"

[data]
manifest = "{manifest}"
classes = ["low", "mid", "high"]
image_size = 32
crop_size = [16, 32]

[cv]
folds = 2
val_fraction = 0.2

[teacher]
backbone = "resnet10t"
epochs = 2
batch_size = 8

[student]
backbone = "resnet10t"
epochs = 2
batch_size = 8

[[loss]]
name = "ce"
weight = 0.2

[[loss]]
name = "kl"
weight = 0.8
temperature = 3.0

[[loss]]
name = "attention_mse"
weight = 0.01

[evaluate]
cam_examples = 2
"""


@pytest.fixture
def tiny_manifest(tmp_path: Path) -> Path:
    return make_manifest(tmp_path / "data")


@pytest.fixture
def tiny_recipe(tmp_path: Path, tiny_manifest: Path) -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text(RECIPE.format(output=tmp_path / "run", manifest=tiny_manifest))
    return path
