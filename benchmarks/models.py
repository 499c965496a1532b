"""Random-weight models for the benchmarks: the tiny test preset, or the real architectures at full size.

Random weights make every box and mask meaningless; only the timings mean anything.
"""

from __future__ import annotations

from pathlib import Path

import torch

from hqlabel.detectors.grounding_dino import GroundingDinoDetector, tiny_random_grounding_dino
from hqlabel.segmenters.hq_sam import HQSamSegmenter, tiny_random_sam_hq

PRESETS = ("tiny-random", "real-size")


def real_size_grounding_dino(device: str | torch.device = "cpu", seed: int = 0) -> GroundingDinoDetector:
    """Grounding DINO at the size of ``grounding-dino-tiny`` (Swin-T + BERT-base), random weights, with the
    offline tiny tokenizer (tokenization cost is negligible next to the model)."""
    from transformers import (
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        GroundingDinoProcessor,
    )
    from transformers.models.grounding_dino.image_processing_pil_grounding_dino import (
        GroundingDinoImageProcessorPil,
    )

    from hqlabel.detectors.grounding_dino import tiny_random_tokenizer

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = GroundingDinoForObjectDetection(GroundingDinoConfig())
    processor = GroundingDinoProcessor(
        image_processor=GroundingDinoImageProcessorPil(), tokenizer=tiny_random_tokenizer()
    )
    return GroundingDinoDetector(model, processor, device=device)


def real_size_sam_hq(device: str | torch.device = "cpu", seed: int = 0) -> HQSamSegmenter:
    """SAM-HQ ViT-B (the ``sam-hq-vit-base`` architecture: 1024 x 1024 input, 256-wide decoder), random
    weights."""
    from transformers import SamHQConfig, SamHQModel, SamHQProcessor
    from transformers.models.sam.image_processing_pil_sam import SamImageProcessorPil

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = SamHQModel(SamHQConfig())
    return HQSamSegmenter(model, SamHQProcessor(image_processor=SamImageProcessorPil()), device=device)


def build_models(
    preset: str, device: str | torch.device = "cpu"
) -> tuple[GroundingDinoDetector, HQSamSegmenter]:
    """(detector, segmenter) of ``preset`` ("tiny-random" or "real-size") on ``device``."""
    if preset == "tiny-random":
        return tiny_random_grounding_dino(device=device), tiny_random_sam_hq(device=device)
    if preset == "real-size":
        return real_size_grounding_dino(device), real_size_sam_hq(device)
    raise ValueError(f"unknown preset {preset!r}; choose one of {PRESETS}")


def save_models(preset: str, directory: Path) -> tuple[str, str]:
    """Write ``preset``'s models as ``from_pretrained`` directories (for a pipeline run of the real-size
    architectures, which have no ``--preset``); returns (detector_dir, segmenter_dir)."""
    detector, segmenter = build_models(preset)
    det_dir, seg_dir = directory / "detector", directory / "segmenter"
    detector.save_pretrained(det_dir)
    segmenter.save_pretrained(seg_dir)
    return str(det_dir), str(seg_dir)
