"""The fast step: ``experiment.compile`` (the feature trunk compiled, the Grad-CAM head eager)
and the channels-last policy."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from kdtoolkit.config.recipe import LossConfig, ModelConfig, load_recipe
from kdtoolkit.engine.loss import build_loss
from kdtoolkit.engine.train import Stage, make_context
from kdtoolkit.errors import KdError
from kdtoolkit.models.backbone import build_backbone
from kdtoolkit.models.device import channels_last, compile_trunk

CPU = torch.device("cpu")


def test_compile_is_a_recipe_key_outside_the_digest(tiny_recipe: Path) -> None:
    plain = load_recipe(tiny_recipe)
    compiled = load_recipe(tiny_recipe, ["experiment.compile=true"])
    assert plain.experiment.compile is False and compiled.experiment.compile is True
    assert compiled.digest() == plain.digest()  # the same run, computed faster
    with pytest.raises(KdError, match="experiment.compile"):
        load_recipe(tiny_recipe, ["experiment.compile='yes please'"])


def student_grads(compiled: bool) -> tuple[dict[str, torch.Tensor], object]:
    """One student step (CE + the Grad-CAM term) of a small timm model: parameter gradients
    and its ``forward_features``."""
    torch.manual_seed(0)
    model = build_backbone("test_convnext", 3, 1, {})
    if compiled:
        compile_trunk(model, CPU, backend="aot_eager")  # no C++ build: the graph capture alone
    terms = [LossConfig(name="ce", weight=1.0), LossConfig(name="attention_mse", weight=1.0)]
    loss = build_loss(terms)
    gen = torch.Generator().manual_seed(1)
    batch = {
        "image": torch.rand(4, 1, 64, 64, generator=gen),
        "label": torch.tensor([0, 1, 2, 0]),
        "mask": (torch.rand(4, 1, 64, 64, generator=gen) > 0.5).float(),
    }
    stage = Stage("student", model, "image", loss, ModelConfig())
    total, _ = loss(make_context(stage, batch, CPU))
    total.backward()
    return {n: p.grad for n, p in model.named_parameters()}, model.forward_features


def test_compiled_trunk_trains_as_the_eager_one() -> None:
    """The Grad-CAM term's second-order gradient goes through the eager head only; the
    compiled trunk gives the eager gradients."""
    eager, plain_forward = student_grads(compiled=False)
    compiled, forward = student_grads(compiled=True)
    assert forward is not plain_forward and hasattr(forward, "_torchdynamo_orig_callable")
    assert set(compiled) == set(eager)
    for name, grad in eager.items():
        torch.testing.assert_close(compiled[name], grad, rtol=1e-4, atol=1e-6)


def test_compile_without_a_compiler_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    model = build_backbone("test_convnext", 3, 1, {})
    with pytest.raises(KdError, match=r"^experiment.compile: .*C\+\+ compiler") as e:
        compile_trunk(model, CPU)
    assert "\n" not in str(e.value)


def test_channels_last_on_cuda_only() -> None:
    x = torch.zeros(2, 3, 8, 8)
    assert channels_last(x, CPU) is x
    cuda = torch.device("cuda")
    assert channels_last(x, cuda).is_contiguous(memory_format=torch.channels_last)
    assert channels_last(torch.zeros(2, 3), cuda).is_contiguous()
