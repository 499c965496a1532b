"""Tests for hqlabel.detectors.owlv2 and the detector builder, on a tiny randomly initialised OWLv2
(offline): parity with transformers' own post-processing, thresholds, NMS, save / load."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from hqlabel.detectors import (
    GroundingDinoDetector,
    Owlv2Detector,
    build_detector,
    detector_type,
    tiny_random_grounding_dino,
)
from hqlabel.detectors.base import box_iou
from hqlabel.detectors.owlv2 import tiny_random_owlv2
from hqlabel.platform.config import DEFAULT_DETECTOR

CLASSES = ["Cat", "traffic light", "dog"]
SIZES = [(100, 150), (200, 120), (64, 64)]  # (H, W): landscape and portrait (padded to a square), square
NO_NMS = dict(box_threshold=0.0, text_threshold=0.0, nms_threshold=1.0, max_detections=10_000)


@pytest.fixture(scope="module")
def detector() -> Owlv2Detector:
    return tiny_random_owlv2(seed=0)


@pytest.fixture(scope="module")
def images() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in SIZES]


def with_settings(detector: Owlv2Detector, **kwargs) -> Owlv2Detector:
    """The same model and processor under other thresholds."""
    return Owlv2Detector(detector.model, detector.processor, **kwargs)


def reference(detector: Owlv2Detector, images: list[np.ndarray], threshold: float) -> list[dict]:
    """transformers' own path: the processor on nested text queries, the model, then
    ``post_process_grounded_object_detection`` with the images' (H, W) as target sizes."""
    inputs = detector.processor(
        images=images, text=[CLASSES] * len(images), return_tensors="pt", input_data_format="channels_last"
    )
    with torch.no_grad():
        outputs = detector.model(**inputs)
    return detector.processor.post_process_grounded_object_detection(
        outputs,
        threshold=threshold,
        target_sizes=[im.shape[:2] for im in images],
        text_labels=[CLASSES] * len(images),
    )


def as_rows(scores: torch.Tensor, labels: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """N x 6 (score, label, x0, y0, x1, y1), sorted row by row."""
    rows = torch.cat([scores[:, None], labels[:, None].float(), boxes], 1).reshape(-1, 6)
    return torch.tensor(sorted(rows.tolist()), dtype=torch.float32).reshape(-1, 6)


@pytest.mark.parametrize("threshold", [0.0, 0.3])
def test_detect_matches_transformers_post_processing(
    detector: Owlv2Detector, images: list[np.ndarray], threshold: float
) -> None:
    """With NMS off, every reference box is ours, with its score and class: boxes scaled by max(H, W) (the
    padded square) and then clipped to the image; boxes wholly in the padding (no area left) dropped."""
    got = with_settings(detector, **{**NO_NMS, "box_threshold": threshold}).detect(images, CLASSES)
    expected = reference(detector, images, threshold)
    checked = 0
    for image, ours, ref in zip(images, got, expected, strict=True):
        h, w = image.shape[:2]
        boxes = ref["boxes"].clone()
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
        inside = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        names = [name for name, k in zip(ref["text_labels"], inside.tolist(), strict=True) if k]
        assert [CLASSES[k] for k in ref["labels"][inside]] == names
        assert (ours.scores.diff() <= 0).all(), "sorted by decreasing score"
        # the order among equal scores is not defined: compare as sorted (score, label, box) rows
        torch.testing.assert_close(
            as_rows(ours.scores, ours.labels, ours.boxes),
            as_rows(ref["scores"][inside], ref["labels"][inside], boxes[inside]),
        )
        checked += len(ours)
    assert checked > 0, "nothing to compare: the tiny model found no boxes"


def test_padding_case_is_exercised(detector: Owlv2Detector, images: list[np.ndarray]) -> None:
    """The non-square images have reference boxes that reach past the image into the padding, and boxes that
    the square's scale (not the image's own width / height) puts where they are."""
    ref = reference(detector, images[:2], 0.0)
    reach = [
        (r["boxes"][:, 2] > im.shape[1]) | (r["boxes"][:, 3] > im.shape[0])
        for im, r in zip(images, ref, strict=False)
    ]
    assert any(bool(x.any()) for x in reach)
    got = with_settings(detector, **NO_NMS).detect(images[:2], CLASSES)
    for image, det in zip(images[:2], got, strict=True):
        h, w = image.shape[:2]
        x0, y0, x1, y1 = det.boxes.unbind(-1)
        assert ((x0 >= 0) & (x0 < x1) & (x1 <= w)).all()
        assert ((y0 >= 0) & (y0 < y1) & (y1 <= h)).all()


def test_labels_are_class_indices_one_query_per_class(
    detector: Owlv2Detector, images: list[np.ndarray]
) -> None:
    """Query c is classes[c]: reversing the class list reverses the labels, boxes and scores unchanged."""
    forward = with_settings(detector, **NO_NMS).detect(images, CLASSES)
    backward = with_settings(detector, **NO_NMS).detect(images, CLASSES[::-1])
    for f, b in zip(forward, backward, strict=True):
        torch.testing.assert_close(b.scores, f.scores)
        torch.testing.assert_close(b.boxes, f.boxes)
        assert (b.labels == len(CLASSES) - 1 - f.labels).all()
    assert len({int(k) for d in forward for k in d.labels}) > 1, "nothing to check: one class only"


def test_thresholds_nms_and_max_detections(detector: Owlv2Detector, images: list[np.ndarray]) -> None:
    nms = 0.3
    full = with_settings(detector, box_threshold=0.0, nms_threshold=nms).detect(images, CLASSES)
    top = with_settings(detector, box_threshold=0.0, nms_threshold=nms, max_detections=2).detect(
        images, CLASSES
    )
    assert any(len(d) > 2 for d in full), "nothing to check: no image has more than 2 boxes"
    for f, t in zip(full, top, strict=True):
        assert torch.equal(t.boxes, f.boxes[:2]) and torch.equal(t.labels, f.labels[:2])
        assert (f.scores.diff() <= 0).all()
        for label in f.labels.unique():
            boxes = f.boxes[f.labels == label]
            assert (box_iou(boxes, boxes).fill_diagonal_(0) <= nms).all()
    assert all(len(d) == 0 for d in with_settings(detector, box_threshold=1.0).detect(images, CLASSES))
    high = with_settings(detector, box_threshold=0.0, text_threshold=0.9).detect(images, CLASSES)
    assert all((d.scores >= 0.9).all() for d in high)


def test_class_name_over_the_text_limit_is_a_value_error(
    detector: Owlv2Detector, images: list[np.ndarray]
) -> None:
    with pytest.raises(ValueError, match="limit of 16 tokens"):
        detector.detect(images[:1], ["cat", "a very long class name indeed"])


def test_torch_preprocess_is_refused(detector: Owlv2Detector) -> None:
    with pytest.raises(ValueError, match="--preprocess auto or processor"):
        with_settings(detector, preprocess="torch")


def test_save_and_load_round_trip_through_build_detector(
    detector: Owlv2Detector, images: list[np.ndarray], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The job's loading path: the config's model_type picks the wrapper, from_pretrained loads it offline."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    detector.save_pretrained(tmp_path)
    assert detector_type(str(tmp_path)) == "owlv2"
    loaded = build_detector(str(tmp_path), **NO_NMS)
    assert isinstance(loaded, Owlv2Detector) and loaded.model is not detector.model
    before = with_settings(detector, **NO_NMS).detect(images, CLASSES)
    after = loaded.detect(images, CLASSES)
    assert sum(map(len, before)) > 0
    for x, y in zip(before, after, strict=True):
        assert torch.equal(x.boxes, y.boxes) and torch.equal(x.scores, y.scores)
        assert torch.equal(x.labels, y.labels)


def test_build_detector_picks_grounding_dino_from_its_config(tmp_path: Path) -> None:
    tiny_random_grounding_dino().save_pretrained(tmp_path)
    assert detector_type(str(tmp_path)) == "grounding-dino"
    assert isinstance(build_detector(str(tmp_path)), GroundingDinoDetector)


def test_build_detector_refuses_other_model_types(tmp_path: Path) -> None:
    from transformers import BertConfig

    BertConfig(
        hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8
    ).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="'bert' model; supported detectors are"):
        build_detector(str(tmp_path))


@pytest.mark.parametrize(
    ("name", "cls"),
    [
        (DEFAULT_DETECTOR, GroundingDinoDetector),
        ("grounding-dino", GroundingDinoDetector),
        ("owlv2", Owlv2Detector),
    ],
)
def test_tiny_random_preset_builds_the_named_family(name: str, cls: type) -> None:
    assert isinstance(build_detector(name, preset="tiny-random"), cls)


def test_tiny_random_preset_refuses_an_unknown_family() -> None:
    with pytest.raises(ValueError, match="architecture family"):
        build_detector("google/owlv2-base-patch16-ensemble", preset="tiny-random")
