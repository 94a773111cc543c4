"""The plugin hooks. A plugin implements any of them with ``@kdtoolkit.hookimpl``.

Each ``kd_register_*`` hook receives the registry of one component kind and registers into it::

    from kdtoolkit import hookimpl

    @hookimpl
    def kd_register_losses(registry):
        registry.register("my_loss", MyLoss)

Plugins are found through the ``kdtoolkit`` entry-point group; the engine's own components come
from built-in plugin modules (``kdtoolkit.builtin.*``) through the same hooks. A hook
implementation whose name matches no hook below is an error.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from kdtoolkit.plugins.registry import Registry

hookspec = pluggy.HookspecMarker("kdtoolkit")
hookimpl = pluggy.HookimplMarker("kdtoolkit")


@hookspec
def kd_register_backbones(registry: Registry) -> None:
    """Register backbone factories: ``factory(num_classes, in_chans, **options) -> Backbone``.

    A backbone is an ``nn.Module`` with ``forward_features(x)`` (last feature map, B×C×h×w),
    ``forward_head(features)`` (logits) and ``num_features`` (C). Options are the factory's
    keyword parameters (see ``kdtoolkit.config.option``).
    """


@hookspec
def kd_register_roi_providers(registry: Registry) -> None:
    """Register ROI providers: subclasses of ``kdtoolkit.plugins.roi.RoiProvider``.

    A provider is built with its recipe options and, per fold, returns an ROI box for every
    image (training images for the student's masks, held-out ones for the two-stage baseline).
    """


@hookspec
def kd_register_losses(registry: Registry) -> None:
    """Register loss terms: subclasses of ``kdtoolkit.plugins.loss.LossTerm``.

    A term is an ``nn.Module`` built with its recipe options; ``forward(ctx)`` gets a
    ``LossContext`` (student and teacher outputs and features, labels, ROI boxes and masks) and
    returns a scalar. Its parameters (an adapter) are trained with the student and stored in
    the checkpoint.
    """


@hookspec
def kd_register_tasks(registry: Registry) -> None:
    """Register tasks: ``Task`` instances (classes, ordinal flag, crop aspect,
    recipe defaults, and an optional built-in data source that writes a manifest)."""


@hookspec
def kd_register_loggers(registry: Registry) -> None:
    """Register run loggers: subclasses of ``kdtoolkit.plugins.logger.RunLogger``.

    A logger is built with its options from ``experiment.loggers`` and receives the run's
    parameters, every stage's per-epoch scalars, the final results and the report's files
    (rank 0 only). A logger that raises is reported once and switched off.
    """


@hookspec
def kd_register_commands(app: Any) -> None:
    """Add sub-commands to the ``kd`` typer app, e.g. ``app.add_typer(sub, name="sos")``."""
