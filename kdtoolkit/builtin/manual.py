"""Built-in plugin: the ``manual`` ROI provider, the manifest's expert boxes."""

from __future__ import annotations

import numpy as np

from kdtoolkit.plugins.hookspec import hookimpl
from kdtoolkit.plugins.roi import RoiProvider, RoiRequest, RoiResult


class ManualProvider(RoiProvider):
    """The expert boxes from the manifest (``x0,y0,x1,y1`` and ``angle``), for every image."""

    def provide(self, request: RoiRequest) -> RoiResult:
        rows = [request.samples[i] for i in request.predict]
        return RoiResult(
            boxes=np.array([s.box for s in rows], dtype=np.float64).reshape(-1, 4),
            angles=np.array([s.angle for s in rows], dtype=np.float64),
            found=np.ones(len(rows), dtype=bool),
        )


@hookimpl
def kd_register_roi_providers(registry):
    registry.register("manual", ManualProvider)
