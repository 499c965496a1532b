"""The Ray-free Labeler with an OWLv2 detector (``--preset tiny-random --detector owlv2``): its boxes and
labels are the detector's, each gets an HQ-SAM mask at the output size."""

from __future__ import annotations

import pytest
from conftest import random_image

from hqlabel.detectors import Owlv2Detector
from hqlabel.platform.config import LabelerConfig
from hqlabel.platform.rle import decode_mask
from hqlabel.workers import Labeler

CLASSES = ["cat", "traffic light"]


@pytest.fixture(scope="module")
def labeler() -> Labeler:
    config = LabelerConfig(
        classes=CLASSES, preset="tiny-random", detector="owlv2", box_threshold=0.2, device="cpu"
    )
    return Labeler.from_config(config)


def test_labeler_labels_with_the_owlv2_detector(labeler: Labeler) -> None:
    assert isinstance(labeler.detector, Owlv2Detector)
    images = [random_image(0, (48, 64)), random_image(1, (70, 30))]  # non-square: padded by OWLv2
    output_sizes = [(96, 128), (70, 30)]  # the first image is a 2x downscaled copy of its original
    detections = labeler.detector.detect(images, CLASSES)
    results = labeler.label(images, output_sizes)
    assert sum(len(r) for r in results) > 0, "nothing to check: the tiny OWLv2 found no boxes"
    for det, instances, (h, w), image in zip(detections, results, output_sizes, images, strict=True):
        scale = h / image.shape[0]
        assert [inst["label"] for inst in instances] == [CLASSES[k] for k in det.labels]
        assert [inst["score"] for inst in instances] == pytest.approx(det.scores.tolist())
        for inst, box in zip(instances, det.boxes.tolist(), strict=True):
            assert inst["box"] == pytest.approx([v * scale for v in box], abs=1e-3)
            mask = decode_mask(inst["mask"])
            assert mask.shape == (h, w) and inst["area"] == int(mask.sum())


def test_preset_detector_must_be_a_family() -> None:
    with pytest.raises(
        ValueError,
        match=r"architecture family, one of \['grounding-dino', 'mm-grounding-dino', 'owlv2', 'sam3'\]",
    ):
        LabelerConfig(classes=CLASSES, preset="tiny-random", detector="google/owlv2-base-patch16-ensemble")
    assert LabelerConfig(classes=CLASSES, preset="tiny-random", detector="owlv2").detector == "owlv2"
