"""The model side of HQ-token training: freeze SAM, encode without gradients, and SAM's own masks.

HQ-SAM keeps SAM frozen and trains only the HQ modules of the mask decoder (``HQ_MODULE_PREFIXES``: the HQ
token, its 3-layer MLP, the ViT-feature compression, the embedding encoder and the mask-feature convs).
Gradients still flow *through* the frozen two-way transformer to the HQ token, which is one of its tokens.
"""

from __future__ import annotations

import numpy as np
import torch
from transformers import SamConfig, SamHQModel, SamModel, SamProcessor

from hqlabel.segmenters import HQSamSegmenter, ImageEmbeddings
from hqlabel.segmenters.hq_weights import is_hq_parameter


def freeze_all_but_hq(model: SamHQModel) -> list[torch.nn.Parameter]:
    """Set ``requires_grad`` on the HQ modules only; return those parameters (in ``named_parameters`` order).

    Raises:
        TypeError: ``model`` is plain SAM (it has no HQ token to train).
    """
    if not isinstance(model, SamHQModel):
        raise TypeError(
            f"HQ-token training needs an HQ-SAM base model, got {type(model).__name__}; "
            "pass a SAM-HQ --base (e.g. syscv-community/sam-hq-vit-base or sam_hq_vit_b.pth)"
        )
    trainable = []
    for name, param in model.named_parameters():
        param.requires_grad_(is_hq_parameter(name))
        if param.requires_grad:
            trainable.append(param)
    return trainable


def normalize(segmenter: HQSamSegmenter, images: np.ndarray) -> torch.Tensor:
    """B x S x S x 3 uint8 images, already at the encoder's square input size with their content at the
    top-left (``augment.large_scale_jitter`` / ``resize_longest``), -> B x 3 x S x S normalised pixels.

    Padding is normalised like content here; ``encode`` then zeroes it outside each image's ``valid`` size,
    as SAM pads the normalised image with zeros.
    """
    processor = segmenter.processor.image_processor
    mean = torch.tensor(processor.image_mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(processor.image_std, dtype=torch.float32).view(1, 3, 1, 1)
    pixels = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
    return (pixels - mean) / std


def encode(segmenter: HQSamSegmenter, images: np.ndarray, valid: list[tuple[int, int]]) -> ImageEmbeddings:
    """Frozen image encoder (``HQSamSegmenter.encode``) over B square S x S x 3 uint8 images, without
    gradients, returned as tensors autograd may save when the decoder trains.

    Args:
        images: B x S x S x 3 uint8, S = the encoder input size; image content at the top-left.
        valid: per image (h, w) of its content; the rest is padding and set to 0 after normalising, as SAM's
            preprocessing does.

    Returns:
        Embeddings whose original and reshaped sizes are (S, S): prompts are in pixels of the square input.
    """
    size = segmenter.pad_size
    if images.shape[1:3] != size:
        raise ValueError(f"images must be B x {size[0]} x {size[1]} x 3, got {tuple(images.shape)}")
    pixels = normalize(segmenter, images)
    for i, (h, w) in enumerate(valid):
        pixels[i, :, h:, :] = 0
        pixels[i, :, :, w:] = 0
    embeddings, intermediate = segmenter.encode(pixels)
    # ``encode`` runs under inference_mode; a clone made outside it is an ordinary tensor autograd may save.
    square = [tuple(size)] * len(images)
    return ImageEmbeddings(embeddings.clone(), [e.clone() for e in intermediate], square, square, hq=True)


def sam_from_sam_hq(segmenter: HQSamSegmenter, **kwargs) -> HQSamSegmenter:
    """Plain SAM with the frozen SAM weights of an HQ-SAM model (its every tensor but the HQ modules).

    HQ-SAM never changes SAM's weights, so this is exactly the SAM that the HQ-SAM model was built on: the
    "SAM" row of an evaluation, with no second download. ``kwargs`` go to ``HQSamSegmenter``.
    """
    model = segmenter.model
    if not isinstance(model, SamHQModel):
        raise TypeError(f"sam_from_sam_hq needs a SamHQModel, got {type(model).__name__}")
    config = model.config.to_dict()
    decoder = {k: v for k, v in config["mask_decoder_config"].items() if k != "vit_dim"}
    sam_config = SamConfig(
        vision_config=config["vision_config"],
        prompt_encoder_config=config["prompt_encoder_config"],
        mask_decoder_config=decoder,
    )
    sam = SamModel(sam_config)
    state = {k: v for k, v in model.state_dict().items() if not is_hq_parameter(k)}
    sam.load_state_dict(state, strict=True)
    sam.to(model.dtype)
    processor = SamProcessor(image_processor=segmenter.processor.image_processor)
    return HQSamSegmenter(sam, processor, device=segmenter.device, **kwargs)
