"""Per-instance quality signals and mask NMS (hqlabel.workers.quality), alone and through ``Labeler``."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import random_image

from hqlabel.platform.config import LabelerConfig
from hqlabel.platform.rle import decode_mask, encode_masks, rle_to_bbox
from hqlabel.workers import Labeler
from hqlabel.workers.quality import box_iou, dedupe_instances, mask_box_iou, mask_nms


def square(top: int, left: int, side: int, size=(40, 60)) -> np.ndarray:
    mask = np.zeros(size, bool)
    mask[top : top + side, left : left + side] = True
    return mask


def test_box_iou_of_paired_boxes() -> None:
    a = np.array([[0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 0, 0]])
    b = np.array([[0, 0, 10, 10], [5, 0, 15, 10], [0, 0, 0, 0]])
    assert box_iou(a, b).tolist() == pytest.approx([1.0, 50 / 150, 0.0])


def test_mask_box_iou_compares_the_tight_box_with_the_prompt() -> None:
    rles = encode_masks(np.stack([square(5, 10, 10), square(5, 10, 10), np.zeros((40, 60), bool)]))
    prompts = np.array([[10, 5, 20, 15], [10, 5, 30, 15], [0, 0, 10, 10]], np.float32)
    assert mask_box_iou(rles, prompts) == pytest.approx([1.0, 0.5, 0.0])


def test_mask_nms_drops_the_lower_scored_duplicate() -> None:
    a = square(5, 10, 20)
    near = a.copy()
    near[5, 10:14] = False  # IoU 396 / 400 with a
    other = square(5, 35, 20)  # beside a: no overlap
    rles = encode_masks(np.stack([a, near, other]))
    assert mask_nms(rles, [0.5, 0.9, 0.1], 0.8) == [1, 2]  # the better-scored near-copy stays
    assert mask_nms(rles, [0.9, 0.9, 0.1], 0.8) == [0, 2]  # a tie: the earlier stays
    assert mask_nms(rles, [0.5, 0.9, 0.1], 0.995) == [0, 1, 2]  # IoU 0.99 is under this threshold

    scores = [0.5, 0.9, 0.1]
    instances = [{"instance_id": k, "score": scores[k], "mask": r} for k, r in enumerate(rles)]
    kept = dedupe_instances(instances, 0.8)
    assert [(i["instance_id"], i["score"]) for i in kept] == [(0, 0.9), (1, 0.1)]
    assert dedupe_instances(instances, None) is instances


@pytest.fixture(scope="module")
def labeler() -> Labeler:
    config = LabelerConfig(classes=["cat"], preset="tiny-random", box_threshold=0.3, device="cpu")
    return Labeler.from_config(config)


def test_labeler_rows_carry_the_signals(labeler) -> None:
    results = labeler.label([random_image(0, (48, 64)), random_image(1, (70, 30))], [(96, 128), (70, 30)])
    instances = [inst for image in results for inst in image]
    assert instances
    for inst in instances:
        assert 0.0 <= inst["stability"] <= 1.0 and 0.0 <= inst["hq_sam_iou"] <= 1.0
        tight = np.array([rle_to_bbox(inst["mask"])])
        assert inst["box_iou"] == pytest.approx(box_iou(tight, np.array([inst["box"]]))[0])
    assert len({inst["hq_sam_iou"] for inst in instances}) > 1


def test_mask_nms_in_the_labeler_removes_duplicate_prompts(labeler) -> None:
    """The same box given twice: two identical masks, which box NMS never sees (given boxes skip it)."""
    image = random_image(2, (48, 64))
    boxes = [[4.0, 4.0, 40.0, 30.0], [4.0, 4.0, 40.0, 30.0], [30.0, 20.0, 60.0, 45.0]]
    given = [(boxes, ["a", "b", "c"])]
    plain = labeler.label([image], boxes=given)[0]
    assert len(plain) == 3 and plain[0]["mask"] == plain[1]["mask"]
    dedupe = Labeler(labeler.detector, labeler.segmenter, labeler.classes, mask_nms=0.8)
    kept = dedupe.label([image], boxes=given)[0]
    assert [i["label"] for i in kept] == ["a", "c"]  # a tie in score: the first stays
    assert [i["instance_id"] for i in kept] == [0, 1]
    assert (decode_mask(kept[1]["mask"]) == decode_mask(plain[2]["mask"])).all()


def test_synonyms_prompt_the_detector_and_label_with_the_class(labeler) -> None:
    config = LabelerConfig(
        classes="person: man, woman; car: car, truck", preset="tiny-random", box_threshold=0.0, device="cpu"
    )
    synonyms = Labeler(labeler.detector, labeler.segmenter, config.classes, synonyms=config.synonyms)
    assert synonyms.prompts == [["man", "woman"], ["car", "truck"]]
    results = synonyms.label([random_image(0, (48, 64))])[0]
    assert results and {i["label"] for i in results} <= {"person", "car"}
