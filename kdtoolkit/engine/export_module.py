"""What ``kd export`` writes into a file: the serving graph (a checkpoint's network and
its calibration, or a fold ensemble's mean of them) and the metadata that describes it (inputs,
outputs, preprocessing, scan read settings, classes, digests)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdtoolkit.data.affine import ANTIALIAS_STEP
from kdtoolkit.engine.export_digest import tensors_sha256
from kdtoolkit.models.temperature import probabilities_of
from kdtoolkit.serving.kdmodel import FoldEnsemble, KdModel

#: The keys of the metadata that say how an input is made (``preprocess.json``).
PREPROCESS_KEYS = ("classes", "inputs", "preprocess", "scan")


class ServingModule(nn.Module):
    """``image`` (N×C×H×W, normalised) → ``probabilities`` (N×K), and the feature map
    (N×F×h×w) with ``features``: the model's ``forward_head(forward_features(x))``, then
    ``probabilities_of`` over the checkpoint's temperature (a buffer of this module, a copy of
    ``KdModel.network``'s): what ``KdModel.predict`` computes."""

    def __init__(self, kd: KdModel, features: bool = False) -> None:
        super().__init__()
        self.net = kd.model
        self.register_buffer("temperature", kd.network.temperature.detach().clone())
        self.features = features

    def forward(self, image: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if not self.features:
            return probabilities_of(self.net(image), self.temperature)
        maps = self.net.forward_features(image)
        return probabilities_of(self.net.forward_head(maps), self.temperature), maps


class EnsembleModule(nn.Module):
    """``image`` → the mean of the fold members' calibrated probabilities (each a
    ``ServingModule``): what ``FoldEnsemble.predict`` computes, as one graph."""

    def __init__(self, ensemble: FoldEnsemble) -> None:
        super().__init__()
        self.members = nn.ModuleList(ServingModule(m) for m in ensemble.members)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return torch.stack([m(image) for m in self.members]).mean(0)


def serving_module(kd: KdModel | FoldEnsemble, features: bool = False) -> nn.Module:
    """The graph an export holds: one checkpoint's ``ServingModule``, or a fold ensemble's
    ``EnsembleModule``."""
    if isinstance(kd, FoldEnsemble):
        return EnsembleModule(kd).eval()
    return ServingModule(kd, features).eval()


def weights_sha256(kd: KdModel | FoldEnsemble) -> str:
    """The digest of the weights an export is made from (every fold's, for an ensemble)."""
    if isinstance(kd, FoldEnsemble):
        return tensors_sha256(
            {
                f"fold_{k}.{name}": t
                for k, m in zip(kd.folds, kd.members, strict=True)
                for name, t in m.model.state_dict().items()
            }
        )
    return tensors_sha256(kd.model.state_dict())


def linear_head(kd: KdModel, maps: torch.Tensor) -> dict[str, list] | None:
    """``{"weight", "bias"}`` when the head is global average pooling then a linear layer
    (checked on ``maps`` and on random maps: ``head(A) == mean_hw(A) @ Wᵀ + b``), else None."""
    if maps.ndim != 4:
        return None
    shape = (len(kd.classes), maps.shape[1])
    linears = [m for m in kd.model.modules() if isinstance(m, nn.Linear)]
    fc = next((m for m in reversed(linears) if tuple(m.weight.shape) == shape), None)
    if fc is None:
        return None
    noise = torch.randn(maps.shape, generator=torch.Generator().manual_seed(0))
    probe = torch.cat([maps, noise.to(maps) * maps.std().clamp_min(1e-3)])
    with torch.no_grad():
        expected = kd.model.forward_head(probe)
        linear = probe.mean((2, 3)) @ fc.weight.T + (0 if fc.bias is None else fc.bias)
    if expected.shape != linear.shape or not torch.allclose(expected, linear, atol=1e-5):
        return None
    bias = torch.zeros(fc.out_features) if fc.bias is None else fc.bias.detach()
    return {"weight": fc.weight.detach().tolist(), "bias": bias.tolist()}


def package_version() -> str:
    """kdtoolkit's installed version ("unknown" when run from a source tree alone)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("kdtoolkit")
    except PackageNotFoundError:
        return "unknown"


def export_metadata(
    kd: KdModel | FoldEnsemble, checkpoint: Path, fmt: str, example: torch.Tensor, features: bool
) -> dict[str, Any]:
    """What the exported file says about itself: its inputs and outputs, the preprocessing
    that makes its input, how scans are read, the classes, and where it came from."""
    meta = kd.metadata
    c, h, w = example.shape[1:]
    outputs: list[dict[str, Any]] = [
        {"name": "probabilities", "shape": ["batch", len(kd.classes)], "dtype": "float32"}
    ]
    out: dict[str, Any] = {
        "format": fmt,
        "kdtoolkit": package_version(),
        "torch": torch.__version__.split("+")[0],
        "role": meta.get("role"),
        "backbone": meta.get("backbone"),
        "fold": meta.get("fold"),
        "recipe_digest": meta.get("recipe_digest"),
        "checkpoint": str(checkpoint),
        "classes": list(kd.classes),
        "inputs": [{"name": "image", "shape": ["batch", c, h, w], "dtype": "float32"}],
        "outputs": outputs,
        "preprocess": {
            "view": kd.view,
            "input_size": [h, w],
            "channels": c,
            "letterbox": kd.spec.letterbox,
            "normalisation": {"mean": list(kd.spec.mean), "std": list(kd.spec.std)},
            "pixels": "integers / dtype maximum (255, 65535) into [0, 1]; RGB to grey with "
            "BT.601 luma, grey to RGB by repeating",
            "resample": "one bilinear sampling at pixel centres, zeros outside the image; "
            f"antialiased reduction first where an axis shrinks by more than {ANTIALIAS_STEP}",
            "layout": "NCHW, (pixel - mean) / std per channel",
        },
        # how KdModel reads scans (the checkpoint's ``read``), in the form it reads it back
        "scan": json.loads(json.dumps(dataclasses.asdict(kd.read))),
    }
    if isinstance(kd, FoldEnsemble):  # what is averaged, and each fold's temperature
        out.update(fold=None, folds=list(kd.folds), checkpoint=None, checkpoints=kd.names)
        out["temperatures"] = [m.temperature for m in kd.members]
    elif "temperature" in meta:
        out["temperature"] = meta["temperature"]
    out["weights_sha256"] = weights_sha256(kd)
    if features:
        with torch.no_grad():
            maps = kd.model.forward_features(example)
        outputs.append(
            {"name": "features", "shape": ["batch", *maps.shape[1:]], "dtype": "float32"}
        )
        head = linear_head(kd, maps)
        out["cam"] = {"head": "pooling+linear", **head} if head else {"head": "other"}
    return out


def preprocess_part(metadata: dict[str, Any]) -> dict[str, Any]:
    """The part of an export's metadata that ``preprocess.json`` holds."""
    return {k: metadata[k] for k in PREPROCESS_KEYS if k in metadata}
