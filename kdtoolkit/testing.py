"""Helpers for testing kdtoolkit plugins (and kdtoolkit itself).

- ``fresh_plugin_manager(*plugins, builtins=False)``: a plugin manager with only the plugins
  given (objects or modules with ``@hookimpl`` functions), optionally plus the built-ins;
- ``fresh_registries(*plugins, builtins=False)``: the registries those plugins fill;
- ``install_plugin(folder, module, source, dist="kd-demo", version="0.1")``: an installed-looking
  plugin distribution (module + dist-info with its ``kdtoolkit`` entry point) in ``folder``;
  returns the environment under which a ``kd`` subprocess discovers it;
- ``kd_cli(*args, env=None, cwd=None)``: run ``kd`` as a user would, in a subprocess;
- ``use_plugins(*plugins)``: a context in which the process-wide registries (recipes, runs)
  also hold ``plugins``, without installing them;
- ``fake_loss_context(...)``: a small ``LossContext`` from a tiny real backbone, to call a
  ``LossTerm`` directly;
- ``tiny_manifest(folder, ...)`` and ``fake_roi_request(folder, ...)``: a few small images on
  disk with their manifest, and an ``RoiRequest`` over them, to call a ``RoiProvider``
  (check its result with ``kdtoolkit.plugins.roi.check_roi_result``);
- ``run_tiny_recipe(tmp_path, *plugins, **overrides)``: a whole run (fold 0 of 2, 1 epoch,
  32-pixel images) with ``plugins`` registered, returning the ``RunResult``.
"""

from __future__ import annotations

import contextlib
import csv
import importlib
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pluggy
import torch
from torch import nn

from kdtoolkit.plugins import hookspec, manager
from kdtoolkit.plugins.loss import LossContext
from kdtoolkit.plugins.manager import (
    BUILTIN_PLUGINS,
    GROUP,
    Registries,
    check_plugins,
    collect_registries,
)
from kdtoolkit.plugins.roi import RoiRequest

if TYPE_CHECKING:
    from kdtoolkit.engine.run import RunResult


def fresh_plugin_manager(*plugins: object, builtins: bool = False) -> pluggy.PluginManager:
    """A plugin manager with the hook specs and only ``plugins`` (and the built-ins when
    ``builtins``); no installed plugin is loaded. Misspelt hooks are rejected."""
    pm = pluggy.PluginManager(GROUP)
    pm.add_hookspecs(hookspec)
    if builtins:
        for name in BUILTIN_PLUGINS:
            pm.register(importlib.import_module(name), name=name)
    for plugin in plugins:
        name = getattr(plugin, "__name__", None) or type(plugin).__name__
        pm.register(plugin, name=name)
    check_plugins(pm)
    return pm


def fresh_registries(*plugins: object, builtins: bool = False) -> Registries:
    """The registries filled by ``plugins`` alone (plus the built-ins when ``builtins``)."""
    return collect_registries(fresh_plugin_manager(*plugins, builtins=builtins))


def install_plugin(
    folder: Path, module: str, source: str, dist: str = "kd-demo", version: str = "0.1"
) -> dict[str, str]:
    """Write ``module`` (``source``, dedented) and a dist-info with a ``kdtoolkit`` entry point
    into ``folder``; return ``os.environ`` with ``folder`` on ``PYTHONPATH``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{module}.py").write_text(textwrap.dedent(source))
    info = folder / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(f"[{GROUP}]\n{module} = {module}\n")
    path = os.pathsep.join(p for p in (str(folder), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path}


def kd_cli(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None, timeout: int = 900
) -> subprocess.CompletedProcess:
    """Run ``kd ARGS`` in a subprocess (as a user would); output captured as text."""
    return subprocess.run(
        [sys.executable, "-m", "kdtoolkit.cli", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def kd_in_process(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """``kd ARGS`` run in this process, as ``kd`` runs (``main``: plugin commands, one-line
    errors, exit codes), its output captured as text: what ``kd_cli`` gives without paying a
    new interpreter's imports. For behaviour that needs a process of its own (signals, a
    kill, an environment, plugins installed for that process), use ``kd_cli``."""
    import contextlib
    import io
    import random
    import signal
    import warnings

    import numpy as np

    from kdtoolkit import interrupts
    from kdtoolkit.cli.app import main

    out, err = io.StringIO(), io.StringIO()
    code: int | str | None = 0
    saved = (sys.argv, os.getcwd(), signal.getsignal(signal.SIGTERM), sys.stdin)
    environ, rng = dict(os.environ), (random.getstate(), np.random.get_state())
    torch = sys.modules.get("torch")
    torch_rng = torch.get_rng_state() if torch is not None else None
    try:
        sys.argv, sys.stdin = ["kd", *args], io.StringIO()
        if cwd is not None:
            os.chdir(cwd)
        with (
            warnings.catch_warnings(),
            contextlib.redirect_stdout(out),
            contextlib.redirect_stderr(err),
        ):
            try:
                main()
            except SystemExit as e:
                code = e.code
    finally:  # what the command changed in this process goes back as it was
        sys.argv, sys.stdin = saved[0], saved[3]
        os.chdir(saved[1])
        signal.signal(signal.SIGTERM, saved[2])
        interrupts.reset()
        os.environ.clear()
        os.environ.update(environ)
        random.setstate(rng[0])
        np.random.set_state(rng[1])
        if torch_rng is not None:
            torch.set_rng_state(torch_rng)
    if not isinstance(code, int | None):  # sys.exit("message"): printed, exit 1
        err.write(f"{code}\n")
        code = 1
    code = 0 if code is None else code
    return subprocess.CompletedProcess(["kd", *args], code, out.getvalue(), err.getvalue())


@contextlib.contextmanager
def use_plugins(*plugins: object, installed: bool = True) -> Iterator[Registries]:
    """Within the block, ``kdtoolkit.plugins.manager.registries()`` (what recipes and runs use)
    holds the built-ins, the installed plugins (unless ``installed=False``) and ``plugins``
    (a plugin that is also installed is registered once)."""
    pm = manager.make_plugin_manager(load_entry_points=installed)
    for plugin in plugins:
        if not pm.is_registered(plugin):  # an installed plugin passed again is the same one
            pm.register(plugin, name=getattr(plugin, "__name__", None) or type(plugin).__name__)
    check_plugins(pm)
    saved = manager.plugin_manager
    manager.registries.cache_clear()
    manager.plugin_manager = lambda: pm  # type: ignore[assignment]
    try:
        yield manager.registries()
    finally:
        manager.plugin_manager = saved
        manager.registries.cache_clear()


class TinyBackbone(nn.Module):
    """A two-layer backbone with the engine's protocol (``forward_features``,
    ``forward_head``, ``num_features``): a stride-4 convolution and a linear head."""

    def __init__(self, num_classes: int = 3, in_chans: int = 1, num_features: int = 8) -> None:
        super().__init__()
        self.num_features = num_features
        self.stem = nn.Conv2d(in_chans, num_features, 4, stride=4)
        self.head = nn.Linear(num_features, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.stem(x))

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features.mean((2, 3)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def fake_loss_context(
    batch: int = 2,
    classes: int = 3,
    size: int = 32,
    channels: int = 1,
    with_teacher: bool = False,
    with_rois: bool = True,
    class_weights: bool = False,
    seed: int = 0,
) -> LossContext:
    """A ``LossContext`` as the engine builds it for a student batch: a ``TinyBackbone``
    student (8 features at size/4) on random ``size``×``size`` images, labels ``i % classes``,
    centred ROI boxes and box masks (``with_rois``), and a tiny teacher's logits and 12
    features on the same images (``with_teacher``). Gradients flow to the student."""
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        student = TinyBackbone(classes, channels)
        teacher = TinyBackbone(classes, channels, num_features=12) if with_teacher else None
    images = torch.rand(batch, channels, size, size, generator=gen)
    features = student.forward_features(images)
    boxes = masks = None
    if with_rois:
        shift = torch.arange(batch, dtype=torch.float32) % 3
        q = torch.full_like(shift, size / 4)
        boxes = torch.stack([q + shift, q, 3 * q + shift, 3 * q - 1], 1)
        grid = torch.arange(size, dtype=torch.float32) + 0.5
        inside_x = (grid >= boxes[:, 0:1]) & (grid <= boxes[:, 2:3])
        inside_y = (grid >= boxes[:, 1:2]) & (grid <= boxes[:, 3:4])
        masks = (inside_y[:, :, None] & inside_x[:, None, :]).float()[:, None]
    teacher_logits = teacher_features = None
    if teacher is not None:
        with torch.no_grad():
            teacher_features = teacher.forward_features(images)
            teacher_logits = teacher.forward_head(teacher_features)
    return LossContext(
        student=student,
        images=images,
        features=features,
        logits=student.forward_head(features),
        labels=torch.arange(batch) % classes,
        boxes=boxes,
        masks=masks,
        teacher_logits=teacher_logits,
        teacher_features=teacher_features,
        class_weights=torch.linspace(0.5, 1.5, classes) if class_weights else None,
    )


def tiny_manifest(
    folder: Path,
    n: int = 12,
    size: int = 32,
    classes: Sequence[str] = ("low", "mid", "high"),
    seed: int = 0,
) -> Path:
    """``n`` grey ``size``×``size`` PNGs in ``folder`` and their ``manifest.csv`` (image,
    label, box, group): a bright 2:1 ROI whose dark stripe count is the class."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        label = i % len(classes)
        image = rng.integers(0, 60, (size, size), dtype=np.uint8)
        w, h = size // 2, size // 4
        x0, y0 = int(rng.integers(1, size - w - 1)), int(rng.integers(1, size - h - 1))
        image[y0 : y0 + h, x0 : x0 + w] = 200
        for s in range(label + 1):
            image[y0 : y0 + h, x0 + 2 + 4 * s : x0 + 4 + 4 * s] = 40
        Image.fromarray(image).save(folder / f"img_{i:03d}.png")
        rows.append([f"img_{i:03d}.png", classes[label], x0, y0, x0 + w, y0 + h, f"p{i}"])
    path = folder / "manifest.csv"
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "label", "x0", "y0", "x1", "y1", "group"])
        writer.writerows(rows)
    return path


def fake_roi_request(
    folder: Path, n: int = 6, size: int = 32, fold: int = 0, train: Sequence[int] | None = None
) -> RoiRequest:
    """An ``RoiRequest`` over a ``tiny_manifest`` of ``n`` images written to ``folder``: the
    first two thirds train (unless ``train`` is given), every image is predicted, the
    provider's ``workdir`` is ``folder/roi`` and ``log`` collects lines in ``request.lines``."""
    from kdtoolkit.data.manifest import read_manifest

    samples = read_manifest(tiny_manifest(Path(folder), n=n, size=size)).samples
    workdir = Path(folder) / "roi"
    workdir.mkdir(parents=True, exist_ok=True)
    lines: list[str] = []
    chosen = range(max(1, 2 * n // 3)) if train is None else train
    request = RoiRequest(
        fold=fold,
        samples=samples,
        train=np.asarray(list(chosen), dtype=np.int64),
        predict=np.arange(n, dtype=np.int64),
        workdir=workdir,
        log=lines.append,
    )
    object.__setattr__(request, "lines", lines)
    return request


TINY_RECIPE: dict[str, Any] = {
    "experiment": {"name": "tiny", "seed": 0, "device": "cpu"},
    "data": {"classes": ["low", "mid", "high"], "image_size": 32, "crop_size": [16, 32]},
    "cv": {"folds": 2, "val_fraction": 0.2, "only": [0]},
    "teacher": {"backbone": "resnet10t", "epochs": 1, "batch_size": 8},
    "student": {"backbone": "resnet10t", "epochs": 1, "batch_size": 8},
    "loss": [{"name": "ce", "weight": 0.5}, {"name": "kl", "weight": 0.5}],
    "evaluate": {"cam_examples": 0, "baseline": False},
}
"""The recipe ``run_tiny_recipe`` starts from (``manifest`` and ``output`` are filled in)."""


def run_tiny_recipe(tmp_path: Path, *plugins: object, **overrides: Any) -> RunResult:
    """Run ``TINY_RECIPE`` into ``tmp_path/run`` with ``plugins`` registered (``use_plugins``;
    a plugin that is also installed is fine); ``overrides`` as in ``kdtoolkit.load_recipe``
    (``roi={"provider": "my_provider"}``, ``loss=[...]``, ``**{"student.epochs": 2}``).

    The data: a 12-image ``tiny_manifest``; with ``task={"name": ..., **options}`` the task's
    own data source instead (its cache in ``tmp_path/.kdcache``), its classes, its crop
    aspect and, unless ``loss`` is given, its default loss terms. A task without a data
    source is a recipe error asking for ``data.manifest``."""
    from kdtoolkit.config.recipe import load_recipe
    from kdtoolkit.engine.run import run

    raw = {**TINY_RECIPE, "experiment": {**TINY_RECIPE["experiment"]}}
    raw["experiment"]["output"] = str(tmp_path / "run")
    if "task" in overrides:
        data = {k: v for k, v in raw["data"].items() if k not in ("classes", "crop_size")}
        raw["data"] = {**data, "cache": str(tmp_path / ".kdcache")}
        raw.pop("loss")  # the task's default terms, unless overridden
    else:
        raw["data"] = {**raw["data"], "manifest": str(tiny_manifest(tmp_path / "data"))}
    with use_plugins(*plugins):
        return run(load_recipe(raw, **overrides), quiet=True)
