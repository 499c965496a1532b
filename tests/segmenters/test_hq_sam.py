"""Tests for hqlabel.segmenters.hq_sam, on a tiny randomly initialised SAM-HQ (offline)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import upsample_calls

from hqlabel.segmenters.hq_sam import (
    HQSamSegmenter,
    ImageEmbeddings,
    MaskLogits,
    resize_plan,
    tiny_random_sam_hq,
)


@pytest.fixture(scope="module")
def segmenter() -> HQSamSegmenter:
    return tiny_random_sam_hq(seed=0)


@pytest.fixture(scope="module")
def images() -> list[np.ndarray]:
    """A landscape and a portrait image (their padded frames differ)."""
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in [(100, 150), (180, 90)]]


def with_settings(segmenter: HQSamSegmenter, **kwargs) -> HQSamSegmenter:
    """The same model and processor under other settings."""
    return HQSamSegmenter(segmenter.model, segmenter.processor, **kwargs)


def random_boxes(n: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """n x 4 XYXY pixel boxes inside an h x w image, at least 4 pixels a side."""
    generator = torch.Generator().manual_seed(seed)
    x = (torch.rand(n, 2, generator=generator) * (w - 4)).sort(-1).values
    y = (torch.rand(n, 2, generator=generator) * (h - 4)).sort(-1).values
    return torch.stack([x[:, 0], y[:, 0], x[:, 1] + 4, y[:, 1] + 4], -1)


def assert_close_to_scale(actual: torch.Tensor, expected: torch.Tensor, rel: float) -> None:
    """|actual - expected| <= rel * max|expected|: random-weight logits are tiny (no absolute tolerance)."""
    scale = expected.abs().max()
    assert scale > 0
    assert actual.shape == expected.shape
    assert (actual - expected).abs().max() <= rel * scale


@contextmanager
def call_sizes(module: torch.nn.Module, size_of) -> Iterator[list[int]]:
    """Record ``size_of(output)`` for each forward call of ``module``."""
    sizes: list[int] = []
    handle = module.register_forward_hook(lambda _module, _args, output: sizes.append(size_of(output)))
    try:
        yield sizes
    finally:
        handle.remove()


def test_encoder_runs_once_per_image_whatever_the_number_of_boxes(
    segmenter: HQSamSegmenter, images: list[np.ndarray]
) -> None:
    chunk = 16
    seg = with_settings(segmenter, chunk_size=chunk)
    model = seg.model
    with (
        call_sizes(model.vision_encoder, lambda out: out[0].shape[0]) as encoded,
        call_sizes(model.mask_decoder, lambda out: out[0].shape[1]) as decoded,
    ):
        embeddings = seg.embed(images)
        (h0, w0), (h1, w1) = (image.shape[:2] for image in images)
        boxes = [random_boxes(1, h0, w0), random_boxes(40, h1, w1)]
        results = seg.predict_boxes(embeddings, boxes)
    assert sum(encoded) == 2
    assert len(decoded) == math.ceil(1 / chunk) + math.ceil(40 / chunk)
    assert decoded == [1, 16, 16, 8]
    assert [len(r) for r in results] == [1, 40]


@pytest.mark.parametrize("image_index", [0, 1])
def test_predict_boxes_matches_a_one_shot_model_call(
    segmenter: HQSamSegmenter, images: list[np.ndarray], image_index: int
) -> None:
    """Embedding a batch then decoding equals the model run end to end on one image, in both HQ modes."""
    image = images[image_index]
    h, w = image.shape[:2]
    boxes = random_boxes(5, h, w, seed=image_index)
    embeddings = segmenter.embed(images)  # batch of two sizes; the other image must not leak in
    inputs = segmenter.processor(images=[image], input_boxes=[[boxes.tolist()]], return_tensors="pt")
    logits = {}
    for hq_token_only in (False, True):
        seg = with_settings(segmenter, hq_token_only=hq_token_only)
        got = seg.predict_boxes(embeddings, [boxes if i == image_index else boxes[:0] for i in range(2)])
        got = got[image_index]
        with torch.no_grad():
            expected = segmenter.model(**inputs, multimask_output=False, hq_token_only=hq_token_only)
        assert got.original_size == (h, w)
        assert got.logits.shape == (5, 1, 64, 64) and got.iou_scores.shape == (5, 1)
        assert_close_to_scale(got.logits, expected.pred_masks[0], rel=1e-4)
        assert_close_to_scale(got.iou_scores, expected.iou_scores[0], rel=1e-4)
        logits[hq_token_only] = got.logits
    difference = (logits[True] - logits[False]).abs().max()
    assert difference > 0.01 * logits[False].abs().max(), "hq_token_only changed nothing"


def test_image_content_reaches_the_masks(segmenter: HQSamSegmenter, images: list[np.ndarray]) -> None:
    boxes = random_boxes(3, 100, 90)
    a, b = (segmenter.predict_boxes(segmenter.embed([image[:100, :90]]), [boxes])[0] for image in images)
    assert (a.logits - b.logits).abs().max() > 0.01 * a.logits.abs().max()


def test_hq_branch_uses_the_intermediate_embeddings(
    segmenter: HQSamSegmenter, images: list[np.ndarray]
) -> None:
    embeddings = segmenter.embed(images[:1])
    boxes = [random_boxes(3, 100, 150)]
    zeroed = ImageEmbeddings(
        embeddings.image_embeddings,
        [torch.zeros_like(e) for e in embeddings.intermediate_embeddings],
        embeddings.original_sizes,
        embeddings.reshaped_sizes,
    )
    with_hq = segmenter.predict_boxes(embeddings, boxes)[0].logits
    without = segmenter.predict_boxes(zeroed, boxes)[0].logits
    assert (with_hq - without).abs().max() > 0.01 * with_hq.abs().max()


def test_chunk_size_does_not_change_the_result(segmenter: HQSamSegmenter, images: list[np.ndarray]) -> None:
    embeddings = segmenter.embed(images[:1])
    boxes = [random_boxes(30, 100, 150)]
    one = with_settings(segmenter, chunk_size=1).predict_boxes(embeddings, boxes)[0]
    all_at_once = with_settings(segmenter, chunk_size=64).predict_boxes(embeddings, boxes)[0]
    assert one.logits.shape[0] == 30
    assert_close_to_scale(one.logits, all_at_once.logits, rel=1e-5)
    assert_close_to_scale(one.iou_scores, all_at_once.iou_scores, rel=1e-5)


def test_image_without_boxes_gets_no_masks_and_no_decoder_call(
    segmenter: HQSamSegmenter, images: list[np.ndarray]
) -> None:
    embeddings = segmenter.embed(images)
    with call_sizes(segmenter.model.mask_decoder, lambda out: out[0].shape[1]) as decoded:
        empty, full = segmenter.predict_boxes(embeddings, [torch.zeros(0, 4), random_boxes(3, 180, 90)])
    assert decoded == [3]
    assert len(empty) == 0
    assert empty.logits.shape == (0, *full.logits.shape[1:]) == (0, 1, 64, 64)
    assert empty.iou_scores.shape == (0, 1)
    assert empty.original_size == (100, 150)
    assert sum(len(chunk) for chunk in segmenter.iter_masks(empty)) == 0


def test_predict_boxes_needs_one_box_set_per_image(
    segmenter: HQSamSegmenter, images: list[np.ndarray]
) -> None:
    embeddings = segmenter.embed(images)
    with pytest.raises(ValueError, match="2"):
        segmenter.predict_boxes(embeddings, [random_boxes(1, 50, 50)])


def test_bad_arguments_are_value_errors(segmenter: HQSamSegmenter) -> None:
    with pytest.raises(ValueError, match="at least one image"):
        segmenter.embed([])
    with pytest.raises(ValueError, match="chunk_size"):
        with_settings(segmenter, chunk_size=0)
    with pytest.raises(ValueError, match="multimask"):
        with_settings(segmenter, multimask="best-of-3")
    with pytest.raises(ValueError, match="encoder_batch"):
        with_settings(segmenter, encoder_batch=0)


def test_fixed_encoder_batch_pads_and_splits(segmenter: HQSamSegmenter, images: list[np.ndarray]) -> None:
    """With ``encoder_batch`` (one shape for a compiled encoder) every encoder call sees that many images,
    and each image's embeddings are those of an unpadded call."""
    five = [images[k % 2] for k in range(5)]
    expected = segmenter.embed(five)
    fixed = with_settings(segmenter, encoder_batch=3)
    with call_sizes(segmenter.model.vision_encoder, lambda out: out[0].shape[0]) as sizes:
        got = fixed.embed(five)
    assert sizes == [3, 3]  # 5 images: 3, then 2 padded to 3
    assert_close_to_scale(got.image_embeddings, expected.image_embeddings, 1e-5)
    for a, b in zip(got.intermediate_embeddings, expected.intermediate_embeddings, strict=True):
        assert_close_to_scale(a, b, 1e-5)


# --- ImageEmbeddings ------------------------------------------------------------------------------


def test_embed_shapes(segmenter: HQSamSegmenter, images: list[np.ndarray]) -> None:
    embeddings = segmenter.embed(images)
    assert len(embeddings) == 2
    assert embeddings.original_sizes == [(100, 150), (180, 90)]
    assert all(max(size) == 128 for size in embeddings.reshaped_sizes)
    assert len(embeddings.intermediate_embeddings) >= 1
    single = embeddings[1]
    assert len(single) == 1 and single.original_sizes == [(180, 90)]
    assert torch.equal(single.image_embeddings[0], embeddings.image_embeddings[1])


def test_image_embeddings_without_intermediate_embeddings_is_refused(
    segmenter: HQSamSegmenter, images: list[np.ndarray]
) -> None:
    embeddings = segmenter.embed(images[:1])
    with pytest.raises(ValueError, match="intermediate"):
        ImageEmbeddings(embeddings.image_embeddings, [], embeddings.original_sizes, embeddings.reshaped_sizes)


def test_image_embeddings_with_disagreeing_batch_sizes_is_refused(
    segmenter: HQSamSegmenter, images: list[np.ndarray]
) -> None:
    e = segmenter.embed(images)
    with pytest.raises(ValueError, match="batch size"):
        ImageEmbeddings(
            e.image_embeddings, [x[:1] for x in e.intermediate_embeddings], e.original_sizes, e.reshaped_sizes
        )
    with pytest.raises(ValueError, match="batch size"):
        ImageEmbeddings(e.image_embeddings, e.intermediate_embeddings, e.original_sizes[:1], e.reshaped_sizes)
    with pytest.raises(ValueError, match="batch size"):
        ImageEmbeddings(e.image_embeddings[:1], e.intermediate_embeddings, e.original_sizes, e.reshaped_sizes)


# --- iter_masks -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mask_logits(segmenter: HQSamSegmenter, images: list[np.ndarray]) -> MaskLogits:
    """20 masks of the 100 x 150 image."""
    return segmenter.predict_boxes(segmenter.embed(images[:1]), [random_boxes(20, 100, 150)])[0]


def reference_masks(segmenter: HQSamSegmenter, logits: MaskLogits, size: tuple[int, int]) -> torch.Tensor:
    """transformers' own SAM post-processing: N x K x H x W bool."""
    masks = segmenter.processor.image_processor.post_process_masks(
        [logits.logits], [size], [logits.reshaped_size], mask_threshold=0.0
    )
    return masks[0]


@pytest.mark.parametrize("size", [(200, 300), (37, 41)])
def test_iter_masks_chunks_cover_all_masks_in_order(
    segmenter: HQSamSegmenter, mask_logits: MaskLogits, size: tuple[int, int]
) -> None:
    chunks = list(segmenter.iter_masks(mask_logits, output_size=size, chunk_size=8))
    assert [len(c) for c in chunks] == [8, 8, 4]
    assert all(c.dtype == torch.bool and c.shape[1:] == (1, *size) for c in chunks)
    masks = torch.cat(chunks)
    assert masks.any() and not masks.all()
    assert torch.equal(masks, reference_masks(segmenter, mask_logits, size))


def test_iter_masks_defaults_to_the_embedded_image_size(
    segmenter: HQSamSegmenter, mask_logits: MaskLogits
) -> None:
    masks = torch.cat(list(segmenter.iter_masks(mask_logits)))
    assert masks.shape == (20, 1, 100, 150)
    assert torch.equal(masks, reference_masks(segmenter, mask_logits, (100, 150)))


def test_iter_masks_keeps_the_three_masks_of_multimask_all(
    segmenter: HQSamSegmenter, images: list[np.ndarray]
) -> None:
    seg = with_settings(segmenter, multimask="all")
    logits = seg.predict_boxes(seg.embed(images[1:]), [random_boxes(5, 180, 90)])[0]
    assert logits.logits.shape == (5, 3, 64, 64) and logits.iou_scores.shape == (5, 3)
    chunks = list(seg.iter_masks(logits, output_size=(90, 45), chunk_size=2))
    assert [c.shape for c in chunks] == [(2, 3, 90, 45), (2, 3, 90, 45), (1, 3, 90, 45)]
    masks = torch.cat(chunks)
    assert masks.any() and not masks.all()
    assert not torch.equal(masks[:, 0], masks[:, 1])
    assert torch.equal(masks, reference_masks(seg, logits, (90, 45)))


@pytest.mark.parametrize(
    ("size", "budget"),
    [
        ((200, 300), 1),  # below the floor: strips of one row
        ((300, 40), 1),  # a narrow mask: strips of 89 rows, the fewest that keep ATen on one code path
        ((1000, 1500), 1_200_000),  # ~100 rows a strip
    ],
)
def test_iter_masks_in_strips_equals_one_resize_bit_for_bit(
    segmenter: HQSamSegmenter, mask_logits: MaskLogits, size: tuple[int, int], budget: int
) -> None:
    """A budget below one mask's float32 size: one prompt per chunk, the final resize in strips of rows,
    and exactly the masks of one resize per chunk (the default budget: one chunk of all 20 here)."""
    with upsample_calls() as whole_calls:
        whole = list(segmenter.iter_masks(mask_logits, size))
    assert [len(c) for c in whole] == [20] and whole_calls.count == 2
    prompts, rows = resize_plan(1, mask_logits.reshaped_size, size, budget)
    strips = math.ceil(size[0] / rows)
    assert prompts == 1 and strips >= 3
    with upsample_calls() as calls:
        chunks = list(segmenter.iter_masks(mask_logits, size, budget_bytes=budget))
    assert calls.count == 20 * (2 + strips)  # per prompt: the first resize, the last axis, then each strip
    assert [c.shape for c in chunks] == [(1, 1, *size)] * 20
    assert all(c.dtype == torch.bool and c.transpose(-1, -2).is_contiguous() for c in chunks)  # column-major
    masks = torch.cat(chunks)
    assert masks.any() and not masks.all()
    assert torch.equal(masks, whole[0])


def test_iter_masks_in_strips_keeps_the_three_masks_of_multimask_all(
    segmenter: HQSamSegmenter, images: list[np.ndarray]
) -> None:
    seg = with_settings(segmenter, multimask="all")
    logits = seg.predict_boxes(seg.embed(images[1:]), [random_boxes(5, 180, 90)])[0]
    size = (360, 180)
    assert resize_plan(3, logits.reshaped_size, size, 100_000)[1] is not None
    chunks = list(seg.iter_masks(logits, output_size=size, budget_bytes=100_000))
    assert [c.shape for c in chunks] == [(1, 3, *size)] * 5
    assert torch.equal(torch.cat(chunks), torch.cat(list(seg.iter_masks(logits, output_size=size))))


def test_iter_masks_chunks_hold_as_many_prompts_as_the_budget_allows(
    segmenter: HQSamSegmenter, mask_logits: MaskLogits
) -> None:
    (rh, rw), (h, w) = mask_logits.reshaped_size, (200, 300)
    per_prompt = 4 * (rw * rh + h * w)  # float32: the first resize and the final one
    chunks = list(segmenter.iter_masks(mask_logits, (h, w), budget_bytes=6 * per_prompt))
    assert [len(c) for c in chunks] == [6, 6, 6, 2]
    chunks = list(segmenter.iter_masks(mask_logits, (h, w), chunk_size=4, budget_bytes=6 * per_prompt))
    assert [len(c) for c in chunks] == [4] * 5
    assert [len(c) for c in segmenter.iter_masks(mask_logits, (h, w), budget_bytes=per_prompt - 1)] == [
        1
    ] * 20


def test_iter_masks_never_splits_a_mask_too_small_for_one_code_path(
    segmenter: HQSamSegmenter, mask_logits: MaskLogits
) -> None:
    """37 + 41 <= 128: ATen's CPU kernel rounds such outputs differently, so a strip would not be exact."""
    assert resize_plan(1, mask_logits.reshaped_size, (37, 41), 1) == (1, None)
    with upsample_calls() as calls:
        masks = torch.cat(list(segmenter.iter_masks(mask_logits, (37, 41), budget_bytes=1)))
    assert calls.count == 2 * 20
    assert torch.equal(masks, reference_masks(segmenter, mask_logits, (37, 41)))


def test_iter_masks_bad_arguments_are_value_errors(
    segmenter: HQSamSegmenter, mask_logits: MaskLogits
) -> None:
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        next(segmenter.iter_masks(mask_logits, chunk_size=0))
    with pytest.raises(ValueError, match="budget must be >= 1 byte, got 0"):
        next(segmenter.iter_masks(mask_logits, budget_bytes=0))


def test_mask_threshold_is_applied(segmenter: HQSamSegmenter, mask_logits: MaskLogits) -> None:
    low, high = (
        torch.cat(list(with_settings(segmenter, mask_threshold=t).iter_masks(mask_logits)))
        for t in (-float("inf"), float("inf"))
    )
    assert low.all() and not high.any()


# --- save / load ----------------------------------------------------------------------------------


def test_save_and_load_round_trip(
    segmenter: HQSamSegmenter, images: list[np.ndarray], tmp_path: Path
) -> None:
    segmenter.save_pretrained(tmp_path)
    loaded = HQSamSegmenter.from_pretrained(str(tmp_path))
    assert loaded.model is not segmenter.model
    assert loaded.is_hq and type(loaded.model) is type(segmenter.model)
    assert loaded.pad_size == segmenter.pad_size
    boxes = [random_boxes(4, 100, 150), random_boxes(2, 180, 90)]
    before = segmenter.predict_boxes(segmenter.embed(images), boxes)
    after = loaded.predict_boxes(loaded.embed(images), boxes)
    for a, b in zip(after, before, strict=True):
        assert torch.equal(a.logits, b.logits)
        assert torch.equal(a.iou_scores, b.iou_scores)
        assert (a.original_size, a.reshaped_size) == (b.original_size, b.reshaped_size)
