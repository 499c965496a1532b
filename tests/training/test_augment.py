"""Large Scale Jitter, flips and the validation resize: shapes, scales, and masks staying on their pixels."""

from __future__ import annotations

import numpy as np
import pytest

from hqlabel.training.augment import large_scale_jitter, random_hflip, resize_longest


def red_scene(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """An image whose red channel is exactly mask 0 (a rectangle) and green channel mask 1 (a disc)."""
    yy, xx = np.mgrid[:height, :width]
    masks = np.zeros((2, height, width), dtype=bool)
    masks[0, height // 5 : height // 2, width // 8 : width // 3] = True
    masks[1] = (yy - 0.6 * height) ** 2 + (xx - 0.65 * width) ** 2 < (0.2 * min(height, width)) ** 2
    image = np.zeros((height, width, 3), dtype=np.uint8)
    image[..., 0] = 255 * masks[0]
    image[..., 1] = 255 * masks[1]
    image[..., 2] = 255 * ~masks.any(0)
    return image, masks


def colour_mismatch(image: np.ndarray, masks: np.ndarray, valid: tuple[int, int]) -> int:
    """Pixels where channel k disagrees with mask k, inside the valid area. Ties do not count: a sample
    exactly between two pixels gives the mask 0.5 (not > 0.5) and the image 127.5, rounded to 128."""
    h, w = valid
    channels = image[:h, :w, :2].astype(int)
    decided = (channels < 127) | (channels > 128)
    disagree = (channels > 127) != np.moveaxis(masks[:2, :h, :w], 0, -1)
    return int((disagree & decided).sum())


def test_large_scale_jitter_shapes_and_padding():
    image, masks = red_scene(60, 80)
    out_image, out_masks, (valid_h, valid_w) = large_scale_jitter(
        image, masks, 64, generator=np.random.default_rng(0)
    )
    assert out_image.shape == (64, 64, 3) and out_image.dtype == np.uint8
    assert out_masks.shape == (2, 64, 64) and out_masks.dtype == bool
    assert 1 <= valid_h <= 64 and 1 <= valid_w <= 64
    assert not out_image[valid_h:].any() and not out_image[:, valid_w:].any()
    assert not out_masks[:, valid_h:].any() and not out_masks[:, :, valid_w:].any()
    padded, _, _ = large_scale_jitter(image, masks, 64, (0.5, 0.5), np.random.default_rng(0), pad_value=128)
    assert (padded[40:] == 128).all()


def test_masks_stay_aligned_with_the_image_through_flip_and_jitter():
    image, masks = red_scene(90, 120)
    assert colour_mismatch(image, masks, (90, 120)) == 0
    rng = np.random.default_rng(1)
    for _ in range(12):
        flipped_image, flipped_masks = random_hflip(image, masks, rng)
        out_image, out_masks, valid = large_scale_jitter(flipped_image, flipped_masks, 96, generator=rng)
        # Channel k is 255 * mask k, resized by the same filter: the same pixels.
        assert colour_mismatch(out_image, out_masks, valid) == 0
        assert out_masks.any()


def test_scale_range_sets_the_longest_side():
    image, masks = red_scene(100, 200)
    rng = np.random.default_rng(2)
    for _ in range(10):
        _, _, (valid_h, valid_w) = large_scale_jitter(image, masks, 64, (0.2, 0.9), rng)
        assert 0.2 * 64 - 1 <= valid_w <= 0.9 * 64 + 1  # width is the longest side
        assert valid_h == round(valid_w / 2) or abs(valid_h - valid_w / 2) <= 1
    _, _, valid = large_scale_jitter(image, masks, 64, (0.5, 0.5), rng)
    assert valid == (16, 32)
    # Scaled beyond the canvas: a random crop fills it along the longest side.
    for _ in range(5):
        _, _, (valid_h, valid_w) = large_scale_jitter(image, masks, 64, (1.5, 2.0), rng)
        assert valid_w == 64 and 48 <= valid_h <= 64


def test_jitter_is_reproducible_and_keeps_empty_instances():
    image, masks = red_scene(50, 50)
    masks = np.concatenate([masks, np.zeros((1, 50, 50), bool)])
    a = large_scale_jitter(image, masks, 32, generator=np.random.default_rng(5))
    b = large_scale_jitter(image, masks, 32, generator=np.random.default_rng(5))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]
    assert a[1].shape[0] == 3 and not a[1][2].any()
    no_masks = large_scale_jitter(image, np.zeros((0, 50, 50), bool), 32, generator=np.random.default_rng(5))
    assert no_masks[1].shape == (0, 32, 32)


def test_jitter_rejects_bad_inputs():
    image, masks = red_scene(20, 20)
    with pytest.raises(ValueError, match="scale_range"):
        large_scale_jitter(image, masks, 16, (0.0, 1.0), np.random.default_rng())
    with pytest.raises(ValueError, match="masks must be N x H x W"):
        large_scale_jitter(image, masks[:, :10], 16, generator=np.random.default_rng())
    with pytest.raises(ValueError, match="uint8"):
        large_scale_jitter(image.astype(np.float32), masks, 16, generator=np.random.default_rng())


def test_random_hflip_flips_image_and_masks_together():
    image, masks = red_scene(30, 40)
    flipped_image, flipped_masks = random_hflip(image, masks, np.random.default_rng(), p=1.0)
    assert np.array_equal(flipped_image, image[:, ::-1]) and np.array_equal(flipped_masks, masks[:, :, ::-1])
    same_image, same_masks = random_hflip(image, masks, np.random.default_rng(), p=0.0)
    assert same_image is image and same_masks is masks
    with pytest.raises(ValueError, match="probability"):
        random_hflip(image, masks, np.random.default_rng(), p=2.0)


@pytest.mark.parametrize(("size", "factor"), [(128, 2), (32, 0.5)])
def test_resize_longest_is_exact_for_integer_factors(size, factor):
    # 32 x 64 image, rectangle on even pixel edges: up- or down-scaling by 2 keeps its edges exactly.
    image = np.zeros((32, 64, 3), dtype=np.uint8)
    masks = np.zeros((1, 32, 64), dtype=bool)
    masks[0, 8:16, 10:30] = True
    image[masks[0]] = 255
    out_image, out_masks, valid = resize_longest(image, masks, size)
    assert out_image.shape == (size, size, 3) and out_masks.shape == (1, size, size)
    assert valid == (int(32 * factor), int(64 * factor))
    expected = np.zeros((size, size), dtype=bool)
    expected[int(8 * factor) : int(16 * factor), int(10 * factor) : int(30 * factor)] = True
    assert np.array_equal(out_masks[0], expected)
    assert np.array_equal(out_image[..., 0] > 127, expected)
    assert not out_image[valid[0] :].any()


def test_resize_longest_rounds_like_sam():
    image = np.zeros((333, 500, 3), dtype=np.uint8)
    _, _, valid = resize_longest(image, np.zeros((0, 333, 500), bool), 1024)
    assert valid == (int(333 * 1024 / 500 + 0.5), 1024) == (682, 1024)
