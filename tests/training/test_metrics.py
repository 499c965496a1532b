"""Mask IoU, Boundary IoU (against sam-hq's OpenCV definition) and the mergeable metric state."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hqlabel.training.metrics import (
    MaskMetrics,
    boundary_dilation,
    boundary_iou,
    mask_iou,
    mask_to_boundary,
)

cv2 = pytest.importorskip("cv2")


def reference_mask_to_boundary(mask: np.ndarray, dilation_ratio: float = 0.02) -> np.ndarray:
    """sam-hq ``train/utils/misc.py::mask_to_boundary``, verbatim but for the bool result."""
    mask = mask.astype(np.uint8)
    h, w = mask.shape
    img_diag = np.sqrt(h**2 + w**2)
    dilation = int(round(dilation_ratio * img_diag))  # noqa: RUF046
    if dilation < 1:
        dilation = 1
    new_mask = cv2.copyMakeBorder(mask, 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0)
    kernel = np.ones((3, 3), dtype=np.uint8)
    new_mask_erode = cv2.erode(new_mask, kernel, iterations=dilation)
    mask_erode = new_mask_erode[1 : h + 1, 1 : w + 1]
    return (mask - mask_erode) > 0


def reference_boundary_iou(gt: np.ndarray, pred: np.ndarray, dilation_ratio: float = 0.02) -> float:
    gt_b = reference_mask_to_boundary(gt, dilation_ratio)
    pred_b = reference_mask_to_boundary(pred, dilation_ratio)
    return (gt_b & pred_b).sum() / (gt_b | pred_b).sum()


def rect(shape: tuple[int, int], y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[y0:y1, x0:x1] = True
    return mask


def test_mask_iou_of_overlapping_rectangles():
    a = rect((20, 20), 0, 10, 0, 10)  # 100 px
    b = rect((20, 20), 5, 15, 0, 10)  # 100 px, 50 shared
    assert mask_iou(a, b) == pytest.approx(50 / 150)
    assert mask_iou(torch.from_numpy(a), torch.from_numpy(b)) == pytest.approx(1 / 3)
    assert mask_iou(a, a) == 1.0
    assert mask_iou(a, np.zeros_like(a)) == 0.0


def test_mask_iou_of_two_empty_masks_is_one():
    empty = np.zeros((8, 8), dtype=bool)
    assert mask_iou(empty, empty) == 1.0
    assert boundary_iou(empty, empty) == 1.0


def test_mask_iou_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="same shape"):
        mask_iou(np.zeros((4, 4), bool), np.zeros((4, 5), bool))
    with pytest.raises(ValueError, match="H x W"):
        mask_iou(np.zeros((1, 4, 4), bool), np.zeros((1, 4, 4), bool))


def test_boundary_dilation_follows_the_diagonal():
    assert boundary_dilation(64, 64) == 2  # 0.02 * 90.5 = 1.81
    assert boundary_dilation(1024, 1024) == 29  # 0.02 * 1448.2
    assert boundary_dilation(10, 10) == 1  # at least one pixel
    with pytest.raises(ValueError, match="dilation_ratio"):
        boundary_dilation(10, 10, 0.0)


def test_boundary_of_a_filled_square_is_a_band_of_width_d():
    # 64 x 64: d = 2. A 20 x 20 square keeps an eroded 16 x 16 core.
    square = rect((64, 64), 20, 40, 20, 40)
    boundary = mask_to_boundary(square)
    assert isinstance(boundary, np.ndarray) and boundary.dtype == bool
    assert boundary.sum() == 20 * 20 - 16 * 16
    assert not boundary[22:38, 22:38].any()
    # The image border counts as background: a full image has a 2-pixel frame of boundary.
    assert mask_to_boundary(np.ones((64, 64), bool)).sum() == 64 * 64 - 60 * 60
    # A square in the corner erodes from the image border too: 10 x 10 keeps rows/cols 2..7.
    assert mask_to_boundary(rect((64, 64), 0, 10, 0, 10)).sum() == 100 - 36


@pytest.mark.parametrize("shape", [(64, 64), (37, 91), (3, 50), (1, 1)])
@pytest.mark.parametrize("dilation_ratio", [0.02, 0.1, 0.6])
def test_mask_to_boundary_matches_opencv_erosion(shape, dilation_ratio):
    rng = np.random.default_rng(0)
    for mask in (rng.random(shape) > 0.3, rect(shape, shape[0] // 4, shape[0], shape[1] // 5, shape[1] - 1)):
        expected = reference_mask_to_boundary(mask, dilation_ratio)
        np.testing.assert_array_equal(mask_to_boundary(mask, dilation_ratio), expected)
        as_tensor = mask_to_boundary(torch.from_numpy(mask), dilation_ratio)
        assert isinstance(as_tensor, torch.Tensor)
        np.testing.assert_array_equal(as_tensor.numpy(), expected)


def test_boundary_iou_of_shifted_square_matches_sam_hq():
    gt = rect((100, 120), 20, 70, 30, 90)
    for shift in (1, 2, 5, 12):
        pred = np.roll(gt, shift, axis=1)
        expected = reference_boundary_iou(gt, pred)
        assert boundary_iou(gt, pred) == pytest.approx(expected, abs=1e-9)
        assert boundary_iou(gt, pred) < mask_iou(gt, pred)  # the boundary sees the shift more
    assert boundary_iou(gt, gt) == 1.0


def test_mask_to_boundary_is_fast_at_sam_resolution():
    mask = torch.rand(1024, 1024, generator=torch.Generator().manual_seed(0)) > 0.5
    mask_to_boundary(mask, 0.5)  # d = 724: the cost must not grow with d


def random_blobs(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:48, :48]
    preds, gts = [], []
    for _ in range(n):
        cy, cx, r = rng.uniform(10, 38), rng.uniform(10, 38), rng.uniform(4, 12)
        gts.append((yy - cy) ** 2 + (xx - cx) ** 2 < r**2)
        preds.append((yy - cy - rng.normal()) ** 2 + (xx - cx) ** 2 < (r + rng.normal()) ** 2)
    return np.stack(preds), np.stack(gts)


def test_mask_metrics_merge_equals_one_pass():
    preds, gts = random_blobs(6, seed=1)
    whole = MaskMetrics()
    whole.update(preds, gts)
    first, second = MaskMetrics(), MaskMetrics()
    for p, g in zip(preds[:2], gts[:2], strict=True):
        first.update(p, g)
    second.update(torch.from_numpy(preds[2:]), torch.from_numpy(gts[2:]))
    first.merge(second)
    assert first.summary()["count"] == 6
    assert first.summary()["miou"] == pytest.approx(whole.summary()["miou"])
    assert first.summary()["mbiou"] == pytest.approx(whole.summary()["mbiou"])
    expected_miou = np.mean([mask_iou(p, g) for p, g in zip(preds, gts, strict=True)])
    expected_mbiou = np.mean([reference_boundary_iou(g, p) for p, g in zip(preds, gts, strict=True)])
    assert whole.summary()["miou"] == pytest.approx(expected_miou)
    assert whole.summary()["mbiou"] == pytest.approx(expected_mbiou)


def test_mask_metrics_state_is_summable_plain_numbers():
    preds, gts = random_blobs(4, seed=2)
    a, b = MaskMetrics(), MaskMetrics()
    a.update(preds[:1], gts[:1])
    b.update(preds[1:], gts[1:])
    state_a, state_b = a.state(), b.state()
    assert all(isinstance(v, (int, float)) for v in state_a.values())
    summed = {k: float(state_a[k]) + float(state_b[k]) for k in state_a}  # what an all-reduce hands back
    merged = MaskMetrics.from_state(summed)
    a.merge(b)
    assert merged.summary() == pytest.approx(a.summary())
    assert merged.summary()["count"] == 4 and isinstance(merged.summary()["count"], int)
    with pytest.raises(ValueError, match="count"):
        MaskMetrics.from_state({"iou_sum": 1.0, "biou_sum": 1.0})


def test_mask_metrics_empty_summary_is_nan():
    summary = MaskMetrics().summary()
    assert summary["count"] == 0
    assert math.isnan(summary["miou"]) and math.isnan(summary["mbiou"])


def test_an_empty_pred_on_an_empty_gt_is_left_out_and_counted():
    """sam-hq's IoU of two empty masks is 0 / 0 = NaN; the means leave such a pair out and count it."""
    preds, gts = random_blobs(3, seed=4)
    scored = MaskMetrics()
    scored.update(preds, gts)
    empty = np.zeros((2, *gts.shape[1:]), dtype=bool)
    metrics = MaskMetrics()
    metrics.update(np.concatenate([preds, empty]), np.concatenate([gts, empty]))
    summary = metrics.summary()
    assert summary["count"] == 3 and summary["empty"] == 2
    assert summary["miou"] == pytest.approx(scored.summary()["miou"])
    assert summary["mbiou"] == pytest.approx(scored.summary()["mbiou"])
    # An empty prediction of a non-empty object (or the reverse) is scored: IoU 0.
    metrics.update(empty[0], gts[0])
    metrics.update(preds[0], empty[0])
    assert metrics.summary()["count"] == 5 and metrics.summary()["empty"] == 2
    # The count survives the state round trip that an all-reduce makes.
    summed = {k: float(v) for k, v in metrics.state().items()}
    assert MaskMetrics.from_state(summed).summary() == pytest.approx(metrics.summary())
    only_empty = MaskMetrics()
    only_empty.update(empty, empty)
    assert only_empty.summary()["count"] == 0 and only_empty.summary()["empty"] == 2
    assert math.isnan(only_empty.summary()["miou"])
