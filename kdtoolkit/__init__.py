"""kdtoolkit: knowledge distillation from ROI-crop teachers to full-image students.

Library first: the ``kd`` CLI is a thin layer over these functions::

    import kdtoolkit
    recipe = kdtoolkit.load_recipe("recipes/sos-quick.toml", ["cv.folds=2"])
    result = kdtoolkit.run(recipe)
    kdtoolkit.predict("runs/x/fold_0/student/model.safetensors", ["slice.png"])
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kdtoolkit.plugins.hookspec import hookimpl

__version__ = "0.1.0"

__all__ = ["__version__", "hookimpl", "load_recipe", "predict", "run"]

if TYPE_CHECKING:
    from kdtoolkit.config.recipe import load_recipe
    from kdtoolkit.engine.predict import predict
    from kdtoolkit.engine.run import run


def __getattr__(name: str) -> Any:
    # Lazy, so that `import kdtoolkit` (e.g. by a plugin for `hookimpl`) stays light.
    if name == "run":
        from kdtoolkit.engine.run import run

        return run
    if name == "predict":
        from kdtoolkit.engine.predict import predict

        return predict
    if name == "load_recipe":
        from kdtoolkit.config.recipe import load_recipe

        return load_recipe
    raise AttributeError(name)
