"""Options of the Grad-CAM loss terms (``cam_layer``, ``mask_norm``), binding a term to the
student, and the gradient share of each term."""

import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdtoolkit.builtin.losses import AttentionKLLoss, AttentionMSELoss, CELoss
from kdtoolkit.builtin.timm import timm_backbone
from kdtoolkit.config.option import check_options
from kdtoolkit.engine.train import gradient_shares
from kdtoolkit.errors import KdError
from kdtoolkit.plugins.loss import CompositeLoss, LossContext


def _resnet():
    torch.manual_seed(0)
    return timm_backbone("resnet18", 3, 1).eval()


def _ctx(model, x, masks, labels):
    features = model.forward_features(x)
    return LossContext(
        student=model,
        images=x,
        features=features,
        logits=model.forward_head(features),
        labels=labels,
        boxes=None,
        masks=masks,
    )


def _case():
    x = torch.randn(2, 1, 64, 64)
    masks = torch.zeros(2, 1, 64, 64)
    masks[0, :, 8:40, 16:48] = 1
    masks[1, :, 30:60, 0:20] = 1
    return x, masks, torch.tensor([0, 2])


def _stage_cam_by_hand(model, x, labels, cam):
    """The CAM of layer3's output, recomputed with that output as a leaf: the later stage
    (layer4) and the head by hand, weights from the class score or from −∂CE/∂A."""
    net = model.model
    with torch.no_grad():
        a = net.layer3(net.layer2(net.layer1(net.maxpool(net.act1(net.bn1(net.conv1(x)))))))
    a.requires_grad_(True)
    logits = net.fc(net.layer4(a).mean(dim=(2, 3)))
    if cam == "paper":
        dlogits = torch.softmax(logits, 1) - F.one_hot(labels, 3).float()  # ∂CE/∂z
        (grads,) = torch.autograd.grad(logits, a, grad_outputs=-dlogits.detach())
    else:
        (grads,) = torch.autograd.grad(logits.gather(1, labels[:, None]).sum(), a)
    m = (grads.mean(dim=(2, 3), keepdim=True) * a).sum(dim=1).detach()
    if cam == "paper":
        low, high = m.amin(dim=(1, 2), keepdim=True), m.amax(dim=(1, 2), keepdim=True)
        return (m - low) / (high - low)
    m = m.clamp_min(0)
    return m / m.amax(dim=(1, 2), keepdim=True)


def _block_mean(masks, h, w):
    B, _, H, W = masks.shape
    return masks.view(B, h, H // h, w, W // w).mean(dim=(2, 4))


@pytest.mark.parametrize("cam", ["gradcam", "paper"])
def test_cam_layer_takes_an_earlier_stage(cam):
    """cam_layer = -2 on a resnet18 at 64 px: layer3's 4×4 grid instead of layer4's 2×2, the
    gradient through layer4 and the head; the loss reaches the first convolution."""
    model = _resnet()
    x, masks, labels = _case()
    term = AttentionMSELoss(cam=cam, cam_layer=-2)
    loss = CompositeLoss([("attention_mse", 1.0, term)])
    loss.bind(model)
    ctx = _ctx(model, x, masks, labels)
    assert ctx.features.shape[-2:] == (2, 2)
    value, _ = loss(ctx)
    expected = _stage_cam_by_hand(model, x, labels, cam)
    assert expected.shape == (2, 4, 4)
    torch.testing.assert_close(value, (expected - _block_mean(masks, 4, 4)).pow(2).mean())
    value.backward()
    grad = model.model.conv1.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    # the same stage by its positive index, and the KL variant on it
    assert AttentionMSELoss(cam_layer=3).cam_layer == 3
    kl = AttentionKLLoss(cam=cam, cam_layer=-2)
    kl.bind(model)
    value = kl(_ctx(model, x, masks, labels))
    assert torch.isfinite(value) and value > 0


def test_cam_layer_last_is_the_default_and_unchanged():
    model = _resnet()
    x, masks, labels = _case()
    default, last = AttentionMSELoss(), AttentionMSELoss(cam_layer="last")
    CompositeLoss([("attention_mse", 1.0, last)]).bind(model)  # nothing to hook
    ctx = _ctx(model, x, masks, labels)
    assert torch.equal(default(ctx), last(ctx))


def test_cam_layer_errors():
    model = _resnet()
    loss = CompositeLoss(
        [("ce", 1.0, CELoss()), ("attention_mse", 1.0, AttentionMSELoss(cam_layer=7))],
        where="fold 0 student",
    )
    with pytest.raises(KdError, match=r"^fold 0 student: loss\.1\.cam_layer = 7: .*-5\.\.4"):
        loss.bind(model)
    # a backbone without timm feature stages (e.g. roi_zoom): only 'last'
    other = CompositeLoss([("attention_kl", 1.0, AttentionKLLoss(cam_layer=-2))])
    with pytest.raises(KdError, match=r"^loss\.0\.cam_layer = -2: .*no feature stages.*'last'"):
        other.bind(nn.Linear(2, 2))
    # a compiled trunk cannot be differentiated twice
    model.forward_features = torch.compile(model.forward_features)
    compiled = CompositeLoss([("attention_mse", 1.0, AttentionMSELoss(cam_layer=-2))])
    with pytest.raises(
        KdError,
        match=r"^loss\.0\.cam_layer = -2 needs .*compile = false or cam_layer = 'last'$",
    ):
        compiled.bind(model)
    # unbound: the stage was never captured
    x, masks, labels = _case()
    with pytest.raises(KdError, match="not captured"):
        AttentionMSELoss(cam_layer=-2)(_ctx(_resnet(), x, masks, labels))
    # option checks
    for options in ({"cam_layer": -2}, {"cam_layer": "last"}, {"mask_norm": "max"}):
        assert check_options(AttentionMSELoss, options, "loss.2") == [], options
    assert check_options(AttentionMSELoss, {"cam_layer": "first"}, "loss.2")
    assert check_options(AttentionMSELoss, {"mask_norm": "peak"}, "loss.2")
    assert check_options(AttentionKLLoss, {"cam": "paper", "cam_layer": -1}, "loss.2") == []
    with pytest.raises(KdError, match="cam_layer must be"):
        AttentionMSELoss(cam_layer=True)
    with pytest.raises(KdError, match="mask_norm must be"):
        AttentionMSELoss(mask_norm="peak")


class _Stage(nn.Module):
    """Identity on a B×C×h×w map, returned as B×h×w×C when ``nhwc`` (as timm's NHWC stages)."""

    def __init__(self, nhwc):
        super().__init__()
        self.nhwc = nhwc

    def forward(self, x):
        return x.permute(0, 2, 3, 1) if self.nhwc else x


class _Staged(nn.Module):
    """One feature stage, then GAP → linear: the stage's CAM is ReLU(Σ_c W_yc A^c), known by
    hand. ``nhwc`` sets ``channels_last_features`` as the timm wrapper does; otherwise the
    attribute is absent."""

    def __init__(self, weight, nhwc):
        super().__init__()
        self.model = nn.Module()
        self.model.stage = _Stage(nhwc)
        self.model.feature_info = [{"module": "stage"}]
        self.fc = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        self.fc.weight.data.copy_(weight)
        if nhwc:
            self.channels_last_features = True

    def forward_features(self, x):
        a = self.model.stage(x)
        return a.permute(0, 3, 1, 2) if self.model.stage.nhwc else a

    def forward_head(self, features):
        return self.fc(features.mean(dim=(2, 3)))


def _staged_ctx(model, x, labels):
    features = model.forward_features(x)
    return LossContext(
        student=model,
        images=torch.zeros(x.shape[0], 1, 8, 12),
        features=features,
        logits=model.forward_head(features),
        labels=labels,
        boxes=None,
        masks=torch.zeros(x.shape[0], 1, 8, 12),
    )


@pytest.mark.parametrize("nhwc", [False, True])
def test_cam_layer_of_a_channels_last_stage_by_hand(nhwc):
    """A stage whose output is B×h×w×C (C = 4, h×w = 2×3) is permuted back before its CAM:
    attention_mse against an empty mask is mean(CAM²), CAM = ReLU(Σ_c W_yc A^c) / max
    (``cam = "gradcam"``) or Σ_c W_yc A^c / max|·| (the default, ``"signed"``). With
    ``create_graph`` the loss reaches the head's weight, without it only the features."""
    torch.manual_seed(0)
    weight = torch.randn(3, 4)
    x = torch.randn(2, 4, 2, 3)
    labels = torch.tensor([1, 2])
    raw = torch.einsum("bc,bchw->bhw", weight[labels], x)
    assert (raw < 0).any()
    relu = F.relu(raw) / F.relu(raw).amax(dim=(1, 2), keepdim=True)
    signed = raw / raw.abs().amax(dim=(1, 2), keepdim=True)
    cases = [
        (g, kind, cam)
        for g in (True, False)
        for kind, cam in (("gradcam", relu), ("signed", signed))
    ]
    for create_graph, cam_kind, cam in cases:
        model = _Staged(weight, nhwc)
        term = AttentionMSELoss(cam_layer=0, create_graph=create_graph, cam=cam_kind)
        term.bind(model)
        xs = x.clone().requires_grad_(True)
        value = term(_staged_ctx(model, xs, labels))
        torch.testing.assert_close(value, cam.pow(2).mean())
        value.backward()
        assert xs.grad.abs().sum() > 0
        assert (model.fc.weight.grad is not None) == create_graph


def _exactly(message):
    return pytest.raises(KdError, match="^" + re.escape(message) + "$")


def test_cam_layer_binding_edge_cases(monkeypatch):
    """The whole index range binds (resnet18: 5 stages, -5..4) and 5 does not; a stage that
    was not captured in this forward, or of another batch, is an error; a failed bind leaves
    the term bindable; an empty feature_info has no stages; several processes are refused."""
    model = _resnet()
    for layer in (-5, 4):
        AttentionMSELoss(cam_layer=layer).bind(model)
    with pytest.raises(KdError, match=r"^cam_layer = 5: this backbone has 5 feature stages"):
        AttentionMSELoss(cam_layer=5).bind(model)
    term = AttentionMSELoss(cam_layer=-2)
    term.bind(model)
    x, masks, labels = _case()
    with torch.no_grad():
        ctx = _ctx(model, x, masks, labels)  # validation forward: nothing captured
    message = (
        "loss 'attention_mse': the stage of cam_layer = -2 was not captured in this forward "
        "(the engine calls bind(student) before training)"
    )
    with _exactly(message):
        term(ctx)
    ctx = _ctx(model, x, masks, labels)
    with _exactly(message):
        term(LossContext(**{**ctx.__dict__, "labels": torch.tensor([0, 1, 2])}))
    with _exactly(
        "cam_layer = -2: backbone Linear has no feature stages (timm's feature_info); "
        "choices: 'last'"
    ):
        term.bind(nn.Linear(2, 2))
    term.bind(model)  # again, after the failed bind
    value = term(_ctx(model, x, masks, labels))
    assert torch.isfinite(value) and value > 0
    empty = _Staged(torch.ones(2, 1), nhwc=False)
    empty.model.feature_info = []
    with pytest.raises(KdError, match="has no feature stages"):
        term.bind(empty)
    monkeypatch.setattr(torch.distributed, "is_available", lambda: True)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda *a, **k: 1)
    term.bind(model)  # one process
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda *a, **k: 2)
    with _exactly(
        "cam_layer = -2 needs one process (a double backward through the trunk); run one "
        "process or set cam_layer = 'last'"
    ):
        term.bind(model)


class _OneChannelHead(nn.Module):
    """GAP → linear from one channel, positive weights: Grad-CAM = A / max A for A ≥ 0."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(1, 2, bias=False)
        self.fc.weight.data.fill_(1.0)

    def forward_head(self, features):
        return self.fc(features.mean(dim=(2, 3)))


def test_mask_norm_max_by_hand():
    """An ROI covering half a cell: area pooling peaks at 0.5, max-normalised at 1. A CAM equal
    to the max-normalised pooled mask scores 0 with "max" and > 0 with "area"."""
    masks = torch.zeros(1, 1, 8, 12)
    masks[0, 0, 0:2, 0:4] = 1  # half of cell (0, 0) of a 2×3 grid of 4×4 cells
    masks[0, 0, 4:6, 4:8] = 1  # half of cell (1, 1)
    pooled = torch.tensor([[[0.5, 0.0, 0.0], [0.0, 0.5, 0.0]]])
    target = pooled / 0.5
    features = (3 * target)[:, None].clone().requires_grad_(True)  # CAM = A / max A = target
    ctx = LossContext(
        student=_OneChannelHead(),
        images=torch.zeros(1, 1, 8, 12),
        features=features,
        logits=torch.zeros(1, 2),
        labels=torch.tensor([1]),
        boxes=None,
        masks=masks,
    )
    assert AttentionMSELoss(mask_norm="max", cam="gradcam")(ctx) == 0
    area = AttentionMSELoss(mask_norm="area", cam="gradcam")(ctx)
    torch.testing.assert_close(area, (target - pooled).pow(2).mean())
    assert area > 0
    assert AttentionMSELoss()(ctx) == 0  # "max" is the default


class _Square(nn.Module):
    """A term ``scale · Σ θ²`` of one parameter vector θ: gradient ``2·scale·θ``."""

    def __init__(self, theta, scale):
        super().__init__()
        self.theta, self.scale = theta, scale

    def forward(self, ctx):
        return self.scale * self.theta.pow(2).sum()


def test_gradient_shares_by_hand():
    """Two identical terms with weights 1 and 3: shares 0.25 and 0.75; a third term at weight
    0 gets 0, a term that does not reach the parameters 0."""
    theta = nn.Parameter(torch.tensor([1.0, -2.0]))
    terms = [
        ("a", 1.0, _Square(theta, 1.0)),
        ("a", 3.0, _Square(theta, 1.0)),
        ("off", 0.0, _Square(theta, 1.0)),
    ]
    loss = CompositeLoss(terms)
    ctx = LossContext(
        student=nn.Identity(),
        images=torch.zeros(1),
        features=torch.zeros(1),
        logits=torch.zeros(1, 2),
        labels=torch.zeros(1, dtype=torch.long),
        boxes=None,
        masks=None,
    )
    loss(ctx)
    assert loss.weighted == {}  # kept only when asked
    loss.keep_terms = True
    total, parts = loss(ctx)
    assert set(loss.weighted) == set(parts) == {"a_0", "a_1", "off"}
    shares = gradient_shares(loss.weighted, [theta])
    assert shares == pytest.approx(
        {"grad_share_a_0": 0.25, "grad_share_a_1": 0.75, "grad_share_off": 0.0}
    )
    total.backward()  # the graph was retained for the step's own backward
    torch.testing.assert_close(theta.grad, 2 * 4 * theta.detach())
    other = nn.Parameter(torch.ones(1))
    assert gradient_shares(loss.weighted, [other]) == {}
