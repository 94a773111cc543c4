"""Shared fixtures: a tiny generic manifest (no task knowledge) and a recipe for it."""

from __future__ import annotations

from pathlib import Path

import pytest

from kdtoolkit import testing
from kdtoolkit.testing import kd_cli, kd_in_process


def kd(*args: str, env=None, cwd: Path | None = None, timeout: int = 900):
    """The tests' ``kd``: in this process (``kd_in_process``), or in a subprocess when the
    test gives it an environment of its own."""
    if env is not None:
        return kd_cli(*args, env=env, cwd=cwd, timeout=timeout)
    return kd_in_process(*args, cwd=cwd)


CLASSES = ["low", "mid", "high"]


def make_manifest(folder: Path, n: int = 30, size: int = 32, seed: int = 0) -> Path:
    """``n`` grey images; a bright 2:1 ROI whose inner stripe count encodes the class."""
    return testing.tiny_manifest(folder, n=n, size=size, classes=CLASSES, seed=seed)


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
