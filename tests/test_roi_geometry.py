"""ROI masks, their boxes and the warp matrices at their edges, against hand computations."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from kdtoolkit.data.mask import masks_and_boxes, roi_mask, roi_masks
from kdtoolkit.errors import KdError

CPU = torch.device("cpu")


def _square(x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    return np.array([(x0, y0), (x1, y0), (x1, y1), (x0, y1)], dtype=np.float64)


def test_box_mask_includes_centres_on_its_edges_and_small_rois() -> None:
    # Centres 0.5, 1.5, 2.5 lie on or inside the edges 0.5 and 2.5: a 3×3 block.
    want = np.zeros((4, 4), dtype=np.float32)
    want[:3, :3] = 1.0
    corners = torch.from_numpy(_square(0.5, 0.5, 2.5, 2.5))[None]
    np.testing.assert_array_equal(roi_masks(corners, (4, 4))[0].numpy(), want)  # default: box
    np.testing.assert_array_equal(roi_mask((0.5, 0.5, 2.5, 2.5), (4, 4)), want)
    one = np.zeros((4, 4), dtype=np.float32)
    one[1, 2] = 1.0  # a one-pixel ROI (frame determinant 0.25) holds its pixel
    np.testing.assert_array_equal(roi_mask((2, 1, 3, 2), (4, 4)), one)


def test_degenerate_roi_masks_are_empty_and_gaussian_is_float32() -> None:
    for kind in ("box", "gaussian"):
        flat = roi_mask((1, 1, 1, 3), (4, 4), kind)
        assert flat.dtype == np.float32 and not flat.any()
    soft = roi_mask((0, 0, 4, 4), (4, 4), "gaussian")
    assert soft.dtype == np.float32
    # Pixel (1, 1): centre (1.5, 1.5), u = v = -0.25, exp(-(2 · 0.0625) / 0.5).
    assert soft[1, 1] == pytest.approx(np.exp(-0.25), rel=1e-6)


def test_mask_errors_in_full() -> None:
    corners = torch.from_numpy(_square(0, 0, 2, 2))[None]
    with pytest.raises(KdError, match="^unknown mask kind 'disc' — use 'box' or 'gaussian'$"):
        roi_masks(corners, (4, 4), "disc")
    message = "roi must be 4 corners (4×2) or a box of 4 numbers, got (3, 2)"
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        roi_mask(np.zeros((3, 2)), (4, 4))


def test_masks_and_boxes_clip_each_roi_to_the_input() -> None:
    corners = [
        _square(-2, -3, 10, 5),  # past the left, top and right edges
        None,  # no ROI: the whole input
        _square(0.5, 0.5, 2.5, 2.5),
        _square(10, 1, 12, 2),  # right of the input
        _square(-5, -5, -3, -3),  # above and left of it
    ]
    masks, boxes = masks_and_boxes(corners, (6, 8), "gaussian", CPU)
    assert masks.shape == (5, 1, 6, 8) and boxes.dtype == torch.float32
    assert boxes.tolist() == [
        [0, 0, 8, 5],
        [0, 0, 8, 6],
        [0.5, 0.5, 2.5, 2.5],
        [8, 1, 8, 2],
        [0, 0, 0, 0],
    ]
    assert (masks[1] == 1).all()
    want = roi_mask((0.5, 0.5, 2.5, 2.5), (6, 8), "gaussian")
    np.testing.assert_array_equal(masks[2, 0].numpy(), want)  # the kind asked for


# -- warp matrices and the antialiased reduction ------------------------------------------------


def test_resize_and_letterbox_matrices_by_hand() -> None:
    from kdtoolkit.data.affine import letterbox_matrix, resize_matrix

    np.testing.assert_array_equal(resize_matrix((10, 20), (5, 40)), np.diag([2.0, 0.5, 1.0]))
    # A 20×10 (H×W) image into 30×30: scale min(30/20, 30/10) = 1.5, width 15 padded by 7.5.
    matrix, scale, pad = letterbox_matrix((20, 10), (30, 30))
    assert scale == 1.5 and pad == (7.5, 0.0)
    np.testing.assert_array_equal(matrix, [[1.5, 0, 7.5], [0, 1.5, 0], [0, 0, 1]])


def test_warp_errors_in_full() -> None:
    from kdtoolkit.data.affine import as3x3, roi_matrix

    with pytest.raises(ValueError, match=r"^affine matrix must be 2×3 or 3×3, got \(2, 2\)$"):
        as3x3(np.eye(2))
    with pytest.raises(KdError) as err:
        roi_matrix(_square(1, 1, 1, 3), (4, 4))
    assert str(err.value) == (
        "ROI with corners [[1.0, 1.0], [1.0, 1.0], [1.0, 3.0], [1.0, 3.0]] has no area — check "
        "the box"
    )


@pytest.mark.parametrize(
    ("size", "antialias"),
    [
        ((16, 16), True),
        ((64, 16), True),
        ((16, 64), True),
        ((64, 32), True),  # by 2 along x only
        ((32, 64), True),  # by 2 along y only
        ((1, 2), True),
        ((2, 1), True),  # down to one column
        ((52, 52), False),
    ],
)
def test_shrinking_warp_is_torchs_antialiased_resize(size, antialias) -> None:
    """A stretch to ``size`` shrinking by more than 1.25 on an axis equals F.interpolate with
    antialias; by 1.25 exactly (64 → 51.2 ≈ 52 here: 1.23), the plain bilinear resize."""
    import torch.nn.functional as F

    from kdtoolkit.data.affine import resize_matrix
    from kdtoolkit.data.warp import warp_tensor

    src = torch.rand(2, 64, 64, generator=torch.Generator().manual_seed(0))
    got = warp_tensor(src, resize_matrix((64, 64), size), size)
    want = F.interpolate(src[None], size=size, mode="bilinear", antialias=antialias)[0]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("linear", "want"),
    [
        ([[3.0, 0.0], [0.0, 0.5]], (3.0, 1.0)),  # axis-aligned: per axis, 0.5 needs none
        ([[1.25, 0.0], [0.0, 1.26]], (1.0, 1.26)),  # 1.25 exactly needs none
        ([[1.26, 0.0], [0.0, 1.25]], (1.26, 1.0)),
        ([[3.0, 0.5], [0.0, 2.0]], (np.hypot(0.5, 2.0),) * 2),  # sheared: the finer column
        ([[3.0, 0.0], [0.5, 2.0]], (2.0, 2.0)),  # sheared the other way
        ([[1.5, 0.5], [0.0, 3.0]], (1.5, 1.5)),  # the first column the finer
    ],
)
def test_reduction_factors_by_hand(linear, want) -> None:
    """Source pixels per output pixel of an inverse warp: per axis when axis-aligned, else
    the smaller column norm on both axes; 1 at or below the antialiasing step (1.25)."""
    from kdtoolkit.data.affine import reduction as _reduction

    inv = np.eye(3)
    inv[:2, :2] = linear
    inv[:2, 2] = [7.0, -3.0]  # the translation plays no part
    assert _reduction(inv) == pytest.approx(want)


def test_warp_stack_warps_every_row_through_its_own_path() -> None:
    """Rows 1 (direct, shifted by one pixel) and 0 (shrunk by 4 and letterboxed) of a stack."""
    import torch.nn.functional as F

    from kdtoolkit.data.affine import letterbox_matrix
    from kdtoolkit.data.warp import warp_stack

    stack = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    shift = np.array([[1.0, 0, 1], [0, 1, 0], [0, 0, 1]])
    box, _, _ = letterbox_matrix((32, 16), (8, 8))  # scale 1/4, padded by 2 on x
    out = warp_stack(stack, [1, 0], [(32, 32), (32, 16)], [shift, box], (8, 8))
    torch.testing.assert_close(out[0, 0, :, 1:], stack[1, 0, :8, :7])
    assert (out[0, 0, :, 0] == 0).all()
    small = F.interpolate(stack[:1, :, :, :16], size=(8, 4), mode="bilinear", antialias=True)
    torch.testing.assert_close(out[1, :, :, 2:6], small[0], atol=1e-5, rtol=0)
    assert (out[1, :, :, :2] == 0).all() and (out[1, :, :, 6:] == 0).all()
    with pytest.raises(ValueError):
        warp_stack(stack, [0, 1], [(32, 32)], [shift, shift], (8, 8))


def test_enclosing_box_of_rotated_rois_by_hand() -> None:
    from kdtoolkit.data.geometry import enclosing_box, roi_corners

    np.testing.assert_array_equal(roi_corners((0, 0, 4, 2)), _square(0, 0, 4, 2))  # angle 0
    np.testing.assert_array_equal(enclosing_box((0, 0, 4, 2)), [0, 0, 4, 2])
    # A 4×2 box about (2, 1) turned by 90°: 2 wide, 4 high.
    np.testing.assert_allclose(enclosing_box((0, 0, 4, 2), 90.0), [1, -1, 3, 3], atol=1e-12)
    # 30°: half-extents 2, 1 project to 2·cos + 1·sin and 2·sin + 1·cos.
    c, s = np.cos(np.radians(30)), np.sin(np.radians(30))
    want = [2 - (2 * c + s), 1 - (2 * s + c), 2 + (2 * c + s), 1 + (2 * s + c)]
    np.testing.assert_allclose(enclosing_box((0, 0, 4, 2), 30.0), want, atol=1e-12)


def test_roi_masks_of_float32_corners_are_computed_in_float64() -> None:
    """A box whose edges fall near pixel centres (x 6.5-7.2, y 6.5-9.2): float32 arithmetic
    puts some of those centres on the other side; the documented float64 path does not."""
    corners = torch.tensor([[[6.5, 6.5], [7.2, 6.5], [7.2, 9.2], [6.5, 9.2]]])
    assert corners.dtype == torch.float32
    want = roi_masks(corners.to(torch.float64), (24, 24))
    assert torch.equal(roi_masks(corners, (24, 24)), want)
    f32 = corners  # the same sums in float32 differ: this input tells the two apart
    frame = torch.stack([(f32[:, 1] - f32[:, 0]) / 2, (f32[:, 3] - f32[:, 0]) / 2], dim=2)
    inv, centre = torch.linalg.inv(frame), f32.mean(dim=1)
    d = torch.arange(24, dtype=torch.float64) + 0.5
    u = inv[:, 0, 0, None, None] * (d[None, None, :] - centre[:, 0, None, None])
    v = inv[:, 1, 1, None, None] * (d[None, :, None] - centre[:, 1, None, None])
    assert not torch.equal((torch.maximum(u.abs(), v.abs()) <= 1.0).float(), want)
