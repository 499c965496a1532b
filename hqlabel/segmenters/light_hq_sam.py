"""Light HQ-SAM: ``transformers.SamHQModel`` with the TinyViT image encoder (SysCV's ``sam_hq_vit_tiny.pth``).

transformers has no TinyViT SAM encoder, so ``LightSamHQModel`` is a ``SamHQModel`` whose ``vision_encoder``
is ``hqlabel.segmenters.tiny_vit.TinyViT``; the prompt encoder and the HQ mask decoder (``vit_dim``:
TinyViT's third stage width, 160) are transformers' own, so ``HQSamSegmenter``, HQ-token training and HQ
weights work unchanged. The TinyViT hyper-parameters live in ``config.tiny_vit`` (saved in ``config.json``),
and the vision config carries only what the rest of the model reads: the input size and the effective patch
size 16.
"""

from __future__ import annotations

import torch
from transformers import SamHQConfig, SamHQModel, SamHQProcessor
from transformers.models.sam.image_processing_pil_sam import SamImageProcessorPil
from transformers.models.sam_hq.modeling_sam_hq import (
    SamHQMaskDecoder,
    SamHQPositionalEmbedding,
    SamHQPreTrainedModel,
    SamHQPromptEncoder,
)

from hqlabel.segmenters.hq_sam import HQSamSegmenter
from hqlabel.segmenters.tiny_vit import TinyViT, TinyViTConfig

LIGHT_NAMES = ("sam-hq-light",)  # --segmenter names of Light HQ-SAM (with --preset tiny-random)
LIGHT_PATCH = 16  # TinyViT's overall stride: 1024 px -> 64 x 64 embeddings, as ViT-SAM's patch size 16


def is_light_config(config: object) -> bool:
    """Whether a (SamHQ) config describes Light HQ-SAM (it has TinyViT hyper-parameters)."""
    return getattr(config, "tiny_vit", None) is not None


def light_sam_hq_config(tiny_vit: TinyViTConfig, *, prompt_encoder: dict, mask_decoder: dict) -> SamHQConfig:
    """The ``SamHQConfig`` of a Light HQ-SAM; ``vit_dim`` is set to TinyViT's ``embed_dims[2]``.

    Args:
        tiny_vit: the encoder's hyper-parameters (``out_chans`` must equal the prompt/decoder width).
        prompt_encoder, mask_decoder: ``SamHQPromptEncoderConfig`` / ``SamHQMaskDecoderConfig`` fields.
    """
    hidden = mask_decoder.get("hidden_size", 256)
    if tiny_vit.out_chans != hidden:
        raise ValueError(
            f"TinyViT's neck gives {tiny_vit.out_chans} channels but the mask decoder is {hidden} wide; "
            "they must be equal"
        )
    vision = dict(
        image_size=tiny_vit.img_size,
        patch_size=LIGHT_PATCH,
        output_channels=tiny_vit.out_chans,
        num_pos_feats=hidden // 2,
        # the ViT fields below are unused (no ViT is built); small values keep the config honest-looking
        hidden_size=tiny_vit.embed_dims[-1],
        num_hidden_layers=sum(tiny_vit.depths),
        num_attention_heads=tiny_vit.num_heads[-1],
        global_attn_indexes=[],
    )
    prompt = dict(prompt_encoder, image_size=tiny_vit.img_size, patch_size=LIGHT_PATCH, hidden_size=hidden)
    decoder = dict(mask_decoder, vit_dim=tiny_vit.embed_dims[2])
    return SamHQConfig(
        vision_config=vision,
        prompt_encoder_config=prompt,
        mask_decoder_config=decoder,
        tiny_vit=tiny_vit.to_dict(),
    )


class LightSamHQModel(SamHQModel):
    """``SamHQModel`` with a TinyViT ``vision_encoder`` (built from ``config.tiny_vit``).

    Same inputs and outputs as ``SamHQModel``: ``get_image_embeddings(pixel_values)`` returns
    ``(B x 256 x 64 x 64 image embeddings, [B x 64 x 64 x 160 early TinyViT feature])`` for the released size.
    """

    def __init__(self, config: SamHQConfig) -> None:
        if not is_light_config(config):
            raise ValueError("LightSamHQModel needs a config with `tiny_vit` (see light_sam_hq_config)")
        SamHQPreTrainedModel.__init__(self, config)  # SamHQModel.__init__ would build a ViT encoder
        self.shared_image_embedding = SamHQPositionalEmbedding(config.vision_config)
        self.vision_encoder = TinyViT(TinyViTConfig(**config.tiny_vit))
        self.prompt_encoder = SamHQPromptEncoder(config)
        config.mask_decoder_config._attn_implementation = config._attn_implementation
        self.mask_decoder = SamHQMaskDecoder(config.mask_decoder_config)
        self.post_init()
        self.vision_encoder.apply(TinyViT._init_weights)  # transformers' N(0, 0.02) starves a random TinyViT


def tiny_random_light_config(image_size: int = 128, decoder_hidden: int = 16) -> SamHQConfig:
    """A tiny Light HQ-SAM config of the real architecture (4 TinyViT stages, windowed attention with padding,
    HQ decoder). ``image_size`` must be a multiple of 16; the embedding grid is ``image_size / 16``."""
    tiny_vit = TinyViTConfig(
        img_size=image_size,
        embed_dims=[8, 16, 24, 32],
        depths=[1, 1, 2, 1],
        num_heads=[1, 2, 2, 2],
        window_sizes=[3, 3, 3, 3],  # grids 16, 8, 8: not multiples of 3, exercises the window padding
        out_chans=decoder_hidden,
    )
    decoder = dict(
        hidden_size=decoder_hidden,
        mlp_dim=2 * decoder_hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        iou_head_hidden_dim=decoder_hidden,
    )
    return light_sam_hq_config(tiny_vit, prompt_encoder=dict(mask_input_channels=4), mask_decoder=decoder)


def tiny_random_light_sam_hq(
    seed: int = 0, *, image_size: int = 128, decoder_hidden: int = 16, **kwargs
) -> HQSamSegmenter:
    """A tiny randomly initialised Light HQ-SAM (``--segmenter sam-hq-light --preset tiny-random``): offline,
    fast, meaningless masks. ``kwargs`` go to ``HQSamSegmenter``."""
    config = tiny_random_light_config(image_size, decoder_hidden)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LightSamHQModel(config)
    image_processor = SamImageProcessorPil(
        size={"longest_edge": image_size}, pad_size={"height": image_size, "width": image_size}
    )
    return HQSamSegmenter(model, SamHQProcessor(image_processor=image_processor), **kwargs)
