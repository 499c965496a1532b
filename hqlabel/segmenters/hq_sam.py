"""HQ-SAM (``transformers.SamHQModel``): embed each image once, then decode any number of box prompts.

The image encoder is the expensive part; ``embed`` runs it once per image and keeps both the final image
embedding and the intermediate ViT embeddings (outputs of the global-attention blocks). HQ-SAM's fused
high-resolution feature needs the first of those: decoding from the final embedding alone silently drops the
HQ branch, so ``ImageEmbeddings`` refuses to exist without them.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import SamHQConfig, SamHQModel, SamHQProcessor
from transformers.models.sam.image_processing_pil_sam import SamImageProcessorPil

from hqlabel.platform.hub import load_pretrained


@dataclass
class ImageEmbeddings:
    """Encoder outputs for a batch of B images.

    Attributes:
        image_embeddings: B x C x h x w (C = 256, h = w = 64 for the released models).
        intermediate_embeddings: per global-attention ViT block, B x h x w x D; HQ-SAM uses the first.
        original_sizes: per image (H, W) of the image that was embedded.
        reshaped_sizes: per image (H', W') after the longest-side resize, before padding.
    """

    image_embeddings: torch.Tensor
    intermediate_embeddings: list[torch.Tensor]
    original_sizes: list[tuple[int, int]]
    reshaped_sizes: list[tuple[int, int]]

    def __post_init__(self) -> None:
        if not self.intermediate_embeddings:
            raise ValueError(
                "HQ-SAM needs the intermediate ViT embeddings next to the image embeddings; without them the "
                "HQ fusion branch is skipped. Build ImageEmbeddings with HQSamSegmenter.embed()"
            )
        batch = self.image_embeddings.shape[0]
        sizes = {len(self.original_sizes), len(self.reshaped_sizes)}
        sizes |= {e.shape[0] for e in self.intermediate_embeddings}
        if sizes != {batch}:
            raise ValueError(f"ImageEmbeddings parts disagree on the batch size: {sorted(sizes | {batch})}")

    def __len__(self) -> int:
        return self.image_embeddings.shape[0]

    def __getitem__(self, i: int) -> ImageEmbeddings:
        return ImageEmbeddings(
            self.image_embeddings[i : i + 1],
            [e[i : i + 1] for e in self.intermediate_embeddings],
            [self.original_sizes[i]],
            [self.reshaped_sizes[i]],
        )


@dataclass
class MaskLogits:
    """Decoder output for the N prompts of one image.

    Attributes:
        logits: N x h x w low-resolution mask logits (h = w = 256 for the released models), in the padded
            square frame of the encoder input.
        iou_scores: N, the IoU head's prediction for each mask.
        original_size: (H, W) of the embedded image.
        reshaped_size: (H', W') of that image inside the padded frame.
    """

    logits: torch.Tensor
    iou_scores: torch.Tensor
    original_size: tuple[int, int]
    reshaped_size: tuple[int, int]

    def __len__(self) -> int:
        return int(self.logits.shape[0])


class HQSamSegmenter:
    """Box-prompted HQ-SAM masks, batched: one encoder pass per image, chunked decoder calls per box set."""

    def __init__(
        self,
        model: SamHQModel,
        processor: SamHQProcessor,
        *,
        hq_token_only: bool = False,
        mask_threshold: float = 0.0,
        chunk_size: int = 64,
        device: str | torch.device = "cpu",
    ) -> None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.processor = processor
        self.hq_token_only = hq_token_only
        self.mask_threshold = mask_threshold
        self.chunk_size = chunk_size

    @classmethod
    def from_pretrained(cls, name_or_path: str, **kwargs) -> HQSamSegmenter:
        """Load from a hub id (``syscv-community/sam-hq-vit-base|large|huge``) or a local directory."""
        model = load_pretrained(
            SamHQModel.from_pretrained, name_or_path, what="segmenter", option="--segmenter"
        )
        processor = load_pretrained(
            SamHQProcessor.from_pretrained, name_or_path, what="segmenter", option="--segmenter"
        )
        return cls(model, processor, **kwargs)

    def save_pretrained(self, directory: str | Path) -> None:
        """Write model and processor so that ``from_pretrained(directory)`` rebuilds this segmenter."""
        self.model.save_pretrained(directory)
        self.processor.save_pretrained(directory)

    @property
    def pad_size(self) -> tuple[int, int]:
        pad = self.processor.image_processor.pad_size
        return int(pad["height"]), int(pad["width"])

    @torch.inference_mode()
    def embed(self, images: list[np.ndarray]) -> ImageEmbeddings:
        """Run the image encoder once over a batch of H x W x 3 uint8 RGB images (sizes may differ)."""
        if not images:
            raise ValueError("embed() needs at least one image")
        inputs = self.processor(images=images, return_tensors="pt")
        pixel_values = inputs["pixel_values"].to(self.device, self.model.dtype)
        image_embeddings, intermediate = self.model.get_image_embeddings(pixel_values)
        return ImageEmbeddings(
            image_embeddings,
            list(intermediate),
            [tuple(s) for s in inputs["original_sizes"].tolist()],
            [tuple(s) for s in inputs["reshaped_input_sizes"].tolist()],
        )

    @torch.inference_mode()
    def predict_boxes(self, embeddings: ImageEmbeddings, boxes: list[torch.Tensor]) -> list[MaskLogits]:
        """Decode one mask per box.

        Args:
            embeddings: from ``embed`` (B images).
            boxes: per image, N_i x 4 XYXY pixels of the embedded image (N_i may be 0).

        Returns:
            Per image, ``MaskLogits`` with N_i masks (error-correction SAM + HQ logits, or HQ logits alone
            when ``hq_token_only``).
        """
        if len(boxes) != len(embeddings):
            raise ValueError(f"got boxes for {len(boxes)} images but embeddings of {len(embeddings)}")
        results = []
        for i, image_boxes in enumerate(boxes):
            image = embeddings[i]
            (h, w), (rh, rw) = image.original_sizes[0], image.reshaped_sizes[0]
            scale = torch.tensor([rw / w, rh / h, rw / w, rh / h])
            prompts = image_boxes.detach().float().cpu().reshape(-1, 4) * scale
            logits, scores = [], []
            for chunk in prompts.split(self.chunk_size) if len(prompts) else []:
                out = self.model(
                    image_embeddings=image.image_embeddings,
                    intermediate_embeddings=image.intermediate_embeddings,
                    input_boxes=chunk[None].to(self.device, self.model.dtype),
                    multimask_output=False,
                    hq_token_only=self.hq_token_only,
                )
                logits.append(out.pred_masks[0, :, 0])
                scores.append(out.iou_scores[0, :, 0])
            if logits:
                mask_logits, iou = torch.cat(logits), torch.cat(scores)
            else:
                side = 4 * image.image_embeddings.shape[-1]
                mask_logits = image.image_embeddings.new_zeros(0, side, side)
                iou = image.image_embeddings.new_zeros(0)
            results.append(MaskLogits(mask_logits, iou, (h, w), (rh, rw)))
        return results

    def iter_masks(
        self, logits: MaskLogits, output_size: tuple[int, int] | None = None, chunk_size: int = 16
    ) -> Iterator[torch.Tensor]:
        """Upsample and binarise masks a chunk at a time (full-resolution masks of many boxes are large).

        Args:
            logits: decoder output of one image.
            output_size: (H, W) of the masks; defaults to the embedded image's size. A different size (the
                image's original resolution, when a downscaled copy was embedded) keeps the same frame.
            chunk_size: masks per yielded chunk.

        Yields:
            n x H x W bool tensors, in prompt order, on the segmenter's device.
        """
        output_size = tuple(output_size or logits.original_size)
        rh, rw = logits.reshaped_size
        for chunk in logits.logits.split(chunk_size):
            x = F.interpolate(chunk[:, None].float(), self.pad_size, mode="bilinear", align_corners=False)
            x = F.interpolate(x[..., :rh, :rw], output_size, mode="bilinear", align_corners=False)
            yield x[:, 0] > self.mask_threshold


def tiny_random_sam_hq(seed: int = 0, **kwargs) -> HQSamSegmenter:
    """A tiny randomly initialised SAM-HQ of the real architecture (ViT encoder with windowed and global
    attention, prompt encoder, HQ mask decoder). Offline and fast; its masks are meaningless."""
    decoder_hidden = 16
    config = SamHQConfig(
        vision_config=dict(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=128,
            patch_size=8,
            window_size=4,
            global_attn_indexes=[1],
            num_pos_feats=decoder_hidden // 2,  # must be half the prompt/decoder hidden size
            output_channels=decoder_hidden,
            mlp_dim=64,
            # transformers' SAM vision default (1e-10) makes a random encoder output ~0 for every image
            initializer_range=0.02,
        ),
        prompt_encoder_config=dict(
            hidden_size=decoder_hidden, image_size=128, patch_size=8, mask_input_channels=4
        ),
        mask_decoder_config=dict(
            hidden_size=decoder_hidden,
            mlp_dim=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            iou_head_hidden_dim=16,
            vit_dim=32,
        ),
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = SamHQModel(config)
    image_processor = SamImageProcessorPil(size={"longest_edge": 128}, pad_size={"height": 128, "width": 128})
    return HQSamSegmenter(model, SamHQProcessor(image_processor=image_processor), **kwargs)
