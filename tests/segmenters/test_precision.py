"""Autocast precision, SDPA attention and torch.compile of the model wrappers (tiny models, CPU)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from hqlabel.detectors import tiny_random_grounding_dino
from hqlabel.platform.config import LabelerConfig, resolve_precision
from hqlabel.segmenters import HQSamSegmenter, ImageEmbeddings, Prompts, tiny_random_sam, tiny_random_sam_hq


@pytest.fixture(scope="module")
def images() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (96, 128, 3), dtype=np.uint8), rng.integers(0, 256, (128, 80, 3), np.uint8)]


BOXES = [
    torch.tensor([[4.0, 8.0, 90.0, 70.0], [30.0, 20.0, 120.0, 95.0]]),
    torch.tensor([[0.0, 0.0, 60.0, 100.0]]),
]


def test_resolve_precision_on_the_cpu():
    assert resolve_precision("auto", "cpu") is None  # auto = fp32 off CUDA
    assert resolve_precision("fp32", "cpu") is None
    assert resolve_precision("bf16", "cpu") is torch.bfloat16
    with pytest.raises(ValueError, match=r"fp16.*not supported on the CPU"):
        resolve_precision("fp16", "cpu")
    with pytest.raises(ValueError, match="precision must be one of"):
        resolve_precision("fp8", "cpu")


def test_labeler_config_precision_and_compile():
    config = LabelerConfig(classes="cat")
    assert (config.precision, config.compile) == ("auto", False)
    assert LabelerConfig(classes="cat", precision="bf16", compile=True).precision == "bf16"
    with pytest.raises(ValueError):
        LabelerConfig(classes="cat", precision="fp8")


def test_preprocess_reaches_both_models() -> None:
    from hqlabel.workers.labeler import build_models

    detector, segmenter = build_models(LabelerConfig(classes="cat", preset="tiny-random", device="cpu"))
    assert not detector.torch_preprocess and not segmenter.torch_preprocess  # auto on the CPU: processors
    config = LabelerConfig(classes="cat", preset="tiny-random", device="cpu", preprocess="torch")
    detector, segmenter = build_models(config)
    assert detector.torch_preprocess and segmenter.torch_preprocess
    with pytest.raises(ValueError):
        LabelerConfig(classes="cat", preprocess="gpu")


def _masks(segmenter: HQSamSegmenter, images: list[np.ndarray]) -> list[torch.Tensor]:
    embeddings = segmenter.embed(images)
    assert embeddings.image_embeddings.dtype == torch.float32
    assert all(e.dtype == torch.float32 for e in embeddings.intermediate_embeddings)
    logits = segmenter.predict_boxes(embeddings, BOXES)
    assert all(m.logits.dtype == torch.float32 and m.iou_scores.dtype == torch.float32 for m in logits)
    return [torch.cat(list(segmenter.iter_masks(m))) for m in logits]


@pytest.mark.parametrize("build", [tiny_random_sam_hq, tiny_random_sam], ids=["hq", "sam"])
def test_bf16_masks_agree_with_fp32(images, build):
    fp32, bf16 = _masks(build(precision="fp32"), images), _masks(build(precision="bf16"), images)
    ious = []
    for a, b in zip(fp32, bf16, strict=True):
        assert a.shape == b.shape and b.dtype == torch.bool
        inter, union = (a & b).flatten(1).sum(1), (a | b).flatten(1).sum(1)
        ious += (inter / union.clamp(min=1)).tolist()
    assert np.mean(ious) > 0.9, ious


def test_bf16_keeps_weights_fp32_and_decode_logits_working(images):
    segmenter = tiny_random_sam_hq(precision="bf16")
    assert segmenter.autocast_dtype is torch.bfloat16
    assert all(p.dtype == torch.float32 for p in segmenter.model.parameters())
    with torch.no_grad():  # training computes embeddings outside inference_mode
        embeddings = segmenter.model.get_image_embeddings(
            segmenter.processor(images=images[:1], return_tensors="pt", input_data_format="channels_last")[
                "pixel_values"
            ]
        )
    image = ImageEmbeddings(embeddings[0], list(embeddings[1]), [(96, 128)], [(96, 128)], hq=True)
    logits, _ = segmenter.decode_logits(image, Prompts(boxes=BOXES[0]))
    assert logits.dtype == torch.float32 and logits.requires_grad  # no autocast in the training path
    logits.mean().backward()


def test_fp16_is_refused_on_the_cpu():
    with pytest.raises(ValueError, match="fp16"):
        tiny_random_sam_hq(precision="fp16")
    with pytest.raises(ValueError, match="fp16"):
        tiny_random_grounding_dino(precision="fp16")


def test_detector_under_bf16_returns_valid_float32_boxes(images):
    detector = tiny_random_grounding_dino(precision="bf16", box_threshold=0.0, text_threshold=0.0)
    results = detector.detect(images, ["cat", "traffic light"])
    assert len(results) == len(images)
    for image, det in zip(images, results, strict=True):
        h, w = image.shape[:2]
        assert len(det.boxes) > 0 and det.boxes.shape == (len(det.scores), 4)
        assert det.boxes.dtype == det.scores.dtype == torch.float32
        assert bool((det.boxes[:, 2] >= det.boxes[:, 0]).all() and (det.boxes[:, 3] >= det.boxes[:, 1]).all())
        assert float(det.boxes[:, 0::2].max()) <= w and float(det.boxes[:, 1::2].max()) <= h
        assert set(det.labels.tolist()) <= {0, 1}


def test_encoder_attention_is_sdpa(tmp_path):
    segmenter = tiny_random_sam_hq()
    assert segmenter.attention_implementation == "sdpa"
    segmenter.save_pretrained(tmp_path)
    assert HQSamSegmenter.from_pretrained(str(tmp_path)).attention_implementation == "sdpa"


@pytest.mark.slow
@pytest.mark.skipif(
    not any(shutil.which(cc) for cc in ("c++", "g++", "clang++")),
    reason="torch.compile's CPU backend (inductor) needs a C++ compiler",
)
def test_compiled_encoder_matches_eager(images):
    eager, compiled = tiny_random_sam_hq(), tiny_random_sam_hq(compile=True)
    assert compiled.compiled
    expected, got = eager.embed(images[:1]), compiled.embed(images[:1])
    torch.testing.assert_close(got.image_embeddings, expected.image_embeddings, rtol=1e-4, atol=1e-4)
    assert set(compiled.model.state_dict()) == set(eager.model.state_dict())  # compiled in place
