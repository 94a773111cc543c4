"""Grad-CAM through the head, checked against the pytorch_grad_cam package."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.image import scale_cam_image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from kdtoolkit.builtin.timm import timm_backbone
from kdtoolkit.models.gradcam import cam_for_images, cam_of, gradcam, minmax, paper_cam, unwrap


def _model(name, in_chans):
    torch.manual_seed(0)
    return timm_backbone(name, 4, in_chans).eval()


def _last_stage(model):
    timm_model = model.model
    return timm_model.layer4 if hasattr(timm_model, "layer4") else timm_model.stages[-1]


def _reference_raw_cam(model, x, target):
    """pytorch_grad_cam's GradCAM on the plain timm model (full backward through the
    whole network, hooks on the last stage): ReLU(Σ_c mean(∂s/∂A^c) A^c) before its scaling and
    resize, and its final output (scaled, resized with OpenCV, scaled again)."""
    layer = _last_stage(model)
    cam = GradCAM(model=model.model, target_layers=[layer])
    targets = [ClassifierOutputTarget(int(t)) for t in target]
    full = cam(input_tensor=x, targets=targets)
    acts = cam.activations_and_grads.activations[0].numpy()
    grads = cam.activations_and_grads.gradients[0].numpy()
    raw = np.maximum(cam.get_cam_image(x, layer, targets, acts, grads), 0)
    cam.activations_and_grads.release()
    return torch.from_numpy(raw), torch.from_numpy(full)


@pytest.mark.parametrize(
    ("name", "in_chans"), [("resnet18", 1), ("resnet18", 3), ("convnext_atto", 1)]
)
def test_matches_pytorch_grad_cam(name, in_chans):
    model = _model(name, in_chans)
    x = torch.randn(3, in_chans, 128, 96)
    target = torch.tensor([0, 2, 3])
    reference, full = _reference_raw_cam(model, x, target)

    features = model.forward_features(x)
    raw = gradcam(model.forward_head, features, target, create_graph=False, normalize=False)
    assert raw.shape == reference.shape == (3, 4, 3)
    assert reference.amax() > 0
    torch.testing.assert_close(raw, reference, rtol=1e-4, atol=1e-6)

    cam = gradcam(model.forward_head, features, target)
    peak = reference.amax(dim=(1, 2), keepdim=True)
    torch.testing.assert_close(cam, reference / peak.clamp_min(1e-12), rtol=1e-4, atol=1e-5)
    assert torch.equal(cam.amax(dim=(1, 2)) == 1, peak.flatten() > 0)

    # cam_for_images itself, no scaling here. Both sides are float32 and resize with the same
    # half-pixel bilinear rule (torch align_corners=False, OpenCV INTER_LINEAR); what differs
    # is float rounding of the gradients (full backward vs head only) and of the two
    # interpolation codes, ~1e-6 of the map's range, amplified ≤ 1/(max − min) by the second
    # min–max: 1e-4 absolute on maps in [0, 1] leaves a wide margin and catches any change of
    # normalisation (max-only vs min–max differs by the map's minimum, ≫ 1e-4).
    maps = cam_for_images(model, x, target)
    assert maps.shape == full.shape == (3, 128, 96)
    torch.testing.assert_close(maps, full, rtol=0, atol=1e-4)


def test_no_grad_features_give_the_same_inference_cam():
    model = _model("convnext_atto", 3)
    x = torch.randn(2, 3, 96, 96)
    target = torch.tensor([1, 3])
    with_graph = gradcam(model.forward_head, model.forward_features(x), target)
    with torch.no_grad():
        features = model.forward_features(x)
        cam = gradcam(model.forward_head, features, target)
    assert not cam.requires_grad and not features.requires_grad
    torch.testing.assert_close(cam, with_graph.detach())


class _CountingIdentity(torch.autograd.Function):
    """Identity whose backward counts calls and refuses to be differentiated again."""

    calls = 0

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        _CountingIdentity.calls += 1
        return grad


def test_gradient_goes_through_the_head_only():
    """No backward through the backbone while computing the CAM, and never a double one: the
    loss's own backward passes the backbone exactly once."""
    model = _model("resnet18", 1).train()
    x = torch.randn(2, 1, 64, 64)
    _CountingIdentity.calls = 0
    features = _CountingIdentity.apply(model.forward_features(x))
    cam = gradcam(model.forward_head, features, torch.tensor([0, 1]), create_graph=True)
    assert _CountingIdentity.calls == 0
    cam.pow(2).mean().backward()
    assert _CountingIdentity.calls == 1
    assert model.model.conv1.weight.grad.abs().sum() > 0


def test_create_graph_keeps_weights_differentiable():
    """For a GAP → linear head the weights are W_y / (hw): with create_graph the CAM depends
    on the classifier, without it the classifier gets no gradient."""
    model = _model("resnet18", 1)
    x = torch.randn(2, 1, 64, 64)
    target = torch.tensor([0, 1])
    fc = model.model.fc.weight
    cam = gradcam(model.forward_head, model.forward_features(x), target, create_graph=True)
    (g,) = torch.autograd.grad(cam.sum(), fc, allow_unused=True)
    assert g is not None and g.abs().sum() > 0
    cam = gradcam(model.forward_head, model.forward_features(x), target, create_graph=False)
    (g,) = torch.autograd.grad(cam.sum(), fc, allow_unused=True)
    assert g is None


def test_normalisation_is_eps_safe():
    head = torch.nn.Sequential(
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 2)
    )
    features = torch.zeros(2, 4, 3, 3, requires_grad=True)
    cam = gradcam(head, features, torch.tensor([0, 1]))
    assert torch.equal(cam, torch.zeros(2, 3, 3))
    cam.sum().backward()
    assert torch.isfinite(features.grad).all()


def test_cam_for_images():
    model = _model("convnext_atto", 1)
    x = torch.randn(2, 1, 96, 64)
    maps = cam_for_images(model, x)
    assert maps.shape == (2, 96, 64) and not maps.requires_grad
    assert maps.min() >= 0 and maps.max() <= 1 and maps.amax(dim=(1, 2)).min() > 0.9
    with torch.no_grad():
        predicted = model(x).argmax(1)
    torch.testing.assert_close(maps, cam_for_images(model, x, predicted))
    other = (predicted + 1) % 4
    assert not torch.allclose(maps, cam_for_images(model, x, other))
    # minmax(resize(minmax(ReLU map))), by hand
    small = gradcam(model.forward_head, model.forward_features(x), predicted, normalize=False)
    small = small.detach()
    low = small.amin(dim=(1, 2), keepdim=True)
    small = (small - low) / (1e-7 + (small - low).amax(dim=(1, 2), keepdim=True))
    big = F.interpolate(small[:, None], size=(96, 64), mode="bilinear")[:, 0]
    low = big.amin(dim=(1, 2), keepdim=True)
    expected = (big - low) / (1e-7 + (big - low).amax(dim=(1, 2), keepdim=True))
    torch.testing.assert_close(maps, expected)
    assert maps.amin(dim=(1, 2)).max() == 0  # min–max: every map reaches 0


def test_unwrap_compiled_and_parallel():
    model = _model("resnet18", 1)
    compiled = torch.compile(model)  # compiles lazily, on its first call: nothing runs here
    assert compiled is not model and compiled._orig_mod is model
    assert unwrap(compiled) is model
    assert unwrap(torch.nn.DataParallel(compiled)) is model
    assert unwrap(torch.nn.DataParallel(model)) is model
    assert unwrap(model) is model


def _gap_identity_head():
    """GAP → linear with the identity weight (2 classes, 2 channels): s = mean_ij A."""
    head = torch.nn.Linear(2, 2, bias=False)
    head.weight.data.copy_(torch.eye(2))
    return lambda a: head(a.mean(dim=(2, 3)))


def _hand_features():
    # sample 0: A^0 = [2, 0], A^1 = [0, 2] (h=1, w=2); sample 1: A^0 = [4, 0], A^1 = [0, 0]
    return torch.tensor([[[[2.0, 0.0]], [[0.0, 2.0]]], [[[4.0, 0.0]], [[0.0, 0.0]]]])


def test_standard_gradcam_by_hand():
    """∂s_y/∂A^c_ij = W_yc / (hw): weights (0.5, 0) for y=0 and (0, 0.5) for y=1."""
    features = _hand_features().requires_grad_(True)
    raw = gradcam(_gap_identity_head(), features, torch.tensor([0, 1]), normalize=False)
    # sample 0: 0.5·A^0 = [1, 0]; sample 1: 0.5·A^1 = [0, 0]
    torch.testing.assert_close(raw, torch.tensor([[[1.0, 0.0]], [[0.0, 0.0]]]))
    cam = gradcam(_gap_identity_head(), features, torch.tensor([0, 1]))
    torch.testing.assert_close(cam, torch.tensor([[[1.0, 0.0]], [[0.0, 0.0]]]))


def test_paper_cam_by_hand():
    """Eqs. 7–8 in the descent direction: w_c = −mean_ij ∂CE/∂A^c_ij = Σ_k (δ_ky − p_k) W_kc / hw
    (∂CE/∂s = softmax(s) − onehot(y)), no ReLU, min–max.

    Sample 0 (y=0): s = (1, 1), p = (½, ½), ∂CE/∂s = (−½, ½), w = (¼, −¼),
    map = ¼·[2, 0] − ¼·[0, 2] = [½, −½] → [1, 0]: the class-0 evidence (A^0) at pixel 0.
    Sample 1 (y=1): s = (2, 0), p = (σ(2), 1 − σ(2)), ∂CE/∂s = (σ(2), −σ(2)),
    w = (−σ(2)/2, σ(2)/2), map = [−2σ(2), 0] → [0, 1]: pixel 0 holds evidence against y."""
    features = _hand_features().requires_grad_(True)
    target = torch.tensor([0, 1])
    cam = paper_cam(_gap_identity_head(), features, target)
    torch.testing.assert_close(cam, torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]]))
    # the raw weights, from the softmax formula, through a 3-pixel sample
    three = torch.tensor([[[[1.0, 2.0, 3.0]], [[0.0, 0.0, 0.0]]]], requires_grad=True)
    sigma = 1 / (1 + math.exp(-(2.0 - 0.0)))  # s = (2, 0), p_0 = σ(2)
    w0 = -(sigma - 1) / 3  # y = 0: ∂CE/∂s_0 = p_0 − 1, descent direction −(p_0 − 1) > 0
    expected = torch.tensor([[[w0 * 1, w0 * 2, w0 * 3]]])
    expected = (expected - expected.min()) / (expected.max() - expected.min())
    torch.testing.assert_close(paper_cam(_gap_identity_head(), three, torch.tensor([0])), expected)
    assert torch.allclose(expected, torch.tensor([[[0.0, 0.5, 1.0]]]))
    # the same ordering as standard Grad-CAM, which is ReLU(w0·A^0) / max
    standard = gradcam(_gap_identity_head(), three, torch.tensor([0]))
    assert torch.equal(standard.argmax(), expected.argmax())


def test_paper_cam_no_relu_keeps_negative_evidence():
    """Two channels of opposite classes: the paper map keeps the evidence against y as its
    low values (no ReLU), where standard Grad-CAM clips it to 0."""
    features = torch.tensor([[[[3.0, 0.0, 0.0]], [[0.0, 0.0, 3.0]]]], requires_grad=True)
    paper = paper_cam(_gap_identity_head(), features, torch.tensor([0]))
    torch.testing.assert_close(paper, torch.tensor([[[1.0, 0.5, 0.0]]]))
    standard = gradcam(_gap_identity_head(), features, torch.tensor([0]))
    torch.testing.assert_close(standard, torch.tensor([[[1.0, 0.0, 0.0]]]))


class _TinyNet(torch.nn.Module):
    """conv → ReLU → conv → ReLU → 2×2 average pool (A: 8 channels, 8×8) → GAP → linear."""

    def __init__(self):
        super().__init__()
        self.trunk = torch.nn.Sequential(
            torch.nn.Conv2d(1, 8, 3, padding=1),
            torch.nn.ReLU(),
            torch.nn.Conv2d(8, 8, 3, padding=1),
            torch.nn.ReLU(),
            torch.nn.AvgPool2d(2),
        )
        self.fc = torch.nn.Linear(8, 3)

    def forward_features(self, x):
        return self.trunk(x)

    def forward_head(self, a):
        return self.fc(a.mean(dim=(2, 3)))


def _evidence_batch(generator, n=64):
    """16×16 noise images with one 2×2 patch, at a random 2×2-aligned cell: class 0 bright,
    class 1 dark, class 2 a bright/dark checker; returns images, labels, patch cell (row, col)."""
    labels = torch.randint(0, 3, (n,), generator=generator)
    cells = torch.randint(0, 8, (n, 2), generator=generator)
    x = 0.1 * torch.randn(n, 1, 16, 16, generator=generator)
    patterns = torch.tensor([[[1.0, 1.0], [1.0, 1.0]], [[-1.0, -1.0], [-1.0, -1.0]]])
    patterns = torch.cat([patterns, torch.tensor([[[1.0, -1.0], [-1.0, 1.0]]])])
    for i in range(n):
        r, c = 2 * cells[i]
        x[i, 0, r : r + 2, c : c + 2] += 2 * patterns[labels[i]]
    return x, labels, cells


def test_paper_cam_on_a_trained_model_agrees_with_gradcam():
    """After training a tiny CNN on a task whose class evidence sits at a known cell, the
    paper map (descent direction) and standard Grad-CAM rank the cells alike (mean Spearman
    correlation > 0) and both peak on the evidence."""
    from scipy.stats import spearmanr

    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    net = _TinyNet()
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(100):
        x, y, _ = _evidence_batch(generator)
        loss = F.cross_entropy(net.forward_head(net.forward_features(x)), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    x, y, cells = _evidence_batch(generator, 256)
    with torch.no_grad():
        features = net.forward_features(x)
        accuracy = (net.forward_head(features).argmax(1) == y).float().mean()
    assert accuracy > 0.9
    paper = paper_cam(net.forward_head, features, y)
    standard = gradcam(net.forward_head, features, y)
    rho = [spearmanr(p.flatten(), s.flatten())[0] for p, s in zip(paper, standard, strict=True)]
    assert np.nanmean(rho) > 0.3
    for cam in (paper, standard):
        peaks = cam.flatten(1).argmax(1)
        at = torch.stack([peaks // 8, peaks % 8], dim=1)
        near = (at - cells).abs().amax(dim=1) <= 1  # on the patch's cell or a neighbour
        assert near.float().mean() > 0.9
    # taken literally (the gradient of the loss, not its descent), the map points away
    literal = 1 - paper  # minmax(−m) = 1 − minmax(m)
    rho = [spearmanr(p.flatten(), s.flatten())[0] for p, s in zip(literal, standard, strict=True)]
    assert np.nanmean(rho) < 0


def test_paper_cam_constant_map_is_zero_and_inference_has_no_graph():
    features = torch.ones(1, 2, 2, 2)
    cam = paper_cam(_gap_identity_head(), features, torch.tensor([0]))
    assert torch.equal(cam, torch.zeros(1, 2, 2)) and not cam.requires_grad
    features = _hand_features().requires_grad_(True)
    cam = paper_cam(_gap_identity_head(), features, torch.tensor([0, 1]), create_graph=True)
    cam[:, 0, 0].sum().backward()
    assert torch.isfinite(features.grad).all()


# --------------------------------------------------------------------------- edge cases


def _gap_linear_case():
    """GAP → linear (no bias) on a 2×3 grid: the class-score weights are W_y / (hw), so the
    Grad-CAM is ReLU(Σ_c W_yc A^c) / max by hand."""
    torch.manual_seed(0)
    fc = torch.nn.Linear(4, 3, bias=False)
    features = torch.randn(2, 4, 2, 3, requires_grad=True)
    labels = torch.tensor([1, 2])
    cam = F.relu(torch.einsum("bc,bchw->bhw", fc.weight.detach()[labels], features.detach()))
    return fc, features, labels, cam / cam.amax(dim=(1, 2), keepdim=True)


def _head(fc):
    return lambda a: fc(a.mean(dim=(2, 3)))


def test_cam_of_by_hand_and_the_graph_it_keeps():
    """By default (create_graph) the CAM's weights reach the classifier; with
    ``create_graph=False`` they do not, and the logits' graph is kept for the loss's own
    backward: the classifier's gradient is then that of Σ logits alone, Σ_b mean_ij A_b."""
    fc, features, labels, by_hand = _gap_linear_case()
    cam = cam_of(_head(fc)(features), features, labels)
    torch.testing.assert_close(cam, by_hand)
    (g,) = torch.autograd.grad(cam.sum(), fc.weight, allow_unused=True)
    assert g is not None and g.abs().sum() > 0
    logits = _head(fc)(features)
    cam = cam_of(logits, features, labels, create_graph=False)
    torch.testing.assert_close(cam, by_hand)
    (cam.sum() + logits.sum()).backward()
    expected = features.detach().mean(dim=(2, 3)).sum(0).expand(3, 4)
    torch.testing.assert_close(fc.weight.grad, expected)


def test_gradcam_and_paper_cam_keep_the_weights_differentiable_by_default():
    fc, features, labels, by_hand = _gap_linear_case()
    standard = gradcam(_head(fc), features, labels)
    torch.testing.assert_close(standard, by_hand)
    for cam in (standard, paper_cam(_head(fc), features, labels)):
        (g,) = torch.autograd.grad(cam.sum(), fc.weight, allow_unused=True)
        assert g is not None and g.abs().sum() > 0


def test_int32_and_uint8_targets_give_the_same_maps():
    fc, features, labels, by_hand = _gap_linear_case()
    for dtype in (torch.int32, torch.uint8):
        target = labels.to(dtype)
        torch.testing.assert_close(gradcam(_head(fc), features, target), by_hand)
        torch.testing.assert_close(
            paper_cam(_head(fc), features, target), paper_cam(_head(fc), features, labels)
        )
        torch.testing.assert_close(cam_of(_head(fc)(features), features, target), by_hand)
        paper = cam_of(_head(fc)(features), features, target, cam="paper")
        torch.testing.assert_close(paper, paper_cam(_head(fc), features, labels))


def test_shape_errors_name_the_function():
    fc, features, labels, _ = _gap_linear_case()
    flat = torch.zeros(2, 4, 3, requires_grad=True)
    with pytest.raises(
        ValueError, match=r"^gradcam needs B×C×h×w features, got shape \(2, 4, 3\)$"
    ):
        gradcam(_head(fc), flat, labels)
    with pytest.raises(
        ValueError, match=r"^paper_cam needs B×C×h×w features, got shape \(2, 4, 3\)$"
    ):
        paper_cam(_head(fc), flat, labels)
    message = r"^cam_of needs B×C×h×w features in the graph, got \({}\)$"
    with pytest.raises(ValueError, match=message.format("2, 4, 3")):
        cam_of(flat.sum(dim=(1, 2))[:, None].expand(2, 3), flat, labels)
    outside = features.detach()  # 4-D but not in the graph
    with pytest.raises(ValueError, match=message.format("2, 4, 2, 3")):
        cam_of(_head(fc)(features), outside, labels)


def test_minmax_matches_pytorch_grad_cam_scaling():
    """Per map over the last two axes, as pytorch_grad_cam's ``scale_cam_image`` (maps with
    different, negative minima)."""
    torch.manual_seed(0)
    maps = torch.randn(3, 4, 5) * torch.tensor([1.0, 2.0, 0.5])[:, None, None]
    maps = maps + torch.tensor([-3.0, 1.0, 5.0])[:, None, None]
    torch.testing.assert_close(minmax(maps), torch.from_numpy(scale_cam_image(maps.numpy())))
