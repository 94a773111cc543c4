"""The CVM phantom, the ``cvm`` task, the ``kd cvm`` commands, and the public-API-only rule."""

from __future__ import annotations

import ast
import csv
from pathlib import Path

import kd_cvm.plugin
import numpy as np
import pytest
import typer
from kd_cvm.phantom import SHAPES, STAGES, render, stage_order
from kd_cvm.task import CVM_TASK, ensure_phantom, phantom_data
from typer.testing import CliRunner

from kdtoolkit import KdError, read_manifest
from kdtoolkit.data.geometry import roi_corners
from kdtoolkit.testing import fresh_registries

PACKAGE = Path(kd_cvm.plugin.__file__).parent
#: The ``kdtoolkit`` modules a plugin may import: the facade, and in tests the documented
#: helpers (``kdtoolkit.testing``, ``kdtoolkit.data.geometry``, ``kdtoolkit.plugins.roi``).
PUBLIC = {"kdtoolkit"}
PUBLIC_IN_TESTS = PUBLIC | {"kdtoolkit.testing", "kdtoolkit.data.geometry", "kdtoolkit.plugins.roi"}


def kdtoolkit_imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {m for m in found if m == "kdtoolkit" or m.startswith("kdtoolkit.")}


def test_plugin_imports_only_the_public_api():
    for path in sorted(PACKAGE.rglob("*.py")):
        assert kdtoolkit_imports(path) <= PUBLIC, path.name
    for path in sorted(Path(__file__).parent.rglob("*.py")):
        assert kdtoolkit_imports(path) <= PUBLIC_IN_TESTS, path.name


def test_task_registers_with_six_stages_and_tall_crops():
    regs = fresh_registries(kd_cvm.plugin)
    task = regs.tasks["cvm"]
    assert task is CVM_TASK and task.classes == STAGES and len(STAGES) == 6
    assert task.ordinal and task.crop_aspect == 0.5 and len(task.descriptions) == 6
    assert task.default_crop_size((128, 128)) == [128, 64]
    assert task.crop_problem((64, 32)) is None and task.crop_problem((32, 64))


def test_render_is_deterministic_and_seeded():
    a, b = render(3, 96, seed=1, index=5), render(3, 96, seed=1, index=5)
    assert np.array_equal(a.image, b.image) and a.box == b.box and a.angle == b.angle
    assert not np.array_equal(a.image, render(3, 96, seed=2, index=5).image)
    assert a.image.shape == (96, 96) and a.image.dtype == np.uint8


@pytest.mark.parametrize("stage", range(6))
def test_roi_is_tall_inside_the_image_and_holds_c2_to_c4(stage):
    for index in range(4):
        drawn = render(stage, 128, seed=0, index=index)
        x0, y0, x1, y1 = drawn.box
        assert (x1 - x0) / (y1 - y0) == pytest.approx(0.5, abs=0.01)
        corners = roi_corners(drawn.box, drawn.angle)
        assert corners.min() >= -0.5 and corners.max() <= 128.5
        # every C2-C4 centre lies inside the rotated box; C6 lies below it
        a = np.radians(drawn.angle)
        axes = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])  # box x, y in image
        centre = np.array([(x0 + x1) / 2, (y0 + y1) / 2])
        for name in ("C2", "C3", "C4", "C6"):
            u, v = axes.T @ (np.array(drawn.vertebrae[name]) - centre)
            inside = abs(u) < (x1 - x0) / 2 and abs(v) < (y1 - y0) / 2
            assert inside == (name != "C6"), (stage, index, name)


def test_stage_shapes_progress():
    ratios = [s[0] for s in SHAPES]
    assert ratios == sorted(ratios) and ratios[4] == 1.0 and ratios[5] > 1.0
    assert [len(s[2]) for s in SHAPES] == [0, 1, 2, 3, 3, 3]


def test_stage_order_is_balanced():
    counts = np.bincount(stage_order(61, seed=0), minlength=6)
    assert counts.max() - counts.min() <= 1 and counts.sum() == 61


def test_phantom_writes_a_manifest_and_reuses_it(tmp_path):
    path = phantom_data(tmp_path, n=12, seed=0, size=64)
    manifest = read_manifest(path, list(STAGES))
    assert len(manifest.samples) == 12 and all(s.box and s.group for s in manifest.samples)
    with open(path, newline="") as handle:
        header = next(csv.reader(handle))
    assert header == ["image", "label", "x0", "y0", "x1", "y1", "angle", "group"]
    stamp = path.stat().st_mtime_ns
    assert phantom_data(tmp_path, n=12, seed=0, size=64) == path
    assert path.stat().st_mtime_ns == stamp
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "manifest.csv").write_text("image,label\n")
    with pytest.raises(KdError, match="not written by the phantom"):
        ensure_phantom(tmp_path / "foreign", n=3, size=64)


def test_cvm_commands(tmp_path):
    app = typer.Typer()
    kd_cvm.plugin.kd_register_commands(app)
    runner = CliRunner()
    stages = runner.invoke(app, ["cvm", "stages"])
    assert stages.exit_code == 0 and "CS6" in stages.output
    out = tmp_path / "ph"
    first = runner.invoke(app, ["cvm", "phantom", str(out), "--n", "6", "--size", "64"])
    assert first.exit_code == 0 and "wrote 6" in first.output, first.output
    again = runner.invoke(app, ["cvm", "phantom", str(out), "--n", "6", "--size", "64"])
    assert "reused 6" in again.output
    assert len(list((out / "images").glob("*.png"))) == 6
