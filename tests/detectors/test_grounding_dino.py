"""Tests for hqlabel.detectors.grounding_dino, on a tiny randomly initialised Grounding DINO (offline)."""

from __future__ import annotations

from pathlib import Path

import huggingface_hub.constants
import numpy as np
import pytest
import torch

from hqlabel.detectors.base import Detections, box_iou
from hqlabel.detectors.grounding_dino import (
    GroundingDinoDetector,
    build_prompt,
    tiny_random_grounding_dino,
    tiny_random_tokenizer,
    token_class_map,
)
from hqlabel.platform.hub import ModelLoadError

CLASSES = ["Cat", "traffic light", "dog"]
SIZES = [(100, 150), (200, 120), (64, 64)]  # (H, W), landscape, portrait and square


@pytest.fixture(scope="module")
def detector() -> GroundingDinoDetector:
    return tiny_random_grounding_dino(seed=0)


@pytest.fixture(scope="module")
def images() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in SIZES]


def with_settings(detector: GroundingDinoDetector, **kwargs) -> GroundingDinoDetector:
    """The same model and processor under other thresholds."""
    settings = dict(box_threshold=0.35, text_threshold=0.25, nms_threshold=0.5, max_detections=100)
    return GroundingDinoDetector(detector.model, detector.processor, **{**settings, **kwargs})


def assert_same_detections(a: list[Detections], b: list[Detections]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x.boxes, y.boxes)
        assert torch.equal(x.scores, y.scores)
        assert torch.equal(x.labels, y.labels)


# --- prompt and token -> class map -------------------------------------------------------------------------


def test_build_prompt_format_and_spans() -> None:
    prompt, spans = build_prompt(CLASSES)
    assert prompt == "cat. traffic light. dog."
    assert len(spans) == len(CLASSES)
    for name, (start, end) in zip(CLASSES, spans, strict=True):
        assert prompt[start:end] == name.lower()
        assert prompt[end] == "."


def test_build_prompt_single_class() -> None:
    assert build_prompt(["a"]) == ("a.", [(0, 1)])


def tokenize(classes: list[str]) -> tuple[str, list[tuple[int, int]], torch.Tensor]:
    prompt, spans = build_prompt(classes)
    encoded = tiny_random_tokenizer()(prompt, return_offsets_mapping=True)
    offsets = [tuple(o) for o in encoded["offset_mapping"]]
    return prompt, offsets, token_class_map(offsets, spans, max_len=64)


def test_token_class_map_assigns_each_class_its_own_tokens() -> None:
    prompt, offsets, positive = tokenize(CLASSES)
    assert positive.shape == (len(CLASSES), 64) and positive.dtype == torch.bool
    assert (positive.sum(1) >= 1).all(), "every class needs at least one token"
    assert (positive.sum(0) <= 1).all(), "a token belongs to at most one class"
    for c, name in enumerate(CLASSES):
        covered = "".join(prompt[s:e] for t, (s, e) in enumerate(offsets) if positive[c, t])
        assert covered == name.lower().replace(" ", "")


def test_token_class_map_leaves_special_and_separator_tokens_out() -> None:
    prompt, offsets, positive = tokenize(CLASSES)
    assert not positive[:, 0].any(), "[CLS]"
    assert not positive[:, len(offsets) - 1].any(), "[SEP]"
    assert not positive[:, len(offsets) :].any(), "padding beyond the prompt"
    for t, (s, e) in enumerate(offsets):
        if prompt[s:e] == ".":
            assert not positive[:, t].any(), f"separator at token {t}"


def test_multi_word_class_spans_both_words() -> None:
    prompt, offsets, positive = tokenize(["traffic light"])
    words = {prompt[s:e] for t, (s, e) in enumerate(offsets) if positive[0, t]}
    assert {"t", "l"} <= words  # first pieces of "traffic" and "light"


# --- detect ---------------------------------------------------------------------------------------


def test_detect_returns_valid_detections_per_image(
    detector: GroundingDinoDetector, images: list[np.ndarray]
) -> None:
    box_threshold = 0.3
    results = with_settings(detector, box_threshold=box_threshold, max_detections=3).detect(images, CLASSES)
    assert len(results) == len(images)
    assert sum(len(r) for r in results) > 0, "nothing to check: the tiny model found no boxes"
    for image, det in zip(images, results, strict=True):
        h, w = image.shape[:2]
        n = len(det)
        assert n <= 3
        assert det.boxes.shape == (n, 4) and det.boxes.dtype == torch.float32
        assert det.scores.shape == (n,) and det.labels.shape == (n,) and det.labels.dtype == torch.int64
        x0, y0, x1, y1 = det.boxes.unbind(-1)
        assert ((x0 >= 0) & (x0 <= x1) & (x1 <= w)).all()
        assert ((y0 >= 0) & (y0 <= y1) & (y1 <= h)).all()
        assert ((det.labels >= 0) & (det.labels < len(CLASSES))).all()
        assert (det.scores > box_threshold).all() and (det.scores <= 1).all()
        assert (det.scores.diff() <= 0).all(), "sorted by decreasing score"


def test_max_detections_keeps_the_top_scoring(
    detector: GroundingDinoDetector, images: list[np.ndarray]
) -> None:
    full = with_settings(detector, max_detections=100).detect(images, CLASSES)
    top = with_settings(detector, max_detections=3).detect(images, CLASSES)
    assert any(len(d) > 3 for d in full), "nothing to check: no image has more than 3 boxes"
    for f, t in zip(full, top, strict=True):
        assert len(t) == min(3, len(f))
        assert torch.equal(t.boxes, f.boxes[:3])
        assert torch.equal(t.scores, f.scores[:3])
        assert torch.equal(t.labels, f.labels[:3])


def test_box_threshold_of_one_gives_no_boxes(
    detector: GroundingDinoDetector, images: list[np.ndarray]
) -> None:
    results = with_settings(detector, box_threshold=1.0).detect(images, CLASSES)
    assert len(results) == len(images)
    assert all(len(d) == 0 for d in results)
    assert all(d.boxes.shape == (0, 4) for d in results)


@pytest.mark.parametrize("nms_threshold", [0.1, 0.5])
def test_no_two_kept_boxes_of_a_label_overlap(
    detector: GroundingDinoDetector, images: list[np.ndarray], nms_threshold: float
) -> None:
    results = with_settings(detector, box_threshold=0.0, nms_threshold=nms_threshold).detect(images, CLASSES)
    for det in results:
        for label in det.labels.unique():
            boxes = det.boxes[det.labels == label]
            iou = box_iou(boxes, boxes).fill_diagonal_(0)
            assert (iou <= nms_threshold).all()


def test_no_images_gives_no_results(detector: GroundingDinoDetector) -> None:
    assert detector.detect([], CLASSES) == []


def greedy_nms(
    boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, threshold: float
) -> list[int]:
    """Reference NMS, one box at a time in plain Python."""
    kept: list[int] = []
    for i in sorted(range(len(scores)), key=lambda i: -float(scores[i])):
        same = [k for k in kept if labels[k] == labels[i]]
        if all(box_iou(boxes[i : i + 1], boxes[k : k + 1]).item() <= threshold for k in same):
            kept.append(i)
    return kept


@pytest.mark.parametrize("text_threshold", [0.25, 0.99])
def test_detect_matches_a_recomputation_by_class(
    detector: GroundingDinoDetector, images: list[np.ndarray], text_threshold: float
) -> None:
    """A box's score for a class is its best score over that class's tokens; a class whose best token is under
    text_threshold is not a candidate. Recomputed here from raw logits, token by token."""
    box_threshold, nms_threshold = 0.3, 0.5
    det = with_settings(
        detector, box_threshold=box_threshold, text_threshold=text_threshold, nms_threshold=nms_threshold
    )
    results = det.detect(images, CLASSES)

    prompt, spans = build_prompt(CLASSES)
    offsets = detector.processor.tokenizer(prompt, return_offsets_mapping=True)["offset_mapping"]
    inputs = detector.processor(images=images, text=[prompt] * len(images), return_tensors="pt")
    with torch.no_grad():
        outputs = detector.model(**inputs)
    probs = outputs.logits.sigmoid()
    for i, (image, got) in enumerate(zip(images, results, strict=True)):
        h, w = image.shape[:2]
        boxes, scores, labels = [], [], []
        for q in range(probs.shape[1]):
            best_score, best_label = 0.0, -1
            for c, (c_start, c_end) in enumerate(spans):
                tokens = [t for t, (s, e) in enumerate(offsets) if e > s and c_start <= s and e <= c_end]
                score = max(float(probs[i, q, t]) for t in tokens)
                if score >= text_threshold and score > best_score:
                    best_score, best_label = score, c
            if best_score > box_threshold:
                cx, cy, bw, bh = outputs.pred_boxes[i, q].tolist()
                box = [(cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h]
                boxes.append([min(max(v, 0), lim) for v, lim in zip(box, [w, h, w, h], strict=True)])
                scores.append(best_score)
                labels.append(best_label)
        expected = greedy_nms(
            torch.tensor(boxes).reshape(-1, 4), torch.tensor(scores), torch.tensor(labels), nms_threshold
        )
        assert got.labels.tolist() == [labels[k] for k in expected]
        torch.testing.assert_close(got.scores, torch.tensor([scores[k] for k in expected]))
        torch.testing.assert_close(got.boxes, torch.tensor([boxes[k] for k in expected]).reshape(-1, 4))


def test_text_threshold_drops_boxes(detector: GroundingDinoDetector, images: list[np.ndarray]) -> None:
    low = with_settings(detector, box_threshold=0.0, text_threshold=0.0).detect(images, CLASSES)
    high = with_settings(detector, box_threshold=0.0, text_threshold=0.9999).detect(images, CLASSES)
    assert sum(map(len, high)) < sum(map(len, low))
    for det in high:
        assert (det.scores >= 0.9999).all()


def test_one_class_name_over_the_text_limit_is_a_value_error(
    detector: GroundingDinoDetector, images: list[np.ndarray]
) -> None:
    """A prompt over the limit is split into passes (tests/detectors/test_synonyms.py); one name alone
    over it cannot be."""
    with pytest.raises(ValueError, match="limit of 64"):
        detector.detect(images[:1], ["cat", "a rather long class name " * 4])


def test_class_without_tokens_is_a_value_error(
    detector: GroundingDinoDetector, images: list[np.ndarray]
) -> None:
    with pytest.raises(ValueError, match="no tokens"):
        detector.detect(images[:1], ["cat", ""])


# --- save / load ----------------------------------------------------------------------------------


def test_save_and_load_round_trip(
    detector: GroundingDinoDetector, images: list[np.ndarray], tmp_path: Path
) -> None:
    original = with_settings(detector, box_threshold=0.2)
    original.save_pretrained(tmp_path)
    loaded = GroundingDinoDetector.from_pretrained(str(tmp_path), box_threshold=0.2)
    assert loaded.model is not detector.model
    before = original.detect(images, CLASSES)
    assert sum(map(len, before)) > 0
    assert_same_detections(loaded.detect(images, CLASSES), before)


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    # huggingface_hub reads HF_HUB_OFFLINE once, at import: set the variable and the constant it became
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.mark.usefixtures("offline")
def test_missing_hub_model_offline_names_model_and_option() -> None:
    name = "hqlabel-tests/no-such-detector"
    with pytest.raises(ModelLoadError, match="--detector") as info:
        GroundingDinoDetector.from_pretrained(name)
    assert name in str(info.value)
    assert "hub" in str(info.value)
    assert isinstance(info.value.__cause__, OSError | ValueError)


@pytest.mark.usefixtures("offline")
def test_missing_local_path_names_model_and_option(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope")
    with pytest.raises(ModelLoadError, match="--detector") as info:
        GroundingDinoDetector.from_pretrained(missing)
    assert missing in str(info.value)


@pytest.mark.usefixtures("offline")
def test_directory_without_a_model_says_so(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not hold a complete model") as info:
        GroundingDinoDetector.from_pretrained(str(tmp_path))
    assert str(tmp_path) in str(info.value)
    assert "detector" in str(info.value)
