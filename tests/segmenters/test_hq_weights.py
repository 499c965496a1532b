"""Tests for hqlabel.segmenters.hq_weights: HQ-token weights saved and loaded on their own."""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import SamConfig, SamHQConfig, SamHQModel, SamModel

from hqlabel.segmenters import build_segmenter
from hqlabel.segmenters.hq_sam import HQSamSegmenter, tiny_random_sam_hq
from hqlabel.segmenters.hq_weights import (
    FORMAT,
    hq_state_dict,
    is_hq_parameter,
    load_hq_weights,
    save_hq_weights,
)

# transformers' SamHQMaskDecoder attributes that HQ-SAM adds to SAM's decoder (SysCV names in brackets):
# the HQ token [hf_token], its MLP [hf_mlp], the ViT-feature compression [compress_vit_feat], the embedding
# encoder [embedding_encoder] and the mask-feature convs [embedding_maskfeature].
HQ_MODULES = (
    "hq_token",
    "hq_mask_mlp",
    "compress_vit_conv1",
    "compress_vit_norm",
    "compress_vit_conv2",
    "encoder_conv1",
    "encoder_norm",
    "encoder_conv2",
    "mask_conv1",
    "mask_norm",
    "mask_conv2",
)
VIT_H = dict(
    hidden_size=1280, num_hidden_layers=32, num_attention_heads=16, global_attn_indexes=[7, 15, 23, 31]
)


@pytest.fixture(scope="module")
def source() -> HQSamSegmenter:
    return tiny_random_sam_hq(seed=0)


@pytest.fixture(scope="module")
def weights_file(source: HQSamSegmenter, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("hq") / "nested" / "hq.safetensors"
    returned = save_hq_weights(source.model, path, base_model="tiny-random", extra={"epochs": 3})
    assert returned == path
    return path


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (100, 150, 3), dtype=np.uint8)


def predict(segmenter: HQSamSegmenter, image: np.ndarray) -> torch.Tensor:
    boxes = torch.tensor([[10.0, 20.0, 60.0, 80.0], [40.0, 5.0, 140.0, 95.0], [0.0, 0.0, 30.0, 30.0]])
    return segmenter.predict_boxes(segmenter.embed([image]), [boxes])[0].logits


def rerandomised_hq(segmenter: HQSamSegmenter, seed: int) -> HQSamSegmenter:
    """A copy of ``segmenter`` whose HQ modules are drawn afresh; every SAM tensor stays the same."""
    model = copy.deepcopy(segmenter.model)
    with torch.random.fork_rng(), torch.no_grad():
        torch.manual_seed(seed)
        for name, param in model.named_parameters():
            if is_hq_parameter(name):
                param.copy_(torch.randn_like(param) * param.detach().std().clamp(min=0.1))
    return HQSamSegmenter(model, segmenter.processor)


def hq_parameter_count(model: SamHQModel) -> int:
    return sum(p.numel() for name in HQ_MODULES for p in getattr(model.mask_decoder, name).parameters())


# --- the file -------------------------------------------------------------------------------------


def test_file_holds_exactly_the_hq_tensors(source: HQSamSegmenter, weights_file: Path) -> None:
    with safe_open(str(weights_file), framework="pt") as f:
        stored = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
        metadata = f.metadata()
    expected = hq_state_dict(source.model)
    assert set(stored) == set(expected)
    assert all(torch.equal(stored[k], expected[k]) for k in expected)
    assert sum(t.numel() for t in stored.values()) == hq_parameter_count(source.model)
    # exactly what HQ-SAM adds to SAM: a SamModel of the same shape has every other tensor, and none of these
    config = source.model.config
    sam = SamModel(
        SamConfig(
            vision_config=config.vision_config.to_dict(),
            prompt_encoder_config=config.prompt_encoder_config.to_dict(),
            mask_decoder_config=config.mask_decoder_config.to_dict(),
        )
    )
    sam_keys, hq_keys = set(sam.state_dict()), set(source.model.state_dict())
    assert set(stored) == hq_keys - sam_keys
    assert not set(stored) & sam_keys
    assert metadata["format"] == FORMAT
    assert metadata["base_model"] == "tiny-random"
    assert metadata["extra"] == '{"epochs": 3}'


def test_hq_state_dict_of_plain_sam_is_a_type_error() -> None:
    with torch.device("meta"), pytest.raises(TypeError, match="SamModel"):
        hq_state_dict(SamModel(SamConfig()))


@pytest.mark.parametrize(
    ("name", "vision", "vit_dim", "low", "high"),
    [("vit_b", {}, 768, 1.0e6, 1.2e6), ("vit_h", VIT_H, 1280, 1.5e6, 1.7e6)],
)
def test_hq_parameter_count_of_the_released_architectures(
    name: str, vision: dict, vit_dim: int, low: float, high: float
) -> None:
    """The paper: HQ-SAM adds ~1.1M (ViT-B) to ~1.6M (ViT-H) parameters. Built on the meta device (no memory).

    By hand: 256 x vit_dim x 4 + 256 for the first ViT-compression deconv, plus 284,416 for the rest
    (HQ token 256, 3-layer MLP 139,808, convs and norms at 256/64/32 channels) -> 1,071,104 (vit_b).
    """
    with torch.device("meta"):
        model = SamHQModel(SamHQConfig(vision_config=vision, mask_decoder_config=dict(vit_dim=vit_dim)))
    count = sum(p.numel() for k, p in model.named_parameters() if is_hq_parameter(k))
    assert count == hq_parameter_count(model) == 256 * vit_dim * 4 + 256 + 284_416
    assert low < count < high, f"{name}: {count} HQ parameters"


# --- loading --------------------------------------------------------------------------------------


def test_load_changes_the_hq_tensors_and_nothing_else(source: HQSamSegmenter, weights_file: Path) -> None:
    target = tiny_random_sam_hq(seed=1).model
    before = {k: v.clone() for k, v in target.state_dict().items()}
    metadata = load_hq_weights(target, weights_file)
    assert metadata["base_model"] == "tiny-random"
    after, wanted = target.state_dict(), source.model.state_dict()
    assert set(after) == set(before)
    for k, value in after.items():
        assert torch.equal(value, wanted[k] if is_hq_parameter(k) else before[k]), k
    changed = [k for k in after if not torch.equal(after[k], before[k])]
    assert changed and all(is_hq_parameter(k) for k in changed)
    assert any("compress_vit_conv1.weight" in k for k in changed)  # the largest HQ tensor (seed-dependent)


def test_loaded_hq_weights_reproduce_the_source_predictions(
    source: HQSamSegmenter, weights_file: Path, image: np.ndarray
) -> None:
    expected = predict(source, image)
    other = rerandomised_hq(source, seed=1)
    differing = predict(other, image)
    assert (differing - expected).abs().max() > 0.01 * expected.abs().max(), "HQ modules changed nothing"
    load_hq_weights(other.model, weights_file)
    assert torch.equal(predict(other, image), expected)


def test_build_segmenter_applies_hq_weights(
    source: HQSamSegmenter, image: np.ndarray, tmp_path: Path
) -> None:
    tuned = rerandomised_hq(source, seed=2)
    path = save_hq_weights(tuned.model, tmp_path / "tuned.safetensors", base_model="tiny-random")
    built = build_segmenter("x", preset="tiny-random", hq_weights=str(path))
    plain = build_segmenter("x", preset="tiny-random")
    expected = predict(tuned, image)
    assert torch.equal(predict(built, image), expected)
    assert not torch.equal(predict(plain, image), expected)


def test_a_different_recorded_base_is_logged(weights_file: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="hqlabel.segmenters.hq_weights"):
        load_hq_weights(tiny_random_sam_hq(seed=1).model, weights_file, base_model="tiny-random")
    assert not caplog.records
    with caplog.at_level(logging.WARNING, logger="hqlabel.segmenters.hq_weights"):
        load_hq_weights(tiny_random_sam_hq(seed=1).model, weights_file, base_model="other-sam-hq")
    assert "tiny-random" in caplog.text and "other-sam-hq" in caplog.text


# --- errors ---------------------------------------------------------------------------------------


def test_missing_file_is_file_not_found(source: HQSamSegmenter, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"missing\.safetensors"):
        load_hq_weights(source.model, tmp_path / "missing.safetensors")


def test_a_file_that_is_not_safetensors_is_a_value_error(source: HQSamSegmenter, tmp_path: Path) -> None:
    path = tmp_path / "hq.safetensors"
    path.write_bytes(b"this is not a safetensors file at all")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_hq_weights(source.model, path)


def test_safetensors_without_the_format_metadata_points_to_segmenter(
    source: HQSamSegmenter, tmp_path: Path
) -> None:
    path = tmp_path / "model.safetensors"
    save_file(hq_state_dict(source.model), str(path))
    with pytest.raises(ValueError, match="--segmenter"):
        load_hq_weights(source.model, path)


def test_non_hq_tensors_in_the_file_are_refused(source: HQSamSegmenter, tmp_path: Path) -> None:
    path = tmp_path / "hq.safetensors"
    tensors = hq_state_dict(source.model) | {"mask_decoder.iou_token.weight": torch.zeros(1, 16)}
    save_file(tensors, str(path), metadata={"format": FORMAT, "base_model": "tiny-random"})
    with pytest.raises(ValueError, match=r"outside the HQ modules.*iou_token"):
        load_hq_weights(source.model, path)


def test_missing_hq_tensors_are_refused(source: HQSamSegmenter, tmp_path: Path) -> None:
    path = tmp_path / "hq.safetensors"
    tensors = {k: v for k, v in hq_state_dict(source.model).items() if "mask_conv2" not in k}
    save_file(tensors, str(path), metadata={"format": FORMAT, "base_model": "tiny-random"})
    with pytest.raises(ValueError, match=r"lacks HQ tensors.*mask_conv2"):
        load_hq_weights(source.model, path)


def test_weights_of_another_size_name_their_base(source: HQSamSegmenter, tmp_path: Path) -> None:
    wider = tiny_random_sam_hq(seed=0, decoder_hidden=32)
    path = save_hq_weights(wider.model, tmp_path / "wide.safetensors", base_model="tiny-random-hidden-32")
    before = {k: v.clone() for k, v in source.model.state_dict().items()}
    with pytest.raises(ValueError, match=r"'tiny-random-hidden-32'.*--segmenter"):
        load_hq_weights(source.model, path)
    assert all(torch.equal(v, before[k]) for k, v in source.model.state_dict().items()), "partly loaded"


def test_loading_into_plain_sam_is_a_type_error(weights_file: Path) -> None:
    with torch.device("meta"):
        sam = SamModel(SamConfig())
    with pytest.raises(TypeError, match="SamHQModel"):
        load_hq_weights(sam, weights_file)
