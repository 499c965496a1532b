"""Tests for the MM-Grounding-DINO detector (hqlabel.detectors.grounding_dino.MMGroundingDinoDetector), on a
tiny randomly initialised MM-Grounding-DINO (offline): parity with transformers' own post-processing, the
builder's choice by model_type, the tiny-random family."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from hqlabel.detectors import (
    MMGroundingDinoDetector,
    build_detector,
    detector_type,
    tiny_random_mm_grounding_dino,
)
from hqlabel.detectors.grounding_dino import build_prompt, token_class_map

CLASSES = ["Cat", "traffic light", "dog"]
SIZES = [(100, 150), (200, 120), (64, 64)]  # (H, W)
NO_NMS = dict(box_threshold=0.0, text_threshold=0.0, nms_threshold=1.0, max_detections=10_000)


@pytest.fixture(scope="module")
def detector() -> MMGroundingDinoDetector:
    return tiny_random_mm_grounding_dino(seed=0)


@pytest.fixture(scope="module")
def images() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in SIZES]


def as_rows(scores: torch.Tensor, labels: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """N x 6 (score, label, x0, y0, x1, y1), sorted row by row."""
    rows = torch.cat([scores[:, None], labels[:, None].float(), boxes], 1).reshape(-1, 6)
    return torch.tensor(sorted(rows.tolist()), dtype=torch.float32).reshape(-1, 6)


def test_the_tiny_model_is_mm_grounding_dino(detector: MMGroundingDinoDetector) -> None:
    from transformers import MMGroundingDinoForObjectDetection

    assert isinstance(detector.model, MMGroundingDinoForObjectDetection)
    assert detector.model.config.model_type == "mm-grounding-dino"
    assert detector.model.config.decoder_layers >= 2


@pytest.mark.parametrize("box_threshold", [0.0, 0.02])
def test_detect_matches_transformers_post_processing_per_class(
    detector: MMGroundingDinoDetector, images: list[np.ndarray], box_threshold: float
) -> None:
    """transformers' ``post_process_grounded_object_detection`` run once per class, on the logits of that
    class's prompt tokens alone (the others at -inf), gives each query's score for that class and decodes the
    class's name back from its tokens. Our detection of a query is the best of those classes with its score,
    the reference's box clipped to the image (NMS off)."""
    prompt, spans = build_prompt(CLASSES)
    encoded = detector.processor.tokenizer(prompt, return_offsets_mapping=True)
    positive = token_class_map(encoded["offset_mapping"], spans, detector.model.config.max_text_len)
    inputs = detector.processor(
        images=images, text=[prompt] * len(images), return_tensors="pt", input_data_format="channels_last"
    )
    with torch.no_grad():
        outputs = detector.model(**inputs)
    sizes = [im.shape[:2] for im in images]
    per_class = []
    for c, name in enumerate(CLASSES):
        masked = type(outputs)(
            **{**outputs, "logits": outputs.logits.masked_fill(~positive[c], float("-inf"))}
        )
        ref = detector.processor.post_process_grounded_object_detection(
            masked, threshold=0.0, text_threshold=0.0, target_sizes=sizes
        )
        for r in ref:  # every query is kept, in query order; its text label is this class's name
            assert len(r["scores"]) == outputs.logits.shape[1]
            assert set(r["text_labels"]) == {name.lower()}
        per_class.append(ref)

    got = MMGroundingDinoDetector(
        detector.model, detector.processor, **{**NO_NMS, "box_threshold": box_threshold}
    ).detect(images, CLASSES)
    checked = 0
    for i, ((h, w), ours) in enumerate(zip(sizes, got, strict=True)):
        scores = torch.stack([per_class[c][i]["scores"] for c in range(len(CLASSES))], -1)  # Q x C
        best, labels = scores.max(-1)
        boxes = per_class[0][i]["boxes"].clone()
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
        keep = best > box_threshold
        assert len(ours) == int(keep.sum())
        torch.testing.assert_close(
            as_rows(ours.scores, ours.labels, ours.boxes), as_rows(best[keep], labels[keep], boxes[keep])
        )
        checked += len(ours)
    assert checked > 0, "nothing to compare: the tiny model found no boxes"
    assert len({int(k) for d in got for k in d.labels}) > 1, "nothing to check: one class only"


def test_build_detector_picks_mm_grounding_dino_from_its_config(
    detector: MMGroundingDinoDetector, images: list[np.ndarray], tmp_path: Path
) -> None:
    detector.save_pretrained(tmp_path)
    assert detector_type(str(tmp_path)) == "mm-grounding-dino"
    loaded = build_detector(str(tmp_path), **NO_NMS)
    assert type(loaded) is MMGroundingDinoDetector and loaded.model is not detector.model
    before = MMGroundingDinoDetector(detector.model, detector.processor, **NO_NMS).detect(images, CLASSES)
    after = loaded.detect(images, CLASSES)
    for x, y in zip(before, after, strict=True):
        assert torch.equal(x.boxes, y.boxes) and torch.equal(x.scores, y.scores)
        assert torch.equal(x.labels, y.labels)


def test_tiny_random_preset_builds_mm_grounding_dino() -> None:
    assert type(build_detector("mm-grounding-dino", preset="tiny-random")) is MMGroundingDinoDetector
