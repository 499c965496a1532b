"""The Ray-free Labeler under ``--preset tiny-random`` with each detector and segmenter family: the config's
names pick the architectures, and the masks come from the segmenter that was picked."""

from __future__ import annotations

import pytest
import torch
from conftest import random_image

from hqlabel.detectors import GroundingDinoDetector, MMGroundingDinoDetector
from hqlabel.platform.config import DEFAULT_SEGMENTER, LabelerConfig
from hqlabel.segmenters import TINY_RANDOM, build_segmenter
from hqlabel.workers import Labeler

CLASSES = ["cat", "traffic light"]


@pytest.mark.parametrize(
    ("name", "model"),
    [
        ("sam-hq", "SamHQModel"),
        ("sam", "SamModel"),
        ("sam-hq-light", "LightSamHQModel"),
        (DEFAULT_SEGMENTER, "SamHQModel"),
        ("placeholder", "SamHQModel"),
    ],
)
def test_segmenter_family_under_the_preset(name: str, model: str) -> None:
    segmenter = build_segmenter(name, preset="tiny-random", multimask="off")
    assert segmenter.is_hq is (model != "SamModel")
    assert type(segmenter.model).__name__ == model


def test_segmenter_families_are_the_registry() -> None:
    from hqlabel.platform.config import SEGMENTER_FAMILIES

    assert tuple(TINY_RANDOM) == SEGMENTER_FAMILIES == ("sam-hq", "sam", "sam-hq-light")


def test_preset_segmenter_must_be_a_family() -> None:
    with pytest.raises(
        ValueError,
        match=r"--segmenter names an architecture family, one of \['sam-hq', 'sam', 'sam-hq-light'\]",
    ):
        LabelerConfig(classes=CLASSES, preset="tiny-random", segmenter="facebook/sam-vit-base")
    assert LabelerConfig(classes=CLASSES, preset="tiny-random", segmenter="sam").segmenter == "sam"
    # without a preset the name is a model id, checked when it loads
    assert (
        LabelerConfig(classes=CLASSES, segmenter="facebook/sam-vit-base").segmenter == "facebook/sam-vit-base"
    )


def test_mm_grounding_dino_boxes_through_plain_sam() -> None:
    config = LabelerConfig(
        classes=CLASSES,
        preset="tiny-random",
        detector="mm-grounding-dino",
        segmenter="sam",
        box_threshold=0.0,
        text_threshold=0.0,  # the tiny random model's scores are about 0.01
        max_detections=4,
        device="cpu",
    )
    labeler = Labeler.from_config(config)
    assert type(labeler.detector) is MMGroundingDinoDetector and isinstance(
        labeler.detector, GroundingDinoDetector
    )
    assert not labeler.segmenter.is_hq
    images = [random_image(0, (48, 64))]
    (detections,) = labeler.detector.detect(images, CLASSES)
    (instances,) = labeler.label(images)
    assert len(instances) == len(detections) > 0
    assert [inst["label"] for inst in instances] == [CLASSES[k] for k in detections.labels]
    torch.testing.assert_close(torch.tensor([inst["box"] for inst in instances]), detections.boxes)
