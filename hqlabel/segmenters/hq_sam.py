"""HQ-SAM (``transformers.SamHQModel``): embed each image once, then decode any number of prompts.

The image encoder is the expensive part; ``embed`` runs it once per image and keeps both the final image
embedding and the intermediate ViT embeddings (outputs of the global-attention blocks). HQ-SAM's fused
high-resolution feature needs the first of those: decoding from the final embedding alone silently drops the
HQ branch, so ``ImageEmbeddings`` of an HQ model refuses to exist without them.

Plain SAM (``transformers.SamModel``) goes through the same API, so SAM and HQ-SAM can label the same job.

Speed options (GPU-oriented): ``precision`` runs the encoder and decoder under ``torch.autocast`` (weights
stay float32, outputs come back as float32), ``compile`` compiles the vision encoder, and the encoder's
attention is PyTorch SDPA (transformers' default; ``attention_implementation`` says which one a model uses).
On CUDA, images are resized and normalised on the GPU (``preprocess``).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from transformers import SamConfig, SamHQConfig, SamHQModel, SamHQProcessor, SamModel, SamProcessor
from transformers.models.sam.image_processing_pil_sam import SamImageProcessorPil

from hqlabel.platform.config import Precision, autocast, resolve_precision
from hqlabel.platform.hub import load_pretrained
from hqlabel.platform.preprocess import Preprocess, sam_pixel_values, use_torch_preprocess
from hqlabel.segmenters.quality import HQLogitsCapture, MaskSignals
from hqlabel.segmenters.structures import ImageEmbeddings, MaskLogits, Prompts
from hqlabel.segmenters.transformers_fixes import fix_sam_hq_mask_decoder

Multimask = Literal["off", "best", "all"]
MULTIMASK_MODES: tuple[str, ...] = ("off", "best", "all")
# Float32 working memory of ``iter_masks`` (upsampling masks to the original size): 256 MiB.
RESIZE_BUDGET_BYTES = 256 * 2**20


class HQSamSegmenter:
    """Prompted HQ-SAM (or SAM) masks, batched: one encoder pass per image, chunked decoder calls.

    Args:
        model: ``SamHQModel`` (or ``SamModel``), frozen, in eval mode.
        processor: its processor (resize longest side, normalise, pad).
        hq_token_only: HQ logits alone instead of SAM logits + HQ logits ("error correction").
        mask_threshold: logit threshold that binarises masks.
        chunk_size: prompts per decoder call; bounds decoder memory whatever the number of prompts.
        multimask: "off" (one mask per prompt, SAM's single-mask token), "best" (the original SysCV release:
            SAM's best of three masks by predicted IoU, plus HQ), "all" (transformers: all three, each + HQ).
        device: where the model runs.
        precision: "fp32" (no autocast), "bf16", "fp16" (GPU only) or "auto" (bf16 on a CUDA device that
            supports it, else fp32): ``embed`` and ``predict`` run under ``torch.autocast`` with that dtype;
            weights stay float32 and both return float32 tensors. ``decode_logits`` (training) does not
            autocast: the training loop owns its precision.
        compile: ``torch.compile`` the vision encoder (in place: parameter names, ``save_pretrained`` and HQ
            weights are unchanged). Meant for GPUs; the first call of each new input shape compiles
            (seconds to minutes), and on the CPU inductor needs a C++ compiler.
        preprocess: where ``embed`` resizes and normalises images: "processor" (the processor, on the CPU),
            "torch" (on ``device``, ``hqlabel.platform.preprocess``) or "auto" (torch on CUDA).
        encoder_batch: images per encoder call: smaller batches are padded with blank images and larger ones
            split, so that the encoder sees one input shape (a compiled encoder compiles once, not once per
            batch size: a job's last batch is usually smaller). With ``compile`` it defaults to the first
            call's batch size; else None (each batch as it comes).
    """

    def __init__(
        self,
        model: SamHQModel | SamModel,
        processor: SamHQProcessor | SamProcessor,
        *,
        hq_token_only: bool = False,
        mask_threshold: float = 0.0,
        chunk_size: int = 16,
        multimask: Multimask = "off",
        device: str | torch.device = "cpu",
        precision: Precision = "fp32",
        compile: bool = False,
        preprocess: Preprocess = "auto",
        encoder_batch: int | None = None,
    ) -> None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        if multimask not in MULTIMASK_MODES:
            raise ValueError(f"multimask must be one of {MULTIMASK_MODES}, got {multimask!r}")
        self.device = torch.device(device)
        self.torch_preprocess = use_torch_preprocess(preprocess, self.device)
        self.precision = precision
        self.autocast_dtype = resolve_precision(precision, self.device)
        if isinstance(model, SamHQModel):
            fix_sam_hq_mask_decoder(model)  # transformers' HQ decoder upscales the wrong tensor (see module)
        self.model = model.to(self.device).eval()
        # the HQ token's own logits of each ``predict`` call, for SAM's mask next to the final one
        self._hq_capture = HQLogitsCapture(self.model.mask_decoder) if self.is_hq else None
        self.processor = processor
        self.hq_token_only = hq_token_only
        self.mask_threshold = mask_threshold
        self.chunk_size = chunk_size
        self.multimask = multimask
        if hq_token_only and not self.is_hq:
            raise ValueError("hq_token_only needs an HQ-SAM model; this is plain SAM")
        if encoder_batch is not None and encoder_batch < 1:
            raise ValueError(f"encoder_batch must be >= 1, got {encoder_batch}")
        self.encoder_batch = encoder_batch
        self.compiled = compile
        if compile:
            self.model.vision_encoder.compile()

    @property
    def is_hq(self) -> bool:
        return isinstance(self.model, SamHQModel)

    @property
    def attention_implementation(self) -> str:
        """The vision encoder's attention: "sdpa" (``scaled_dot_product_attention``) or "eager"."""
        encoder = self.model.vision_encoder
        fixed = getattr(encoder, "attention_implementation", None)  # Light HQ-SAM's TinyViT: always SDPA
        return fixed or encoder.config._attn_implementation or "eager"

    def autocast(self) -> contextlib.AbstractContextManager:
        """``torch.autocast`` at this segmenter's precision (a no-op context at fp32)."""
        return autocast(self.device, self.autocast_dtype)

    @classmethod
    def from_pretrained(
        cls, name_or_path: str, *, hq_weights: str | None = None, revision: str | None = None, **kwargs
    ) -> HQSamSegmenter:
        """Load HQ-SAM or SAM.

        Args:
            name_or_path: a hub id (``syscv-community/sam-hq-vit-base|large|huge``, or plain SAM's
                ``facebook/sam-vit-base``),
                a local directory saved by ``save_pretrained``, or an original checkpoint file
                (``sam_hq_vit_b.pth``, Light HQ-SAM's ``sam_hq_vit_tiny.pth``, ``sam_vit_b_01ec64.pth``).
            hq_weights: fine-tuned HQ-token weights (``save_hq_weights``) to load on top.
            revision: a hub id's commit hash, branch or tag (ignored for a directory or a file).
        """
        if Path(name_or_path).expanduser().is_file():
            from hqlabel.segmenters.checkpoints import load_original_checkpoint

            model, processor = load_original_checkpoint(Path(name_or_path).expanduser())
        else:
            from transformers import AutoConfig

            where = dict(what="segmenter", option="--segmenter", revision=revision)
            config = load_pretrained(AutoConfig.from_pretrained, name_or_path, **where)
            plain = config.model_type == "sam"
            model_cls, processor_cls = (SamModel, SamProcessor) if plain else (SamHQModel, SamHQProcessor)
            if getattr(config, "tiny_vit", None) is not None:  # Light HQ-SAM saved by save_pretrained
                from hqlabel.segmenters.light_hq_sam import LightSamHQModel

                model_cls = LightSamHQModel
            model = load_pretrained(model_cls.from_pretrained, name_or_path, **where)
            processor = load_pretrained(processor_cls.from_pretrained, name_or_path, **where)
        if hq_weights is not None:
            from hqlabel.segmenters.hq_weights import load_hq_weights

            load_hq_weights(model, hq_weights)
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
        if self.torch_preprocess:
            pixel_values, original, reshaped = sam_pixel_values(
                images, self.processor.image_processor, self.device
            )
        else:
            # channels_last: else a 1- or 3-pixel-high image reads as channels-first (transposed or fails)
            inputs = self.processor(images=images, return_tensors="pt", input_data_format="channels_last")
            pixel_values = inputs["pixel_values"]
            original = [tuple(s) for s in inputs["original_sizes"].tolist()]
            reshaped = [tuple(s) for s in inputs["reshaped_input_sizes"].tolist()]
        image_embeddings, intermediate = self.encode(pixel_values)
        return ImageEmbeddings(image_embeddings, intermediate, original, reshaped, hq=self.is_hq)

    @torch.inference_mode()
    def encode(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The image encoder on a batch of preprocessed images, at this segmenter's precision.

        Args:
            pixel_values: B x 3 x H x W, normalised and padded to ``pad_size`` (the processor's output).

        Returns:
            ``(B x C x h x w image embeddings, the intermediate ViT embeddings)`` (B x h' x w' x D each; none
            for plain SAM), float32 on the segmenter's device.
        """
        pixel_values = pixel_values.to(self.device, self.model.dtype)
        if self.compiled and self.encoder_batch is None:
            self.encoder_batch = len(pixel_values)
        batch = self.encoder_batch
        if batch is None or len(pixel_values) == batch:
            return self._encode(pixel_values)
        embeddings, intermediate = [], []
        for chunk in pixel_values.split(batch):
            n = len(chunk)
            if n < batch:
                chunk = torch.cat([chunk, chunk.new_zeros(batch - n, *chunk.shape[1:])])
            chunk_embeddings, chunk_intermediate = self._encode(chunk)
            embeddings.append(chunk_embeddings[:n])
            intermediate.append([e[:n] for e in chunk_intermediate])
        return torch.cat(embeddings), [torch.cat(level) for level in zip(*intermediate, strict=True)]

    def _encode(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        with self.autocast():
            if self.is_hq:
                image_embeddings, intermediate = self.model.get_image_embeddings(pixel_values)
            else:
                image_embeddings, intermediate = self.model.get_image_embeddings(pixel_values), []
        if self.autocast_dtype is None:
            return image_embeddings, list(intermediate)
        return image_embeddings.float(), [e.float() for e in intermediate]

    def predict_boxes(self, embeddings: ImageEmbeddings, boxes: list[torch.Tensor]) -> list[MaskLogits]:
        """``predict`` with box prompts only: per image, N_i x 4 XYXY pixels of the embedded image."""
        return self.predict(embeddings, [None if len(b) == 0 else Prompts(boxes=b) for b in boxes])

    @torch.inference_mode()
    def predict(self, embeddings: ImageEmbeddings, prompts: list[Prompts | None]) -> list[MaskLogits]:
        """Decode masks for the prompts of each embedded image.

        Args:
            embeddings: from ``embed`` (B images).
            prompts: per image, its ``Prompts`` (or None for no objects).

        Returns:
            Per image, ``MaskLogits`` with one row per prompt (K masks each, see ``multimask``).
        """
        if len(prompts) != len(embeddings):
            raise ValueError(f"got prompts for {len(prompts)} images but embeddings of {len(embeddings)}")
        if embeddings.hq != self.is_hq:
            raise ValueError("these embeddings come from a different model type (SAM vs HQ-SAM)")
        results = []
        for i, image_prompts in enumerate(prompts):
            image = embeddings[i]
            (h, w), (rh, rw) = image.original_sizes[0], image.reshaped_sizes[0]
            scale = torch.tensor([rw / w, rh / h])
            logits, scores, sam_logits = [], [], []
            n = 0 if image_prompts is None else len(image_prompts)
            side = 4 * image.image_embeddings.shape[-1]
            if n and image_prompts.masks is not None and image_prompts.masks.shape[-2:] != (side, side):
                raise ValueError(
                    f"mask prompts must be N x {side} x {side} low-res logits (MaskLogits.logits[:, k]), "
                    f"got shape {tuple(image_prompts.masks.shape)}"
                )
            for start in range(0, n, self.chunk_size):
                chunk = image_prompts.slice(start, start + self.chunk_size)
                with self.autocast():
                    masks, iou, sam = self._decode(image, chunk, scale, with_sam=True)
                logits.append(masks.float())
                scores.append(iou.float())
                if sam is not None:
                    sam_logits.append(sam.float())
            if logits:
                mask_logits, iou = torch.cat(logits), torch.cat(scores)
            else:
                k = 3 if self.multimask == "all" and not self.hq_token_only else 1
                mask_logits = image.image_embeddings.new_zeros(0, k, side, side)
                iou = image.image_embeddings.new_zeros(0, k)
                sam_logits = [mask_logits] if self.is_hq else []
            sam = torch.cat(sam_logits) if sam_logits else None
            results.append(MaskLogits(mask_logits, iou, (h, w), (rh, rw), sam_logits=sam))
        return results

    def decode_logits(self, image: ImageEmbeddings, prompts: Prompts) -> tuple[torch.Tensor, torch.Tensor]:
        """One image's prompts through the mask decoder, differentiably (no ``inference_mode``): training.

        Args:
            image: ``ImageEmbeddings`` of one image, computed outside ``inference_mode`` (``torch.no_grad``
                is fine) so that autograd may save them.
            prompts: its prompts, pixels of the embedded image.

        Returns:
            ``(N x K x h x w logits, N x K predicted IoU)``, in the padded frame, as in ``predict``.

        No autocast here whatever ``precision`` says (mixed-precision training needs its own loss scaling and
        choices); wrap the call in ``torch.autocast`` (or ``self.autocast()``) to decode at lower precision.
        """
        if len(image) != 1:
            raise ValueError(f"decode_logits takes the embeddings of one image, got {len(image)}")
        (h, w), (rh, rw) = image.original_sizes[0], image.reshaped_sizes[0]
        masks, iou, _ = self._decode(image, prompts, torch.tensor([rw / w, rh / h]))
        return masks, iou

    def _decode(
        self, image: ImageEmbeddings, prompts: Prompts, scale: torch.Tensor, *, with_sam: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """One decoder call for the n prompts of one image -> (n x K x h x w logits, n x K IoU, SAM's own
        n x K x h x w logits for the same masks or None). SAM's logits come with ``with_sam`` on an HQ model:
        the HQ token's part (``HQLogitsCapture``) subtracted from SAM + HQ, from the same call."""
        if prompts.points is not None and bool((prompts.point_labels == -10).any()):
            return self._decode_without_padding(image, prompts, scale, with_sam=with_sam)
        n, dtype = len(prompts), self.model.dtype
        kwargs: dict = {}
        if prompts.masks is None:
            # One image, n prompts: the decoder shares the image embedding across the prompt batch.
            embed, inter, shape = image.image_embeddings, image.intermediate_embeddings, (1, n)
        else:
            # transformers adds the dense (mask) prompt per image, so a per-prompt mask needs a batch of n.
            embed = image.image_embeddings.expand(n, -1, -1, -1)
            inter = [e.expand(n, -1, -1, -1) for e in image.intermediate_embeddings]
            shape = (n, 1)
            kwargs["input_masks"] = prompts.masks[:, None].to(self.device, dtype)
        if prompts.boxes is not None:
            boxes = prompts.boxes * scale.repeat(2)
            kwargs["input_boxes"] = boxes.reshape(*shape, 4).to(self.device, dtype)
        if prompts.points is not None:
            points = prompts.points * scale
            kwargs["input_points"] = points.reshape(*shape, -1, 2).to(self.device, dtype)
            kwargs["input_labels"] = prompts.point_labels.reshape(*shape, -1).to(self.device)
        capture = self._hq_capture if with_sam else None
        if self.is_hq:
            # with the HQ part captured, SAM + HQ gives both masks (HQ alone is that part)
            hq_only = self.hq_token_only and capture is None
            kwargs.update(intermediate_embeddings=inter, hq_token_only=hq_only)
        if capture is not None:
            capture.start()
        out = self.model(image_embeddings=embed, multimask_output=self.multimask != "off", **kwargs)
        masks = out.pred_masks.reshape(n, -1, *out.pred_masks.shape[-2:])
        iou = out.iou_scores.reshape(n, -1)
        sam = None
        if capture is not None:
            hq = capture.hq_logits(n).to(masks.dtype)
            sam = masks - hq  # n x K: SAM's masks (sorted by IoU under multimask, as ``masks``)
            if self.hq_token_only:  # the HQ mask alone; SAM's is the single-mask token's or the best of 3
                masks, sam = hq, sam[:, :1]
        if masks.shape[1] == 1:  # hq_token_only returns the HQ mask alone; its IoU is the best SAM one's
            return masks, iou[:, :1], sam
        if self.multimask == "best":
            if not self.is_hq:  # plain SAM's transformers output is not sorted: pick the best by IoU
                best = iou.argmax(-1)
                masks, iou = masks[torch.arange(n), best][:, None], iou[torch.arange(n), best][:, None]
            else:  # transformers sorts the three SAM masks by IoU (each + HQ): the first is the original's
                masks, iou = masks[:, :1], iou[:, :1]
                sam = None if sam is None else sam[:, :1]
        return masks, iou, sam

    def _decode_without_padding(
        self, image: ImageEmbeddings, prompts: Prompts, scale: torch.Tensor, *, with_sam: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``_decode`` with the -10 padding points dropped. transformers zeroes their embeddings, but the
        decoder still attends to the zero tokens (no attention mask), which changes the masks; so the prompts
        are decoded in groups with equally many real points, each group without padding."""
        real = prompts.point_labels != -10
        order = torch.sort(real.to(torch.int8), dim=1, descending=True, stable=True).indices  # real first
        points = prompts.points.gather(1, order[..., None].expand(-1, -1, 2))
        labels = prompts.point_labels.gather(1, order)
        counts = real.sum(1)
        rows, masks, iou, sam = [], [], [], []
        for count in counts.unique().tolist():
            group = torch.nonzero(counts == count)[:, 0]
            group_masks, group_iou, group_sam = self._decode(
                image,
                Prompts(
                    None if prompts.boxes is None else prompts.boxes[group],
                    points[group, :count] if count else None,
                    labels[group, :count] if count else None,
                    None if prompts.masks is None else prompts.masks[group],
                ),
                scale,
                with_sam=with_sam,
            )
            rows.append(group)
            masks.append(group_masks)
            iou.append(group_iou)
            sam.append(group_sam)
        inverse = torch.argsort(torch.cat(rows))
        sam_logits = None if any(s is None for s in sam) else torch.cat(sam)[inverse]
        return torch.cat(masks)[inverse], torch.cat(iou)[inverse], sam_logits

    def iter_masks(
        self,
        logits: MaskLogits,
        output_size: tuple[int, int] | None = None,
        chunk_size: int | None = None,
        budget_bytes: int = RESIZE_BUDGET_BYTES,
        signals: MaskSignals | None = None,
    ) -> Iterator[torch.Tensor]:
        """Upsample and binarise masks a chunk at a time, in working memory bounded by ``budget_bytes``.

        The same arithmetic as SAM's post-processing (transformers' ``post_process_masks``): bilinear to the
        padded input size, crop the image's part, bilinear to the output size, threshold; the same masks up
        to float rounding (7 pixels in 1.1 billion on the benchmark). Cheaper: the first resize computes
        only the image's part of the padded frame (the low-res rows and columns it needs, at the same
        scale), and the second writes each mask column-major (it resizes the transposed logits), the order
        COCO RLE reads, so that encoding needs no transpose.

        Memory: the float32 intermediates of a chunk (the first resize, rw x rh per mask, and the final
        one, H x W per mask) stay within ``budget_bytes``: a chunk holds as many prompts as fit. When one
        prompt's masks alone do not fit, the final resize runs in strips of image rows (``resize_plan``),
        bit for bit the same masks as one call: it resizes the last axis alone (rw x H per mask, kept for
        the whole prompt), then each strip's first axis. (ATen's bilinear kernels compute a pixel as the
        lerp along the first axis of lerps along the last, which the two calls reproduce; tested on the
        CPU, where small outputs take another path that ``resize_plan`` stays clear of.) Outside the
        budget: the yielded chunk itself, 1 byte per pixel per mask (a 100 MP image's mask is 95 MiB);
        and a prompt's first resize and last-axis pass when they alone exceed it (4 x rw x (rh + H) bytes
        per mask: at most 43 MiB for a 100 MP image at the released models' 1024 x 1024 input). With the
        default budget (256 MiB) the masks of a 100 MP image take at most 256 MiB of float32 plus the
        95 MiB mask being yielded.

        Args:
            logits: decoder output of one image.
            output_size: (H, W) of the masks; defaults to the embedded image's size. A different size (the
                image's original resolution, when a downscaled copy was embedded) keeps the same frame.
            chunk_size: at most this many prompts per yielded chunk; default: as many as the budget allows.
            budget_bytes: float32 working memory of a chunk, bytes.
            signals: gathers each mask's quality signals from the resizes themselves (``MaskSignals``, see
                ``quality_signals``): the stability score from the final-resolution logits before they are
                thresholded, and the IoU with SAM's own mask from the first resize (SAM's logits take that
                one only, rw x rh per mask more).

        Yields:
            n x K x H x W bool tensors, in prompt order, on the segmenter's device. Each H x W mask is a
            transposed view of contiguous W x H memory (column-major); call ``.contiguous()`` where
            row-major memory matters.

        Raises:
            ValueError: ``chunk_size`` or ``budget_bytes`` below 1.
        """
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(
                f"chunk_size must be >= 1 (or None: as many as the budget allows), got {chunk_size}"
            )
        height, width = (int(v) for v in (output_size or logits.original_size))
        (rh, rw), (ph, pw) = logits.reshaped_size, self.pad_size
        lh, lw = logits.logits.shape[-2:]
        # Low-res rows/columns that the image's rh x rw pixels of the padded frame sample from, + 1 for the
        # bilinear neighbour of the last one.
        crop = logits.logits[
            ..., : min(lh, math.ceil(rh * lh / ph) + 1), : min(lw, math.ceil(rw * lw / pw) + 1)
        ]
        prompts, rows = resize_plan(crop.shape[1], (rh, rw), (height, width), budget_bytes)
        if chunk_size is not None:
            prompts = min(prompts, chunk_size)
        upsample = torch.ops.aten.upsample_bilinear2d.default  # takes both the output size and the scale
        sam = (
            None
            if signals is None or signals.sam_logits is None
            else signals.sam_logits[..., : crop.shape[-2], : crop.shape[-1]]
        )
        sam_chunks = None if sam is None else sam.transpose(-1, -2).split(prompts)
        for c, chunk in enumerate(crop.transpose(-1, -2).split(prompts)):
            x = upsample(chunk.float(), [rw, rh], False, pw / lw, ph / lh)  # = the padded resize, cropped
            if signals is not None:
                sam_x = (
                    None
                    if sam_chunks is None
                    else upsample(sam_chunks[c].float(), [rw, rh], False, pw / lw, ph / lh)
                )
                signals.input_frame(x, sam_x)
                del sam_x
            if rows is None:
                x = upsample(x, [width, height], False)
                if signals is not None:
                    signals.output_frame(x)
                yield (x > self.mask_threshold).transpose(-1, -2)
            else:
                x = upsample(x, [rw, height], False)  # the last axis alone: as the 2-D kernel computes it
                masks = x.new_empty((*x.shape[:-2], width, height), dtype=torch.bool)
                for start in range(0, height, rows):
                    strip = upsample(
                        x[..., start : start + rows].contiguous(), [width, min(rows, height - start)], False
                    )
                    torch.gt(strip, self.mask_threshold, out=masks[..., start : start + rows])
                    if signals is not None:
                        signals.output_frame(strip, last=start + rows >= height)
                    del strip
                del x
                yield masks.transpose(-1, -2)

    def quality_signals(self, logits: MaskLogits) -> MaskSignals:
        """An empty ``MaskSignals`` for ``logits`` (one image's), to pass to ``iter_masks``."""
        return MaskSignals(self.mask_threshold, logits.sam_logits)


# ATen's CPU bilinear kernel takes another code path (other rounding) for outputs whose two sides sum to at
# most this (``_use_vectorized_kernel_cond_2d`` in ATen's UpSampleKernel.cpp); strips stay above it.
_ATEN_CPU_SMALL_OUTPUT = 128


def resize_plan(
    masks_per_prompt: int, reshaped_size: tuple[int, int], output_size: tuple[int, int], budget_bytes: int
) -> tuple[int, int | None]:
    """How ``HQSamSegmenter.iter_masks`` splits its work to keep its float32 intermediates in a budget.

    Args:
        masks_per_prompt: K (3 for multimask "all", else 1).
        reshaped_size: (rh, rw), the image's part of the model's input frame.
        output_size: (H, W) of the masks.
        budget_bytes: float32 working memory allowed, bytes.

    Returns:
        ``(prompts, rows)``: prompts per chunk (>= 1), and None when a whole prompt fits, else the image rows
        per strip of the final resize (one prompt per chunk then). A prompt costs 4 x K x (rw x rh + H x W)
        bytes whole, 4 x K x (rw x rh + rw x H + (rw + W) x rows) bytes in strips. Strips never go below the
        rows that keep ATen's CPU kernel on its large-output path, and masks too small for that
        (H + W <= 128) are never split: both keep the strips bit for bit equal to one call.

    Raises:
        ValueError: ``budget_bytes`` below 1.
    """
    if budget_bytes < 1:
        raise ValueError(f"the resize budget must be >= 1 byte, got {budget_bytes}")
    (rh, rw), (height, width) = reshaped_size, output_size
    k = max(1, masks_per_prompt)
    whole = 4 * k * (rw * rh + height * width)
    if (
        whole <= budget_bytes
        or width + height <= _ATEN_CPU_SMALL_OUTPUT
        or rw + height <= _ATEN_CPU_SMALL_OUTPUT
    ):
        return max(1, budget_bytes // whole), None
    left = budget_bytes // (4 * k) - rw * rh - rw * height
    rows = max(1, left // (rw + width), _ATEN_CPU_SMALL_OUTPUT + 1 - width)
    return 1, min(rows, height)


def _tiny_random(
    hq: bool, seed: int, image_size: int, patch_size: int, decoder_hidden: int, **kwargs
) -> HQSamSegmenter:
    vit_dim = 32
    config_cls, model_cls, processor_cls = (
        (SamHQConfig, SamHQModel, SamHQProcessor) if hq else (SamConfig, SamModel, SamProcessor)
    )
    decoder = dict(
        hidden_size=decoder_hidden,
        mlp_dim=2 * decoder_hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        iou_head_hidden_dim=decoder_hidden,
    )
    if hq:
        decoder["vit_dim"] = vit_dim
    config = config_cls(
        vision_config=dict(
            hidden_size=vit_dim,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=image_size,
            patch_size=patch_size,
            window_size=4,
            global_attn_indexes=[1],
            num_pos_feats=decoder_hidden // 2,  # must be half the prompt/decoder hidden size
            output_channels=decoder_hidden,
            mlp_dim=64,
            # transformers' SAM vision default (1e-10) makes a random encoder output ~0 for every image
            initializer_range=0.02,
        ),
        prompt_encoder_config=dict(
            hidden_size=decoder_hidden, image_size=image_size, patch_size=patch_size, mask_input_channels=4
        ),
        mask_decoder_config=decoder,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = model_cls(config)
    image_processor = SamImageProcessorPil(
        size={"longest_edge": image_size}, pad_size={"height": image_size, "width": image_size}
    )
    return HQSamSegmenter(model, processor_cls(image_processor=image_processor), **kwargs)


def tiny_random_sam_hq(
    seed: int = 0, *, image_size: int = 128, patch_size: int = 8, decoder_hidden: int = 16, **kwargs
) -> HQSamSegmenter:
    """A tiny randomly initialised SAM-HQ of the real architecture (ViT encoder with windowed and global
    attention, prompt encoder, HQ mask decoder). Offline and fast; its masks are meaningless.

    ``image_size``/``patch_size`` set the embedding grid (``image_size // patch_size``); ``decoder_hidden``
    the prompt/decoder width (256 in the released models). ``kwargs`` go to ``HQSamSegmenter``.
    """
    return _tiny_random(True, seed, image_size, patch_size, decoder_hidden, **kwargs)


def tiny_random_sam(
    seed: int = 0, *, image_size: int = 128, patch_size: int = 8, decoder_hidden: int = 16, **kwargs
) -> HQSamSegmenter:
    """``tiny_random_sam_hq``'s plain-SAM twin (no HQ token), for SAM vs HQ-SAM comparisons and tests."""
    return _tiny_random(False, seed, image_size, patch_size, decoder_hidden, **kwargs)
