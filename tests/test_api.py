"""The library facade: every public name resolves, docs/api.md runs as written, a plugin written
only against ``from kdtoolkit import …`` works, and ``KdModel`` serves a checkpoint."""

from __future__ import annotations

import ast
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest

import kdtoolkit
from kdtoolkit.testing import install_plugin, kd_cli, kd_in_process

ROOT = Path(__file__).resolve().parents[1]

FACADE_PLUGIN = '''
"""A plugin that knows only the facade: a scaled CE loss and a centred-box ROI provider."""
from typing import Annotated

import numpy as np
import torch.nn.functional as F

from kdtoolkit import (
    LossContext,
    LossTerm,
    Range,
    RoiProvider,
    RoiRequest,
    RoiResult,
    hookimpl,
)


class HalfCELoss(LossTerm):
    def __init__(self, scale: Annotated[float, Range(gt=0)] = 0.5) -> None:
        super().__init__()
        self.scale = scale

    def forward(self, ctx: LossContext):
        return self.scale * F.cross_entropy(ctx.logits.float(), ctx.labels)


class CentreBoxProvider(RoiProvider):
    def __init__(self, fraction: Annotated[float, Range(gt=0, le=1)] = 0.5) -> None:
        self.fraction = fraction

    def provide(self, request: RoiRequest) -> RoiResult:
        boxes = []
        for i in request.predict:
            s = request.samples[i]
            w, h = s.width * self.fraction, s.height * self.fraction
            cx, cy = s.width / 2, s.height / 2
            boxes.append([cx - w / 2, cy - h / 4, cx + w / 2, cy + h / 4])
        n = len(boxes)
        return RoiResult(np.array(boxes, float), np.zeros(n), np.ones(n, bool), {"calls": 1.0})


@hookimpl
def kd_register_losses(registry):
    registry.register("half_ce", HalfCELoss)


@hookimpl
def kd_register_roi_providers(registry):
    registry.register("centre_box", CentreBoxProvider)
'''


def test_every_public_name_resolves():
    assert set(kdtoolkit.__all__) == {"__version__", *kdtoolkit.EXPORTS}
    for name in kdtoolkit.__all__:
        assert getattr(kdtoolkit, name) is not None, name
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        kdtoolkit.nope  # noqa: B018


def test_facade_plugin_imports_only_the_facade():
    tree = ast.parse(FACADE_PLUGIN)
    modules = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert {m for m in modules if m.startswith("kdtoolkit")} == {"kdtoolkit"}


@pytest.mark.slow
def test_facade_only_plugin_runs_with_builtin_losses_disabled(tmp_path, tiny_recipe):
    """Teachers and baselines train with the engine's own CE although the built-in losses are
    disabled; the student uses the plugin's loss and ROI provider."""
    env = install_plugin(tmp_path / "site", "kd_facade_demo", FACADE_PLUGIN, "kd-facade-demo")
    env["KD_DISABLE_PLUGINS"] = "kdtoolkit.builtin.losses"
    listing = kd_cli("plugins", env=env)
    assert listing.returncode == 0, listing.stderr
    assert "half_ce" in listing.stdout and "centre_box" in listing.stdout
    assert not re.search(r"\bkl\b", listing.stdout)  # the built-in losses are really off
    result = kd_cli(
        "run",
        str(tiny_recipe),
        "--quiet",
        "--set",
        'loss=[{name = "half_ce", weight = 1.0, scale = 0.5}]',
        "--set",
        "roi.provider=centre_box",
        "--set",
        "teacher.epochs=1",
        "--set",
        "student.epochs=1",
        env=env,
    )
    assert result.returncode == 0, result.stderr
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert {"teacher_crop", "baseline_full", "student"} <= set(results["summary"])


@pytest.mark.slow
def test_kdmodel_serves_a_checkpoint_and_predict_skips_junk(tmp_path, tiny_recipe):
    recipe = kdtoolkit.load_recipe(
        tiny_recipe,
        teacher={"epochs": 1},
        student={"epochs": 1},
        evaluate={"baseline": False},
        cv={"only": [0]},
    )
    result = kdtoolkit.run(recipe, quiet=True)
    ckpt = result.output / "fold_0" / "student" / "model.safetensors"
    model = kdtoolkit.KdModel.load(ckpt, device="cpu")
    assert model.classes == ["low", "mid", "high"] and model.view == "image"
    images = sorted((tmp_path / "data").glob("*.png"))[:3]
    from_paths = model.predict(images)
    from PIL import Image

    arrays = [np.asarray(Image.open(p)) for p in images]
    from_arrays = model.predict(arrays)
    for a, b in zip(from_paths, from_arrays, strict=True):
        assert a.label == b.label
        assert np.allclose(list(a.probabilities.values()), list(b.probabilities.values()))
        assert abs(sum(a.probabilities.values()) - 1) < 1e-5
    cams = model.cam(images)
    assert cams.shape == (3, 32, 32) and cams.min() >= 0 and cams.max() <= 1 + 1e-6
    # a folder with a junk file: the rest are predicted, the junk is named, exit 2
    folder = tmp_path / "mixed"
    folder.mkdir()
    for p in images:
        (folder / p.name).write_bytes(p.read_bytes())
    (folder / "broken.png").write_bytes(b"not a png")
    out = kd_in_process("predict", str(ckpt), str(folder), "--json", "--device", "cpu")
    assert out.returncode == 2
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    assert len(lines) == 3 and "broken.png" in out.stderr and "Traceback" not in out.stderr


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), re.S)


@pytest.mark.slow
def test_api_doc_examples_run(tmp_path, monkeypatch):
    """Every ``python`` block of docs/api.md, in order, in one namespace, in a fresh folder
    that holds the repository's recipes."""
    blocks = python_blocks(ROOT / "docs" / "api.md")
    assert len(blocks) >= 3
    os.symlink(ROOT / "recipes", tmp_path / "recipes")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "docs/api.md", "exec"), namespace)  # noqa: S102
