"""roi_zoom: mask moments, the resampling geometry against the teacher's crop, training."""

from __future__ import annotations

import math

import numpy as np
import torch

from kdtoolkit.builtin.roi_zoom import RoiBoxLoss, mask_moments, roi_grid
from kdtoolkit.data.geometry import roi_corners
from kdtoolkit.data.mask import roi_mask
from kdtoolkit.data.view import crop_roi
from kdtoolkit.models.backbone import build_backbone
from kdtoolkit.plugins.loss import LossContext

H = W = 96
BOX, ANGLE = (30.0, 40.0, 70.0, 60.0), 35.0  # 40×20 px, rotated 35° counter-clockwise


def _mask() -> torch.Tensor:
    return torch.from_numpy(roi_mask(roi_corners(BOX, ANGLE), (H, W), "box"))[None, None]


def test_mask_moments_of_a_rotated_rectangle_by_hand():
    cx, cy, hl, hs, c2, s2 = mask_moments(_mask())[0].tolist()
    # isotropic units: (pixel − W/2) / (W/2)
    assert math.isclose(cx, (50 - 48) / 48, abs_tol=0.02)
    assert math.isclose(cy, (50 - 48) / 48, abs_tol=0.02)
    assert math.isclose(hl, 20 / 48, rel_tol=0.05)  # half of the 40 px side
    assert math.isclose(hs, 10 / 48, rel_tol=0.08)
    # counter-clockwise on screen (y down): the long axis points up-right, angle −35°
    angle = math.degrees(0.5 * math.atan2(s2, c2))
    assert math.isclose(angle, -ANGLE, abs_tol=1.0)


def test_roi_grid_samples_the_teachers_crop():
    rng = np.random.default_rng(0)
    image = rng.random((H, W, 1)).astype(np.float32)
    teacher = crop_roi(image, BOX, ANGLE, (20, 40))[..., 0]
    grid = roi_grid(mask_moments(_mask()), (20, 40))
    x = torch.from_numpy(image[..., 0])[None, None]
    zoom = torch.nn.functional.grid_sample(x, grid, align_corners=False)[0, 0].numpy()
    assert np.corrcoef(teacher.ravel(), zoom.ravel())[0, 1] > 0.8
    shifted = crop_roi(image, (34.0, 40.0, 74.0, 60.0), ANGLE, (20, 40))[..., 0]
    assert np.corrcoef(shifted.ravel(), zoom.ravel())[0, 1] < 0.5


def test_roi_zoom_trains_its_locator_with_roi_box():
    torch.manual_seed(0)
    model = build_backbone(
        "roi_zoom", 3, 1, {"locator": "resnet10t", "classifier": "resnet10t", "crop_size": [16, 32]}
    )
    x = torch.randn(2, 1, H, W)
    features = model.forward_features(x)
    assert model.last_crop.shape == (2, 1, 16, 32)
    logits = model.forward_head(features)
    assert logits.shape == (2, 3)
    masks = _mask().repeat(2, 1, 1, 1)
    ctx = LossContext(
        student=model,
        images=x,
        features=features,
        logits=logits,
        labels=torch.tensor([0, 2]),
        boxes=None,
        masks=masks,
    )
    loss = RoiBoxLoss()(ctx)
    assert torch.isfinite(loss) and loss > 0
    before = model.shape_head.weight.detach().clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    (loss + torch.nn.functional.cross_entropy(logits, ctx.labels)).backward()
    assert model.shape_head.weight.grad.abs().sum() > 0 and model.where.weight.grad.abs().sum() > 0
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    optimizer.step()
    assert not torch.equal(before, model.shape_head.weight)


def test_init_from_teacher_copies_the_teacher_into_the_classifier():
    import pytest

    from kdtoolkit.engine.stage import init_from_teacher
    from kdtoolkit.errors import KdError

    torch.manual_seed(0)
    teacher = build_backbone("resnet10t", 3, 1, {})
    zoom = build_backbone("roi_zoom", 3, 1, {"locator": "resnet10t", "classifier": "resnet10t"})
    init_from_teacher(zoom, teacher, "student")
    crop = torch.randn(2, 1, 32, 64)
    teacher.eval(), zoom.eval()
    torch.testing.assert_close(zoom.classifier(crop), teacher(crop))
    plain = build_backbone("resnet10t", 3, 1, {})
    init_from_teacher(plain, teacher, "student")  # same architecture: a plain copy
    torch.testing.assert_close(plain.eval()(crop), teacher(crop))
    other = build_backbone("resnet18", 3, 1, {})
    with pytest.raises(KdError, match="student.init_from_teacher"):
        init_from_teacher(other, teacher, "student")


def test_image_attention_marks_the_predicted_roi():
    from kdtoolkit.models.gradcam import cam_for_images
    from kdtoolkit.report.metrics import cam_box_iou, pointing_game

    torch.manual_seed(0)
    model = build_backbone("roi_zoom", 3, 1, {"locator": "resnet10t", "classifier": "resnet10t"})
    target = mask_moments(_mask())
    model.locate = lambda x: target.repeat(len(x), 1)  # a perfect locator
    cam = cam_for_images(model, torch.zeros(1, 1, H, W))[0].numpy()
    corners = roi_corners(BOX, ANGLE)
    assert pointing_game(cam, corners)
    assert cam_box_iou(cam, corners) > 0.8
    assert cam.max() <= 1 and cam.min() == 0


def test_affine_grid_equals_torchs_for_any_batch():
    """The batch-free grid is ``F.affine_grid``'s (align_corners=False), by its own reference."""
    import torch.nn.functional as F

    from kdtoolkit.builtin.roi_zoom import affine_grid

    theta = torch.randn(5, 2, 3, generator=torch.Generator().manual_seed(0))
    for size in ((7, 11), (16, 32), (1, 1)):
        expected = F.affine_grid(theta, (5, 1, *size), align_corners=False)
        assert torch.allclose(affine_grid(theta, size), expected, atol=1e-6)
        assert affine_grid(theta[:1], size).shape == (1, *size, 2)
