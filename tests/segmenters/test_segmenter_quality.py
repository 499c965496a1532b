"""Mask quality signals from the segmenter: SAM's own logits from the HQ decoder call, stability and HQ-vs-SAM
IoU gathered while ``iter_masks`` resizes (tiny random HQ-SAM / SAM, offline)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hqlabel.segmenters.hq_sam import HQSamSegmenter, tiny_random_sam, tiny_random_sam_hq
from hqlabel.segmenters.quality import mask_iou
from hqlabel.segmenters.structures import MaskLogits, Prompts


@pytest.fixture(scope="module")
def segmenter() -> HQSamSegmenter:
    return tiny_random_sam_hq(seed=0)


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (100, 150, 3), dtype=np.uint8)


BOXES = torch.tensor([[10.0, 10.0, 80.0, 60.0], [50.0, 20.0, 140.0, 95.0], [0.0, 0.0, 150.0, 100.0]])


def with_settings(segmenter: HQSamSegmenter, **kwargs) -> HQSamSegmenter:
    return HQSamSegmenter(segmenter.model, segmenter.processor, **kwargs)


def direct_hq_logits(seg: HQSamSegmenter, image: np.ndarray, multimask: bool) -> torch.Tensor:
    """The HQ token's logits straight from transformers (``hq_token_only=True``): n x 1 x h x w."""
    embeddings = seg.embed([image])
    h, w = embeddings.original_sizes[0]
    rh, rw = embeddings.reshaped_sizes[0]
    boxes = BOXES * torch.tensor([rw / w, rh / h] * 2)
    with torch.inference_mode():
        out = seg.model(
            image_embeddings=embeddings.image_embeddings,
            intermediate_embeddings=embeddings.intermediate_embeddings,
            input_boxes=boxes[None],
            multimask_output=multimask,
            hq_token_only=True,
        )
    return out.pred_masks[0]


@pytest.mark.parametrize("multimask", ["off", "best", "all"])
def test_sam_logits_are_the_model_output_without_the_hq_token(segmenter, image, multimask) -> None:
    seg = with_settings(segmenter, multimask=multimask)
    logits = seg.predict_boxes(seg.embed([image]), [BOXES])[0]
    k = 3 if multimask == "all" else 1
    assert logits.logits.shape == logits.sam_logits.shape == (3, k, 64, 64)
    hq = direct_hq_logits(seg, image, multimask != "off")
    torch.testing.assert_close(logits.logits - logits.sam_logits, hq.expand_as(logits.logits))
    assert not torch.allclose(logits.sam_logits, logits.logits)

    # hq_token_only: the masks are the HQ token's (as transformers returns them), SAM's mask the first one
    only = with_settings(segmenter, multimask=multimask, hq_token_only=True)
    hq_only = only.predict_boxes(only.embed([image]), [BOXES])[0]
    torch.testing.assert_close(hq_only.logits, hq)
    torch.testing.assert_close(hq_only.sam_logits, logits.sam_logits[:, :1])
    embeddings = only.embed([image])
    with torch.inference_mode():  # training's path: no capture, HQ alone from transformers as before
        plain, _ = only.decode_logits(embeddings, Prompts(boxes=BOXES))
    torch.testing.assert_close(plain, hq, atol=1e-5, rtol=1e-5)


def test_plain_sam_has_no_sam_logits_and_agrees_with_itself(image) -> None:
    seg = tiny_random_sam(seed=0)
    logits = seg.predict_boxes(seg.embed([image]), [BOXES])[0]
    assert logits.sam_logits is None
    signals = seg.quality_signals(logits)
    list(seg.iter_masks(logits, (200, 300), signals=signals))
    stability, agreement = signals.result()
    assert agreement.tolist() == [[1.0]] * 3 and stability.shape == (3, 1)


def counts(seg: HQSamSegmenter, logits: MaskLogits, size, threshold: float) -> torch.Tensor:
    masks = torch.cat(list(with_settings(seg, mask_threshold=threshold).iter_masks(logits, size)))
    return masks.sum((-2, -1)).double()


@pytest.mark.parametrize("budget", [256 * 2**20, 1])  # one chunk; one prompt a chunk, final resize in strips
def test_stability_is_the_iou_of_the_masks_at_plus_and_minus_one(segmenter, image, budget) -> None:
    logits = segmenter.predict_boxes(segmenter.embed([image]), [BOXES])[0]
    spread = 3 / logits.logits.std()  # random logits are ~0: spread them over a few units
    logits = dataclasses.replace(logits, logits=(logits.logits - logits.logits.mean()) * spread)
    size = (200, 300)
    signals = segmenter.quality_signals(logits)
    masks = torch.cat(list(segmenter.iter_masks(logits, size, budget_bytes=budget, signals=signals)))
    stability, _ = signals.result()
    expected = counts(segmenter, logits, size, 1.0) / counts(segmenter, logits, size, -1.0)
    assert float(stability.min()) > 0 and float(stability.max()) < 1
    torch.testing.assert_close(stability.double(), expected)
    assert torch.equal(masks, torch.cat(list(segmenter.iter_masks(logits, size))))  # masks unchanged


def test_hq_sam_iou_is_computed_at_the_input_resolution(segmenter, image) -> None:
    logits = segmenter.predict_boxes(segmenter.embed([image]), [BOXES])[0]
    mean, spread = logits.logits.mean(), 3 / logits.logits.std()
    logits = dataclasses.replace(
        logits, logits=(logits.logits - mean) * spread, sam_logits=(logits.sam_logits - mean) * spread
    )
    signals = segmenter.quality_signals(logits)
    list(segmenter.iter_masks(logits, (1000, 1500), signals=signals))
    _, agreement = signals.result()
    (rh, rw), pad = logits.reshaped_size, segmenter.pad_size

    def frame(x: torch.Tensor) -> torch.Tensor:  # SAM's padded resize, cropped to the image
        return F.interpolate(x, pad, mode="bilinear", align_corners=False)[..., :rh, :rw] > 0

    expected = mask_iou(frame(logits.logits), frame(logits.sam_logits))
    assert float(expected.min()) > 0 and float(expected.max()) < 1
    torch.testing.assert_close(agreement, expected, atol=2e-3, rtol=0)


def test_mask_iou_counts_pixels() -> None:
    a = torch.zeros(2, 1, 4, 4, dtype=torch.bool)
    b = a.clone()
    a[0, 0, :2] = True  # 8 pixels
    b[0, 0, 1:3] = True  # 8 pixels, 4 shared
    assert mask_iou(a, b)[:, 0].tolist() == pytest.approx([4 / 12, 1.0])  # two empty masks agree
