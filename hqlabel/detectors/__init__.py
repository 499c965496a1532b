"""Open-vocabulary detectors (plain torch / transformers, no Ray)."""

from __future__ import annotations

from hqlabel.detectors.base import Detections, Detector, TransformersDetector, batched_nms, box_iou
from hqlabel.detectors.grounding_dino import (
    GroundingDinoDetector,
    MMGroundingDinoDetector,
    tiny_random_grounding_dino,
    tiny_random_mm_grounding_dino,
)
from hqlabel.detectors.owlv2 import Owlv2Detector, tiny_random_owlv2
from hqlabel.detectors.sam3 import Sam3Detector, tiny_random_sam3
from hqlabel.platform.config import DEFAULT_DETECTOR, DETECTOR_FAMILIES

PRESETS = ("tiny-random",)
# config.json's model_type -> the wrapper that loads it
DETECTORS: dict[str, type[TransformersDetector]] = {
    "grounding-dino": GroundingDinoDetector,
    "mm-grounding-dino": MMGroundingDinoDetector,
    "owlv2": Owlv2Detector,
    "sam3": Sam3Detector,
    "sam3_video": Sam3Detector,  # facebook/sam3's config: Sam3Model loads its detector part
}
# architecture family -> its tiny random builder (``--preset tiny-random --detector FAMILY``)
TINY_RANDOM = {
    "grounding-dino": tiny_random_grounding_dino,
    "mm-grounding-dino": tiny_random_mm_grounding_dino,
    "owlv2": tiny_random_owlv2,
    "sam3": tiny_random_sam3,
}
assert tuple(TINY_RANDOM) == DETECTOR_FAMILIES, "LabelerConfig validates --detector against DETECTOR_FAMILIES"


def detector_type(name_or_path: str, *, revision: str | None = None) -> str:
    """The ``model_type`` in the config of a hub id (at ``revision``) or directory.

    Raises:
        ModelLoadError: the config cannot be loaded.
        ValueError: a model type no wrapper handles.
    """
    from transformers import AutoConfig

    from hqlabel.platform.hub import load_pretrained

    config = load_pretrained(
        AutoConfig.from_pretrained, name_or_path, what="detector", option="--detector", revision=revision
    )
    if config.model_type not in DETECTORS:
        examples = ", ".join(dict.fromkeys(cls.hub_example for cls in DETECTORS.values()))
        raise ValueError(
            f"--detector {name_or_path} is a {config.model_type!r} model; supported detectors are "
            f"{sorted(DETECTORS)} (e.g. {examples})"
        )
    return config.model_type


def build_detector(
    name_or_path: str, *, preset: str | None = None, revision: str | None = None, **kwargs
) -> TransformersDetector:
    """The detector a job names.

    Without a preset: a hub id (at ``revision``) or directory, loaded by the wrapper its config's
    ``model_type`` names (``DETECTORS``). With ``preset="tiny-random"``: ``name_or_path`` names an
    architecture family (``TINY_RANDOM``; the default detector id means Grounding DINO) and a tiny random
    model of it is built. ``kwargs`` go to the wrapper.
    """
    if preset is None:
        cls = DETECTORS[detector_type(name_or_path, revision=revision)]
        return cls.from_pretrained(name_or_path, revision=revision, **kwargs)
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {list(PRESETS)}")
    family = "grounding-dino" if name_or_path == DEFAULT_DETECTOR else name_or_path
    if family not in TINY_RANDOM:
        raise ValueError(
            f"under --preset {preset}, --detector names an architecture family, one of "
            f"{sorted(TINY_RANDOM)}; got {name_or_path!r}"
        )
    return TINY_RANDOM[family](**kwargs)


__all__ = [
    "DETECTORS",
    "Detections",
    "Detector",
    "GroundingDinoDetector",
    "MMGroundingDinoDetector",
    "Owlv2Detector",
    "Sam3Detector",
    "TransformersDetector",
    "batched_nms",
    "box_iou",
    "build_detector",
    "detector_type",
    "tiny_random_grounding_dino",
    "tiny_random_mm_grounding_dino",
    "tiny_random_owlv2",
    "tiny_random_sam3",
]
