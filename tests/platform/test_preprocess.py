"""The torch preprocessing (``hqlabel.platform.preprocess``) against transformers' own processors: same
sizes, same pixel values up to PIL's rounding to uint8, same model outputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers.models.grounding_dino.image_processing_pil_grounding_dino import (
    GroundingDinoImageProcessorPil,
)
from transformers.models.sam.image_processing_pil_sam import SamImageProcessorPil

from hqlabel.detectors.grounding_dino import tiny_random_grounding_dino
from hqlabel.platform.preprocess import grounding_dino_pixel_values, sam_pixel_values, use_torch_preprocess
from hqlabel.segmenters.hq_sam import tiny_random_sam_hq

CPU = torch.device("cpu")


def images(sizes, seed=0):
    """Smooth random images (a photo's statistics, not white noise, where every resize is a coin flip)."""
    rng = np.random.default_rng(seed)
    out = []
    for h, w in sizes:
        yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
        phase = rng.uniform(0, 6, size=3)
        base = np.stack([np.sin(6 * xx + 4 * yy + p) for p in phase], -1) * 100 + 128
        out.append(np.clip(base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8))
    return out


def one_uint8_step(processor) -> float:
    """One uint8 level after rescale and normalise, the largest over the channels."""
    return float(processor.rescale_factor / min(processor.image_std))


SIZES = [(480, 640), (640, 480), (37, 91), (1024, 1024), (1, 3)]


@pytest.mark.parametrize(
    "processor", [SamImageProcessorPil(), tiny_random_sam_hq().processor.image_processor]
)
def test_sam_pixel_values_match_the_processor(processor) -> None:
    batch = images(SIZES)
    expected = processor(images=batch, return_tensors="pt", input_data_format="channels_last")
    pixels, original, reshaped = sam_pixel_values(batch, processor, CPU)

    assert original == [tuple(s) for s in expected["original_sizes"].tolist()]
    assert reshaped == [tuple(s) for s in expected["reshaped_input_sizes"].tolist()]
    assert pixels.shape == expected["pixel_values"].shape
    diff = (pixels - expected["pixel_values"]).abs()
    assert diff.max() <= 1.01 * one_uint8_step(processor)  # PIL rounds its resized pixels to uint8
    assert diff.mean() <= 0.35 * one_uint8_step(processor)  # rounding errors average a quarter step


def test_grounding_dino_pixel_values_match_the_processor() -> None:
    processor = GroundingDinoImageProcessorPil()
    batch = images(SIZES[:3])
    expected = processor(images=batch, return_tensors="pt", input_data_format="channels_last")
    pixels, mask = grounding_dino_pixel_values(batch, processor, CPU)

    assert pixels.shape == expected["pixel_values"].shape
    assert torch.equal(mask, expected["pixel_mask"])
    diff = (pixels - expected["pixel_values"]).abs()
    assert diff.max() <= 1.01 * one_uint8_step(processor)
    assert diff.mean() <= 0.35 * one_uint8_step(processor)  # rounding errors average a quarter step


def test_models_see_the_same_inputs_either_way() -> None:
    """Tokens identical, encoder features close. (Random tiny models pick their top-k queries from
    near-ties, so their boxes are not compared: any pixel change reorders them.)"""
    batch = images([(96, 128), (70, 50)], seed=1)
    by_processor = tiny_random_grounding_dino(preprocess="processor")
    by_torch = tiny_random_grounding_dino(preprocess="torch")
    assert by_torch.torch_preprocess and not by_processor.torch_preprocess
    (text,) = by_torch.passes(["circle", "square"])
    prompt = text.prompt
    inputs = by_processor._inputs(batch, prompt), by_torch._inputs(batch, prompt)
    for key in ("input_ids", "attention_mask", "token_type_ids", "pixel_mask"):
        assert torch.equal(inputs[0][key], inputs[1][key]), key
    with torch.inference_mode():
        a, b = (by_processor.model(**x).encoder_last_hidden_state_vision for x in inputs)
    assert (a - b).abs().mean() <= 0.02 * a.abs().mean()
    assert len(by_torch.detect(batch, ["circle", "square"])) == 2

    a, b = (
        tiny_random_sam_hq(preprocess="processor").embed(batch),
        tiny_random_sam_hq(preprocess="torch").embed(batch),
    )
    assert (a.original_sizes, a.reshaped_sizes) == (b.original_sizes, b.reshaped_sizes)
    scale = a.image_embeddings.abs().max()
    torch.testing.assert_close(a.image_embeddings, b.image_embeddings, atol=0.02 * scale, rtol=0)


def test_auto_means_torch_on_cuda_only() -> None:
    assert use_torch_preprocess("auto", torch.device("cuda")) is True
    assert use_torch_preprocess("auto", CPU) is False
    assert use_torch_preprocess("torch", CPU) is True
    assert use_torch_preprocess("processor", torch.device("cuda")) is False
    with pytest.raises(ValueError, match="preprocess must be one of"):
        use_torch_preprocess("gpu", CPU)


def test_unsupported_processor_settings_name_the_fix() -> None:
    processor = SamImageProcessorPil(do_pad=False)
    with pytest.raises(ValueError, match="preprocess='processor'"):
        sam_pixel_values(images([(10, 10)]), processor, CPU)
    processor = GroundingDinoImageProcessorPil(size={"height": 64, "width": 64})
    with pytest.raises(ValueError, match="preprocess='processor'"):
        grounding_dino_pixel_values(images([(10, 10)]), processor, CPU)
