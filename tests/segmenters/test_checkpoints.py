"""Parity of hqlabel.segmenters.checkpoints against the official reference code.

Tiny SAM / HQ-SAM models of the reference implementations (``segment_anything``, ``segment_anything_hq``;
installed with ``pip install --no-deps segment-anything-hq==0.3 segment-anything==1.0``) get random weights,
are saved as an original ``.pth``, loaded with ``load_original_checkpoint`` and must give the same encoder
features, masks and IoU scores. Real-size (vit_b/l/h) key and shape coverage is checked on the meta device.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import pickle
import sys
import types
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from transformers import SamHQModel, SamHQProcessor, SamModel, SamProcessor

from hqlabel.segmenters.checkpoints import (
    convert_sam_hq_state_dict,
    convert_sam_state_dict,
    load_original_checkpoint,
)
from hqlabel.segmenters.hq_sam import HQSamSegmenter
from hqlabel.segmenters.transformers_fixes import fix_sam_hq_mask_decoder

TOL = 1e-4
IMAGE, PATCH, GRID = 128, 16, 8  # tiny models: 128 px input, 8 x 8 embedding grid, 32 x 32 mask logits


def _reference_modules(package: str) -> types.SimpleNamespace:
    """The reference modeling submodules, without the package ``__init__`` (it imports torchvision)."""
    spec = importlib.util.find_spec(package)
    if spec is None:
        pytest.skip(
            f"{package} not installed: pip install --no-deps segment-anything-hq==0.3 segment-anything==1.0"
        )
    root = Path(next(iter(spec.submodule_search_locations)))
    for name, path in [(package, root), (f"{package}.modeling", root / "modeling")]:
        if name not in sys.modules:
            stub = types.ModuleType(name)
            stub.__path__ = [str(path)]
            sys.modules[name] = stub
    names = ["image_encoder", "prompt_encoder", "transformer", "sam", "mask_decoder"]
    names += ["mask_decoder_hq"] if package == "segment_anything_hq" else []
    return types.SimpleNamespace(
        **{n: importlib.import_module(f"{package}.modeling.{n}") for n in names}, package=package
    )


@pytest.fixture(scope="module")
def ref_hq() -> types.SimpleNamespace:
    return _reference_modules("segment_anything_hq")


@pytest.fixture(scope="module")
def ref_sam() -> types.SimpleNamespace:
    return _reference_modules("segment_anything")


def build_reference(
    ref: types.SimpleNamespace,
    *,
    image_size: int = IMAGE,
    patch: int = PATCH,
    embed_dim: int = 64,
    depth: int = 4,
    heads: int = 2,
    global_attn: tuple[int, ...] = (1, 3),
    window: int = 3,  # 8 is not a multiple of 3: exercises the window padding
    prompt_dim: int = 32,
    decoder_mlp: int = 64,
    decoder_heads: int = 2,
    iou_hidden: int = 32,
) -> nn.Module:
    """A reference ``Sam`` (HQ decoder for segment_anything_hq), wired like ``build_sam._build_sam``."""
    grid = image_size // patch
    encoder = ref.image_encoder.ImageEncoderViT(
        depth=depth,
        embed_dim=embed_dim,
        img_size=image_size,
        mlp_ratio=4,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        num_heads=heads,
        patch_size=patch,
        qkv_bias=True,
        use_rel_pos=True,
        global_attn_indexes=global_attn,
        window_size=window,
        out_chans=prompt_dim,
    )
    prompt_encoder = ref.prompt_encoder.PromptEncoder(
        embed_dim=prompt_dim,
        image_embedding_size=(grid, grid),
        input_image_size=(image_size, image_size),
        mask_in_chans=16,
    )
    transformer = ref.transformer.TwoWayTransformer(
        depth=2, embedding_dim=prompt_dim, mlp_dim=decoder_mlp, num_heads=decoder_heads
    )
    common = dict(
        num_multimask_outputs=3,
        transformer=transformer,
        transformer_dim=prompt_dim,
        iou_head_depth=3,
        iou_head_hidden_dim=iou_hidden,
    )
    if ref.package == "segment_anything_hq":
        decoder = ref.mask_decoder_hq.MaskDecoderHQ(**common, vit_dim=embed_dim)
    else:
        decoder = ref.mask_decoder.MaskDecoder(**common)
    return ref.sam.Sam(image_encoder=encoder, prompt_encoder=prompt_encoder, mask_decoder=decoder).eval()


@torch.no_grad()
def randomize(model: nn.Module, seed: int) -> nn.Module:
    """Every saved tensor non-trivial (SAM zero-inits rel-pos tables, pos_embed, ...): LayerNorm weights
    1 + N(0, 0.1), biases N(0, 0.1), matrices N(0, 1 / fan_in), position tables N(0, 0.1), gaussian N(0, 1).
    """
    generator = torch.Generator().manual_seed(seed)
    norms = {
        f"{name}.{p}"
        for name, module in model.named_modules()
        if isinstance(module, nn.LayerNorm) or type(module).__name__ == "LayerNorm2d"
        for p in ("weight", "bias")
    }
    for key, tensor in model.state_dict().items():
        noise = torch.randn(tensor.shape, generator=generator)
        if key in norms and key.endswith("weight"):
            tensor.copy_(1 + 0.1 * noise)
        elif key.endswith("positional_encoding_gaussian_matrix"):
            tensor.copy_(noise)
        elif tensor.ndim < 2 or key.endswith(("pos_embed", "rel_pos_h", "rel_pos_w")):
            tensor.copy_(0.1 * noise)
        else:
            tensor.copy_(noise / math.sqrt(tensor[0].numel()))
    return model


@pytest.fixture(scope="module")
def hq_pair(ref_hq, tmp_path_factory):
    """(reference HQ-SAM, the same weights loaded through the original .pth, its processor)."""
    reference = randomize(build_reference(ref_hq), seed=0)
    path = tmp_path_factory.mktemp("ckpt") / "sam_hq_tiny.pth"
    torch.save(reference.state_dict(), path)
    model, processor = load_original_checkpoint(path, num_heads=2, decoder_num_heads=2)
    assert isinstance(model, SamHQModel) and isinstance(processor, SamHQProcessor)
    return reference, model, processor


@pytest.fixture(scope="module")
def sam_pair(ref_sam, tmp_path_factory):
    reference = randomize(build_reference(ref_sam), seed=1)
    path = tmp_path_factory.mktemp("ckpt") / "sam_tiny.pth"
    torch.save(reference.state_dict(), path)
    model, processor = load_original_checkpoint(path, num_heads=2, decoder_num_heads=2)
    assert isinstance(model, SamModel) and isinstance(processor, SamProcessor)
    return reference, model


def pixels(batch: int = 2, seed: int = 0) -> torch.Tensor:
    """Already resized, normalised and padded encoder input."""
    return torch.randn(batch, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(seed))


def prompts(case: str, batch: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    """transformers-layout prompts in the 128 px frame: boxes B x N x 4, points B x N x P x 2, labels
    B x N x P, masks B x 1 x 32 x 32 (low-resolution logits)."""
    generator = torch.Generator().manual_seed(seed)
    out = {}
    n = 3 if case == "boxes" else 2
    if case in ("boxes", "boxes+points", "boxes+mask"):
        corners = (torch.rand(batch, n, 2, 2, generator=generator) * (IMAGE - 8)).sort(dim=2).values
        corners[:, :, 1] += 8
        out["input_boxes"] = corners.reshape(batch, n, 4)
    if case in ("points", "boxes+points"):
        p = 3 if case == "points" else 2
        out["input_points"] = torch.rand(batch, n, p, 2, generator=generator) * IMAGE
        labels = torch.tensor([1, 0, 1][:p]).repeat(batch, n, 1)
        labels[:, 1] = torch.tensor([0, 1, 1][:p])  # positive and negative points in each prompt
        out["input_labels"] = labels
    if case == "boxes+mask":
        out["input_masks"] = torch.randn(batch, 1, 4 * GRID, 4 * GRID, generator=generator) * 4
    return out


@torch.no_grad()
def reference_decode(reference, pixel_values, prompt: dict, image: int, multimask: bool, hq_token_only=None):
    """The original pipeline for one image of the batch: N prompts -> (N x 1|3 x 32 x 32, N x 1|3 IoU)."""
    embeddings = reference.image_encoder(pixel_values[image : image + 1])
    if hq_token_only is not None:  # segment_anything_hq's encoder returns the intermediate embeddings too
        embeddings, interm = embeddings
    points = boxes = masks = None
    if "input_points" in prompt:
        points = (prompt["input_points"][image], prompt["input_labels"][image])
    if "input_boxes" in prompt:
        boxes = prompt["input_boxes"][image]
    n = len(boxes if boxes is not None else points[0])
    if "input_masks" in prompt:
        masks = prompt["input_masks"][image : image + 1].expand(n, -1, -1, -1)
    sparse, dense = reference.prompt_encoder(points=points, boxes=boxes, masks=masks)
    args = (embeddings, reference.prompt_encoder.get_dense_pe(), sparse, dense, multimask)
    if hq_token_only is None:
        return reference.mask_decoder(*args)
    return reference.mask_decoder(*args, hq_token_only, interm)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert actual.shape == expected.shape, f"{what}: {tuple(actual.shape)} vs {tuple(expected.shape)}"
    diff = (actual - expected).abs().max().item()
    scale = expected.abs().max().item()
    assert scale > 0.1, f"{what}: reference output ~0 ({scale:.2e}), the comparison would be vacuous"
    assert diff < TOL, f"{what}: max |diff| {diff:.2e} (output scale {scale:.2e})"


def test_hq_image_encoder_matches(hq_pair):
    reference, model, _ = hq_pair
    x = pixels()
    with torch.no_grad():
        expected, expected_interm = reference.image_encoder(x)
        actual, actual_interm = model.get_image_embeddings(x)
    assert_close(actual, expected, "image embeddings")
    assert len(actual_interm) == len(expected_interm) == 2  # global-attention blocks 1 and 3
    for a, e in zip(actual_interm, expected_interm, strict=True):
        assert_close(a, e, "intermediate embeddings")


CASES = ["boxes", "points", "boxes+points", "boxes+mask"]


@pytest.mark.parametrize("hq_token_only", [False, True])
@pytest.mark.parametrize("case", CASES)
def test_hq_single_mask_matches(hq_pair, case, hq_token_only):
    reference, model, _ = hq_pair
    x, prompt = pixels(), prompts(case)
    with torch.no_grad():
        out = model(pixel_values=x, **prompt, multimask_output=False, hq_token_only=hq_token_only)
    for image in range(x.shape[0]):
        masks, iou = reference_decode(
            reference, x, prompt, image, multimask=False, hq_token_only=hq_token_only
        )
        assert_close(out.pred_masks[image], masks, f"{case} masks, image {image}")
        assert_close(out.iou_scores[image], iou, f"{case} iou, image {image}")


@pytest.mark.parametrize("hq_token_only", [False, True])
@pytest.mark.parametrize("case", ["boxes", "points"])
def test_hq_multimask_first_is_the_reference_mask(hq_pair, case, hq_token_only):
    """The reference returns the best of the 3 SAM masks (+ HQ); transformers all 3, sorted by IoU."""
    reference, model, _ = hq_pair
    x, prompt = pixels(), prompts(case)
    with torch.no_grad():
        out = model(pixel_values=x, **prompt, multimask_output=True, hq_token_only=hq_token_only)
    assert out.pred_masks.shape[2] == (1 if hq_token_only else 3)
    assert (out.iou_scores.diff(dim=-1) <= 0).all(), "transformers sorts the 3 masks by IoU, best first"
    for image in range(x.shape[0]):
        masks, iou = reference_decode(
            reference, x, prompt, image, multimask=True, hq_token_only=hq_token_only
        )
        assert_close(out.pred_masks[image, :, :1], masks, f"{case} best mask, image {image}")
        assert_close(out.iou_scores[image, :, :1], iou, f"{case} best iou, image {image}")


def test_transformers_hq_decoder_needs_the_fix(hq_pair):
    """transformers' SamHQMaskDecoder upscales its input embedding (transposed) instead of the two-way
    transformer's output; fix_sam_hq_mask_decoder (applied by load_original_checkpoint) restores it."""
    reference, fixed, _ = hq_pair
    plain = SamHQModel(fixed.config).eval()
    plain.load_state_dict(fixed.state_dict())
    x, prompt = pixels(), prompts("boxes")
    with torch.no_grad():
        expected, _ = reference_decode(reference, x, prompt, 0, multimask=False, hq_token_only=False)
        unfixed = plain(pixel_values=x, **prompt, multimask_output=False).pred_masks[0]
        if (unfixed - expected).abs().max() < TOL:
            pytest.skip(
                "transformers' SamHQMaskDecoder is fixed upstream; fix_sam_hq_mask_decoder is a no-op"
            )
        assert (unfixed - expected).abs().max() > 0.1
        fix_sam_hq_mask_decoder(fix_sam_hq_mask_decoder(plain))  # idempotent
        assert_close(plain(pixel_values=x, **prompt, multimask_output=False).pred_masks[0], expected, "fixed")
        copy = pickle.loads(pickle.dumps(plain))  # the fix survives pickling (Ray ships models that way)
        assert_close(copy(pixel_values=x, **prompt, multimask_output=False).pred_masks[0], expected, "copy")


def test_segmenter_on_converted_checkpoint_matches_reference(hq_pair):
    """End to end through HQSamSegmenter (processor, embed once, decode boxes) on the converted model."""
    reference, model, processor = hq_pair
    image = np.random.default_rng(0).integers(0, 256, (96, IMAGE, 3), dtype=np.uint8)  # longest side = 128
    boxes = torch.tensor([[4.0, 8.0, 60.0, 50.0], [30.0, 20.0, 120.0, 90.0]])
    segmenter = HQSamSegmenter(model, processor)
    (logits,) = segmenter.predict_boxes(segmenter.embed([image]), [boxes])
    x = segmenter.processor(images=[image], return_tensors="pt")["pixel_values"]
    expected, _ = reference_decode(reference, x, {"input_boxes": boxes[None]}, 0, False, hq_token_only=False)
    assert_close(logits.logits.reshape(expected.shape), expected, "segmenter logits")


@pytest.mark.parametrize("multimask", [False, True])
@pytest.mark.parametrize("case", CASES)
def test_sam_matches(sam_pair, case, multimask):
    reference, model = sam_pair
    x, prompt = pixels(seed=1), prompts(case, seed=1)
    with torch.no_grad():
        assert_close(model.get_image_embeddings(x), reference.image_encoder(x), "SAM image embeddings")
        out = model(pixel_values=x, **prompt, multimask_output=multimask)
    for image in range(x.shape[0]):
        masks, iou = reference_decode(reference, x, prompt, image, multimask=multimask)
        assert_close(out.pred_masks[image], masks, f"{case} masks, image {image}")
        assert_close(out.iou_scores[image], iou, f"{case} iou, image {image}")


RELEASED = {  # build_sam.py: embed dim, depth, heads, global-attention blocks
    "vit_b": (768, 12, 12, (2, 5, 8, 11)),
    "vit_l": (1024, 24, 16, (5, 11, 17, 23)),
    "vit_h": (1280, 32, 16, (7, 15, 23, 31)),
}


@pytest.mark.parametrize("hq", [True, False], ids=["sam_hq", "sam"])
@pytest.mark.parametrize("size", ["vit_b", "vit_l", "vit_h"])
def test_released_sizes_map_every_tensor(ref_hq, ref_sam, hq, size):
    """The real architectures (on the meta device: shapes only) convert key for key and shape for shape."""
    dim, depth, heads, global_attn = RELEASED[size]
    with torch.device("meta"):
        reference = build_reference(
            ref_hq if hq else ref_sam,
            image_size=1024,
            embed_dim=dim,
            depth=depth,
            heads=heads,
            global_attn=global_attn,
            window=14,
            prompt_dim=256,
            decoder_mlp=2048,
            decoder_heads=8,
            iou_hidden=256,
        )
    original = reference.state_dict()
    config, converted = (convert_sam_hq_state_dict if hq else convert_sam_state_dict)(original)
    vision = config.vision_config
    assert (vision.hidden_size, vision.num_hidden_layers, vision.num_attention_heads) == (dim, depth, heads)
    assert tuple(vision.global_attn_indexes) == global_attn
    assert (vision.image_size, vision.patch_size, vision.window_size, vision.mlp_dim) == (
        1024,
        16,
        14,
        4 * dim,
    )
    assert config.mask_decoder_config.num_attention_heads == 8
    assert config.prompt_encoder_config.hidden_size == 256
    if hq:
        assert config.mask_decoder_config.vit_dim == dim
    with torch.device("meta"):
        model = (SamHQModel if hq else SamModel)(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    actual = {k: tuple(v.shape) for k, v in converted.items()}
    assert sorted(set(expected) - set(actual)) == [], "transformers tensors without a source"
    assert sorted(set(actual) - set(expected)) == [], "original tensors without a destination"
    assert actual == expected
    # one source tensor per destination, except the positional gaussian (shared by two transformers modules)
    assert len(converted) == len(original) + 1


def save(state_dict: dict, path: Path) -> Path:
    torch.save(state_dict, path)
    return path


@pytest.fixture(scope="module")
def tiny_hq_state_dict(ref_hq) -> dict[str, torch.Tensor]:
    return randomize(build_reference(ref_hq), seed=2).state_dict()


def test_wrapped_state_dict_and_pixel_statistics(ref_sam, tmp_path):
    """``{"model": {"module.<key>": ...}}`` loads; stored pixel_mean / pixel_std become the processor's."""
    state_dict = randomize(build_reference(ref_sam), seed=3).state_dict()
    mean, std = (
        torch.tensor([100.0, 110.0, 120.0]).view(3, 1, 1),
        torch.tensor([50.0, 60.0, 70.0]).view(3, 1, 1),
    )
    wrapped = {
        "model": {f"module.{k}": v for k, v in {**state_dict, "pixel_mean": mean, "pixel_std": std}.items()}
    }
    model, processor = load_original_checkpoint(save(wrapped, tmp_path / "wrapped.pth"), decoder_num_heads=2)
    assert torch.equal(model.vision_encoder.pos_embed, state_dict["image_encoder.pos_embed"])
    image = np.random.default_rng(0).integers(0, 256, (64, 128, 3), dtype=np.uint8)  # no resize needed
    inputs = processor(images=image, return_tensors="pt")
    assert tuple(inputs["pixel_values"].shape) == (1, 3, IMAGE, IMAGE)
    expected = (torch.from_numpy(image).permute(2, 0, 1).float() - mean) / std
    torch.testing.assert_close(inputs["pixel_values"][0, :, :64], expected, atol=1e-4, rtol=1e-4)
    assert inputs["pixel_values"][0, :, 64:].abs().max() == 0  # padded below


def test_default_processor_is_sams_preprocessing(tmp_path, tiny_hq_state_dict):
    _, processor = load_original_checkpoint(
        save(tiny_hq_state_dict, tmp_path / "hq.pth"), decoder_num_heads=2
    )
    image = np.random.default_rng(1).integers(0, 256, (256, 128, 3), dtype=np.uint8)
    inputs = processor(images=image, return_tensors="pt")
    assert inputs["reshaped_input_sizes"].tolist() == [[IMAGE, IMAGE // 2]]
    assert tuple(inputs["pixel_values"].shape) == (1, 3, IMAGE, IMAGE)
    ip = processor.image_processor
    assert np.allclose(np.array(ip.image_mean) * 255, [123.675, 116.28, 103.53])
    assert np.allclose(np.array(ip.image_std) * 255, [58.395, 57.12, 57.375])


@pytest.mark.parametrize(
    "removed",
    [
        "mask_decoder.hf_mlp.layers.1.bias",
        "image_encoder.blocks.2.attn.proj.weight",
        "image_encoder.neck.0.weight",
    ],
)
def test_missing_tensor_is_named(tmp_path, tiny_hq_state_dict, removed):
    state_dict = {k: v for k, v in tiny_hq_state_dict.items() if k != removed}
    with pytest.raises(ValueError, match="not a complete") as error:
        load_original_checkpoint(save(state_dict, tmp_path / "partial.pth"), decoder_num_heads=2)
    assert removed in str(error.value)


def test_unexpected_and_misshaped_tensors_are_named(tmp_path, tiny_hq_state_dict):
    state_dict = dict(tiny_hq_state_dict)
    state_dict["mask_decoder.extra_head.weight"] = torch.zeros(2)
    state_dict["mask_decoder.hf_token.weight"] = torch.zeros(1, 31)
    with pytest.raises(ValueError, match="not a complete HQ-SAM checkpoint") as error:
        load_original_checkpoint(save(state_dict, tmp_path / "odd.pth"), decoder_num_heads=2)
    assert "mask_decoder.extra_head.weight" in str(error.value)
    assert "mask_decoder.hf_token.weight (1, 31)" in str(error.value)


def test_truncated_file_names_the_path(tmp_path, tiny_hq_state_dict):
    path = save(tiny_hq_state_dict, tmp_path / "sam_hq_vit_b.pth")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match="re-download") as error:
        load_original_checkpoint(path)
    assert str(path) in str(error.value)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.pth"):
        load_original_checkpoint(tmp_path / "nope.pth")


def test_incomplete_light_hq_sam_is_named(tmp_path):
    """A TinyViT (Light HQ-SAM) file loads (tests/segmenters/test_light_hq_sam.py); a fragment is refused."""
    tiny_vit = {
        "image_encoder.patch_embed.seq.0.c.weight": torch.zeros(32, 3, 3, 3),
        "image_encoder.layers.0.blocks.0.conv1.c.weight": torch.zeros(256, 64, 1, 1),
        "mask_decoder.hf_token.weight": torch.zeros(1, 256),
    }
    with pytest.raises(ValueError, match="not a complete SAM / HQ-SAM checkpoint"):
        load_original_checkpoint(save(tiny_vit, tmp_path / "sam_hq_vit_tiny.pth"))
    with pytest.raises(ValueError, match="not a complete SAM / HQ-SAM checkpoint"):
        convert_sam_hq_state_dict(tiny_vit)


def test_wrong_converter_and_contradicting_heads(tiny_hq_state_dict):
    with pytest.raises(ValueError, match="convert_sam_hq_state_dict"):
        convert_sam_state_dict(tiny_hq_state_dict)
    with pytest.raises(ValueError, match="num_heads=4 contradicts"):
        convert_sam_hq_state_dict(tiny_hq_state_dict, num_heads=4)
