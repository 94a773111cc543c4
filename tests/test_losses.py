"""Built-in loss terms against hand computations and independent references."""

import math
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdtoolkit.builtin.convnext_attn import convnext_attn
from kdtoolkit.builtin.input_gradient import InputGradientLoss
from kdtoolkit.builtin.losses import (
    AttentionKLLoss,
    AttentionMSELoss,
    AttentionPoolLoss,
    CELoss,
    KLLoss,
    RoiCELoss,
    RoiFeatureLoss,
)
from kdtoolkit.builtin.roi_zoom import RoiBoxLoss
from kdtoolkit.builtin.timm import timm_backbone
from kdtoolkit.config.option import check_options
from kdtoolkit.errors import KdError
from kdtoolkit.plugins.loss import CompositeLoss, LossContext
from kdtoolkit.plugins.manager import registries


def _ctx(**kw):
    base = {
        "student": None,
        "images": torch.zeros(2, 1, 8, 8),
        "features": torch.zeros(2, 1, 2, 2),
        "logits": torch.zeros(2, 3),
        "labels": torch.zeros(2, dtype=torch.long),
        "boxes": torch.zeros(2, 4),
        "masks": torch.zeros(2, 1, 8, 8),
    }
    return LossContext(**{**base, **kw})


def test_kd_register_losses_registers_every_builtin_term():
    losses = registries().losses
    expected = {
        "ce": CELoss,
        "kl": KLLoss,
        "attention_mse": AttentionMSELoss,
        "attention_kl": AttentionKLLoss,
        "roi_feature": RoiFeatureLoss,
        "attention_pool": AttentionPoolLoss,
        "roi_ce": RoiCELoss,
        "roi_box": RoiBoxLoss,
        "input_gradient": InputGradientLoss,
    }
    for name, cls in expected.items():
        assert losses.get(name) is cls
        assert losses.owner(name).startswith("kdtoolkit ")
    assert [n for n in expected if losses.get(n).needs_teacher] == ["kl", "roi_feature"]


def test_options_are_declared_with_bounds():
    assert check_options(KLLoss, {"temperature": 0}, "loss[1]") == [
        "loss[1].temperature: must be >= 0.05, got 0"
    ]
    assert check_options(CELoss, {"label_smoothing": 0.1}, "loss[0]") == []
    assert "must be one of 'kl', 'bce'" in check_options(AttentionKLLoss, {"mode": "l2"}, "x")[0]
    assert "must be one of 'cosine'" in check_options(RoiFeatureLoss, {"metric": "l1"}, "x")[0]
    assert check_options(RoiFeatureLoss, {"output_size": 0}, "x") == [
        "x.output_size: must be >= 1, got 0"
    ]


# --------------------------------------------------------------------------- ce, kl


def test_ce_by_hand_with_class_weights_and_smoothing():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]])
    labels = torch.tensor([0, 1])
    weights = torch.tensor([1.0, 3.0, 1.0])
    logp = logits.log_softmax(1)
    nll = -logp[torch.arange(2), labels]
    by_hand = (weights[labels] * nll).sum() / weights[labels].sum()
    ctx = _ctx(logits=logits, labels=labels, class_weights=weights)
    torch.testing.assert_close(CELoss()(ctx), by_hand)
    eps = 0.1
    smooth = -((1 - eps) * logp[torch.arange(2), labels] + eps / 3 * logp.sum(1)).mean()
    torch.testing.assert_close(
        CELoss(label_smoothing=eps)(_ctx(logits=logits, labels=labels)), smooth
    )


def test_kl_by_hand_and_against_torch():
    torch.manual_seed(0)
    z, t, T = torch.randn(4, 5), torch.randn(4, 5), 3.0
    ctx = _ctx(logits=z, teacher_logits=t)
    value = KLLoss(temperature=T)(ctx)
    p = [[math.exp(v / T) for v in row] for row in t.tolist()]
    q = [[math.exp(v / T) for v in row] for row in z.tolist()]
    by_hand = 0.0
    for pr, qr in zip(p, q, strict=True):
        sp, sq = sum(pr), sum(qr)
        by_hand += sum(a / sp * math.log((a / sp) / (b / sq)) for a, b in zip(pr, qr, strict=True))
    by_hand *= T * T / 4
    assert value.item() == pytest.approx(by_hand, rel=1e-5)
    reference = F.kl_div(F.log_softmax(z / T, 1), F.softmax(t / T, 1), reduction="batchmean")
    torch.testing.assert_close(value, T * T * reference)


def test_kl_gradient_only_to_student_and_needs_teacher():
    z = torch.randn(3, 4, requires_grad=True)
    t = torch.randn(3, 4, requires_grad=True)
    KLLoss()(_ctx(logits=z, teacher_logits=t)).backward()
    assert z.grad.abs().sum() > 0 and t.grad is None
    with pytest.raises(KdError, match="teacher logits"):
        KLLoss()(_ctx(logits=z))


# --------------------------------------------------------------------------- Grad-CAM terms


class _LinearHead(nn.Module):
    """GAP → linear: Grad-CAM weights are W_y / (hw), known by hand."""

    def __init__(self, weight):
        super().__init__()
        self.fc = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        self.fc.weight.data.copy_(weight)

    def forward_head(self, features):
        return self.fc(features.mean(dim=(2, 3)))


def _hand_cam(weight, features, labels):
    h, w = features.shape[-2:]
    cam = F.relu(torch.einsum("bc,bchw->bhw", weight[labels] / (h * w), features))
    return cam / cam.amax(dim=(1, 2), keepdim=True)


def _block_mean(masks, h, w):
    """Area downsampling by block averaging (independent of adaptive_avg_pool2d)."""
    B, _, H, W = masks.shape
    return masks.view(B, h, H // h, w, W // w).mean(dim=(2, 4))


def _grad_cam_case():
    torch.manual_seed(0)
    weight = torch.randn(3, 4)
    features = torch.randn(2, 4, 2, 3, requires_grad=True)
    labels = torch.tensor([1, 2])
    masks = torch.zeros(2, 1, 8, 12)
    masks[0, :, :4, :8] = 1
    masks[1, :, 2:6, 3:12] = 1
    ctx = _ctx(
        student=_LinearHead(weight),
        images=torch.zeros(2, 1, 8, 12),
        features=features,
        labels=labels,
        masks=masks,
    )
    return ctx, _hand_cam(weight, features.detach(), labels), _block_mean(masks, 2, 3)


def test_attention_mse_by_hand():
    ctx, cam, mask = _grad_cam_case()
    assert mask.sum() > 0 and mask.max() == 1 and 0 < mask[1, 0, 0] < 1
    value = AttentionMSELoss(cam="gradcam", mask_norm="area")(ctx)
    torch.testing.assert_close(value, (cam - mask).pow(2).mean())
    value.backward()
    assert torch.isfinite(ctx.features.grad).all() and ctx.features.grad.abs().sum() > 0


def test_attention_mse_defaults_signed_cam_and_max_mask_by_hand():
    """The defaults: the Grad-CAM weights W_y/(hw) for GAP → linear, ``Σ_c w_c A^c`` without
    ReLU divided by its largest absolute value, against the mask divided by its maximum."""
    ctx, _, mask = _grad_cam_case()
    weight = ctx.student.fc.weight.detach()
    features = ctx.features.detach()
    h, w = features.shape[-2:]
    raw = torch.einsum("bc,bchw->bhw", weight[ctx.labels] / (h * w), features)
    assert (raw < 0).any() and (raw > 0).any()
    cam = raw / raw.abs().amax(dim=(1, 2), keepdim=True)
    target = mask / mask.amax(dim=(1, 2), keepdim=True)
    assert target.amax(dim=(1, 2)).tolist() == [1.0, 1.0]
    term = AttentionMSELoss()
    assert (term.cam, term.mask_norm) == ("signed", "max")
    value = term(ctx)
    torch.testing.assert_close(value, (cam - target).pow(2).mean())
    value.backward()
    assert torch.isfinite(ctx.features.grad).all() and ctx.features.grad.abs().sum() > 0


def test_attention_mse_defaults_have_no_degenerate_minimum():
    """At the defaults the mask itself scores 0, while an all-zero or a constant map scores at
    least mean(M²); with the old defaults (ReLU Grad-CAM, area mask) the all-zero map beat a
    CAM equal to the (max-scaled) mask, and its gradient vanished."""
    head = _LinearHead(torch.eye(2))
    masks = torch.zeros(1, 1, 4, 4)
    masks[..., 0, 0] = 1  # a quarter of one cell of the 2×2 grid
    labels = torch.tensor([0])

    def value(features, **options):
        features = features.clone().requires_grad_(True)
        ctx = _ctx(
            student=head,
            images=torch.zeros(1, 1, 4, 4),
            features=features,
            labels=labels,
            masks=masks,
        )
        out = AttentionMSELoss(**options)(ctx)
        out.backward()
        return float(out.detach()), features.grad

    target = torch.tensor([[1.0, 0.0], [0.0, 0.0]])  # the max-scaled mask on the 2×2 grid
    on_mask = torch.zeros(1, 2, 2, 2)
    on_mask[0, 0] = target  # class 0's map: positive on the ROI's cell, 0 elsewhere
    dead = torch.zeros(1, 2, 2, 2)
    dead[0, 0] = -1.0  # class 0's score negative everywhere: ReLU Grad-CAM all zero
    constant = torch.ones(1, 2, 2, 2)
    zero_value = float(target.pow(2).mean())
    assert value(on_mask)[0] == pytest.approx(0.0, abs=1e-12)
    assert value(dead)[0] > zero_value
    assert value(constant)[0] >= zero_value
    _, grad = value(dead)
    assert grad.abs().sum() > 0  # the signed map still has a gradient there
    # the old defaults: the all-zero map scores below the mask-shaped map, with no gradient
    old = {"cam": "gradcam", "mask_norm": "area"}
    assert value(dead, **old)[0] < value(on_mask, **old)[0]
    assert value(dead, **old)[1].abs().sum() == 0


def test_attention_mse_paper_cam_by_hand():
    """``cam = "paper"``: for GAP → linear, ∂CE/∂A^c_ij = Σ_k (p_k − δ_ky) W_kc / (hw) (softmax
    minus one-hot); the weights are its descent direction w = −that, the map Σ_c w_c A^c without
    ReLU, min–max normalised per sample."""
    ctx, _, mask = _grad_cam_case()
    weight = ctx.student.fc.weight.detach()
    features = ctx.features.detach()
    h, w = features.shape[-2:]
    p = torch.softmax(features.mean(dim=(2, 3)) @ weight.T, dim=1)
    dlogits = p - F.one_hot(ctx.labels, 3).float()
    weights = -(dlogits @ weight) / (h * w)  # B×C, the descent direction
    raw = torch.einsum("bc,bchw->bhw", weights, features)
    low, high = raw.amin(dim=(1, 2), keepdim=True), raw.amax(dim=(1, 2), keepdim=True)
    cam = (raw - low) / (high - low)
    assert (raw < 0).any() and cam.min() == 0 and cam.max() == 1
    value = AttentionMSELoss(cam="paper", mask_norm="area")(ctx)
    torch.testing.assert_close(value, (cam - mask).pow(2).mean())
    value.backward()
    assert torch.isfinite(ctx.features.grad).all() and ctx.features.grad.abs().sum() > 0
    assert check_options(AttentionMSELoss, {"cam": "paper"}, "loss[2]") == []
    assert (
        "must be one of 'gradcam', 'paper', 'signed'"
        in check_options(AttentionMSELoss, {"cam": "x"}, "loss[2]")[0]
    )
    with pytest.raises(KdError, match="cam must be"):
        AttentionMSELoss(cam="x")


def _attention_mse_grads(model, create_graph):
    torch.manual_seed(1)
    x = torch.randn(2, 1, 64, 64)
    masks = torch.zeros(2, 1, 64, 64)
    masks[:, :, 16:48, 8:40] = 1
    model.zero_grad()
    features = model.forward_features(x)
    ctx = _ctx(
        student=model,
        images=x,
        features=features,
        logits=model.forward_head(features),
        labels=torch.tensor([0, 2]),
        masks=masks,
    )
    AttentionMSELoss(create_graph=create_graph)(ctx).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_attention_mse_second_order_through_head():
    """create_graph=True differentiates the Grad-CAM weights (head only): ConvNeXt's
    LayerNorm head makes them depend on the features, so backbone gradients change too."""
    torch.manual_seed(0)
    model = timm_backbone("convnext_atto", 3, 1)
    full = _attention_mse_grads(model, create_graph=True)
    detached = _attention_mse_grads(model, create_graph=False)
    assert all(torch.isfinite(g).all() for g in [*full.values(), *detached.values()])
    stem = "model.stem.0.weight"
    assert full[stem].abs().sum() > 0 and detached[stem].abs().sum() > 0
    assert not torch.allclose(full[stem], detached[stem])
    assert "model.head.fc.weight" in full and "model.head.fc.weight" not in detached


@pytest.mark.parametrize("mode", ["kl", "bce"])
def test_attention_kl_by_hand(mode):
    ctx, cam, mask = _grad_cam_case()
    value = AttentionKLLoss(mode=mode)(ctx)
    eps = 1e-8
    if mode == "kl":
        p = mask.flatten(1) / mask.flatten(1).sum(1, keepdim=True)
        q = (cam.flatten(1) + eps) / (cam.flatten(1) + eps).sum(1, keepdim=True)
        terms = torch.where(p > 0, p * (p / q).log(), torch.zeros_like(p))
        expected = terms.sum(1).mean()
    else:
        expected = -(mask * (cam + eps).log() + (1 - mask) * (1 - cam + eps).log()).mean()
    torch.testing.assert_close(value, expected)
    value.backward()
    grad = ctx.features.grad
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_attention_kl_is_scale_free():
    ctx, _, _ = _grad_cam_case()
    scaled = _ctx(**{**ctx.__dict__, "masks": ctx.masks * 7})
    torch.testing.assert_close(AttentionKLLoss()(ctx), AttentionKLLoss()(scaled))


# --------------------------------------------------------------------------- attention_pool


def test_attention_pool_by_hand():
    student = nn.Module()
    attention = torch.tensor([[0.1, 0.2], [0.3, 0.4]]).view(1, 1, 2, 2).requires_grad_(True)
    student.last_attention = attention
    masks = torch.zeros(1, 1, 4, 4)
    masks[..., :2, :] = 1  # top row of cells: p = (0.5, 0.5, 0, 0)
    ctx = _ctx(student=student, masks=masks, labels=torch.zeros(1, dtype=torch.long))
    value = AttentionPoolLoss()(ctx)
    by_hand = 0.5 * math.log(0.5 / 0.1) + 0.5 * math.log(0.5 / 0.2)
    assert value.item() == pytest.approx(by_hand, rel=1e-5)
    value.backward()
    assert torch.isfinite(attention.grad).all() and attention.grad.abs().sum() > 0


@pytest.mark.parametrize("mode", ["spatial", "pool"])
def test_attention_pool_trains_convnext_attn(mode):
    torch.manual_seed(0)
    model = convnext_attn(3, 1, variant="convnext_atto", attention=mode)
    x = torch.randn(2, 1, 64, 64)
    masks = torch.zeros(2, 1, 64, 64)
    masks[:, :, :32, :32] = 1
    features = model.forward_features(x)
    ctx = _ctx(
        student=model,
        images=x,
        features=features,
        logits=model.forward_head(features),
        labels=torch.tensor([0, 1]),
        masks=masks,
    )
    value = AttentionPoolLoss()(ctx)
    # Zero-initialised attention is uniform over the 2×2 cells; the mask is one cell.
    assert value.item() == pytest.approx(math.log(4), rel=1e-4)
    value.backward()
    for p in model.attention.parameters():
        assert torch.isfinite(p.grad).all()
    assert model.attention.conv.weight.grad.abs().sum() > 0


def test_attention_pool_needs_an_attention_student():
    model = timm_backbone("resnet18", 3, 1)
    with pytest.raises(KdError, match="convnext_attn"):
        AttentionPoolLoss()(_ctx(student=model))


# --------------------------------------------------------------------------- roi_feature


def _roi_case(metric, margin=0):
    """Student feature map 8×8 over a 32×64 (H×W) image, so a cell is 4 pixels high and 8
    wide: constant c in cells rows 2:6, columns 1:5 (plus ``margin`` cells around), so the
    box x 8–40, y 8–24 in image pixels (cells x 1–5, y 2–6) pools exactly c. Without a margin
    this holds for 1×1 output only, where roi_align's samples fall on cell centres; finer bins
    interpolate across the box edge."""
    c = torch.tensor([1.0, 2.0, -1.0])
    features = torch.randn(1, 3, 8, 8)
    features[0, :, 2 - margin : 6 + margin, 1 - margin : 5 + margin] = c[:, None, None]
    features.requires_grad_(True)
    teacher = torch.randn(1, 3, 5, 5)
    term = RoiFeatureLoss(metric=metric)
    term.setup(3, 3)
    with torch.no_grad():
        term.adapter.weight.copy_(torch.eye(3))
        term.adapter.bias.zero_()
    ctx = _ctx(
        images=torch.zeros(1, 1, 32, 64),
        features=features,
        boxes=torch.tensor([[8.0, 8.0, 40.0, 24.0]]),
        teacher_features=teacher,
    )
    return term, ctx, c, teacher.mean(dim=(2, 3))[0]


@pytest.mark.parametrize(("output_size", "margin"), [(1, 0), (3, 1)])
def test_roi_feature_pools_inside_the_box(output_size, margin):
    term, ctx, c, _ = _roi_case("cosine", margin)
    term.output_size = output_size
    torch.testing.assert_close(term.pooled_student(ctx), c[None])
    shifted = _ctx(**{**ctx.__dict__, "boxes": ctx.boxes + 8})
    assert not torch.allclose(term.pooled_student(shifted), c[None])


@pytest.mark.parametrize("metric", ["cosine", "mse"])
def test_roi_feature_by_hand(metric):
    term, ctx, s, t = _roi_case(metric)
    value = term(ctx)
    if metric == "cosine":
        expected = 1 - (s @ t) / (s.norm() * t.norm())
    else:

        def ln(v):
            return (v - v.mean()) / torch.sqrt(v.var(unbiased=False) + 1e-5)

        expected = (ln(s) - ln(t)).pow(2).mean()
    torch.testing.assert_close(value, expected)
    value.backward()
    grad = ctx.features.grad
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert grad[0, :, 0, 7].abs().sum() == 0  # a cell far outside the box


def test_roi_feature_trains_student_and_adapter():
    torch.manual_seed(0)
    student = timm_backbone("resnet18", 3, 1)
    teacher = timm_backbone("resnet18", 3, 1).eval()
    term = RoiFeatureLoss()
    assert term.needs_teacher
    term.setup(student.num_features, teacher.num_features)
    assert isinstance(term.adapter, nn.Linear) and term.adapter.weight.shape == (512, 512)
    x = torch.randn(2, 1, 64, 64)
    crops = torch.randn(2, 1, 32, 64)
    with torch.no_grad():
        teacher_features = teacher.forward_features(crops)
    features = student.forward_features(x)
    ctx = _ctx(
        student=student,
        images=x,
        features=features,
        logits=student.forward_head(features),
        boxes=torch.tensor([[0.0, 0.0, 40.0, 32.0], [10.0, 20.0, 60.0, 50.0]]),
        teacher_features=teacher_features,
    )
    optimizer = torch.optim.SGD([*student.parameters(), *term.parameters()], lr=0.1)
    before = term.adapter.weight.detach().clone()
    value = term(ctx)
    assert value.shape == () and 0 < value.item() < 2
    value.backward()
    conv1 = student.model.conv1.weight.grad
    assert torch.isfinite(conv1).all() and conv1.abs().sum() > 0
    optimizer.step()
    assert not torch.equal(term.adapter.weight, before)


def test_roi_feature_needs_a_teacher():
    with pytest.raises(KdError, match="teacher"):
        RoiFeatureLoss().setup(8, None)
    with pytest.raises(KdError, match="not set up"):
        RoiFeatureLoss()(_ctx())


# --------------------------------------------------------------------------- together


def test_paper_loss_on_convnext_attn_student():
    """L = 0.01·attention_mse + 0.8·kl + 0.2·ce on a convnext_attn student, each term against
    its formula computed here: CE from log-softmax, T²·KL from the two softmaxes, and the
    attention term from a Grad-CAM taken by hand through the attention head (weights the mean
    of ∂s_y/∂A, no ReLU, divided by the largest absolute value) against the mask averaged over
    each cell and divided by its maximum (the term's defaults)."""
    torch.manual_seed(0)
    student = convnext_attn(3, 1, variant="convnext_atto")
    loss = CompositeLoss(
        [("attention_mse", 0.01, AttentionMSELoss()), ("kl", 0.8, KLLoss()), ("ce", 0.2, CELoss())]
    )
    assert loss.needs_teacher
    x = torch.randn(2, 1, 64, 64)
    masks = torch.zeros(2, 1, 64, 64)
    masks[:, :, 20:40, 10:50] = 1
    features = student.forward_features(x)
    logits = student.forward_head(features)
    labels, teacher = torch.tensor([0, 2]), torch.randn(2, 3)
    ctx = _ctx(
        student=student,
        images=x,
        features=features,
        logits=logits,
        labels=labels,
        masks=masks,
        teacher_logits=teacher,
    )
    total, parts = loss(ctx)

    z = logits.detach().double()
    ce = -(z.log_softmax(1)[[0, 1], labels]).mean()
    log_p, log_q = (teacher.double() / 3).log_softmax(1), (z / 3).log_softmax(1)
    kl = 9 * (log_p.exp() * (log_p - log_q)).sum(1).mean()
    a = features.detach().requires_grad_(True)
    score = student.forward_head(a).gather(1, labels[:, None]).sum()
    (grad,) = torch.autograd.grad(score, a)
    cam = (grad.mean(dim=(2, 3), keepdim=True) * a).sum(1).detach()
    cam = cam / cam.abs().amax(dim=(1, 2), keepdim=True)
    h, w = cam.shape[-2:]
    cells = masks[:, 0].reshape(2, h, 64 // h, w, 64 // w).mean(dim=(2, 4))
    cells = cells / cells.amax(dim=(1, 2), keepdim=True)
    attention = (cam - cells).pow(2).mean()
    assert parts["ce"] == pytest.approx(float(ce), rel=1e-5)
    assert parts["kl"] == pytest.approx(float(kl), rel=1e-5)
    assert parts["attention_mse"] == pytest.approx(float(attention), rel=1e-4)
    expected = 0.01 * float(attention) + 0.8 * float(kl) + 0.2 * float(ce)
    assert total.item() == pytest.approx(expected, rel=1e-5)
    total.backward()
    grads = [p.grad for p in student.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_roi_ce_classifies_the_roi_with_the_plain_head():
    """Constant features c inside the box: z_roi is the head applied to c (for convnext_attn
    the head without its attention), and CE(y, z_roi) matches F.cross_entropy by hand."""
    torch.manual_seed(0)
    for attention in ("spatial", "pool"):
        student = convnext_attn(3, 1, variant="convnext_atto", attention=attention)
        term, ctx, c, _ = _roi_case("cosine", margin=1)
        features = torch.randn(1, 320, 8, 8)
        features[0, :, 1:7, 0:6] = 0.5
        features.requires_grad_(True)
        ctx = _ctx(
            **{
                **ctx.__dict__,
                "student": student,
                "features": features,
                "labels": torch.tensor([2]),
                "teacher_features": None,
            }
        )
        value = RoiCELoss(output_size=2)(ctx)
        head = student.model.head
        pooled = head.norm(torch.full((1, 320, 1, 1), 0.5))
        expected_logits = head.fc(pooled.flatten(1))
        torch.testing.assert_close(value, F.cross_entropy(expected_logits, torch.tensor([2])))
        value.backward()
        grad = features.grad
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0
        assert grad[0, :, 0, 7].abs().sum() == 0  # outside the box: no gradient


# --------------------------------------------------------------------------- edge cases


def _exactly(message):
    """pytest.raises for a KdError whose whole message is ``message``."""
    return pytest.raises(KdError, match="^" + re.escape(message) + "$")


def test_error_messages_in_full():
    with _exactly("loss 'kl' needs teacher logits, but the batch has none"):
        KLLoss()(_ctx())
    with _exactly("loss 'roi_feature' needs a teacher (its feature width is unknown)"):
        RoiFeatureLoss().setup(8, None)
    with _exactly("loss 'roi_feature' was not set up (call setup(student, teacher))"):
        RoiFeatureLoss()(_ctx())
    term = RoiFeatureLoss()
    term.setup(1, 1)
    with _exactly("loss 'roi_feature' needs teacher features, but the batch has none"):
        term(_ctx())
    with _exactly("loss 'roi_feature': metric must be 'cosine' or 'mse', not 'l1'"):
        RoiFeatureLoss(metric="l1")
    with _exactly("loss 'attention_kl': mode must be 'kl' or 'bce', not 'l2'"):
        AttentionKLLoss(mode="l2")
    with _exactly(
        "loss 'attention_pool' needs a student with an attention map (backbone "
        "'convnext_attn'); this student has none"
    ):
        AttentionPoolLoss()(_ctx(student=nn.Module()))
    student = nn.Module()
    student.last_attention = torch.ones(3, 1, 2, 2)  # a batch of 3, labels of 2
    with _exactly("loss 'attention_pool': the attention map is not of this batch"):
        AttentionPoolLoss()(_ctx(student=student))


def test_masks_without_a_channel_axis_and_max_norm_per_sample():
    """Zero features give an all-zero CAM, so attention_mse is mean(M²) of the pooled mask.
    B×H×W masks pool like B×1×H×W; ``max`` divides each sample by its own maximum (block means
    0.5 and 0.25 here, both become 1), and an empty mask stays 0."""
    masks = torch.zeros(3, 1, 4, 4)
    masks[0, 0, 0, :] = 1  # half of cell (0, 0) and of cell (0, 1)
    masks[1, 0, 0, 0] = 1  # a quarter of cell (0, 0)
    area = _block_mean(masks, 2, 2)
    assert area.amax(dim=(1, 2)).tolist() == [0.5, 0.25, 0.0]
    peak = torch.zeros(3, 2, 2)
    peak[0, 0, :] = 1
    peak[1, 0, 0] = 1

    def loss(m, norm):
        features = torch.zeros(3, 1, 2, 2, requires_grad=True)
        ctx = _ctx(
            student=_LinearHead(torch.ones(2, 1)),
            features=features,
            masks=m,
            labels=torch.zeros(3, dtype=torch.long),
            images=torch.zeros(3, 1, 4, 4),
        )
        return AttentionMSELoss(mask_norm=norm)(ctx)

    for m in (masks, masks[:, 0]):
        torch.testing.assert_close(loss(m, "area"), area.pow(2).mean())
        torch.testing.assert_close(loss(m, "max"), peak.pow(2).mean())
    wide = torch.ones(2, 1, 4, 6)  # a 2×3 grid for a batch of 2
    features = torch.zeros(2, 1, 2, 3, requires_grad=True)
    ctx = _ctx(
        student=_LinearHead(torch.ones(2, 1)),
        features=features,
        masks=wide,
        images=torch.zeros(2, 1, 4, 6),
    )
    assert AttentionMSELoss(mask_norm="max")(ctx).item() == 1


def test_cam_terms_differentiate_the_weights_by_default():
    """Default ``create_graph=True``: the Grad-CAM weights W_y/(hw) stay in the graph, so the
    loss reaches the head's weight; with False it does not."""
    for make in (AttentionMSELoss, AttentionKLLoss):
        for kwargs, reaches_head in (({}, True), ({"create_graph": False}, False)):
            ctx, _, _ = _grad_cam_case()
            make(**kwargs)(ctx).backward()
            grad = ctx.student.fc.weight.grad
            assert (grad is not None and grad.abs().sum() > 0) == reaches_head, (make, kwargs)


def test_attention_pool_takes_maps_without_a_channel_axis():
    student = nn.Module()
    student.last_attention = torch.tensor([[[0.1, 0.2], [0.3, 0.4]]])  # 1×2×2
    masks = torch.zeros(1, 1, 4, 4)
    masks[..., :2, :] = 1
    ctx = _ctx(student=student, masks=masks, labels=torch.zeros(1, dtype=torch.long))
    by_hand = 0.5 * math.log(0.5 / 0.1) + 0.5 * math.log(0.5 / 0.2)
    assert AttentionPoolLoss()(ctx).item() == pytest.approx(by_hand, rel=1e-5)


def test_ce_takes_double_class_weights():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]])
    labels = torch.tensor([0, 1])
    nll = -logits.log_softmax(1)[torch.arange(2), labels]
    by_hand = (nll[0] + 3 * nll[1]) / 4
    weights = torch.tensor([1.0, 3.0, 1.0], dtype=torch.float64)
    value = CELoss()(_ctx(logits=logits, labels=labels, class_weights=weights))
    assert value.dtype == torch.float32
    torch.testing.assert_close(value, by_hand)


def test_roi_pool_default_is_the_box_mean_and_takes_double_boxes():
    """``output_size = 1`` (roi_feature's default): roi_align samples every cell centre of a box
    on cell edges, so the pooled vector is the mean of the box's cells (3×3 here)."""
    torch.manual_seed(0)
    features = torch.randn(1, 3, 8, 8)
    ctx = _ctx(
        images=torch.zeros(1, 1, 32, 64),
        features=features,
        boxes=torch.tensor([[8.0, 8.0, 32.0, 20.0]], dtype=torch.float64),  # cells x 1–4, y 2–5
    )
    term = RoiFeatureLoss()
    term.setup(3, 3)
    torch.testing.assert_close(term.pooled_student(ctx), features[:, :, 2:5, 1:4].mean(dim=(2, 3)))


def test_roi_feature_mse_normalises_each_sample():
    """``metric = "mse"`` with a batch of 2: the layer norm is over each sample's channels,
    for the student's and the teacher's vectors alike."""
    term, ctx, s, t = _roi_case("mse")
    t2 = torch.tensor([3.0, -1.0, 0.5])
    two = _ctx(
        **{
            **ctx.__dict__,
            "features": torch.cat([ctx.features, 3 * ctx.features.detach()]),
            "images": torch.zeros(2, 1, 32, 64),
            "boxes": ctx.boxes.repeat(2, 1),
            "teacher_features": torch.cat(
                [ctx.teacher_features, t2.expand(1, 5, 5, 3).permute(0, 3, 1, 2)]
            ),
        }
    )

    def ln(v):
        return (v - v.mean()) / torch.sqrt(v.var(unbiased=False) + 1e-5)

    expected = ((ln(s) - ln(t)).pow(2).mean() + (ln(3 * s) - ln(t2)).pow(2).mean()) / 2
    torch.testing.assert_close(term(two), expected)


def test_roi_ce_on_a_plain_head_with_class_weights():
    """A student that is no timm backbone: its own ``forward_head`` on the pooled box (float64
    here, the features' dtype), weighted CE. Constant features c per sample in the box, so the
    2×2 pooled map is c and GAP → linear gives logits W c."""
    weight = torch.tensor([[1.0, -1.0], [0.5, 2.0], [-1.0, 0.0]], dtype=torch.float64)
    features = torch.zeros(2, 2, 8, 8, dtype=torch.float64)
    c = torch.tensor([[1.0, 2.0], [-1.0, 0.5]], dtype=torch.float64)
    features[:, :, 1:7, 0:6] = c[:, :, None, None]
    student = _LinearHead(weight).double()
    labels, weights = torch.tensor([0, 2]), torch.tensor([1.0, 1.0, 4.0])
    ctx = _ctx(
        student=student,
        images=torch.zeros(2, 1, 32, 64),
        features=features.requires_grad_(True),
        boxes=torch.tensor([[8.0, 8.0, 40.0, 24.0]]).repeat(2, 1),
        labels=labels,
        class_weights=weights,
    )
    value = RoiCELoss()(ctx)
    nll = -(c @ weight.T).log_softmax(1)[[0, 1], labels]
    by_hand = (nll[0] + 4 * nll[1]) / 5
    torch.testing.assert_close(value, by_hand.float())
    # the default output_size is 2: the same as asking for it, not as 3 on a varying map
    torch.manual_seed(0)
    ctx.features = torch.randn(2, 2, 8, 8, dtype=torch.float64)
    assert torch.equal(RoiCELoss()(ctx), RoiCELoss(output_size=2)(ctx))
    assert not torch.equal(RoiCELoss()(ctx), RoiCELoss(output_size=3)(ctx))


# The engine's own cross-entropy (kdtoolkit/engine/loss.py), against a hand computation.


def _hand_ce(logits, labels, weight=None):
    """Σ w_y·(−log softmax(z)_y) / Σ w_y, written out with math.exp."""
    num = den = 0.0
    for row, y in zip(logits, labels, strict=True):
        logp = row[y] - math.log(sum(math.exp(v) for v in row))
        w = 1.0 if weight is None else weight[y]
        num += -w * logp
        den += w
    return num / den


def test_engine_cross_entropy_matches_hand_computation_with_and_without_class_weights():
    from kdtoolkit.engine.loss import CE, build_loss, cross_entropy

    rows, labels, weight = [[2.0, 0.0, -1.0], [0.5, 1.5, 0.0]], [0, 2], [1.0, 2.0, 3.0]
    logits = torch.tensor(rows, dtype=torch.float16)  # under autocast; cast to float32
    plain = _ctx(logits=logits, labels=torch.tensor(labels))
    weighted = _ctx(
        logits=logits,
        labels=torch.tensor(labels),
        class_weights=torch.tensor(weight, dtype=torch.float64),  # cast to float32 too
    )
    rows16 = logits.float().tolist()
    assert cross_entropy().where == ""  # no place given: errors name none
    for loss in (cross_entropy("fold 0 teacher"), build_loss([], "fold 0 teacher")):
        assert CE == "ce" and loss.names == ["ce"] and loss.weights == [1.0]
        assert loss.plugins == ["kdtoolkit"] and loss.where == "fold 0 teacher"
        total, parts = loss(plain)
        assert total.dtype == torch.float32 and set(parts) == {"ce"}
        assert total.item() == pytest.approx(_hand_ce(rows16, labels), rel=1e-6)
        total, parts = loss(weighted)
        assert total.dtype == torch.float32
        assert parts["ce"] == pytest.approx(_hand_ce(rows16, labels, weight), rel=1e-6)


def test_engine_build_loss_builds_the_recipe_terms_from_the_registry():
    from kdtoolkit.config.recipe import LossConfig
    from kdtoolkit.engine.loss import build_loss

    terms = [LossConfig(name="ce", weight=0.5), LossConfig(name="kl", weight=2.0)]
    loss = build_loss(terms, "fold 1 student")
    assert loss.names == ["ce", "kl"] and loss.weights == [0.5, 2.0]
    assert loss.where == "fold 1 student" and all(loss.plugins)
    from kdtoolkit.engine.loss import cross_entropy

    # without a place, errors name none: every default ``where`` is empty
    assert build_loss(terms).where == build_loss([]).where == cross_entropy().where == ""
