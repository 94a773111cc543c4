"""Every student architecture the toolkit trains exports to ONNX, TorchScript and ``.pt2``
with a dynamic batch axis: each file, run in its own runtime at batch 1, 3 and 16, gives
``KdModel``'s probabilities (the ``roi_zoom`` student builds its sampling grid per batch)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import kdtoolkit
from kdtoolkit import export_model, prepare_inputs
from kdtoolkit.engine.export import FORMATS
from kdtoolkit.models.backbone import build_backbone
from kdtoolkit.models.checkpoint import save_checkpoint
from kdtoolkit.serving.parity import synthetic_images
from kdtoolkit.serving.runtimes import load_runtime

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

ARCHITECTURES = {
    "resnet": ("resnet10t", {}),
    "convnext_attn": ("convnext_attn", {"variant": "convnext_atto", "kernel_size": 3}),
    "roi_zoom": (
        "roi_zoom",
        {"locator": "resnet10t", "classifier": "resnet10t", "crop_size": [16, 32]},
    ),
}


def checkpoint_of(folder, backbone: str, options: dict) -> kdtoolkit.KdModel:
    """A student checkpoint of ``backbone`` with random weights (48-pixel grey input)."""
    torch.manual_seed(0)
    model = build_backbone(backbone, 3, 1, options)
    path = folder / "model.safetensors"
    meta = {
        "role": "student",
        "classes": ["a", "b", "c"],
        "backbone": backbone,
        "backbone_options": options,
        "input_size": [48, 48],
        "view": "image",
        "channels": 1,
        "letterbox": True,
        "normalisation": {"mean": [0.449], "std": [0.226]},
        "temperature": 1.5,
    }
    save_checkpoint(path, dict(model.state_dict()), meta)
    return path


@pytest.mark.parametrize("fmt", ["onnx", "torchscript", "exported"])
@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_every_architecture_exports_with_a_dynamic_batch(arch, fmt, tmp_path):
    ckpt = checkpoint_of(tmp_path, *ARCHITECTURES[arch])
    suffix = FORMATS[fmt]
    result = export_model(ckpt, tmp_path / f"out/student{suffix}", fmt, samples=20)
    assert result.parity.ok and result.parity.n == 20
    model = kdtoolkit.KdModel.load(ckpt, device="cpu")
    images = synthetic_images(model, 20, seed=1)
    expected = model.predict_proba(images)
    x = prepare_inputs(images, result.metadata)
    run = load_runtime(result.path, fmt)
    for start, stop in ((0, 1), (1, 4), (4, 20)):  # batches of 1, 3 and 16
        (probs,) = run(x[start:stop])
        assert probs.shape == (stop - start, 3)
        assert np.abs(probs - expected[start:stop]).max() < 1e-5
