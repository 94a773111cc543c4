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
