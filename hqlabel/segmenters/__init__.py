"""HQ-SAM segmentation: load, embed once per image, decode many prompts."""

from hqlabel.platform.config import SEGMENTER_FAMILIES
from hqlabel.segmenters.hq_sam import (
    MULTIMASK_MODES,
    HQSamSegmenter,
    ImageEmbeddings,
    MaskLogits,
    Prompts,
    tiny_random_sam,
    tiny_random_sam_hq,
)

PRESETS = ("tiny-random",)
# architecture family -> its tiny random builder (``--preset tiny-random --segmenter FAMILY``). A new family
# (e.g. "sam-hq-light", Light HQ-SAM) adds its builder here and its name to config.SEGMENTER_FAMILIES.
TINY_RANDOM = {"sam-hq": tiny_random_sam_hq, "sam": tiny_random_sam}
assert tuple(TINY_RANDOM) == SEGMENTER_FAMILIES, "LabelerConfig checks --segmenter with SEGMENTER_FAMILIES"


def build_segmenter(
    name_or_path: str,
    *,
    preset: str | None = None,
    hq_weights: str | None = None,
    revision: str | None = None,
    **kwargs,
) -> HQSamSegmenter:
    """The segmenter a job names: a preset (``tiny-random``) or ``HQSamSegmenter.from_pretrained``.

    Under ``preset="tiny-random"`` a family name of ``TINY_RANDOM`` ("sam-hq", "sam") builds a tiny random
    model of that architecture; any other name (the default hub id, or a placeholder) builds the tiny SAM-HQ
    (``LabelerConfig`` refuses names that are neither a family nor the default id). ``hq_weights``
    (fine-tuned HQ-token weights) load on top either way; ``kwargs`` go to ``HQSamSegmenter``.
    """
    if preset is None:
        return HQSamSegmenter.from_pretrained(
            name_or_path, hq_weights=hq_weights, revision=revision, **kwargs
        )
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    segmenter = TINY_RANDOM.get(name_or_path, tiny_random_sam_hq)(**kwargs)
    if hq_weights is not None:
        from hqlabel.segmenters.hq_weights import load_hq_weights

        load_hq_weights(segmenter.model, hq_weights, base_model=preset)
    return segmenter


__all__ = [
    "MULTIMASK_MODES",
    "TINY_RANDOM",
    "HQSamSegmenter",
    "ImageEmbeddings",
    "MaskLogits",
    "Prompts",
    "build_segmenter",
    "tiny_random_sam",
    "tiny_random_sam_hq",
]
