"""The ``sos`` task: spheno-occipital synchondrosis fusion staging (Bassed et al., five stages)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Literal

from kd_sos.phantom import STAGES, ensure_phantom, phantom_params, preset
from kdtoolkit.config.option import Range
from kdtoolkit.plugins.task import Task

DESCRIPTIONS = (
    "open: a radiolucent cleft separates the sphenoid and the basi-occiput",
    "endocranial border fused, the rest still open",
    "about half fused, open towards the exocranial border",
    "fully fused, a radiopaque scar line remains",
    "fully fused, the scar obliterated: even trabecular bone",
)

DEFAULTS = {
    "data": {"channels": 1},  # grey; crops follow crop_aspect (2:1 at 224 px: 112×224)
    "cv": {"folds": 5},
    "loss": [
        {"name": "ce", "weight": 0.2},
        {"name": "kl", "weight": 0.8, "temperature": 3.0},
        {"name": "attention_mse", "weight": 0.01},
    ],
    "teacher": {"backbone": "convnext_attn"},
    "student": {"backbone": "convnext_attn"},
}
"""The paper's settings (Halimi Milani et al. 2025): 5-fold CV, θ·CE + β·T²·KL + α·Grad-CAM MSE."""


def phantom_data(
    out_dir: Path,
    n: Annotated[int, Range(ge=1)] = 723,
    seed: int = 0,
    size: Annotated[int, Range(ge=64, le=4096)] = 256,
    difficulty: Literal["paper", "hard"] = "paper",
    band_width: Annotated[float | None, Range(ge=0.05, le=0.2)] = None,
    min_decoys: Annotated[int | None, Range(ge=0, le=8)] = None,
    max_decoys: Annotated[int | None, Range(ge=0, le=8)] = None,
    noise: Annotated[float | None, Range(ge=0, le=0.5)] = None,
    age_cues: Annotated[float | None, Range(ge=0, le=2)] = None,
    age_spread: Annotated[float | None, Range(gt=0, le=3)] = None,
) -> Path:
    """The synthetic SOS phantom under ``out_dir`` (generated once, then reused); its manifest.

    Options (the recipe's ``[task]`` table): ``n`` slices, ``seed``, image ``size`` in pixels,
    the ``difficulty`` regime (:data:`kd_sos.phantom.PRESETS`: ``"paper"`` with global maturity
    cues, ``"hard"`` without), and knobs of :class:`kd_sos.phantom.Difficulty` that override
    the regime's value. Each set of options gets its own subfolder, so runs with different
    options never overwrite each other's data.
    """
    d = preset(
        difficulty,
        band_width=band_width,
        min_decoys=min_decoys,
        max_decoys=max_decoys,
        noise=noise,
        age_cues=age_cues,
        age_spread=age_spread,
    )
    params = phantom_params(n, seed, size, False, d)
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:8]
    folder = Path(out_dir) / f"phantom-n{n}-seed{seed}-{size}px-{digest}"
    return ensure_phantom(folder, n=n, seed=seed, size=size, difficulty=d)


SOS_TASK = Task(
    name="sos",
    classes=STAGES,
    descriptions=DESCRIPTIONS,
    ordinal=True,
    crop_aspect=2.0,
    defaults=DEFAULTS,
    make_data=phantom_data,
)
