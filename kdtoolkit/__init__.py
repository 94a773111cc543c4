"""kdtoolkit: knowledge distillation from ROI-crop teachers to full-image students.

Library first: the ``kd`` CLI is a thin layer over these names (docs/api.md)::

    import kdtoolkit
    recipe = kdtoolkit.load_recipe("recipes/sos-quick.toml", cv={"folds": 2})
    result = kdtoolkit.run(recipe)
    model = kdtoolkit.KdModel.load(result.output / "fold_0/student/model.safetensors")
    model.predict(["slice.png"])

A plugin imports everything it needs from here: ``hookimpl``, ``LossTerm``, ``LossContext``,
``RoiProvider``, ``RoiRequest``, ``RoiResult``, ``Task``, ``Range``, ``KdError``, ``Registry``,
the ROI geometry (``roi_corners``, ``roi_axes``, ``enclosing_box``), ``RunLogger`` and
``RunInfo`` (run loggers) and, for its tests,
``CompositeLoss`` and ``run_provider`` (with the helpers of ``kdtoolkit.testing``).
Names are resolved on first use, so ``import kdtoolkit`` stays light.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from kdtoolkit.fileio import keep_caches_private

__version__ = "0.1.0"
keep_caches_private()  # libraries' caches (matplotlib) never go into the home folder

#: Public name → the module that defines it.
EXPORTS = {
    "load_recipe": "kdtoolkit.config.recipe",
    "Recipe": "kdtoolkit.config.recipe",
    "Range": "kdtoolkit.config.option",
    "run": "kdtoolkit.engine.run",
    "RunResult": "kdtoolkit.engine.run",
    "tune": "kdtoolkit.tuning.study",
    "TuneResult": "kdtoolkit.tuning.study",
    "load_data": "kdtoolkit.engine.context",
    "KdModel": "kdtoolkit.serving.kdmodel",
    "FoldEnsemble": "kdtoolkit.serving.kdmodel",
    "Prediction": "kdtoolkit.serving.predictor",
    "export_model": "kdtoolkit.engine.export",
    "read_export_metadata": "kdtoolkit.engine.export",
    "verify_export": "kdtoolkit.engine.export",
    "prepare_inputs": "kdtoolkit.serving.preprocess",
    "create_backbone": "kdtoolkit.models.backbone",
    "Backbone": "kdtoolkit.models.backbone",
    "list_components": "kdtoolkit.plugins.manager",
    "registries": "kdtoolkit.plugins.manager",
    "hookimpl": "kdtoolkit.plugins.hookspec",
    "Registry": "kdtoolkit.plugins.registry",
    "LossTerm": "kdtoolkit.plugins.loss",
    "LossContext": "kdtoolkit.plugins.loss",
    "CompositeLoss": "kdtoolkit.plugins.loss",
    "RoiProvider": "kdtoolkit.plugins.roi",
    "RoiRequest": "kdtoolkit.plugins.roi",
    "RoiResult": "kdtoolkit.plugins.roi",
    "run_provider": "kdtoolkit.plugins.roi",
    "roi_corners": "kdtoolkit.data.geometry",
    "roi_axes": "kdtoolkit.data.geometry",
    "enclosing_box": "kdtoolkit.data.geometry",
    "Task": "kdtoolkit.plugins.task",
    "KdError": "kdtoolkit.errors",
    "PluginError": "kdtoolkit.plugins.registry",
    "read_manifest": "kdtoolkit.data.manifest",
    "Manifest": "kdtoolkit.data.manifest",
    "Sample": "kdtoolkit.data.manifest",
    "RunLogger": "kdtoolkit.plugins.logger",
    "RunInfo": "kdtoolkit.plugins.logger",
}

__all__ = [
    "__version__",
    "load_recipe",
    "Recipe",
    "Range",
    "run",
    "RunResult",
    "tune",
    "TuneResult",
    "load_data",
    "KdModel",
    "FoldEnsemble",
    "Prediction",
    "export_model",
    "read_export_metadata",
    "verify_export",
    "prepare_inputs",
    "create_backbone",
    "Backbone",
    "list_components",
    "registries",
    "hookimpl",
    "Registry",
    "LossTerm",
    "LossContext",
    "CompositeLoss",
    "RoiProvider",
    "RoiRequest",
    "RoiResult",
    "run_provider",
    "roi_corners",
    "roi_axes",
    "enclosing_box",
    "Task",
    "KdError",
    "PluginError",
    "read_manifest",
    "Manifest",
    "Sample",
    "RunLogger",
    "RunInfo",
]

if TYPE_CHECKING:
    from kdtoolkit.config.option import Range
    from kdtoolkit.config.recipe import Recipe, load_recipe
    from kdtoolkit.data.geometry import enclosing_box, roi_axes, roi_corners
    from kdtoolkit.data.manifest import Manifest, Sample, read_manifest
    from kdtoolkit.engine.context import load_data
    from kdtoolkit.engine.export import export_model, read_export_metadata, verify_export
    from kdtoolkit.engine.run import RunResult, run
    from kdtoolkit.errors import KdError
    from kdtoolkit.models.backbone import Backbone, create_backbone
    from kdtoolkit.plugins.hookspec import hookimpl
    from kdtoolkit.plugins.logger import RunInfo, RunLogger
    from kdtoolkit.plugins.loss import CompositeLoss, LossContext, LossTerm
    from kdtoolkit.plugins.manager import list_components, registries
    from kdtoolkit.plugins.registry import PluginError, Registry
    from kdtoolkit.plugins.roi import RoiProvider, RoiRequest, RoiResult, run_provider
    from kdtoolkit.plugins.task import Task
    from kdtoolkit.serving.kdmodel import FoldEnsemble, KdModel
    from kdtoolkit.serving.predictor import Prediction
    from kdtoolkit.serving.preprocess import prepare_inputs
    from kdtoolkit.tuning.study import TuneResult, tune


def __getattr__(name: str) -> Any:
    module = EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'kdtoolkit' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
