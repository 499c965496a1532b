"""Tests for hqlabel.platform.rle: COCO compressed RLE compatible with pycocotools."""

from __future__ import annotations

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from hqlabel.platform.rle import decode_mask, encode_mask, encode_masks, mask_area, rle_to_bbox


@pytest.fixture
def random_masks() -> np.ndarray:
    """3 x 37 x 53 random bool masks (odd sizes catch row/column-order mistakes)."""
    return np.random.default_rng(7).random((3, 37, 53)) > 0.5


def test_round_trip_is_exact(random_masks: np.ndarray) -> None:
    decoded = np.stack([decode_mask(rle) for rle in encode_masks(random_masks)])
    np.testing.assert_array_equal(decoded, random_masks)


def test_decode_returns_bool_hw(random_masks: np.ndarray) -> None:
    decoded = decode_mask(encode_mask(random_masks[0]))
    assert decoded.dtype == np.bool_ and decoded.shape == (37, 53)


def test_size_and_counts_types(random_masks: np.ndarray) -> None:
    rle = encode_mask(random_masks[0])
    assert rle["size"] == [37, 53]
    assert all(type(v) is int for v in rle["size"])
    assert isinstance(rle["counts"], bytes)


def test_area_equals_mask_sum(random_masks: np.ndarray) -> None:
    assert [mask_area(rle) for rle in encode_masks(random_masks)] == random_masks.sum(axis=(1, 2)).tolist()


def test_pycocotools_decodes_our_rle(random_masks: np.ndarray) -> None:
    rle = encode_mask(random_masks[1])
    decoded = mask_utils.decode({"size": rle["size"], "counts": rle["counts"]})
    np.testing.assert_array_equal(decoded.astype(bool), random_masks[1])


def test_counts_as_str_and_size_as_array(random_masks: np.ndarray) -> None:
    rle = encode_mask(random_masks[2])
    as_json = {"size": np.array(rle["size"]), "counts": rle["counts"].decode("ascii")}
    np.testing.assert_array_equal(decode_mask(as_json), random_masks[2])


def test_uint8_masks_encode_like_bool(random_masks: np.ndarray) -> None:
    assert encode_masks(random_masks.astype(np.uint8)) == encode_masks(random_masks)


def test_empty_mask() -> None:
    rle = encode_mask(np.zeros((5, 7), dtype=bool))
    assert mask_area(rle) == 0 and not decode_mask(rle).any()


def test_full_mask() -> None:
    rle = encode_mask(np.ones((5, 7), dtype=bool))
    assert mask_area(rle) == 35 and decode_mask(rle).all()


def test_bbox_of_rectangle_is_xyxy() -> None:
    mask = np.zeros((40, 60), dtype=bool)
    mask[5:15, 20:50] = True  # Rows 5..14, columns 20..49.
    assert rle_to_bbox(encode_mask(mask)) == (20.0, 5.0, 50.0, 15.0)


def test_zero_masks_give_empty_list() -> None:
    assert encode_masks(np.zeros((0, 4, 4), dtype=bool)) == []


def test_wrong_ndim_raises() -> None:
    with pytest.raises(ValueError, match="N x H x W"):
        encode_masks(np.zeros((4, 4), dtype=bool))


def test_float_masks_raise() -> None:
    with pytest.raises(ValueError, match="threshold"):
        encode_masks(np.zeros((1, 4, 4), dtype=np.float32))


def test_malformed_rle_raises() -> None:
    with pytest.raises(ValueError, match="size"):
        decode_mask({"counts": b"0"})


def huge_rle(height: int = 50_000, width: int = 50_000) -> dict:
    """A valid compressed RLE of an empty height x width mask: a few bytes declaring 2.5 G pixels."""
    from pycocotools import mask as mask_utils

    rle = mask_utils.frPyObjects({"size": [height, width], "counts": [height * width]}, height, width)
    return {"size": [height, width], "counts": bytes(rle["counts"])}


def test_decode_refuses_a_declared_size_over_max_pixels_before_allocating() -> None:
    rle = huge_rle()
    assert len(rle["counts"]) < 16 and mask_area(rle) == 0  # well formed: decoding would take 5 GB
    with pytest.raises(
        ValueError, match=r"\[50000, 50000\] declares 2500000000 pixels, over the cap of 100000000"
    ):
        decode_mask(rle)  # the default cap: the labeling default --max-pixels
    with pytest.raises(ValueError, match="over the cap of 99 pixels"):
        decode_mask(encode_mask(np.ones((10, 10), bool)), max_pixels=99)
    assert decode_mask(encode_mask(np.ones((10, 10), bool)), max_pixels=100).all()  # at the cap
    assert decode_mask(encode_mask(np.ones((10, 10), bool)), max_pixels=None).shape == (10, 10)


def test_column_major_bool_masks_encode_like_row_major_ones():
    """``iter_masks`` yields column-major masks, which ``encode_masks`` reads without copying."""
    masks = np.random.default_rng(1).random((3, 37, 53)) > 0.6
    column_major = np.asfortranarray(masks.transpose(1, 2, 0)).transpose(2, 0, 1)
    assert column_major.transpose(1, 2, 0).flags.f_contiguous
    assert encode_masks(column_major) == encode_masks(masks) == encode_masks(masks.astype(np.uint8) * 255)
