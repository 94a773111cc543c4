"""The ``cvm`` task (Baccetti CS1–CS6) and the phantom on disk as a kdtoolkit manifest."""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

from PIL import Image

from kd_cvm.phantom import STAGES, render, stage_order
from kdtoolkit import KdError, Range, Task

DESCRIPTIONS = (
    "no concavity at the lower borders of C2-C4; C3 and C4 bodies trapezoidal",
    "concavity at the lower border of C2 only; C3 and C4 trapezoidal",
    "concavities at C2 and C3; C3 and C4 trapezoidal or horizontal rectangular",
    "concavities at C2, C3 and C4; C3 and C4 horizontal rectangular",
    "concavities at C2-C4; at least one of C3 and C4 square",
    "concavities at C2-C4; at least one of C3 and C4 vertical rectangular",
)

DEFAULTS = {
    "data": {"channels": 1},  # crop_size follows crop_aspect = 0.5: tall crops
    "cv": {"folds": 5},
    "loss": [
        {"name": "ce", "weight": 0.2},
        {"name": "kl", "weight": 0.8, "temperature": 3.0},
    ],
}

MANIFEST_COLUMNS = ("image", "label", "x0", "y0", "x1", "y1", "angle", "group")
PARAMS_FILE = "phantom.json"
GENERATOR_VERSION = 1


def ensure_phantom(
    folder: Path,
    n: int = 600,
    seed: int = 0,
    size: int = 128,
    noise: float = 0.04,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Write ``n`` cephalograms (``images/*.png``) and ``manifest.csv`` to ``folder``, or reuse
    them when ``phantom.json`` says they were written with the same options; the manifest."""
    folder = Path(folder)
    params = {"version": GENERATOR_VERSION, "n": n, "seed": seed, "size": size, "noise": noise}
    manifest, params_file = folder / "manifest.csv", folder / PARAMS_FILE
    if manifest.exists():
        if params_file.exists() and json.loads(params_file.read_text()) == params:
            return manifest
        if not params_file.exists():
            raise KdError(f"{manifest} exists and was not written by the phantom — use a new OUT")
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i, stage in enumerate(stage_order(n, seed)):
        drawn = render(int(stage), size, seed, i, noise)
        name = f"images/cvm_{i:05d}.png"
        Image.fromarray(drawn.image).save(folder / name)
        rows.append([name, STAGES[drawn.stage], *drawn.box, drawn.angle, f"p{i:05d}"])
        if progress is not None:
            progress(i + 1, n)
    tmp = manifest.with_suffix(".tmp")
    with open(tmp, "w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(MANIFEST_COLUMNS)
        writer.writerows(rows)
    params_file.write_text(json.dumps(params, indent=1))
    tmp.replace(manifest)
    return manifest


def phantom_data(
    out_dir: Path,
    n: Annotated[int, Range(ge=1)] = 600,
    seed: int = 0,
    size: Annotated[int, Range(ge=64, le=1024)] = 128,
    noise: Annotated[float, Range(ge=0, le=0.5)] = 0.04,
) -> Path:
    """The CVM phantom under ``out_dir`` (generated once, then reused); its manifest. Options
    (the recipe's ``[task]`` table): ``n`` images, ``seed``, image ``size`` in pixels and the
    ``noise`` σ; each set of options gets its own subfolder."""
    params = {"n": n, "seed": seed, "size": size, "noise": noise, "v": GENERATOR_VERSION}
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:8]
    folder = Path(out_dir) / f"phantom-n{n}-seed{seed}-{size}px-{digest}"
    return ensure_phantom(folder, n=n, seed=seed, size=size, noise=noise)


CVM_TASK = Task(
    name="cvm",
    classes=STAGES,
    descriptions=DESCRIPTIONS,
    ordinal=True,
    crop_aspect=0.5,
    defaults=DEFAULTS,
    make_data=phantom_data,
)
