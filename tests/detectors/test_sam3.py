"""Tests for hqlabel.detectors.sam3 on a tiny randomly initialised SAM 3 (offline): parity with transformers'
own SAM 3 post-processing (boxes, scores, labels, masks), one prompt per class, the embed-once path, the
presence threshold, save / load through build_detector, and the labeler's ``sam3_mask`` column."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
import torch.nn.functional as F

from hqlabel.detectors import Sam3Detector, build_detector, detector_type
from hqlabel.detectors.sam3 import masks_at, tiny_random_sam3

CLASSES = ["Cat", "traffic light", "dog"]
SIZES = [(100, 150), (200, 120), (64, 64)]  # (H, W)
NO_NMS = dict(box_threshold=0.0, text_threshold=0.0, nms_threshold=1.0, max_detections=10_000)


@pytest.fixture(scope="module")
def detector() -> Sam3Detector:
    return tiny_random_sam3(seed=0)


@pytest.fixture(scope="module")
def images() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in SIZES]


def with_settings(detector: Sam3Detector, **kwargs) -> Sam3Detector:
    return Sam3Detector(detector.model, detector.processor, **kwargs)


def transformers_post_processing():
    """``Sam3ImageProcessor.post_process_instance_segmentation`` (and the ``_scale_boxes`` it calls), compiled
    from transformers' own source file, unchanged. The module itself cannot be imported here: it imports
    torchvision at its top for other functions, and HQLabel does not depend on torchvision (PyPI's build
    needs a CUDA torch); these two functions use torch alone."""
    import transformers.models.sam3 as package

    path = Path(package.__file__).parent / "image_processing_sam3.py"
    tree = ast.parse(path.read_text())
    functions = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "_scale_boxes"]
    (cls,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Sam3ImageProcessor"]
    functions += [
        n
        for n in cls.body
        if isinstance(n, ast.FunctionDef) and n.name == "post_process_instance_segmentation"
    ]
    assert len(functions) == 2, "transformers' SAM 3 post-processing moved; update this test"
    namespace = {"torch": torch}
    exec(compile(ast.Module(body=functions, type_ignores=[]), str(path), "exec"), namespace)
    return namespace["post_process_instance_segmentation"]


def key(score: torch.Tensor, label: int, box: torch.Tensor) -> tuple:
    return round(float(score), 5), int(label), tuple(round(float(v), 3) for v in box)


def same_mask(probs: torch.Tensor, ours: torch.Tensor, theirs: torch.Tensor) -> bool:
    """Equal masks, but for pixels whose probability is within 1e-5 of the 0.5 threshold: bilinear resizing
    rounds differently in the last bit depending on how many masks are resized together (the tiny random
    model's probabilities sit near 0.5)."""
    return bool(((ours == theirs) | ((probs - 0.5).abs() < 1e-5)).all())


@pytest.mark.parametrize("threshold", [0.0, 0.25])
def test_detect_matches_transformers_post_processing(
    detector: Sam3Detector, images: list[np.ndarray], threshold: float
) -> None:
    """Per class prompt, transformers' post-processing of the model's outputs gives the boxes (clipped to the
    image), scores and masks of that class; ours are their union, labelled by the prompt (NMS off)."""
    post_process = transformers_post_processing()
    sizes = [im.shape[:2] for im in images]
    per_class = [
        post_process(None, out, threshold=threshold, mask_threshold=0.5, target_sizes=sizes)
        for out in detector.raw_outputs(images, CLASSES)
    ]
    got = with_settings(detector, **{**NO_NMS, "box_threshold": threshold}).detect(images, CLASSES)
    checked = 0
    for i, ((h, w), ours) in enumerate(zip(sizes, got, strict=True)):
        scores, labels, boxes, masks = [], [], [], []
        for c, ref in enumerate(per_class):
            box = ref[i]["boxes"].clone()
            box[:, 0::2] = box[:, 0::2].clamp(0, w)
            box[:, 1::2] = box[:, 1::2].clamp(0, h)
            scores += ref[i]["scores"].tolist()
            labels += [c] * len(box)
            boxes += box.tolist()
            masks += list(ref[i]["masks"].bool())
        expected = [(key(*r), m) for *r, m in zip(scores, labels, boxes, masks, strict=True)]
        actual = [key(*r) for r in zip(ours.scores, ours.labels, ours.boxes, strict=True)]
        assert sorted(actual) == sorted(k for k, _ in expected)
        probs = F.interpolate(ours.masks[None], size=(h, w), mode="bilinear", align_corners=False)[0]
        binary = masks_at(ours.masks, (h, w))
        for k, p, m in zip(actual, probs, binary, strict=True):  # pair each with a reference of its key
            match = next(j for j, (e, em) in enumerate(expected) if e == k and same_mask(p, m, em))
            expected.pop(match)
        assert all(m.any() for m in masks), "nothing to compare: empty masks"
        checked += len(ours)
    assert checked > 0, "nothing to compare: the tiny model found nothing"
    if threshold > 0:
        assert checked < 3 * len(images) * detector.model.config.detr_decoder_config.num_queries


def test_embedding_once_matches_the_plain_forward(detector: Sam3Detector, images: list[np.ndarray]) -> None:
    """raw_outputs runs the image encoder once for every class: the same outputs as transformers' forward on
    pixels and a prompt."""
    text = detector.prompts(CLASSES)
    outputs = detector.raw_outputs(images, CLASSES)
    with torch.no_grad():
        for c in (0, 2):
            plain = detector.model(
                pixel_values=detector.pixel_values(images),
                input_ids=text["input_ids"][c : c + 1].expand(len(images), -1),
                attention_mask=text["attention_mask"][c : c + 1].expand(len(images), -1),
            )
            for key in ("pred_logits", "pred_boxes", "pred_masks", "presence_logits"):
                torch.testing.assert_close(outputs[c][key], plain[key])


def test_one_prompt_per_class(detector: Sam3Detector, images: list[np.ndarray]) -> None:
    """Prompt c is classes[c], alone: reversing the class list reverses the labels; a class's detections
    do not depend on the other classes."""
    forward = with_settings(detector, **NO_NMS).detect(images, CLASSES)
    backward = with_settings(detector, **NO_NMS).detect(images, CLASSES[::-1])
    alone = with_settings(detector, **NO_NMS).detect(images, CLASSES[1:2])
    for f, b, a in zip(forward, backward, alone, strict=True):
        assert sorted((len(CLASSES) - 1 - f.labels).tolist()) == sorted(b.labels.tolist())
        torch.testing.assert_close(f.scores[f.labels == 1].sort().values, a.scores.sort().values)
    assert any(len(d) for d in alone)


def test_presence_threshold_drops_whole_classes(detector: Sam3Detector, images: list[np.ndarray]) -> None:
    outputs = detector.raw_outputs(images, CLASSES)
    presence = torch.stack([o.presence_logits[:, 0].sigmoid() for o in outputs], 1)  # B x C
    cut = float(presence.median())
    got = with_settings(detector, **{**NO_NMS, "text_threshold": cut}).detect(images, CLASSES)
    for i, det in enumerate(got):
        present = {c for c in range(len(CLASSES)) if presence[i, c] >= cut}
        assert set(det.labels.tolist()) == present
    assert all(len(d) == 0 for d in with_settings(detector, box_threshold=1.0).detect(images, CLASSES))


def test_nms_and_max_detections(detector: Sam3Detector, images: list[np.ndarray]) -> None:
    full = with_settings(detector, box_threshold=0.0, nms_threshold=0.99).detect(images, CLASSES)
    top = with_settings(detector, box_threshold=0.0, nms_threshold=0.99, max_detections=2).detect(
        images, CLASSES
    )
    assert any(len(d) > 2 for d in full)
    for f, t in zip(full, top, strict=True):
        assert (f.scores.diff() <= 0).all()
        assert torch.equal(t.boxes, f.boxes[:2]) and torch.equal(t.masks, f.masks[:2])


def test_class_name_over_the_text_limit_is_a_value_error(
    detector: Sam3Detector, images: list[np.ndarray]
) -> None:
    with pytest.raises(ValueError, match="limit of 16 tokens"):
        detector.detect(images[:1], ["cat", "a very long class name indeed"])


def test_save_and_load_through_build_detector(
    detector: Sam3Detector, images: list[np.ndarray], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    detector.save_pretrained(tmp_path)
    assert detector_type(str(tmp_path)) == "sam3"
    loaded = build_detector(str(tmp_path), **NO_NMS)
    assert type(loaded) is Sam3Detector and loaded.model is not detector.model
    before = with_settings(detector, **NO_NMS).detect(images, CLASSES)
    for x, y in zip(before, loaded.detect(images, CLASSES), strict=True):
        assert torch.equal(x.boxes, y.boxes) and torch.equal(x.scores, y.scores)
        assert torch.equal(x.labels, y.labels) and torch.equal(x.masks, y.masks)


def test_tiny_random_preset_builds_sam3() -> None:
    assert type(build_detector("sam3", preset="tiny-random")) is Sam3Detector


def test_labeler_keeps_sam3_masks_next_to_hq_sam_masks(images: list[np.ndarray]) -> None:
    from hqlabel.api.results import LabelResult
    from hqlabel.platform.config import LabelerConfig
    from hqlabel.platform.rle import decode_mask
    from hqlabel.workers import Labeler

    config = LabelerConfig(
        classes=CLASSES, preset="tiny-random", detector="sam3", box_threshold=0.0, max_detections=3
    )
    labeler = Labeler.from_config(config)
    output_sizes = [(2 * h, 2 * w) for h, w in SIZES]  # the images as 2x downscaled copies
    detections = labeler.detector.detect(images, CLASSES)
    results = labeler.label(images, output_sizes)
    assert sum(map(len, results)) > 0
    for det, instances, size in zip(detections, results, output_sizes, strict=True):
        assert [inst["label"] for inst in instances] == [CLASSES[k] for k in det.labels]
        expected = masks_at(det.masks, size).numpy()
        for inst, mask in zip(instances, expected, strict=True):
            assert decode_mask(inst["mask"]).shape == size  # HQ-SAM's, from the box
            assert np.array_equal(decode_mask(inst["sam3_mask"]), mask)  # SAM 3's own
        # the Python API's result carries them too, as the masks table's rows
        result = LabelResult.from_instances(instances, size)
        assert [r["sam3_mask"] for r in result.rows()] == [i["sam3_mask"] for i in instances]


def test_outputs_without_the_sam3_column_stay_readable(tmp_path: Path) -> None:
    """A labels folder written before ``sam3_mask`` existed reads as before (no such key)."""
    from hqlabel.api.results import read_labels
    from hqlabel.platform import storage
    from hqlabel.platform.rle import encode_masks
    from hqlabel.platform.schema import IMAGES_SCHEMA, MASKS_SCHEMA

    old = pa.schema([f for f in MASKS_SCHEMA if f.name != "sam3_mask"])
    mask = np.zeros((1, 4, 6), bool)
    mask[0, 1:3, 2:5] = True
    (rle,) = encode_masks(mask)
    row = dict(image_id="a", instance_id=0, label="cat", score=0.9, box=[2, 1, 5, 3], mask=rle, area=6)
    storage.write_parquet(
        pa.Table.from_pylist([{**row, "pred_iou": 0.8}], schema=old), str(tmp_path / "masks/part-0.parquet")
    )
    images = pa.Table.from_pylist(
        [dict(image_id="a", height=4, width=6, num_instances=1)], schema=IMAGES_SCHEMA
    )
    storage.write_parquet(images, str(tmp_path / "images/part-0.parquet"))
    (tmp_path / "job.json").write_text(json.dumps({"spec": {"labeler": {"classes": ["cat"]}}, "summary": {}}))
    ((image_id, result),) = list(read_labels(str(tmp_path)))
    assert image_id == "a" and len(result) == 1
    assert result.rows()[0]["sam3_mask"] is None and result.rows()[0]["area"] == 6
