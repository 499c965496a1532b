"""HQ-SAM segmentation: load, embed once per image, decode many prompts."""

from hqlabel.segmenters.hq_sam import (
    MULTIMASK_MODES,
    HQSamSegmenter,
    ImageEmbeddings,
    MaskLogits,
    Prompts,
    tiny_random_sam,
    tiny_random_sam_hq,
)

PRESETS = {"tiny-random": tiny_random_sam_hq}


def build_segmenter(
    name_or_path: str,
    *,
    preset: str | None = None,
    hq_weights: str | None = None,
    revision: str | None = None,
    **kwargs,
) -> HQSamSegmenter:
    """The segmenter a job names: a preset (``tiny-random``) or ``HQSamSegmenter.from_pretrained``.

    ``hq_weights`` (fine-tuned HQ-token weights) load on top either way; ``kwargs`` go to ``HQSamSegmenter``.
    """
    if preset is None:
        return HQSamSegmenter.from_pretrained(
            name_or_path, hq_weights=hq_weights, revision=revision, **kwargs
        )
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    segmenter = PRESETS[preset](**kwargs)
    if hq_weights is not None:
        from hqlabel.segmenters.hq_weights import load_hq_weights

        load_hq_weights(segmenter.model, hq_weights, base_model=preset)
    return segmenter


__all__ = [
    "MULTIMASK_MODES",
    "HQSamSegmenter",
    "ImageEmbeddings",
    "MaskLogits",
    "Prompts",
    "build_segmenter",
    "tiny_random_sam",
    "tiny_random_sam_hq",
]
