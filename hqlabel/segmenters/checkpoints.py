"""Load the original SAM / HQ-SAM ``.pth`` checkpoints into ``transformers`` models.

The released files (Meta's ``sam_vit_{b,l,h}_*.pth``, SysCV's ``sam_hq_vit_{b,l,h,tiny}.pth``) are plain state
dicts of the reference ``Sam`` module (``image_encoder.*``, ``prompt_encoder.*``, ``mask_decoder.*``). This
module renames every tensor to the ``transformers.SamModel`` / ``SamHQModel`` layout and infers the model
config from the tensor shapes, so a checkpoint of any ViT size loads without a hand-written config:

- ViT width, patch size, depth, MLP width, neck channels: from the patch embedding, blocks and neck weights.
- image size: from the absolute position embedding (``1 x (S/p) x (S/p) x D``).
- global-attention blocks: their relative-position tables span the whole grid (``2 * S/p - 1`` rows), windowed
  blocks span one window (``2 * window - 1`` rows), which also gives the window size.
- ViT heads: ``D / head_dim``, with ``head_dim`` the width of the relative-position tables.
- mask-decoder heads are not visible in any shape; every released decoder uses 8 (``decoder_num_heads=``).

Light HQ-SAM (``sam_hq_vit_tiny.pth``) has a TinyViT encoder: it loads as ``light_hq_sam.LightSamHQModel``,
the TinyViT hyper-parameters inferred from the stage widths, block counts and attention-bias tables
(``_tiny_vit_config``); its unused classification head (``image_encoder.head``, ``norm_head``) is dropped.

The reference decoder's two-way transformer uses ``nn.LayerNorm``'s default eps (1e-5); the converted config
says so (``transformers`` defaults to 1e-6 there), which keeps the outputs equal to the reference code.

``load_original_checkpoint`` applies ``transformers_fixes.fix_sam_hq_mask_decoder`` (transformers' HQ mask
decoder upscales the wrong tensor; see that module).
"""

from __future__ import annotations

import math
import pickle
import re
import zipfile
from pathlib import Path

import torch
from torch import Tensor
from transformers import (
    PreTrainedModel,
    ProcessorMixin,
    SamConfig,
    SamHQConfig,
    SamHQModel,
    SamHQProcessor,
    SamModel,
    SamProcessor,
)
from transformers.models.sam.image_processing_pil_sam import SamImageProcessorPil

from hqlabel.segmenters.light_hq_sam import LIGHT_PATCH, LightSamHQModel, light_sam_hq_config
from hqlabel.segmenters.tiny_vit import TinyViTConfig
from hqlabel.segmenters.transformers_fixes import fix_sam_hq_mask_decoder

# ViT width -> (heads, global-attention blocks) of the released SAM / HQ-SAM encoders (vit_b, vit_l, vit_h).
RELEASED_VIT_SIZES: dict[int, tuple[int, tuple[int, ...]]] = {
    768: (12, (2, 5, 8, 11)),
    1024: (16, (5, 11, 17, 23)),
    1280: (16, (7, 15, 23, 31)),
}
SAM_DECODER_HEADS = 8
SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)  # the reference Sam's normalisation, 0-255 RGB
SAM_PIXEL_STD = (58.395, 57.12, 57.375)

_HQ_PREFIXES = (
    "mask_decoder.hf_token.",
    "mask_decoder.hf_mlp.",
    "mask_decoder.compress_vit_feat.",
    "mask_decoder.embedding_encoder.",
    "mask_decoder.embedding_maskfeature.",
)
_TINY_VIT_HEAD = ("image_encoder.norm_head.", "image_encoder.head.")
_GAUSSIAN = "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"
_HF_GAUSSIANS = (
    "shared_image_embedding.positional_embedding",
    "prompt_encoder.shared_embedding.positional_embedding",
)

# (original key prefix, transformers key prefix); "{i}" stands for a block / layer index. Keys no rule
# matches keep their name (``iou_token``, ``attn.qkv``, ``transformer.layers.{i}.self_attn``, ...); unknown
# keys thereby surface as unexpected in the strict load instead of being dropped.
_RULES = [
    ("image_encoder.patch_embed.proj.", "vision_encoder.patch_embed.projection."),
    ("image_encoder.pos_embed", "vision_encoder.pos_embed"),
    ("image_encoder.blocks.{i}.norm1.", "vision_encoder.layers.{i}.layer_norm1."),
    ("image_encoder.blocks.{i}.norm2.", "vision_encoder.layers.{i}.layer_norm2."),
    ("image_encoder.blocks.{i}.", "vision_encoder.layers.{i}."),
    ("image_encoder.neck.0.", "vision_encoder.neck.conv1."),
    ("image_encoder.neck.1.", "vision_encoder.neck.layer_norm1."),
    ("image_encoder.neck.2.", "vision_encoder.neck.conv2."),
    ("image_encoder.neck.3.", "vision_encoder.neck.layer_norm2."),
    ("prompt_encoder.point_embeddings.{i}.", "prompt_encoder.point_embed.{i}."),
    ("prompt_encoder.mask_downscaling.0.", "prompt_encoder.mask_embed.conv1."),
    ("prompt_encoder.mask_downscaling.1.", "prompt_encoder.mask_embed.layer_norm1."),
    ("prompt_encoder.mask_downscaling.3.", "prompt_encoder.mask_embed.conv2."),
    ("prompt_encoder.mask_downscaling.4.", "prompt_encoder.mask_embed.layer_norm2."),
    ("prompt_encoder.mask_downscaling.6.", "prompt_encoder.mask_embed.conv3."),
    ("mask_decoder.transformer.layers.{i}.norm1.", "mask_decoder.transformer.layers.{i}.layer_norm1."),
    ("mask_decoder.transformer.layers.{i}.norm2.", "mask_decoder.transformer.layers.{i}.layer_norm2."),
    ("mask_decoder.transformer.layers.{i}.norm3.", "mask_decoder.transformer.layers.{i}.layer_norm3."),
    ("mask_decoder.transformer.layers.{i}.norm4.", "mask_decoder.transformer.layers.{i}.layer_norm4."),
    ("mask_decoder.transformer.norm_final_attn.", "mask_decoder.transformer.layer_norm_final_attn."),
    ("mask_decoder.output_upscaling.0.", "mask_decoder.upscale_conv1."),
    ("mask_decoder.output_upscaling.1.", "mask_decoder.upscale_layer_norm."),
    ("mask_decoder.output_upscaling.3.", "mask_decoder.upscale_conv2."),
    ("mask_decoder.hf_token.", "mask_decoder.hq_token."),
    ("mask_decoder.compress_vit_feat.0.", "mask_decoder.compress_vit_conv1."),
    ("mask_decoder.compress_vit_feat.1.", "mask_decoder.compress_vit_norm."),
    ("mask_decoder.compress_vit_feat.3.", "mask_decoder.compress_vit_conv2."),
    ("mask_decoder.embedding_encoder.0.", "mask_decoder.encoder_conv1."),
    ("mask_decoder.embedding_encoder.1.", "mask_decoder.encoder_norm."),
    ("mask_decoder.embedding_encoder.3.", "mask_decoder.encoder_conv2."),
    ("mask_decoder.embedding_maskfeature.0.", "mask_decoder.mask_conv1."),
    ("mask_decoder.embedding_maskfeature.1.", "mask_decoder.mask_norm."),
    ("mask_decoder.embedding_maskfeature.3.", "mask_decoder.mask_conv2."),
]


class _Renamer:
    """Original <-> transformers key names, both ways (the reverse names missing keys in error messages)."""

    def __init__(self, num_mask_tokens: int, iou_head_depth: int, hq: bool, light: bool = False) -> None:
        rules = list(_RULES)
        if light:  # hqlabel's TinyViT keeps the original module names
            rules = [r for r in rules if not r[0].startswith("image_encoder.")]
            rules.append(("image_encoder.", "vision_encoder."))
        # The reference MLP keeps its Linears in ``layers.0..n-1``; transformers names the ends proj_in/out.
        mlps = [(f"mask_decoder.output_hypernetworks_mlps.{k}", None, 3) for k in range(num_mask_tokens)]
        mlps.append(("mask_decoder.iou_prediction_head", None, iou_head_depth))
        if hq:
            mlps.append(("mask_decoder.hf_mlp", "mask_decoder.hq_mask_mlp", 3))
        for src, dst, depth in mlps:
            dst = dst or src
            rules.append((f"{src}.layers.0.", f"{dst}.proj_in."))
            rules += [(f"{src}.layers.{j}.", f"{dst}.layers.{j - 1}.") for j in range(1, depth - 1)]
            rules.append((f"{src}.layers.{depth - 1}.", f"{dst}.proj_out."))
        self._forward = [(self._compile(a), b) for a, b in rules]
        self._backward = [(self._compile(b), a) for a, b in rules]

    @staticmethod
    def _compile(prefix: str) -> re.Pattern[str]:
        return re.compile("^" + re.escape(prefix).replace(re.escape("{i}"), r"(?P<i>\d+)"))

    @staticmethod
    def _apply(rules: list[tuple[re.Pattern[str], str]], key: str) -> str:
        for pattern, template in rules:
            match = pattern.match(key)
            if match:
                return template.replace("{i}", match.groupdict().get("i") or "") + key[match.end() :]
        return key

    def to_hf(self, key: str) -> list[str]:
        return list(_HF_GAUSSIANS) if key == _GAUSSIAN else [self._apply(self._forward, key)]

    def to_original(self, key: str) -> str:
        return _GAUSSIAN if key in _HF_GAUSSIANS else self._apply(self._backward, key)


def _unwrap(state_dict: dict) -> dict[str, Tensor]:
    """The bare state dict: unwrap ``{"model": ...}`` / ``{"state_dict": ...}``, strip DDP's ``module.``."""
    for wrapper in ("state_dict", "model"):
        if isinstance(state_dict.get(wrapper), dict):
            state_dict = state_dict[wrapper]
            break
    if state_dict and all(k.startswith("module.") for k in state_dict):
        state_dict = {k.removeprefix("module."): v for k, v in state_dict.items()}
    bad = [k for k, v in state_dict.items() if not isinstance(v, Tensor)]
    if bad:
        raise ValueError(f"not a SAM / HQ-SAM state dict: entries {bad[:5]} are not tensors")
    if not any(k.startswith("image_encoder.blocks.") for k in state_dict) and not is_light_state_dict(
        state_dict
    ):
        raise ValueError(
            "not a SAM / HQ-SAM checkpoint: no `image_encoder.blocks.*` (ViT) or `image_encoder.layers.*` "
            f"(TinyViT) tensors (first keys: {list(state_dict)[:5]})"
        )
    return state_dict


def is_light_state_dict(state_dict: dict) -> bool:
    """Whether an original-layout state dict has a TinyViT image encoder (Light HQ-SAM, MobileSAM)."""
    return any(k.startswith(("image_encoder.layers.", "image_encoder.patch_embed.seq.")) for k in state_dict)


def is_hq_state_dict(state_dict: dict) -> bool:
    """Whether an original-layout state dict holds HQ-SAM's extra decoder parts (``hf_token``, ...)."""
    return any(k.startswith(_HQ_PREFIXES) for k in _unwrap(state_dict))


def _tensor(state_dict: dict[str, Tensor], key: str) -> Tensor:
    if key not in state_dict:
        raise ValueError(
            f"the checkpoint has no `{key}`, needed to infer the model config: it is not a complete "
            "SAM / HQ-SAM checkpoint"
        )
    return state_dict[key]


def _count(state_dict: dict[str, Tensor], prefix: str) -> int:
    """Number of ``prefix{n}.*`` entries (blocks, layers): the highest index + 1."""
    indexes = [int(m.group(1)) for k in state_dict if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))]
    return max(indexes, default=-1) + 1


def _vision_config(sd: dict[str, Tensor], num_heads: int | None) -> dict:
    hidden, channels, patch, _ = _tensor(sd, "image_encoder.patch_embed.proj.weight").shape
    depth = _count(sd, "image_encoder.blocks.")
    rel_pos = [sd.get(f"image_encoder.blocks.{i}.attn.rel_pos_h") for i in range(depth)]
    use_rel_pos = all(r is not None for r in rel_pos)
    if "image_encoder.pos_embed" in sd:
        grid = int(sd["image_encoder.pos_embed"].shape[1])
    elif use_rel_pos:
        grid = (max(int(r.shape[0]) for r in rel_pos) + 1) // 2
    else:
        grid = 1024 // patch
    released_heads, released_global = RELEASED_VIT_SIZES.get(hidden, (None, None))
    if use_rel_pos:
        inferred = hidden // int(rel_pos[0].shape[1])
        if num_heads is not None and num_heads != inferred:
            raise ValueError(
                f"num_heads={num_heads} contradicts the checkpoint: its {hidden}-wide ViT has "
                f"{rel_pos[0].shape[1]}-wide relative-position tables, i.e. {inferred} heads"
            )
        num_heads = inferred
        global_attn = [i for i, r in enumerate(rel_pos) if r.shape[0] == 2 * grid - 1]
        windowed = [int(r.shape[0]) for i, r in enumerate(rel_pos) if i not in global_attn]
        window_size = (windowed[0] + 1) // 2 if windowed else 14
    else:
        if released_heads is None:
            raise ValueError(
                f"a {hidden}-wide ViT without relative-position tables is not a released SAM size "
                f"({sorted(RELEASED_VIT_SIZES)}): its heads and global-attention blocks cannot be inferred"
            )
        num_heads = num_heads or released_heads
        global_attn, window_size = list(released_global), 14
    if num_heads is None or hidden % num_heads:
        raise ValueError(f"cannot split the {hidden}-wide ViT into num_heads={num_heads} heads")
    return dict(
        hidden_size=int(hidden),
        num_channels=int(channels),
        num_hidden_layers=depth,
        num_attention_heads=num_heads,
        image_size=grid * int(patch),
        patch_size=int(patch),
        mlp_dim=int(_tensor(sd, "image_encoder.blocks.0.mlp.lin1.weight").shape[0]),
        output_channels=int(_tensor(sd, "image_encoder.neck.0.weight").shape[0]),
        qkv_bias="image_encoder.blocks.0.attn.qkv.bias" in sd,
        use_abs_pos="image_encoder.pos_embed" in sd,
        use_rel_pos=use_rel_pos,
        window_size=window_size,
        global_attn_indexes=global_attn,
        num_pos_feats=int(_tensor(sd, _GAUSSIAN).shape[1]),
        layer_norm_eps=1e-6,  # build_sam's partial(nn.LayerNorm, eps=1e-6)
    )


def _tiny_vit_config(sd: dict[str, Tensor]) -> TinyViTConfig:
    """TinyViT hyper-parameters from the tensor shapes; the input size is the released 1024 px (the
    reference code hard-codes its 64 x 64 output grid). Stage 0 is convolutional: its heads and window are
    unused placeholders."""
    enc = "image_encoder."
    dims = [int(_tensor(sd, f"{enc}patch_embed.seq.2.c.weight").shape[0])]
    dims += [int(_tensor(sd, f"{enc}layers.{i}.downsample.conv1.c.weight").shape[0]) for i in range(3)]
    depths = [_count(sd, f"{enc}layers.{i}.blocks.") for i in range(4)]
    if 0 in depths[1:]:
        raise ValueError(f"TinyViT checkpoint with an empty attention stage (blocks per stage {depths})")
    biases = [_tensor(sd, f"{enc}layers.{i}.blocks.0.attn.attention_biases") for i in range(1, 4)]
    windows = [math.isqrt(int(b.shape[1])) for b in biases]  # one bias per (|dy|, |dx|): window**2 offsets
    return TinyViTConfig(
        img_size=1024,
        in_chans=int(_tensor(sd, f"{enc}patch_embed.seq.0.c.weight").shape[1]),
        embed_dims=dims,
        depths=depths,
        num_heads=[1] + [int(b.shape[0]) for b in biases],
        window_sizes=[windows[0], *windows],
        mlp_ratio=_tensor(sd, f"{enc}layers.1.blocks.0.mlp.fc1.weight").shape[0] / dims[1],
        mbconv_expand_ratio=_tensor(sd, f"{enc}layers.0.blocks.0.conv1.c.weight").shape[0] / dims[0],
        local_conv_size=int(_tensor(sd, f"{enc}layers.1.blocks.0.local_conv.c.weight").shape[-1]),
        out_chans=int(_tensor(sd, f"{enc}neck.0.weight").shape[0]),
    )


def _prompt_encoder_config(sd: dict[str, Tensor], vision: dict) -> dict:
    return dict(
        hidden_size=int(_tensor(sd, "prompt_encoder.no_mask_embed.weight").shape[1]),
        image_size=vision["image_size"],
        patch_size=vision["patch_size"],
        mask_input_channels=int(_tensor(sd, "prompt_encoder.mask_downscaling.3.weight").shape[0]),
        num_point_embeddings=_count(sd, "prompt_encoder.point_embeddings."),
        layer_norm_eps=1e-6,  # LayerNorm2d's default
    )


def _mask_decoder_config(sd: dict[str, Tensor], decoder_num_heads: int | None, hq: bool) -> dict:
    hidden = int(_tensor(sd, "mask_decoder.iou_token.weight").shape[1])
    internal = int(_tensor(sd, "mask_decoder.transformer.final_attn_token_to_image.q_proj.weight").shape[0])
    config = dict(
        hidden_size=hidden,
        mlp_dim=int(_tensor(sd, "mask_decoder.transformer.layers.0.mlp.lin1.weight").shape[0]),
        num_hidden_layers=_count(sd, "mask_decoder.transformer.layers."),
        num_attention_heads=decoder_num_heads or SAM_DECODER_HEADS,
        attention_downsample_rate=hidden // internal,
        num_multimask_outputs=int(_tensor(sd, "mask_decoder.mask_tokens.weight").shape[0]) - 1,
        iou_head_depth=_count(sd, "mask_decoder.iou_prediction_head.layers."),
        iou_head_hidden_dim=int(_tensor(sd, "mask_decoder.iou_prediction_head.layers.0.weight").shape[0]),
        layer_norm_eps=1e-5,  # the reference TwoWayTransformer's nn.LayerNorm default
    )
    if hq:
        config["vit_dim"] = int(_tensor(sd, "mask_decoder.compress_vit_feat.0.weight").shape[0])
    return config


def _convert(
    state_dict: dict, *, hq: bool, num_heads: int | None, decoder_num_heads: int | None
) -> tuple[SamConfig | SamHQConfig, dict[str, Tensor], _Renamer]:
    sd = _unwrap(state_dict)
    if is_hq_state_dict(sd) != hq:
        found, use = (
            ("HQ-SAM", "convert_sam_hq_state_dict") if not hq else ("plain SAM", "convert_sam_state_dict")
        )
        raise ValueError(f"this is a {found} checkpoint; convert it with {use}")
    sd = {k: v for k, v in sd.items() if k not in ("pixel_mean", "pixel_std")}  # older SAM files keep them
    light = is_light_state_dict(sd)
    if light and not hq:
        raise ValueError(
            "this is a MobileSAM checkpoint (TinyViT encoder, plain SAM decoder), which is not supported; "
            "use Light HQ-SAM (sam_hq_vit_tiny.pth) or a ViT SAM / HQ-SAM checkpoint"
        )
    decoder = _mask_decoder_config(sd, decoder_num_heads, hq)
    if light:
        if num_heads is not None:
            raise ValueError("num_heads is a ViT option; a TinyViT checkpoint's heads come from its shapes")
        # the classification head of the TinyViT recipe is saved but never used by SAM
        sd = {k: v for k, v in sd.items() if not k.startswith(_TINY_VIT_HEAD)}
        tiny_vit = _tiny_vit_config(sd)
        prompt = _prompt_encoder_config(sd, dict(image_size=tiny_vit.img_size, patch_size=LIGHT_PATCH))
        config = light_sam_hq_config(tiny_vit, prompt_encoder=prompt, mask_decoder=decoder)
    else:
        vision = _vision_config(sd, num_heads)
        config = (SamHQConfig if hq else SamConfig)(
            vision_config=vision,
            prompt_encoder_config=_prompt_encoder_config(sd, vision),
            mask_decoder_config=decoder,
        )
    renamer = _Renamer(decoder["num_multimask_outputs"] + 1, decoder["iou_head_depth"], hq, light)
    converted = {new: value for key, value in sd.items() for new in renamer.to_hf(key)}
    return config, converted, renamer


def convert_sam_hq_state_dict(
    state_dict: dict[str, Tensor], *, num_heads: int | None = None, decoder_num_heads: int | None = None
) -> tuple[SamHQConfig, dict[str, Tensor]]:
    """Original HQ-SAM (``segment_anything_hq``, ``sam_hq_vit_{b,l,h}.pth``) -> ``SamHQModel`` keys, config.

    Args:
        state_dict: the loaded checkpoint (optionally wrapped in ``model`` / ``state_dict``, keys optionally
            prefixed ``module.``).
        num_heads: ViT heads; inferred from the relative-position tables, so only a cross-check.
        decoder_num_heads: mask-decoder heads, not inferable from shapes; default 8 (every released model).

    Returns:
        The inferred config and the renamed tensors (the same tensor objects, not copies).
    """
    config, converted, _ = _convert(
        state_dict, hq=True, num_heads=num_heads, decoder_num_heads=decoder_num_heads
    )
    return config, converted


def convert_sam_state_dict(
    state_dict: dict[str, Tensor], *, num_heads: int | None = None, decoder_num_heads: int | None = None
) -> tuple[SamConfig, dict[str, Tensor]]:
    """Original SAM (``segment_anything``, ``sam_vit_{b,l,h}_*.pth``) -> ``SamModel`` keys and config.

    Same arguments and result as ``convert_sam_hq_state_dict``.
    """
    config, converted, _ = _convert(
        state_dict, hq=False, num_heads=num_heads, decoder_num_heads=decoder_num_heads
    )
    return config, converted


def sam_processor(
    image_size: int,
    patch_size: int,
    *,
    hq: bool,
    pixel_mean: Tensor | None = None,
    pixel_std: Tensor | None = None,
) -> SamProcessor | SamHQProcessor:
    """SAM's preprocessing: longest side -> ``image_size``, ImageNet normalisation, pad to a square."""
    mean = (
        (pixel_mean.flatten() / 255).tolist() if pixel_mean is not None else [m / 255 for m in SAM_PIXEL_MEAN]
    )
    std = (pixel_std.flatten() / 255).tolist() if pixel_std is not None else [s / 255 for s in SAM_PIXEL_STD]
    mask_side = 4 * (image_size // patch_size)  # the decoder's low-resolution mask frame
    image_processor = SamImageProcessorPil(
        size={"longest_edge": image_size},
        pad_size={"height": image_size, "width": image_size},
        mask_size={"longest_edge": mask_side},
        mask_pad_size={"height": mask_side, "width": mask_side},
        image_mean=mean,
        image_std=std,
    )
    return (SamHQProcessor if hq else SamProcessor)(image_processor=image_processor)


def _read(path: Path) -> dict:
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    if path.is_dir():
        raise ValueError(
            f"{path} is a directory; load_original_checkpoint reads one original .pth file. For a "
            "transformers model directory (config.json + weights) use HQSamSegmenter.from_pretrained"
        )
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile) as e:
        first_line = (str(e).strip().splitlines() or [""])[0]
        raise ValueError(
            f"cannot read the checkpoint {path}: the file is truncated or corrupt (or holds objects other "
            f"than tensors); re-download it. ({type(e).__name__}: {first_line})"
        ) from e
    if not isinstance(loaded, dict):
        raise ValueError(f"{path} holds a {type(loaded).__name__}, not a SAM / HQ-SAM state dict")
    return loaded


def _check_tensors(
    path: Path, kind: str, model: PreTrainedModel, converted: dict[str, Tensor], renamer: _Renamer
) -> None:
    """Raise ``ValueError`` naming (in the file's own key names) every missing, extra or misshapen tensor."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [f"{renamer.to_original(k)} (-> {k})" for k in expected if k not in converted]
    unexpected = sorted({renamer.to_original(k) for k in converted if k not in expected})
    misshapen = [
        f"{renamer.to_original(k)} {tuple(converted[k].shape)} instead of {shape}"
        for k, shape in expected.items()
        if k in converted and tuple(converted[k].shape) != shape
    ]
    problems = [
        f"{what} {len(keys)}: {', '.join(keys[:10])}{', ...' if len(keys) > 10 else ''}"
        for what, keys in [("missing", missing), ("unexpected", unexpected), ("misshapen", misshapen)]
        if keys
    ]
    if problems:
        raise ValueError(
            f"{path} is not a complete {kind} checkpoint of one consistent architecture; "
            + "; ".join(problems)
        )


def load_original_checkpoint(
    path: str | Path, *, num_heads: int | None = None, decoder_num_heads: int | None = None
) -> tuple[PreTrainedModel, ProcessorMixin]:
    """Load an original SAM or HQ-SAM ``.pth`` (detected from its keys) as a ``transformers`` model.

    Args:
        path: ``sam_hq_vit_{b,l,h}.pth`` or Light HQ-SAM's ``sam_hq_vit_tiny.pth`` (SysCV), or
            ``sam_vit_{b,l,h}_*.pth`` (Meta).
        num_heads, decoder_num_heads: see ``convert_sam_hq_state_dict``.

    Returns:
        ``(SamHQModel, SamHQProcessor)`` (``LightSamHQModel`` for a TinyViT checkpoint) or
        ``(SamModel, SamProcessor)``. The model is in eval mode on the
        CPU, every parameter taken from the file (strict load); ``fix_sam_hq_mask_decoder`` is applied.

    Raises:
        FileNotFoundError: no such file.
        ValueError: unreadable file, MobileSAM (TinyViT without HQ), or tensors missing / left over /
            misshapen.
    """
    path = Path(path).expanduser()
    state_dict = _unwrap(_read(path))
    hq = is_hq_state_dict(state_dict)
    config, converted, renamer = _convert(
        state_dict, hq=hq, num_heads=num_heads, decoder_num_heads=decoder_num_heads
    )
    light = is_light_state_dict(state_dict)
    model_cls = LightSamHQModel if light else SamHQModel if hq else SamModel
    with torch.device("meta"):  # no random init: every parameter is assigned from the file below
        model = model_cls(config)
    if light:  # BatchNorm step counters: unused in eval; tolerate files saved without them
        for key in model.state_dict():
            if key.endswith("num_batches_tracked"):
                converted.setdefault(key, torch.tensor(0))
    kind = "Light HQ-SAM" if light else "HQ-SAM" if hq else "SAM"
    _check_tensors(path, kind, model, converted, renamer)
    model.load_state_dict(converted, strict=True, assign=True)
    model.tie_weights()
    if hq:
        fix_sam_hq_mask_decoder(model)
    pixel_mean, pixel_std = state_dict.get("pixel_mean"), state_dict.get("pixel_std")
    vision = config.vision_config
    processor = sam_processor(
        vision.image_size, vision.patch_size, hq=hq, pixel_mean=pixel_mean, pixel_std=pixel_std
    )
    return model.eval(), processor
