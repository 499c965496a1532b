"""Synonyms (a class prompted with several phrases) and Grounding DINO prompts split at the text limit, on the
tiny random detectors (offline)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hqlabel.detectors.base import Detections, batched_nms
from hqlabel.detectors.grounding_dino import (
    GroundingDinoDetector,
    build_prompt,
    plan_passes,
    tiny_random_grounding_dino,
)
from hqlabel.detectors.owlv2 import Owlv2Detector, tiny_random_owlv2

SIZES = [(100, 150), (64, 64)]
SYNONYMS = [["man", "woman", "pedestrian"], ["car", "truck"], ["dog"]]
# 300 distinct names of 1 to 3 letters ("a".."z", "ab"...): the tiny tokenizer spells them letter by letter
ONTOLOGY = [chr(97 + k % 26) + ("" if k < 26 else chr(97 + (k // 26) % 26)) + ("" if k < 676 else "x")
            for k in range(300)]  # fmt: skip


@pytest.fixture(scope="module")
def images() -> list[np.ndarray]:
    rng = np.random.default_rng(1)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in SIZES]


@pytest.fixture(scope="module")
def gdino() -> GroundingDinoDetector:
    return tiny_random_grounding_dino(seed=0, box_threshold=0.0, text_threshold=0.0, max_detections=1000)


@pytest.fixture(scope="module")
def owl() -> Owlv2Detector:
    return tiny_random_owlv2(seed=0, box_threshold=0.0, text_threshold=0.0, max_detections=1000)


def flat_then_grouped(detector, images, nms_threshold: float) -> tuple[list[Detections], list[Detections]]:
    """Detections with SYNONYMS as groups, and with every synonym a class of its own, labels mapped back to
    its group. With no box suppression (nms 1.0) the two agree: a box's best class over all phrases is the
    group of its best phrase."""
    detector.nms_threshold = nms_threshold
    owner = torch.tensor([c for c, group in enumerate(SYNONYMS) for _ in group])
    flat = detector.detect(images, [p for group in SYNONYMS for p in group])
    flat = [Detections(d.boxes, d.scores, owner[d.labels]) for d in flat]
    return flat, detector.detect(images, SYNONYMS)


@pytest.mark.parametrize("name", ["gdino", "owl"])
def test_synonyms_label_boxes_with_their_class(name, images, request) -> None:
    detector = request.getfixturevalue(name)
    flat, grouped = flat_then_grouped(detector, images, nms_threshold=1.0)
    assert sum(map(len, grouped)) > 0
    for a, b in zip(flat, grouped, strict=True):
        order_a, order_b = a.scores.argsort(stable=True), b.scores.argsort(stable=True)
        torch.testing.assert_close(a.scores[order_a], b.scores[order_b])
        torch.testing.assert_close(a.boxes[order_a], b.boxes[order_b])
        assert a.labels[order_a].tolist() == b.labels[order_b].tolist()
        assert set(b.labels.tolist()) <= {0, 1, 2}


@pytest.mark.parametrize("name", ["gdino", "owl"])
def test_synonyms_of_one_class_suppress_each_other(name, images, request) -> None:
    """Class-aware NMS runs on the classes: boxes found by two synonyms of a class are one class's boxes."""
    detector = request.getfixturevalue(name)
    _, grouped = flat_then_grouped(detector, images, nms_threshold=0.5)
    for det in grouped:
        again = batched_nms(det.boxes, det.scores, det.labels, 0.5)
        assert len(again) == len(det)


def test_a_300_class_ontology_is_split_into_passes_that_map_back(gdino, images) -> None:
    tokenizer, max_len = gdino.processor.tokenizer, gdino.model.config.max_text_len
    passes = gdino.passes(ONTOLOGY)
    assert len(passes) > 1
    seen = []
    for text in passes:
        ids = tokenizer(text.prompt)["input_ids"]
        assert len(ids) <= max_len
        tokens = tokenizer.convert_ids_to_tokens(ids)
        for row, c in enumerate(text.class_ids.tolist()):
            on = text.positive[row][: len(tokens)].tolist()
            spelled = "".join(t.removeprefix("##") for t, o in zip(tokens, on, strict=True) if o)
            assert spelled == ONTOLOGY[c]  # the class's tokens, and only them
            seen.append(c)
    assert sorted(seen) == list(range(len(ONTOLOGY)))  # each class in exactly one pass

    # The split run's boxes of a pass's classes = those classes detected on their own (one pass), labels
    # mapped back: the NMS is per class and each class is in one pass. Checked for the first and last pass.
    gdino.nms_threshold = 0.5
    (det,) = gdino.detect(images[1:], ONTOLOGY)  # one small image
    assert len(det) > 0 and set(det.labels.tolist()) <= set(range(len(ONTOLOGY)))
    got = sorted(zip(det.labels.tolist(), map(tuple, det.boxes.tolist()), strict=True))
    for text in (passes[0], passes[-1]):
        subset = text.class_ids.tolist()
        assert len(gdino.passes([ONTOLOGY[c] for c in subset])) == 1
        (alone,) = gdino.detect(images[1:], [ONTOLOGY[c] for c in subset])
        found = zip(alone.labels.tolist(), alone.boxes.tolist(), strict=True)
        assert len(alone) > 0
        assert sorted((subset[k], tuple(b)) for k, b in found) == [g for g in got if g[0] in subset]


def test_plan_passes_packs_to_the_limit(gdino) -> None:
    tokenizer = gdino.processor.tokenizer
    groups = [[name] for name in ONTOLOGY[:40]]
    passes = plan_passes(groups, tokenizer, 20)
    for k, text in enumerate(passes[:-1]):  # each full pass could not take the next phrase
        nxt = ONTOLOGY[int(passes[k + 1].class_ids[0])]
        longer = build_prompt([*text.prompt.removesuffix(".").split(". "), nxt])[0]
        assert len(tokenizer(longer)["input_ids"]) > 20
    with pytest.raises(ValueError, match="limit of 5"):
        plan_passes([["abcdef"]], tokenizer, 5)
    with pytest.raises(ValueError, match="'abcdef' alone"):  # after phrases that fit
        plan_passes([["a"], ["abcdef"]], tokenizer, 5)
