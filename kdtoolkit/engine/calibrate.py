"""Temperature scaling of a trained stage on its fold's validation split (the split that
selected its epoch; never the held-out fold): the temperature goes into the checkpoint's
metadata, and ``KdModel``, ``kd predict`` and the report's calibrated rows divide the logits
by it."""

from __future__ import annotations

from typing import Any

import torch

from kdtoolkit.engine.loaders import Loader
from kdtoolkit.engine.train import View, predict_logits
from kdtoolkit.models.temperature import nll, temperature_fit


def calibrate(
    model: torch.nn.Module, val_loader: Loader, view: View, device: torch.device
) -> dict[str, Any]:
    """The metadata of ``model``'s temperature, fitted on the logits of ``val_loader``:
    ``{"temperature": T, "calibration": {"fitted_on", "n", "nll", "nll_calibrated"}}``, and
    ``"note"`` (one line) saying why when none is kept (T = 1)."""
    logits, labels, _ = predict_logits(model, val_loader, view, device)
    t, note = temperature_fit(logits, labels)
    calibration: dict[str, Any] = {
        "fitted_on": "validation",
        "n": int(len(labels)),
        "nll": nll(logits, labels) if len(labels) else None,
        "nll_calibrated": nll(logits, labels, t) if len(labels) else None,
    }
    if note:
        calibration["note"] = note
    return {"temperature": t, "calibration": calibration}
