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


def _tiny_random_light(**kwargs) -> HQSamSegmenter:
    from hqlabel.segmenters.light_hq_sam import tiny_random_light_sam_hq

    return tiny_random_light_sam_hq(**kwargs)


# architecture family -> its tiny random builder (``--preset tiny-random --segmenter FAMILY``). A new family
# adds its builder here and its name to config.SEGMENTER_FAMILIES.
TINY_RANDOM = {"sam-hq": tiny_random_sam_hq, "sam": tiny_random_sam, "sam-hq-light": _tiny_random_light}
assert tuple(TINY_RANDOM) == SEGMENTER_FAMILIES, "LabelerConfig checks --segmenter with SEGMENTER_FAMILIES"


def light_segmenter(name_or_path: str, preset: str | None, **kwargs) -> HQSamSegmenter | None:
    """``--segmenter sam-hq-light``: Light HQ-SAM (TinyViT encoder); None for any other name.

    With ``--preset tiny-random`` a tiny random Light HQ-SAM; without, an error naming the checkpoint to pass
    (no hub repository holds Light HQ-SAM in transformers' format).
    """
    from hqlabel.segmenters.light_hq_sam import LIGHT_NAMES, tiny_random_light_sam_hq

    if name_or_path not in LIGHT_NAMES:
        return None
    if preset == "tiny-random":
        return tiny_random_light_sam_hq(**kwargs)
    raise ValueError(
        f"--segmenter {name_or_path} has no hub model: pass the path of SysCV's sam_hq_vit_tiny.pth "
        "(Light HQ-SAM) instead, or add --preset tiny-random for a tiny random one"
    )


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
    model of that architecture, and ``sam-hq-light`` a tiny Light HQ-SAM (``light_segmenter``, which also
    names the checkpoint to pass without the preset); any other name (the default hub id, or a placeholder)
    builds the tiny SAM-HQ (``LabelerConfig`` refuses names that are neither a family nor the default id).
    ``hq_weights`` (fine-tuned HQ-token weights) load on top either way; ``kwargs`` go to ``HQSamSegmenter``.
    """
    light = light_segmenter(name_or_path, preset, **kwargs)
    if light is not None:
        if hq_weights is not None:
            from hqlabel.segmenters.hq_weights import load_hq_weights

            load_hq_weights(light.model, hq_weights, base_model=name_or_path)
        return light
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
    "light_segmenter",
    "tiny_random_sam",
    "tiny_random_sam_hq",
]
