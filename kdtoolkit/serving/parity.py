"""Parity of an exported model with ``KdModel``: the same images, prepared for the runtime as
the export's preprocessing metadata says and for ``KdModel`` as its checkpoint says, give the
same probabilities (and feature maps) within a tolerance.

The inputs are held-out images of a run folder (the checkpoint's own test fold in
``folds.json``), or synthetic images of several sizes and aspect ratios (so that letterbox,
resampling and normalisation are exercised, not only the network).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdtoolkit.errors import KdError
from kdtoolkit.fileio import read_json
from kdtoolkit.serving.kdmodel import KdModel
from kdtoolkit.serving.predictor import describe
from kdtoolkit.serving.preprocess import ImageLike, prepare_inputs
from kdtoolkit.serving.runtimes import load_runtime, run_in_batches


@dataclass
class Parity:
    """The largest absolute difference per output (features relative to their largest
    magnitude, when at least 1) over ``n`` inputs, against ``tolerance``; ``mismatched``: keys
    where ``preprocess.json`` disagrees with the file's own metadata."""

    differences: dict[str, float]
    tolerance: float
    n: int
    inputs: str
    mismatched: list[str] = field(default_factory=list)

    @property
    def largest(self) -> tuple[str, float]:
        name = max(self.differences, key=lambda k: self.differences[k])
        return name, self.differences[name]

    @property
    def ok(self) -> bool:
        return self.largest[1] <= self.tolerance and not self.mismatched

    def describe(self) -> str:
        name, value = self.largest
        text = (
            f"largest difference {value:.3g} ({name}) on {self.n} {self.inputs}, "
            f"tolerance {self.tolerance:g}"
        )
        if self.mismatched:
            keys = ", ".join(self.mismatched)
            text += f"; preprocess.json differs from the file's metadata in {keys}"
        return text

    def raise_if_failed(self, path: Path) -> None:
        if not self.ok:
            raise KdError(f"{path}: parity check failed: {self.describe()}")


def synthetic_images(kd: KdModel, n: int, seed: int = 0) -> list[np.ndarray]:
    """``n`` uint8 images (grey, or RGB for a 3-channel model) of varied sizes and aspect
    ratios around the model's input: smooth shapes plus noise."""
    rng = np.random.default_rng(seed)
    h, w = kd.spec.image_size
    shapes = [(h, w), (int(h * 1.5), w), (h, int(w * 1.3)), (2 * h, 2 * w), (h // 2 + 1, w)]
    out = []
    for i in range(n):
        sh, sw = shapes[i % len(shapes)]
        y, x = np.mgrid[0:sh, 0:sw] / max(sh, sw)
        cy, cx = rng.uniform(0.2, 0.8, 2)
        blob = np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / rng.uniform(0.01, 0.1))
        image = 200 * blob + rng.uniform(0, 55, (sh, sw))
        if kd.spec.channels == 3:
            image = np.stack([image * s for s in rng.uniform(0.7, 1.0, 3)], axis=2)
        out.append(image.clip(0, 255).astype(np.uint8))
    return out


def held_out_images(kd: KdModel, run: Path, n: int) -> tuple[list[ImageLike], str]:
    """Up to ``n`` images of the checkpoint's held-out fold in ``run/folds.json`` (any
    images of the run when the checkpoint has no fold). With ``cv.repeats`` R > 1, fold id
    ``f`` is fold ``f % folds`` of repeat ``f // folds`` (each sample's ``repeat_folds``)."""
    doc = read_json(
        run / "folds.json", "run folder's fold list", "give --run a run folder of kd run"
    )
    fold = kd.metadata.get("fold")
    samples = doc.get("samples", [])
    where = "images"
    if fold is not None:
        k, repeats = int(doc.get("folds", 0)), int(doc.get("repeats", 1))
        if k and fold >= k * repeats:
            raise KdError(
                f"{run}: the checkpoint is the run's final model (trained on every sample), "
                "which has no held-out images; omit --run (synthetic inputs)"
            )
        if repeats > 1 and k:
            r, f = divmod(fold, k)
            samples = [s for s in samples if (s.get("repeat_folds") or [])[r : r + 1] == [f]]
            where = f"held-out images of fold {f} of repeat {r}"
        else:
            samples = [s for s in samples if s.get("fold") == fold]
            where = f"held-out images of fold {fold}"
    paths = [Path(s["image"]) for s in samples[:n]]
    if not paths:
        raise KdError(f"{run}/folds.json: no {where}; omit --run (synthetic inputs)")
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise KdError(
            f"{missing[0]}: a held-out image of {run} is missing ({len(missing)} of "
            f"{len(paths)}); restore the data or omit --run (synthetic inputs)"
        )
    return list(paths), where


def sample_inputs(kd: KdModel, run: str | Path | None, n: int) -> tuple[list[ImageLike], str]:
    """(images, what they are) for the parity check: at least two."""
    n = max(2, int(n))
    if run is not None:
        return held_out_images(kd, Path(run), n)
    return list(synthetic_images(kd, n)), "synthetic images"


def check_parity(
    kd: KdModel,
    path: Path,
    meta: dict[str, Any],
    images: Sequence[ImageLike],
    inputs: str,
    tolerance: float,
    mismatched: Sequence[str] = (),
) -> Parity:
    """Run the export at ``path`` on ``images`` prepared as ``meta["preprocess"]`` says and
    compare with ``KdModel.predict`` (and its feature maps when the export outputs them)."""
    try:
        names = [o["name"] for o in meta["outputs"]]
        with warnings.catch_warnings():  # NaN pixels: named below, not warned about
            warnings.simplefilter("ignore", RuntimeWarning)
            x = prepare_inputs(images, meta)
    except (KeyError, TypeError, ValueError) as e:
        raise KdError(
            f"{path}: its preprocessing metadata is incomplete ({type(e).__name__}: {e}); "
            "export the model again"
        ) from None
    bad = [
        describe(image) for image, row in zip(images, x, strict=True) if not np.isfinite(row).all()
    ]
    if bad:
        raise KdError(
            f"{bad[0]}: holds NaN or infinite values ({len(bad)} of the {inputs}); fix or "
            "remove it, or omit --run (synthetic inputs)"
        )
    try:
        got = run_in_batches(load_runtime(path, meta["format"]), x)
    except KdError:
        raise
    except Exception as e:  # noqa: BLE001 - a runtime's refusal is a failed check
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise KdError(
            f"{path}: parity check failed: the exported model does not run on the inputs its "
            f"preprocessing makes ({type(e).__name__}: {first})"
        ) from None
    reference = np.array([list(p.probabilities.values()) for p in kd.predict(images)])
    wanted = {"probabilities": reference}
    if "features" in names:
        with torch.no_grad():
            wanted["features"] = kd.model.forward_features(kd.preprocess(images)).numpy()
    differences = {}
    for name, out in zip(names, got, strict=True):
        ref = wanted[name]
        if out.shape != ref.shape:
            differences[name] = float("inf")
            continue
        scale = 1.0 if name == "probabilities" else max(1.0, float(np.abs(ref).max()))
        differences[name] = float(np.abs(out.astype(np.float64) - ref).max() / scale)
    return Parity(differences, tolerance, len(images), inputs, list(mismatched))


def differing_keys(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested dicts."""
    out = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += differing_keys(va, vb, f"{prefix}{key}.")
        elif va != vb:
            out.append(f"{prefix}{key}")
    return out
