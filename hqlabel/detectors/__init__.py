"""Open-vocabulary detectors (plain torch / transformers, no Ray)."""

from hqlabel.detectors.base import Detections, Detector, batched_nms, box_iou
from hqlabel.detectors.grounding_dino import GroundingDinoDetector, tiny_random_grounding_dino

PRESETS = {"tiny-random": tiny_random_grounding_dino}


def build_detector(
    name_or_path: str, *, preset: str | None = None, revision: str | None = None, **kwargs
) -> GroundingDinoDetector:
    """The detector a job names: a preset (``tiny-random``) or a Grounding DINO hub id (at ``revision``) /
    directory."""
    if preset is None:
        return GroundingDinoDetector.from_pretrained(name_or_path, revision=revision, **kwargs)
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[preset](**kwargs)


__all__ = ["Detections", "Detector", "GroundingDinoDetector", "batched_nms", "box_iou", "build_detector"]
