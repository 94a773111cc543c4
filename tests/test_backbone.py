"""Backbones: timm wrapping, ConvNeXt+Attn, registry/timm name resolution, local weights."""

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from kdtoolkit.builtin.convnext_attn import ConvNeXtAttn, convnext_attn
from kdtoolkit.builtin.timm import timm_backbone
from kdtoolkit.config.option import check_options
from kdtoolkit.errors import KdError
from kdtoolkit.models.backbone import (
    RESERVED,
    Backbone,
    backbone_options_factory,
    build_backbone,
    create_backbone,
    is_known_backbone,
    unknown_message,
)
from kdtoolkit.models.timm import TimmBackbone
from kdtoolkit.models.weights import load_pretrained
from kdtoolkit.plugins import manager
from kdtoolkit.plugins.manager import registries
from kdtoolkit.plugins.registry import Registry


def _state(model):
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("in_chans", [1, 3])
def test_timm_backbone_matches_timm_model(in_chans):
    torch.manual_seed(0)
    raw = timm.create_model("resnet18", num_classes=5, in_chans=in_chans).eval()
    model = TimmBackbone(raw).eval()
    x = torch.randn(2, in_chans, 64, 64)
    features = model.forward_features(x)
    assert features.shape == (2, 512, 2, 2) and model.num_features == 512
    torch.testing.assert_close(model(x), raw(x))
    torch.testing.assert_close(model.forward_head(features), raw(x))


def test_nhwc_models_are_permuted_to_nchw():
    raw = timm.create_model(
        "swin_tiny_patch4_window7_224",
        num_classes=3,
        embed_dim=24,
        depths=(1, 1, 1, 1),
        num_heads=(1, 1, 1, 1),
    )
    model = TimmBackbone(raw).eval()
    x = torch.randn(1, 3, 224, 224)
    features = model.forward_features(x)
    assert features.shape == (1, model.num_features, 7, 7)
    torch.testing.assert_close(model.forward_head(features), model.model(x))


def test_token_features_are_rejected():
    with pytest.raises(KdError, match="vit_tiny_patch16_224.*not a B×C×h×w"):
        build_backbone("vit_tiny_patch16_224", 5, 3, {})


def test_each_backbone_plugin_registers_its_own_component():
    from kdtoolkit.builtin import convnext_attn as attn_plugin
    from kdtoolkit.builtin import roi_zoom as zoom_plugin
    from kdtoolkit.builtin import timm as timm_plugin

    registry = Registry("backbone")
    attn_plugin.kd_register_backbones(registry=registry)
    zoom_plugin.kd_register_backbones(registry=registry)
    assert registry.list() == ["convnext_attn", "roi_zoom"]
    assert registry.get("convnext_attn") is convnext_attn
    assert registry.get("roi_zoom") is zoom_plugin.roi_zoom
    assert "resnet18" not in registry
    timm_plugin.kd_register_backbones(registry=registry)
    assert registry.list() == ["convnext_attn", "roi_zoom"]  # a resolver registers no names
    assert "resnet18" in registry and [r.name for r in registry.resolvers()] == ["timm"]
    assert "timm model name" in registry.resolvers()[0].describe


def test_names_resolve_in_registry_then_timm():
    assert "convnext_attn" in registries().backbones
    assert registries().backbones.get("convnext_attn") is convnext_attn
    assert is_known_backbone("convnext_attn") and is_known_backbone("resnet18")
    assert is_known_backbone("convnext_atto.d2_in1k")
    assert not is_known_backbone("resnet81")
    assert isinstance(
        build_backbone("convnext_attn", 4, 1, {"variant": "convnext_atto"}), ConvNeXtAttn
    )
    assert isinstance(build_backbone("resnet18", 4, 1, {}), TimmBackbone)


def test_unknown_name_lists_close_matches():
    with pytest.raises(KdError, match="unknown backbone 'resnet81'.*'resnet18'"):
        build_backbone("resnet81", 5, 1, {})
    assert "'convnext_attn'" in unknown_message("convnext_atn")
    assert "any timm model name" in unknown_message("convnext_atn")


def test_without_the_timm_plugin_timm_names_are_unknown(monkeypatch):
    monkeypatch.setenv("KD_DISABLE_PLUGINS", "kdtoolkit.builtin.timm")
    regs = manager.collect_registries(manager.make_plugin_manager(load_entry_points=False))
    assert "convnext_attn" in regs.backbones and "resnet18" not in regs.backbones
    assert regs.backbones.resolvers() == []
    with pytest.raises(KdError, match="unknown backbone 'resnet18'"):
        regs.backbones["resnet18"]


def test_the_timm_resolver_belongs_to_its_plugin():
    backbones = registries().backbones
    assert backbones.owner("resnet18") == backbones.owner("convnext_attn")
    assert backbones.owner("resnet18").startswith("kdtoolkit ")
    assert backbones.get("resnet18").__name__ == "timm_backbone[resnet18]"


def test_backbones_satisfy_the_protocol_and_create_backbone_builds_them():
    torch.manual_seed(0)
    model = create_backbone("convnext_attn", num_classes=4, variant="convnext_atto")
    assert isinstance(model, ConvNeXtAttn) and isinstance(model, Backbone)
    assert model(torch.randn(1, 1, 64, 64)).shape == (1, 4)
    resnet = create_backbone("resnet18", num_classes=3, in_chans=3, drop_rate=0.1)
    assert isinstance(resnet, Backbone) and resnet.model.drop_rate == 0.1
    assert not isinstance(torch.nn.Linear(2, 2), Backbone)


def test_options_are_declared_by_the_factory():
    timm_opts = backbone_options_factory("resnet18")
    assert (
        check_options(timm_opts, {"drop_rate": 0.1, "pretrained": "w.safetensors"}, "s", RESERVED)
        == []
    )
    problems = check_options(timm_opts, {"drop_rate": 1.5, "dropout": 0.1}, "s", RESERVED)
    assert problems[0] == "s.drop_rate: must be < 1, got 1.5"
    assert problems[1].startswith("s.dropout: unknown option")
    attn = backbone_options_factory("convnext_attn")
    assert (
        check_options(attn, {"attention": "pool", "variant": "convnext_atto"}, "s", RESERVED) == []
    )
    assert "must be one of" in check_options(attn, {"attention": "cbam"}, "s", RESERVED)[0]
    with pytest.raises(KdError, match="backbone.resnet18.drop_rate: must be < 1"):
        build_backbone("resnet18", 5, 1, {"drop_rate": 2.0})


def test_timm_weights_only_on_request(monkeypatch):
    """``pretrained="timm"`` asks timm (the hub check is stubbed: no network in tests)."""
    from kdtoolkit.models import timm as kd_timm

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(kd_timm, "timm_hub_problem", lambda name, role="": None)
    calls = []
    real = timm.create_model

    def spy(name, pretrained=False, **kwargs):
        calls.append(pretrained)
        return real(name, pretrained=False, **kwargs)

    monkeypatch.setattr(timm, "create_model", spy)
    timm_backbone("resnet18", 5, 1)
    timm_backbone("resnet18", 5, 1, pretrained="timm")
    convnext_attn(5, 1, variant="convnext_atto", pretrained="timm")
    assert calls == [False, True, True]


# --------------------------------------------------------------------------- ConvNeXt+Attn


@pytest.mark.parametrize("attention", ["spatial", "pool"])
def test_convnext_attn_forward_backward(attention):
    torch.manual_seed(0)
    model = convnext_attn(5, 1, variant="convnext_atto", attention=attention)
    x = torch.randn(2, 1, 64, 64)
    logits = model(x)
    assert logits.shape == (2, 5) and model.num_features == 320
    a = model.last_attention
    assert a.shape == (2, 1, 2, 2)
    if attention == "pool":
        torch.testing.assert_close(a.sum(dim=(2, 3)), torch.ones(2, 1))
    else:
        assert ((a > 0) & (a < 1)).all()
    (logits[:, 0].sum() + a.pow(2).sum()).backward()
    grads = [p.grad for p in model.attention.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    assert model.model.stem[0].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("attention", ["spatial", "pool"])
def test_convnext_attn_starts_as_plain_convnext(attention):
    """Zero-initialised attention: uniform pooling (pool) or a constant 0.5 scale that the
    head's LayerNorm removes (spatial)."""
    torch.manual_seed(0)
    model = convnext_attn(5, 3, variant="convnext_atto", attention=attention).eval()
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(model(x), model.model(x), atol=1e-4, rtol=1e-4)


def test_convnext_attn_spatial_by_hand():
    torch.manual_seed(0)
    model = convnext_attn(3, 1, variant="convnext_atto", attention="spatial").eval()
    torch.nn.init.normal_(model.attention.conv.weight)
    A = torch.randn(2, 320, 5, 5)
    stats = torch.stack([A.mean(1), A.max(1).values], dim=1)
    a = torch.sigmoid(
        F.conv2d(stats, model.attention.conv.weight, model.attention.conv.bias, padding=3)
    )
    head = model.model.head
    z = head.norm((A * a).mean(dim=(2, 3), keepdim=True)).flatten(1)
    torch.testing.assert_close(model.forward_head(A), head.fc(z))
    torch.testing.assert_close(model.last_attention, a)


def test_convnext_attn_pool_by_hand():
    torch.manual_seed(0)
    model = convnext_attn(3, 1, variant="convnext_atto", attention="pool").eval()
    torch.nn.init.normal_(model.attention.conv.weight, std=0.1)
    A = torch.randn(2, 320, 4, 3)
    w = model.attention.conv.weight.view(320)
    logits = torch.einsum("bchw,c->bhw", A, w) + model.attention.conv.bias
    p = logits.flatten(1).softmax(1).view(2, 4, 3)
    z = torch.einsum("bchw,bhw->bc", A, p)
    head = model.model.head
    expected = head.fc(F.layer_norm(z, (320,), head.norm.weight, head.norm.bias, eps=head.norm.eps))
    torch.testing.assert_close(model.forward_head(A), expected)
    torch.testing.assert_close(model.last_attention[:, 0], p)


# --------------------------------------------------------------------------- weights


def test_safetensors_round_trip(tmp_path):
    torch.manual_seed(0)
    a = timm_backbone("resnet18", 5, 1).eval()
    path = tmp_path / "w.safetensors"
    save_file(_state(a), str(path))
    torch.manual_seed(1)
    b = timm_backbone("resnet18", 5, 1, pretrained=str(path)).eval()
    x = torch.randn(2, 1, 64, 64)
    torch.testing.assert_close(b(x), a(x), rtol=0, atol=0)


def test_convnext_attn_round_trip_keeps_attention(tmp_path):
    torch.manual_seed(0)
    a = convnext_attn(5, 1, variant="convnext_atto", attention="pool").eval()
    torch.nn.init.normal_(a.attention.conv.weight)
    path = tmp_path / "w.safetensors"
    save_file(_state(a), str(path))
    b = build_backbone(
        "convnext_attn",
        5,
        1,
        {"variant": "convnext_atto", "attention": "pool", "pretrained": str(path)},
    ).eval()
    x = torch.randn(2, 1, 64, 64)
    torch.testing.assert_close(b(x), a(x), rtol=0, atol=0)


def test_timm_checkpoint_with_prefix_and_wrapper(tmp_path):
    """A DDP-style 'module.' timm state dict inside {'state_dict': ...} (torch.save) loads
    into the inner timm model; ConvNeXtAttn's attention keeps its initialisation."""
    torch.manual_seed(0)
    raw = timm.create_model("convnext_atto", num_classes=5, in_chans=1)
    path = tmp_path / "w.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in raw.state_dict().items()}}, path)
    model = convnext_attn(5, 1, variant="convnext_atto", pretrained=str(path))
    for k, v in raw.state_dict().items():
        torch.testing.assert_close(model.model.state_dict()[k], v, rtol=0, atol=0)
    assert model.attention.conv.weight.abs().sum() == 0


def test_timm_conventions_adapt_stem_and_skip_classifier(tmp_path):
    torch.manual_seed(0)
    rgb = timm.create_model("resnet18", num_classes=1000, in_chans=3)
    path = tmp_path / "in1k.safetensors"
    save_file(_state(rgb), str(path))
    torch.manual_seed(1)
    grey = timm_backbone("resnet18", 5, 1)
    fc_before = grey.model.fc.weight.detach().clone()
    load_pretrained(grey, path)
    torch.testing.assert_close(grey.model.conv1.weight, rgb.conv1.weight.sum(dim=1, keepdim=True))
    torch.testing.assert_close(grey.model.layer4[1].conv2.weight, rgb.layer4[1].conv2.weight)
    torch.testing.assert_close(grey.model.fc.weight, fc_before)
    with pytest.raises(KdError, match="shape key"):
        load_pretrained(timm_backbone("resnet18", 5, 1), path, adapt=False)


def test_mismatched_file_names_keys(tmp_path):
    path = tmp_path / "r10.safetensors"
    save_file(_state(timm.create_model("resnet10t", num_classes=5, in_chans=1)), str(path))
    with pytest.raises(KdError) as err:
        timm_backbone("resnet14t", 5, 1, pretrained=str(path))
    message = str(err.value)
    assert str(path) in message
    assert "25 missing key(s): layer1.0.conv3.weight, " in message and "(+20 more)" in message
    assert "shape key(s): layer1.0.conv1.weight (64, 64, 3, 3) vs (64, 64, 1, 1)" in message
    with pytest.raises(KdError, match="shape key"):
        load_pretrained(timm_backbone("resnet18", 5, 1).model, _write_bad_shape(tmp_path))


def _write_bad_shape(tmp_path):
    state = _state(timm.create_model("resnet18", num_classes=5, in_chans=1))
    state["layer1.0.conv1.weight"] = torch.zeros(64, 64, 1, 1)
    path = tmp_path / "bad.safetensors"
    save_file(state, str(path))
    return path


def test_missing_or_unreadable_file(tmp_path):
    model = timm_backbone("resnet18", 5, 1)
    with pytest.raises(KdError, match="no such file"):
        load_pretrained(model, tmp_path / "nope.safetensors")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(KdError, match="junk.pth: cannot read"):
        load_pretrained(model, junk)
