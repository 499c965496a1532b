"""Point, box and mask prompts, multimask modes and plain SAM: parity with a one-shot ``transformers`` call.

Tiny random models (offline). Their logits are small, so tolerances are relative to the output's scale.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import SamModel

from hqlabel.segmenters.hq_sam import (
    HQSamSegmenter,
    ImageEmbeddings,
    MaskLogits,
    Prompts,
    tiny_random_sam,
    tiny_random_sam_hq,
)

SIZE = (100, 150)  # H, W of the prompted image; the embedded batch also holds a portrait image
LOW_RES = 64  # 4 x the 16 x 16 embedding grid of the tiny models


@pytest.fixture(scope="module")
def hq() -> HQSamSegmenter:
    return tiny_random_sam_hq(seed=0)


@pytest.fixture(scope="module")
def sam() -> HQSamSegmenter:
    return tiny_random_sam(seed=0)


@pytest.fixture(scope="module")
def images() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (*size, 3), dtype=np.uint8) for size in [SIZE, (180, 90)]]


@pytest.fixture(scope="module")
def hq_embeddings(hq: HQSamSegmenter, images: list[np.ndarray]) -> ImageEmbeddings:
    return hq.embed(images)


def with_settings(segmenter: HQSamSegmenter, **kwargs) -> HQSamSegmenter:
    return HQSamSegmenter(segmenter.model, segmenter.processor, **kwargs)


def random_boxes(n: int, seed: int = 0) -> torch.Tensor:
    """n x 4 XYXY pixel boxes inside the SIZE image, at least 4 pixels a side."""
    h, w = SIZE
    generator = torch.Generator().manual_seed(seed)
    x = (torch.rand(n, 2, generator=generator) * (w - 4)).sort(-1).values
    y = (torch.rand(n, 2, generator=generator) * (h - 4)).sort(-1).values
    return torch.stack([x[:, 0], y[:, 0], x[:, 1] + 4, y[:, 1] + 4], -1)


def random_points(n: int, p: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """n x p x 2 XY pixel points inside the SIZE image and n x p labels, positive and negative."""
    h, w = SIZE
    generator = torch.Generator().manual_seed(seed)
    points = torch.rand(n, p, 2, generator=generator) * torch.tensor([w - 1.0, h - 1.0])
    labels = torch.randint(0, 2, (n, p), generator=generator)
    labels[:, 0] = 1  # every object has a positive click ...
    labels[:, -1] = 0  # ... and a negative one
    return points, labels


def assert_close_to_scale(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-4) -> None:
    """|actual - expected| <= rel * max|expected|: random-weight logits are tiny (no absolute tolerance)."""
    scale = expected.abs().max()
    assert scale > 0
    assert actual.shape == expected.shape
    assert (actual - expected).abs().max() <= rel * scale


def predict(segmenter: HQSamSegmenter, embeddings: ImageEmbeddings, prompts: Prompts) -> MaskLogits:
    """Decode ``prompts`` on the first embedded image (the SIZE one); the other image has no objects."""
    return segmenter.predict(embeddings, [prompts] + [None] * (len(embeddings) - 1))[0]


def reference(
    segmenter: HQSamSegmenter,
    image: np.ndarray,
    *,
    boxes: torch.Tensor | None = None,
    points: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    masks: torch.Tensor | None = None,
    multimask_output: bool = False,
    hq_token_only: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers end to end on one image: (N x K x h x w logits, N x K IoU)."""
    prompts = {}
    if boxes is not None:
        prompts["input_boxes"] = [boxes.tolist()]
    if points is not None:
        prompts["input_points"] = [points.tolist()]
        prompts["input_labels"] = [labels.tolist()]
    inputs = segmenter.processor(images=[image], return_tensors="pt", **prompts)
    extra = {"hq_token_only": hq_token_only} if segmenter.is_hq else {}
    with torch.no_grad():
        out = segmenter.model(**inputs, input_masks=masks, multimask_output=multimask_output, **extra)
    return out.pred_masks[0], out.iou_scores[0]


# --- points and boxes -----------------------------------------------------------------------------


def test_positive_and_negative_points_match_transformers(
    hq: HQSamSegmenter, images: list[np.ndarray], hq_embeddings: ImageEmbeddings
) -> None:
    points, labels = random_points(3, 4)
    got = predict(hq, hq_embeddings, Prompts(points=points, point_labels=labels))
    expected_logits, expected_iou = reference(hq, images[0], points=points, labels=labels)
    assert got.logits.shape == (3, 1, LOW_RES, LOW_RES)
    assert_close_to_scale(got.logits, expected_logits)
    assert_close_to_scale(got.iou_scores, expected_iou)
    flipped = predict(hq, hq_embeddings, Prompts(points=points, point_labels=1 - labels)).logits
    assert (flipped - got.logits).abs().max() > 0.01 * got.logits.abs().max(), "labels changed nothing"


def test_points_default_to_foreground(hq: HQSamSegmenter, hq_embeddings: ImageEmbeddings) -> None:
    points, _ = random_points(2, 3)
    implicit = predict(hq, hq_embeddings, Prompts(points=points))
    explicit = predict(hq, hq_embeddings, Prompts(points=points, point_labels=torch.ones(2, 3)))
    assert torch.equal(implicit.logits, explicit.logits)


@pytest.mark.parametrize("multimask", ["off", "best", "all"])
@pytest.mark.parametrize("hq_token_only", [False, True])
def test_boxes_with_points_match_transformers_in_every_mode(
    hq: HQSamSegmenter,
    images: list[np.ndarray],
    hq_embeddings: ImageEmbeddings,
    multimask: str,
    hq_token_only: bool,
) -> None:
    boxes, (points, labels) = random_boxes(4, seed=1), random_points(4, 2, seed=1)
    seg = with_settings(hq, multimask=multimask, hq_token_only=hq_token_only)
    got = predict(seg, hq_embeddings, Prompts(boxes=boxes, points=points, point_labels=labels))
    expected_logits, expected_iou = reference(
        hq,
        images[0],
        boxes=boxes,
        points=points,
        labels=labels,
        multimask_output=multimask != "off",
        hq_token_only=hq_token_only,
    )
    # transformers: SAM's 3 masks sorted by IoU, each + HQ; with hq_token_only the HQ mask alone (and 3 IoUs)
    k = 3 if multimask == "all" and not hq_token_only else 1
    assert got.logits.shape == (4, k, LOW_RES, LOW_RES) and got.iou_scores.shape == (4, k)
    assert_close_to_scale(got.logits, expected_logits[:, :k])
    assert_close_to_scale(got.iou_scores, expected_iou[:, :k])
    if multimask != "off":  # the first (= kept) IoU is the best of the three
        assert torch.equal(expected_iou[:, 0], expected_iou.max(-1).values)


def test_multimask_best_is_the_highest_iou_mask_of_all(
    hq: HQSamSegmenter, hq_embeddings: ImageEmbeddings
) -> None:
    """ "best" (the SysCV release) keeps, per object, the mask of "all" with the highest predicted IoU."""
    prompts = Prompts(boxes=random_boxes(6, seed=2))
    best = predict(with_settings(hq, multimask="best"), hq_embeddings, prompts)
    every = predict(with_settings(hq, multimask="all"), hq_embeddings, prompts)
    off = predict(hq, hq_embeddings, prompts)
    assert every.logits.shape == (6, 3, LOW_RES, LOW_RES)
    assert (every.iou_scores[:, 0] > every.iou_scores[:, 1:].max(-1).values).all(), "need distinct IoUs"
    assert torch.equal(best.iou_scores[:, 0], every.iou_scores.max(-1).values)
    assert torch.equal(best.logits[:, 0], every.logits[:, 0])
    scale = every.logits.abs().max()
    assert (every.logits[:, 0] - every.logits[:, 1]).abs().max() > 0.01 * scale, "the 3 masks should differ"
    assert (best.logits - off.logits).abs().max() > 0.01 * scale, "best of 3 equals the single-mask token"


# --- mask prompts ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def previous(hq: HQSamSegmenter, hq_embeddings: ImageEmbeddings) -> tuple[torch.Tensor, MaskLogits]:
    """Five boxes and a first pass over them."""
    boxes = random_boxes(5, seed=3)
    return boxes, predict(hq, hq_embeddings, Prompts(boxes=boxes))


@pytest.mark.parametrize("with_boxes", [True, False])
def test_previous_mask_prompt_matches_transformers_one_object_at_a_time(
    hq: HQSamSegmenter,
    images: list[np.ndarray],
    hq_embeddings: ImageEmbeddings,
    previous: tuple[torch.Tensor, MaskLogits],
    with_boxes: bool,
) -> None:
    """The batched path (image embedding expanded to a batch of n, one dense prompt each) equals decoding
    each object alone. transformers' SamHQMaskEmbedding starts with Conv2d(1, ...), so ``input_masks`` is
    batch x 1 x h x w (its docstring's batch x h x w fails), one mask per image of the batch."""
    boxes, first = previous
    masks = first.logits[:, 0]
    got = predict(hq, hq_embeddings, Prompts(boxes=boxes if with_boxes else None, masks=masks))
    assert got.logits.shape == (5, 1, LOW_RES, LOW_RES)
    for i in range(5):
        expected_logits, expected_iou = reference(
            hq, images[0], boxes=boxes[i : i + 1] if with_boxes else None, masks=masks[i][None, None]
        )
        assert_close_to_scale(got.logits[i], expected_logits[0])
        assert_close_to_scale(got.iou_scores[i], expected_iou[0])
    if with_boxes:
        assert (got.logits - first.logits).abs().max() > 0.01 * first.logits.abs().max(), "mask ignored"


def test_mask_prompts_with_points_and_multimask_match_transformers(
    hq: HQSamSegmenter,
    images: list[np.ndarray],
    hq_embeddings: ImageEmbeddings,
    previous: tuple[torch.Tensor, MaskLogits],
) -> None:
    _, first = previous
    points, labels = random_points(5, 2, seed=4)
    seg = with_settings(hq, multimask="all")
    got = predict(seg, hq_embeddings, Prompts(points=points, point_labels=labels, masks=first.logits[:, 0]))
    for i in range(5):
        expected_logits, expected_iou = reference(
            hq,
            images[0],
            points=points[i : i + 1],
            labels=labels[i : i + 1],
            masks=first.logits[i, :1][None],
            multimask_output=True,
        )
        assert_close_to_scale(got.logits[i], expected_logits[0])
        assert_close_to_scale(got.iou_scores[i], expected_iou[0])


def test_chunking_with_mask_prompts_does_not_change_the_result(
    hq: HQSamSegmenter, hq_embeddings: ImageEmbeddings, previous: tuple[torch.Tensor, MaskLogits]
) -> None:
    boxes, first = previous
    prompts = Prompts(boxes=boxes, masks=first.logits[:, 0])
    small = predict(with_settings(hq, chunk_size=2), hq_embeddings, prompts)
    large = predict(with_settings(hq, chunk_size=64), hq_embeddings, prompts)
    assert_close_to_scale(small.logits, large.logits, rel=1e-5)
    assert_close_to_scale(small.iou_scores, large.iou_scores, rel=1e-5)


def test_mask_prompt_of_the_wrong_resolution_is_refused(
    hq: HQSamSegmenter, hq_embeddings: ImageEmbeddings
) -> None:
    with pytest.raises(ValueError, match=f"{LOW_RES} x {LOW_RES}"):
        predict(hq, hq_embeddings, Prompts(masks=torch.zeros(2, 32, 32)))


# --- padding points -------------------------------------------------------------------------------


def test_padding_points_are_ignored(hq: HQSamSegmenter, hq_embeddings: ImageEmbeddings) -> None:
    """A -10 point changes nothing, wherever it sits and however many the other objects have (transformers
    zeroes a -10 point's embedding but its decoder still attends to it, so the segmenter drops them)."""
    points, labels = random_points(3, 3, seed=5)
    pad_point, pad_label = torch.tensor([[7.0, 9.0]]), torch.tensor([-10])
    padded_points = torch.stack(
        [
            torch.cat([points[0], pad_point]),  # padding last
            torch.cat([points[1, :1], pad_point, points[1, 1:]]),  # padding in between
            torch.cat([points[2, :2], pad_point, pad_point]),  # two paddings: 2 real points
        ]
    )
    padded_labels = torch.stack(
        [
            torch.cat([labels[0], pad_label]),
            torch.cat([labels[1, :1], pad_label, labels[1, 1:]]),
            torch.cat([labels[2, :2], pad_label, pad_label]),
        ]
    )
    for boxes in (None, random_boxes(3, seed=5)):
        padded = predict(hq, hq_embeddings, Prompts(boxes, padded_points, padded_labels))
        plain = predict(hq, hq_embeddings, Prompts(boxes, points, labels))
        assert_close_to_scale(padded.logits[:2], plain.logits[:2], rel=1e-5)
        assert_close_to_scale(padded.iou_scores[:2], plain.iou_scores[:2], rel=1e-5)
        alone = predict(
            hq, hq_embeddings, Prompts(boxes if boxes is None else boxes[2:], points[2:, :2], labels[2:, :2])
        )
        assert_close_to_scale(padded.logits[2:], alone.logits, rel=1e-5)
        assert_close_to_scale(padded.iou_scores[2:], alone.iou_scores, rel=1e-5)


# --- validation -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "needs boxes, points or masks"),
        ({"point_labels": torch.ones(2, 3)}, "needs boxes, points or masks"),
        ({"boxes": torch.zeros(2, 5)}, "N x 4"),
        ({"boxes": torch.zeros(4, 3)}, "N x 4"),  # 12 numbers are not 3 boxes
        ({"points": torch.zeros(2, 2)}, "N x P x 2"),
        ({"points": torch.zeros(2, 3, 3)}, "N x P x 2"),
        ({"points": torch.zeros(2, 3, 2), "point_labels": torch.ones(2, 2)}, "point_labels must be N x P"),
        ({"boxes": torch.zeros(2, 4), "point_labels": torch.ones(2, 3)}, "without points"),
        ({"masks": torch.zeros(2, 1, 64, 64)}, "N x h x w"),
        ({"boxes": torch.zeros(3, 4), "points": torch.zeros(2, 1, 2)}, "same objects"),
        ({"boxes": torch.zeros(2, 4), "masks": torch.zeros(3, 64, 64)}, "same objects"),
    ],
)
def test_bad_prompts_are_value_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Prompts(**kwargs)


# --- plain SAM ------------------------------------------------------------------------------------


@pytest.mark.parametrize("multimask", ["off", "best", "all"])
def test_plain_sam_boxes_match_transformers(
    sam: HQSamSegmenter, images: list[np.ndarray], multimask: str
) -> None:
    boxes = random_boxes(5, seed=6)
    seg = with_settings(sam, multimask=multimask)
    got = predict(seg, seg.embed(images), Prompts(boxes=boxes))
    expected_logits, expected_iou = reference(
        sam, images[0], boxes=boxes, multimask_output=multimask != "off"
    )
    if multimask == "best":  # SAM's three masks come unsorted: keep the highest IoU's
        best = expected_iou.argmax(-1)
        assert best.unique().numel() > 1 or (best != 0).any(), "the argmax should matter for some box"
        expected_logits = expected_logits[torch.arange(5), best][:, None]
        expected_iou = expected_iou.max(-1, keepdim=True).values
    k = 3 if multimask == "all" else 1
    assert got.logits.shape == (5, k, LOW_RES, LOW_RES)
    assert_close_to_scale(got.logits, expected_logits)
    assert_close_to_scale(got.iou_scores, expected_iou)


def test_plain_sam_embeddings_are_not_hq(
    sam: HQSamSegmenter, hq: HQSamSegmenter, images: list[np.ndarray], hq_embeddings: ImageEmbeddings
) -> None:
    assert not sam.is_hq and hq.is_hq
    embeddings = sam.embed(images)
    assert embeddings.hq is False and embeddings.intermediate_embeddings == []
    assert len(embeddings[1]) == 1 and embeddings[1].hq is False
    with pytest.raises(ValueError, match="different model type"):
        hq.predict_boxes(embeddings, [random_boxes(1), random_boxes(1)])
    with pytest.raises(ValueError, match="different model type"):
        sam.predict_boxes(hq_embeddings, [random_boxes(1), random_boxes(1)])


def test_plain_sam_refuses_hq_token_only(sam: HQSamSegmenter) -> None:
    with pytest.raises(ValueError, match="hq_token_only"):
        with_settings(sam, hq_token_only=True)


def test_plain_sam_save_and_load_round_trip(
    sam: HQSamSegmenter, images: list[np.ndarray], tmp_path: Path
) -> None:
    sam.save_pretrained(tmp_path)
    loaded = HQSamSegmenter.from_pretrained(str(tmp_path), multimask="all")
    assert type(loaded.model) is SamModel and not loaded.is_hq
    assert loaded.pad_size == sam.pad_size
    prompts = Prompts(boxes=random_boxes(4, seed=7))
    before = predict(with_settings(sam, multimask="all"), sam.embed(images), prompts)
    after = predict(loaded, loaded.embed(images), prompts)
    assert torch.equal(after.logits, before.logits)
    assert torch.equal(after.iou_scores, before.iou_scores)
