"""Light HQ-SAM (TinyViT encoder): parity with the official ``segment_anything_hq`` code, loading, presets.

The official Light HQ-SAM (``segment_anything_hq.modeling.tiny_vit_sam.TinyViT`` + ``MaskDecoderHQ``) is built
with small widths and random weights (BatchNorm statistics included), saved as an original-format ``.pth``,
loaded with ``load_original_checkpoint`` and must give the same image embeddings, early feature, masks and
IoU scores. The official TinyViT hard-codes a 64 x 64 output grid (1024 px input) and a stride-1 patch merging
only into a 320/448/576-wide last stage, so the test model keeps those and shrinks the rest.

``tiny_vit_sam.py`` imports ``timm`` (``DropPath``, ``to_2tuple``, ``trunc_normal_``, ``register_model``),
which cannot be installed here (it needs torchvision). Only to import that reference file, ``_reference``
registers a minimal stand-in ``timm`` in ``sys.modules`` and removes it right after the import; the stand-in
is never used by hqlabel (whose TinyViT port, ``hqlabel/segmenters/tiny_vit.py``, needs no timm), and with
drop-path rate 0 the reference never calls ``DropPath``.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import encode
from PIL import Image
from torch import nn

from hqlabel.jobs.cli import main
from hqlabel.segmenters import Prompts, build_segmenter
from hqlabel.segmenters.checkpoints import convert_sam_hq_state_dict, load_original_checkpoint
from hqlabel.segmenters.hq_sam import HQSamSegmenter
from hqlabel.segmenters.hq_weights import hq_state_dict, save_hq_weights
from hqlabel.segmenters.light_hq_sam import LightSamHQModel
from hqlabel.segmenters.tiny_vit import TinyViTConfig

pytestmark = pytest.mark.timeout(240)

REL_TOL = 1e-4
IMAGE, GRID = 1024, 64
SMALL = dict(embed_dims=[16, 32, 48, 320], depths=[1, 2, 2, 1], num_heads=[1, 2, 3, 5])
RELEASED = dict(embed_dims=[64, 128, 160, 320], depths=[2, 2, 6, 2], num_heads=[2, 4, 5, 10])


def _timm_stand_in() -> dict[str, types.ModuleType]:
    """The four names tiny_vit_sam.py imports from timm, nothing else."""
    timm, models = types.ModuleType("timm"), types.ModuleType("timm.models")
    layers, registry = types.ModuleType("timm.models.layers"), types.ModuleType("timm.models.registry")

    class DropPath(nn.Identity):  # the reference builds it only for drop_path > 0 (never here)
        def __init__(self, drop_prob=None) -> None:
            super().__init__()

    layers.DropPath = DropPath
    layers.to_2tuple = lambda x: tuple(x) if isinstance(x, (tuple, list)) else (x, x)
    layers.trunc_normal_ = nn.init.trunc_normal_
    registry.register_model = lambda fn: fn
    timm.models, models.layers, models.registry = models, layers, registry
    return {
        "timm": timm,
        "timm.models": models,
        "timm.models.layers": layers,
        "timm.models.registry": registry,
    }


@pytest.fixture(scope="module")
def ref() -> types.SimpleNamespace:
    """The reference modeling modules, without the package ``__init__`` (it imports torchvision)."""
    package = "segment_anything_hq"
    if package in sys.modules:  # test_checkpoints.py's stand-in package (no __spec__) or ours
        root = Path(sys.modules[package].__path__[0])
    else:
        spec = importlib.util.find_spec(package)
        if spec is None:
            pytest.skip(f"{package} not installed: pip install --no-deps segment-anything-hq==0.3")
        root = Path(next(iter(spec.submodule_search_locations)))
    for name, path in [(package, root), (f"{package}.modeling", root / "modeling")]:
        if name not in sys.modules:
            stub = types.ModuleType(name)
            stub.__path__ = [str(path)]
            stub.__spec__ = importlib.util.spec_from_file_location(
                name, path / "__init__.py", submodule_search_locations=[str(path)]
            )
            sys.modules[name] = stub
    stand_in = {} if importlib.util.find_spec("timm") else _timm_stand_in()
    sys.modules.update(stand_in)
    try:
        tiny_vit = importlib.import_module(f"{package}.modeling.tiny_vit_sam")
    finally:
        for name in stand_in:
            sys.modules.pop(name, None)
    names = ["prompt_encoder", "transformer", "sam", "mask_decoder_hq"]
    modules = {n: importlib.import_module(f"{package}.modeling.{n}") for n in names}
    return types.SimpleNamespace(tiny_vit_sam=tiny_vit, **modules)


def build_reference(ref, *, embed_dims, depths, num_heads, decoder_mlp: int = 64) -> nn.Module:
    """A reference Light HQ-SAM, wired like ``build_sam.build_sam_vit_t`` (prompt width 256, 1024 px)."""
    encoder = ref.tiny_vit_sam.TinyViT(
        img_size=IMAGE,
        in_chans=3,
        num_classes=1000,  # the released file keeps this unused head: the loader must drop it
        embed_dims=embed_dims,
        depths=depths,
        num_heads=num_heads,
        window_sizes=[7, 7, 14, 7],  # grids 128, 64, 64: 128 and 64 are not multiples of 7 or 14 (padding)
        mlp_ratio=4.0,
        drop_rate=0.0,
        drop_path_rate=0.0,
        mbconv_expand_ratio=4.0,
        local_conv_size=3,
        layer_lr_decay=0.8,
    )
    prompt_encoder = ref.prompt_encoder.PromptEncoder(
        embed_dim=256, image_embedding_size=(GRID, GRID), input_image_size=(IMAGE, IMAGE), mask_in_chans=16
    )
    transformer = ref.transformer.TwoWayTransformer(
        depth=2, embedding_dim=256, mlp_dim=decoder_mlp, num_heads=8
    )
    decoder = ref.mask_decoder_hq.MaskDecoderHQ(
        num_multimask_outputs=3,
        transformer=transformer,
        transformer_dim=256,
        iou_head_depth=3,
        iou_head_hidden_dim=256,
        vit_dim=embed_dims[2],
    )
    return ref.sam.Sam(image_encoder=encoder, prompt_encoder=prompt_encoder, mask_decoder=decoder).eval()


@torch.no_grad()
def randomize(model: nn.Module, seed: int) -> nn.Module:
    """Every saved tensor non-trivial: norm / BatchNorm weights 1 + N(0, 0.1), biases and running means
    N(0, 0.1), running variances U(0.5, 1.5), attention biases N(0, 0.5), matrices N(0, 1 / fan_in)."""
    generator = torch.Generator().manual_seed(seed)
    for key, tensor in model.state_dict().items():
        if not tensor.is_floating_point():  # num_batches_tracked
            continue
        noise = torch.randn(tensor.shape, generator=generator)
        if key.endswith("running_var"):
            tensor.copy_(0.5 + torch.rand(tensor.shape, generator=generator))
        elif key.endswith("attention_biases"):
            tensor.copy_(0.5 * noise)
        elif key.endswith("positional_encoding_gaussian_matrix"):
            tensor.copy_(noise)
        elif tensor.ndim < 2 and key.endswith("weight"):
            tensor.copy_(1 + 0.1 * noise)
        elif tensor.ndim < 2:
            tensor.copy_(0.1 * noise)
        else:
            tensor.copy_(noise / math.sqrt(tensor[0].numel()))
    return model.eval()  # the reference caches its attention biases (``ab``) when switched to eval


@pytest.fixture(scope="module")
def pair(ref, tmp_path_factory):
    """(reference Light HQ-SAM, the same weights loaded from its .pth, the processor, the .pth path)."""
    reference = randomize(build_reference(ref, **SMALL), seed=0)
    path = tmp_path_factory.mktemp("ckpt") / "sam_hq_vit_tiny.pth"
    torch.save(reference.state_dict(), path)
    model, processor = load_original_checkpoint(path)
    return reference, model, processor, path


def pixels(seed: int = 0) -> torch.Tensor:
    """One resized, normalised, padded 1024 px encoder input."""
    return torch.randn(1, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(seed))


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert actual.shape == expected.shape, f"{what}: {tuple(actual.shape)} vs {tuple(expected.shape)}"
    scale = expected.abs().max().item()
    assert scale > 0.1, f"{what}: reference output ~0 ({scale:.2e}), the comparison would be vacuous"
    diff = (actual - expected).abs().max().item()
    assert diff < REL_TOL * max(1.0, scale), f"{what}: max |diff| {diff:.2e} (output scale {scale:.2e})"


@pytest.fixture(scope="module")
def encoded(pair):
    """Reference and hqlabel encoder outputs on the same input (each encoder runs once per module)."""
    reference, model, _, _ = pair
    x = pixels()
    with torch.no_grad():
        expected, expected_interm = reference.image_encoder(x)
        actual, actual_interm = model.get_image_embeddings(x)
    return x, (expected, expected_interm[0]), (actual, actual_interm)


def test_loads_as_light_model_with_inferred_config(pair):
    _, model, processor, _ = pair
    assert isinstance(model, LightSamHQModel)
    tiny = TinyViTConfig(**model.config.tiny_vit)
    assert (tiny.embed_dims, tiny.depths, tiny.num_heads[1:]) == (
        SMALL["embed_dims"],
        SMALL["depths"],
        [2, 3, 5],
    )
    assert tiny.window_sizes[1:] == [7, 14, 7] and tiny.img_size == IMAGE
    assert model.config.mask_decoder_config.vit_dim == 48
    assert processor.image_processor.pad_size == {"height": IMAGE, "width": IMAGE}


def test_image_embeddings_and_early_feature_match(encoded):
    _, (expected, expected_interm), (actual, actual_interm) = encoded
    assert_close(actual, expected, "image embeddings")  # B x 256 x 64 x 64
    assert len(actual_interm) == 1
    assert tuple(actual_interm[0].shape) == (1, GRID, GRID, 48)
    assert_close(actual_interm[0], expected_interm, "early feature (stage 1 output)")


def _prompts(case: str) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    out = {}
    if case in ("boxes", "boxes+points"):
        corners = (torch.rand(1, 2, 2, 2, generator=generator) * (IMAGE - 64)).sort(dim=2).values
        corners[:, :, 1] += 64
        out["input_boxes"] = corners.reshape(1, 2, 4)
    if case in ("points", "boxes+points"):
        out["input_points"] = torch.rand(1, 2, 2, 2, generator=generator) * IMAGE
        out["input_labels"] = torch.tensor([[[1, 0], [0, 1]]])  # positive and negative points
    return out


@torch.no_grad()
def _reference_decode(reference, embeddings, interm, prompt, multimask: bool, hq_token_only: bool):
    points = boxes = None
    if "input_points" in prompt:
        points = (prompt["input_points"][0], prompt["input_labels"][0])
    if "input_boxes" in prompt:
        boxes = prompt["input_boxes"][0]
    sparse, dense = reference.prompt_encoder(points=points, boxes=boxes, masks=None)
    pe = reference.prompt_encoder.get_dense_pe()
    return reference.mask_decoder(embeddings, pe, sparse, dense, multimask, hq_token_only, [interm])


# (each decode of a 256-wide decoder into 256 x 256 logits costs ~1 s of CPU: three cases cover the prompt
# kinds and both HQ modes)
@pytest.mark.parametrize(
    ("case", "hq_token_only"), [("boxes", False), ("points", True), ("boxes+points", False)]
)
def test_masks_and_iou_match(pair, encoded, case, hq_token_only):
    reference, model, _, _ = pair
    _, (embeddings, interm), (actual, actual_interm) = encoded
    prompt = _prompts(case)
    masks, iou = _reference_decode(reference, embeddings, interm, prompt, False, hq_token_only)
    with torch.no_grad():
        out = model(
            image_embeddings=actual,
            intermediate_embeddings=actual_interm,
            **prompt,
            multimask_output=False,
            hq_token_only=hq_token_only,
        )
    assert_close(out.pred_masks[0], masks, f"{case} masks")  # N x 1 x 256 x 256 logits
    assert_close(out.iou_scores[0], iou, f"{case} iou")


def test_multimask_first_is_the_reference_mask(pair, encoded):
    reference, model, _, _ = pair
    _, (embeddings, interm), (actual, actual_interm) = encoded
    prompt = _prompts("points")
    masks, iou = _reference_decode(reference, embeddings, interm, prompt, True, False)
    with torch.no_grad():
        out = model(
            image_embeddings=actual, intermediate_embeddings=actual_interm, **prompt, multimask_output=True
        )
    assert_close(out.pred_masks[0, :, :1], masks, "best mask")
    assert_close(out.iou_scores[0, :, :1], iou, "best iou")


def test_segmenter_end_to_end_matches_reference(pair):
    """HQSamSegmenter (processor, embed once, decode boxes) on the loaded Light model vs the reference."""
    reference, model, processor, _ = pair
    image = np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8)
    boxes = torch.tensor([[10.0, 20.0, 200.0, 150.0], [150.0, 100.0, 390.0, 290.0]])
    segmenter = HQSamSegmenter(model, processor, multimask="best")
    (logits,) = segmenter.predict_boxes(segmenter.embed([image]), [boxes])
    x = processor(images=[image], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        embeddings, interm = reference.image_encoder(x)
    scaled = {"input_boxes": (boxes * IMAGE / 400)[None]}
    expected, iou = _reference_decode(reference, embeddings, interm[0], scaled, True, False)
    assert_close(logits.logits, expected, "segmenter logits")
    assert_close(logits.iou_scores, iou, "segmenter iou")
    assert segmenter.attention_implementation == "sdpa"


def test_released_size_maps_every_tensor(ref):
    """The released vit_tiny architecture (build_sam_vit_t) converts key for key and shape for shape."""
    original = build_reference(ref, **RELEASED, decoder_mlp=2048).state_dict()
    config, converted = convert_sam_hq_state_dict(original)
    tiny = TinyViTConfig(**config.tiny_vit)
    assert tiny == TinyViTConfig(num_heads=[1, 4, 5, 10])  # the released defaults; stage 0 has no heads
    assert config.mask_decoder_config.vit_dim == 160 and config.mask_decoder_config.mlp_dim == 2048
    with torch.device("meta"):
        model = LightSamHQModel(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    actual = {k: tuple(v.shape) for k, v in converted.items()}
    assert sorted(set(expected) - set(actual)) == [], "hqlabel tensors without a source"
    assert sorted(set(actual) - set(expected)) == [], "original tensors without a destination"
    assert actual == expected
    head = [k for k in original if k.startswith(("image_encoder.head.", "image_encoder.norm_head."))]
    assert len(head) == 4  # the unused classification head, dropped
    assert len(converted) == len(original) - len(head) + 1  # + the shared positional gaussian


def test_checkpoint_without_batchnorm_counters_loads_and_bad_ones_are_named(pair, tmp_path):
    reference, model, _, _ = pair
    state_dict = {k: v for k, v in reference.state_dict().items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "no_counters.pth"
    torch.save(state_dict, path)
    reloaded, _ = load_original_checkpoint(path)
    key = "vision_encoder.layers.2.blocks.1.attn.attention_biases"
    assert torch.equal(reloaded.state_dict()[key], model.state_dict()[key])
    del state_dict["image_encoder.layers.1.blocks.0.mlp.fc2.weight"]
    torch.save(state_dict, path)
    with pytest.raises(
        ValueError, match=r"Light HQ-SAM checkpoint.*missing 1: image_encoder\.layers\.1\.blocks"
    ):
        load_original_checkpoint(path)
    plain = {k: v for k, v in state_dict.items() if not k.startswith("mask_decoder.hf_")}
    torch.save({k: v for k, v in plain.items() if "compress_vit" not in k and "embedding_" not in k}, path)
    with pytest.raises(ValueError, match="MobileSAM"):
        load_original_checkpoint(path)


def test_pth_path_works_as_segmenter_option(pair, tmp_path, capsys):
    """``hqlabel segment --segmenter PATH/sam_hq_vit_tiny.pth`` masks = the loaded model's, thresholded."""
    _, model, processor, path = pair
    image = np.random.default_rng(1).integers(0, 256, (60, 80, 3), dtype=np.uint8)
    image_path = tmp_path / "photo.png"
    image_path.write_bytes(encode(image))
    out = tmp_path / "seg"
    args = ["segment", str(image_path), "--box", "5,5,50,40", "--segmenter", str(path), "--out", str(out)]
    assert main(args) == 0
    written = np.asarray(Image.open(out / "photo_mask_0.png")) > 0
    segmenter = HQSamSegmenter(model, processor)
    (logits,) = segmenter.predict(segmenter.embed([image]), [Prompts(boxes=torch.tensor([[5.0, 5, 50, 40]]))])
    expected = torch.cat(list(segmenter.iter_masks(logits)))[0, 0].numpy()
    assert np.array_equal(written, expected)


def test_tiny_random_preset_and_name(tmp_path):
    segmenter = build_segmenter("sam-hq-light", preset="tiny-random", multimask="off")
    assert isinstance(segmenter.model, LightSamHQModel) and segmenter.is_hq
    image = np.random.default_rng(2).integers(0, 256, (90, 120, 3), dtype=np.uint8)
    embeddings = segmenter.embed([image])
    assert tuple(embeddings.image_embeddings.shape) == (1, 16, 8, 8)
    assert tuple(embeddings.intermediate_embeddings[0].shape) == (1, 8, 8, 24)
    assert embeddings.image_embeddings.std() > 0.1  # a random TinyViT that does not vanish
    (logits,) = segmenter.predict_boxes(embeddings, [torch.tensor([[10.0, 10.0, 80.0, 70.0]])])
    assert tuple(logits.logits.shape) == (1, 1, 32, 32)

    segmenter.save_pretrained(tmp_path / "light")  # config.json keeps tiny_vit: reloads as Light HQ-SAM
    again = build_segmenter(str(tmp_path / "light"), multimask="off")
    assert isinstance(again.model, LightSamHQModel)
    (same,) = again.predict_boxes(again.embed([image]), [torch.tensor([[10.0, 10.0, 80.0, 70.0]])])
    torch.testing.assert_close(same.logits, logits.logits)

    with torch.no_grad():  # HQ-only weights: tune (perturb) the HQ token, save, load onto a fresh preset
        segmenter.model.mask_decoder.hq_token.weight.add_(1.0)
    save_hq_weights(segmenter.model, tmp_path / "hq.safetensors", base_model="sam-hq-light")
    tuned = build_segmenter("sam-hq-light", preset="tiny-random", hq_weights=str(tmp_path / "hq.safetensors"))
    expected = hq_state_dict(segmenter.model)
    assert all(torch.equal(v, expected[k]) for k, v in hq_state_dict(tuned.model).items())
    assert not torch.equal(again.model.mask_decoder.hq_token.weight, tuned.model.mask_decoder.hq_token.weight)

    with pytest.raises(ValueError, match=r"sam_hq_vit_tiny\.pth"):
        build_segmenter("sam-hq-light")
    plain = build_segmenter("anything-else", preset="tiny-random")
    assert not isinstance(plain.model, LightSamHQModel)


def test_label_job_with_light_preset(ray_session, image_folder, tmp_path):
    """``hqlabel label --preset tiny-random --segmenter sam-hq-light``: the job's masks are the in-memory
    Light HQ-SAM labeler's (same options, one image per batch)."""
    import pyarrow.parquet as pq

    import hqlabel

    out = tmp_path / "labels"
    args = ["label", str(image_folder), "--out", str(out), "--classes", "cat, dog", "--preset", "tiny-random"]
    assert main([*args, "--segmenter", "sam-hq-light", "--box-threshold", "0.3", "--batch-size", "1"]) == 0
    rows = pq.read_table(out / "masks").to_pylist()
    assert rows, "random models fire on every image"
    labeler = hqlabel.Labeler.from_pretrained(
        segmenter="sam-hq-light", classes="cat, dog", preset="tiny-random", box_threshold=0.3, batch_size=1
    )
    assert isinstance(labeler.core.segmenter.model, LightSamHQModel)
    image_id = rows[0]["image_id"]
    result = labeler(np.asarray(Image.open(image_folder / image_id).convert("RGB")))
    job_rows = [r for r in rows if r["image_id"] == image_id]
    assert [r["mask"] for r in result.rows()] == [r["mask"] for r in job_rows]
