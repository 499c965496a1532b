"""Grounding DINO (``transformers.GroundingDinoForObjectDetection``) as an open-vocabulary detector.

The class list becomes one prompt (``"cat. dog. traffic light."``). Grounding DINO scores every query box
against every prompt token; a box's score for a class is the best score over that class's tokens, so boxes
map back to the class list, never to token fragments.
"""

from __future__ import annotations

import string
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from transformers import (
    BertConfig,
    BertTokenizer,
    GroundingDinoConfig,
    GroundingDinoForObjectDetection,
    GroundingDinoProcessor,
    MMGroundingDinoConfig,
    MMGroundingDinoForObjectDetection,
    SwinConfig,
)
from transformers.models.grounding_dino.image_processing_pil_grounding_dino import (
    GroundingDinoImageProcessorPil,
)

from hqlabel.detectors.base import Detections, TransformersDetector, prompt_groups
from hqlabel.platform.config import Precision
from hqlabel.platform.preprocess import Preprocess, grounding_dino_pixel_values, use_torch_preprocess

# With fixed shapes, the pixel canvas (height and width) is rounded up to a multiple of this: a mixed
# dataset's canvas grows, and so recompiles, a bounded number of times (the backbone's coarsest stride is 32).
CANVAS_MULTIPLE = 64


def round_up(value: int, multiple: int = CANVAS_MULTIPLE) -> int:
    return -(-value // multiple) * multiple


def build_prompt(classes: list[str]) -> tuple[str, list[tuple[int, int]]]:
    """Join class names into a Grounding DINO prompt.

    Returns:
        The prompt (lower case, ``". "``-separated, ending in ``"."``) and, per class, its character span
        ``(start, end)`` in the prompt.
    """
    parts, spans, pos = [], [], 0
    for name in classes:
        text = name.lower()
        spans.append((pos, pos + len(text)))
        parts.append(text + ".")
        pos += len(text) + 2  # the "." and the joining space
    return " ".join(parts), spans


def token_class_map(
    offsets: list[tuple[int, int]], spans: list[tuple[int, int]], max_len: int
) -> torch.Tensor:
    """C x T boolean map: which prompt tokens belong to which class.

    Args:
        offsets: per token, its character span in the prompt (special tokens are ``(0, 0)``).
        spans: per class, its character span.
        max_len: T, the detector's text length (logits are padded to it).
    """
    positive = torch.zeros(len(spans), max_len, dtype=torch.bool)
    for t, (start, end) in enumerate(offsets[:max_len]):
        if end <= start:
            continue
        for c, (c_start, c_end) in enumerate(spans):
            if start >= c_start and end <= c_end:
                positive[c, t] = True
    return positive


class TextPass:
    """One detector pass: a prompt, its C' x T token map and the class index of each of its C' rows."""

    def __init__(self, prompt: str, positive: torch.Tensor, class_ids: torch.Tensor) -> None:
        self.prompt, self.positive, self.class_ids = prompt, positive, class_ids


def plan_passes(groups: list[list[str]], tokenizer, max_len: int) -> list[TextPass]:
    """Pack the phrases of ``groups`` (per class, its synonyms) into as few prompts as fit ``max_len`` tokens.

    Phrases are packed in order, a prompt closing when the next phrase would take it over the limit (counted
    by tokenizing the prompt with ``tokenizer``, special tokens included); a class's synonyms may land in
    different passes (its boxes meet again at the NMS).

    Raises:
        ValueError: one phrase alone is over the limit, or produces no tokens.
    """
    phrases = [(c, phrase) for c, group in enumerate(groups) for phrase in group]
    packed: list[list[tuple[int, str]]] = []
    current: list[tuple[int, str]] = []

    def length(members: list[tuple[int, str]]) -> int:
        return len(tokenizer(build_prompt([p for _, p in members])[0])["input_ids"])

    for c, phrase in phrases:
        candidate = [*current, (c, phrase)]
        if length(candidate) <= max_len:
            current = candidate
            continue
        n = length([(c, phrase)])
        if n > max_len:
            raise ValueError(
                f"the prompt for class name {phrase!r} alone is {n} tokens, more than the detector's "
                f"limit of {max_len}; shorten it"
            )
        if current:
            packed.append(current)
        current = [(c, phrase)]
    if current:
        packed.append(current)
    passes = []
    for members in packed:
        prompt, spans = build_prompt([p for _, p in members])
        encoded = tokenizer(prompt, return_offsets_mapping=True)
        by_phrase = token_class_map(encoded["offset_mapping"], spans, max_len)
        missing = [p for (_, p), row in zip(members, by_phrase, strict=True) if not row.any()]
        if missing:
            raise ValueError(f"class names {missing} produce no tokens for the detector; rename them")
        class_ids = sorted({c for c, _ in members})
        row = {c: k for k, c in enumerate(class_ids)}
        positive = torch.zeros(len(class_ids), max_len, dtype=torch.bool)
        for (c, _), tokens in zip(members, by_phrase, strict=True):
            positive[row[c]] |= tokens
        passes.append(TextPass(prompt, positive, torch.tensor(class_ids, dtype=torch.int64)))
    return passes


class GroundingDinoDetector(TransformersDetector):
    """Grounding DINO with class-aware NMS; ``detect`` takes a batch of images and a class list.

    ``precision``: see ``TransformersDetector``. ``preprocess`` ("auto": on the device when it is a GPU, see
    ``hqlabel.platform.preprocess``) chooses where images are resized and normalised.

    ``compile``: ``torch.compile`` the whole model in place (one graph, static shapes; parameter names and
    ``save_pretrained`` are unchanged). Meant for GPUs; on the CPU inductor needs a C++ compiler. It implies
    ``fixed_shapes``, so that a job compiles once per canvas, not once per batch:

    - the batch: every model call takes ``batch`` images (default: the first call's count); a smaller batch is
      padded with blank images (zeros, all valid) whose outputs are dropped, a larger one is split;
    - the pixels: ``pixel_values`` / ``pixel_mask`` are padded (bottom and right, zeros, mask 0 as Grounding
      DINO pads every batch to its largest image) to a canvas that only grows: the largest resized height
      and width seen so far, each rounded up to ``CANVAS_MULTIPLE`` (a starting ``canvas`` may be given);
      a dataset of same-size images compiles once, a mixed one once per canvas growth;
    - the text: every pass of a class list is padded to the longest pass's token count (pad tokens are
      masked: the detections do not change).

    Both preprocessing paths are padded the same way. Grounding DINO's outputs depend on the padding around
    an image (its features see the padded feature maps), so without fixed shapes an image's boxes depend
    slightly on the other images of its batch; with them, the boxes are those of the image on the canvas,
    the same whatever the batch composition (for one canvas), but not the boxes of the unpadded image.
    """

    model_class = GroundingDinoForObjectDetection
    processor_class = GroundingDinoProcessor
    hub_example = "IDEA-Research/grounding-dino-tiny"

    def __init__(
        self,
        model: GroundingDinoForObjectDetection,
        processor: GroundingDinoProcessor,
        *,
        box_threshold: float = 0.35,
        text_threshold: float = 0.25,
        nms_threshold: float = 0.5,
        max_detections: int = 100,
        device: str | torch.device = "cpu",
        precision: Precision = "fp32",
        preprocess: Preprocess = "auto",
        compile: bool = False,
        compile_backend: str | Callable[..., Any] = "inductor",
        fixed_shapes: bool | None = None,
        batch: int | None = None,
        canvas: tuple[int, int] | None = None,
    ) -> None:
        if batch is not None and batch < 1:
            raise ValueError(f"batch must be >= 1, got {batch}")
        super().__init__(
            model,
            processor,
            box_threshold=box_threshold,
            text_threshold=text_threshold,
            nms_threshold=nms_threshold,
            max_detections=max_detections,
            device=device,
            precision=precision,
        )
        self.torch_preprocess = use_torch_preprocess(preprocess, self.device)
        self._prompt_cache: dict[tuple[tuple[str, ...], ...], list[TextPass]] = {}
        self._text_cache: dict[tuple[str, int, int | None], dict[str, torch.Tensor]] = {}
        self._length_cache: dict[tuple[str, ...], int] = {}
        self.compiled = compile
        self.fixed_shapes = compile if fixed_shapes is None else fixed_shapes
        self.batch = batch
        self.canvas = None if canvas is None else (round_up(canvas[0]), round_up(canvas[1]))
        if compile:
            # one graph: the deformable attention's shape checks (transformers' ``torch_compilable_check``)
            # call ``Tensor.item()``, a graph break per layer unless scalar outputs are captured (``_call``)
            self.model.compile(backend=compile_backend, dynamic=False)

    def passes(self, classes: list[str] | list[list[str]]) -> list[TextPass]:
        """The detector passes for ``classes`` (names, or per class a list of synonyms): one prompt when
        they fit the text limit, else several (``plan_passes``); cached."""
        groups = prompt_groups(classes)
        key = tuple(tuple(g) for g in groups)
        if key not in self._prompt_cache:
            passes = plan_passes(groups, self.processor.tokenizer, self.model.config.max_text_len)
            self._prompt_cache[key] = passes
        return self._prompt_cache[key]

    def _detect_pass(
        self, images: list[np.ndarray], text: TextPass, text_len: int | None = None
    ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """One model call with one prompt: per image, the boxes over ``box_threshold`` (XYXY pixels), their
        scores and class indices (into the whole class list), before NMS. ``text_len``: pad the prompt's
        tokens to this length (fixed shapes)."""
        inputs = self._inputs(images, text.prompt, text_len)
        with self.autocast():
            outputs = self._call(inputs)
        probs = outputs.logits.float().sigmoid()  # B x Q x T (B: with fixed shapes, the padded batch)
        positive = text.positive.to(self.device)
        # B x Q x C': best token score per class; a class with all tokens under text_threshold drops out.
        class_scores = (probs[:, :, None, :] * positive[None, None]).amax(-1)
        class_scores = class_scores.masked_fill(class_scores < self.text_threshold, 0.0)
        scores, labels = class_scores.max(-1)
        labels = text.class_ids.to(self.device)[labels]
        found = []
        for i, image in enumerate(images):  # the padding images' rows are dropped
            h, w = image.shape[:2]
            keep = scores[i] > self.box_threshold
            # boxes are relative to the image's valid (unpadded) region, whatever the canvas around it
            cx, cy, bw, bh = outputs.pred_boxes[i, keep].float().unbind(-1)
            boxes = torch.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], -1)
            boxes = boxes * torch.tensor([w, h, w, h], dtype=boxes.dtype, device=boxes.device)
            boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
            boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
            found.append((boxes, scores[i, keep], labels[i, keep]))
        return found

    def _call(self, inputs: dict[str, torch.Tensor]) -> Any:
        """The model on ``inputs``; a compiled model is traced with scalar outputs captured, so that the
        deformable attention's ``.item()`` checks do not break the graph (one graph per input shape)."""
        if not self.compiled:
            return self.model(**inputs)
        with torch._dynamo.config.patch(capture_scalar_outputs=True):
            return self.model(**inputs)

    def _tokens(self, prompt: str, count: int, length: int | None) -> dict[str, torch.Tensor]:
        """``prompt``'s tokens for ``count`` images on the device (padded to ``length`` tokens), cached."""
        key = (prompt, count, length)
        if key not in self._text_cache:
            padding = dict(padding="max_length", max_length=length) if length else dict(padding=True)
            text = self.processor.tokenizer([prompt] * count, return_tensors="pt", **padding)
            self._text_cache[key] = {k: v.to(self.device) for k, v in text.items()}
        return self._text_cache[key]

    def _text_length(self, passes: list[TextPass]) -> int:
        """The longest pass's token count (special tokens included): every pass is padded to it."""
        key = tuple(text.prompt for text in passes)
        if key not in self._length_cache:
            tokenizer = self.processor.tokenizer
            self._length_cache[key] = max(len(tokenizer(text.prompt)["input_ids"]) for text in passes)
        return self._length_cache[key]

    def _inputs(
        self, images: list[np.ndarray], prompt: str, text_len: int | None = None
    ) -> dict[str, torch.Tensor]:
        """The model's inputs on the device: from the processor, or (``torch_preprocess``) pixels resized on
        the device and the prompt's tokens tokenized once per batch size. With ``fixed_shapes``, padded to the
        canvas and the fixed batch, with the tokens padded to ``text_len``."""
        if not self.fixed_shapes and not self.torch_preprocess:
            inputs = self.processor(
                images=images,
                text=[prompt] * len(images),
                return_tensors="pt",
                input_data_format="channels_last",  # else a 1- or 3-pixel-high image reads as channels-first
            )
            return {k: v.to(self.device) for k, v in inputs.items()}
        if self.torch_preprocess:
            pixel_values, pixel_mask = grounding_dino_pixel_values(
                images, self.processor.image_processor, self.device
            )
        else:
            pixels = self.processor.image_processor(
                images=images, return_tensors="pt", input_data_format="channels_last"
            )
            pixel_values, pixel_mask = pixels["pixel_values"], pixels["pixel_mask"]
            pixel_values, pixel_mask = pixel_values.to(self.device), pixel_mask.to(self.device)
        count = len(images)
        if self.fixed_shapes:
            pixel_values, pixel_mask = self._pad(pixel_values, pixel_mask)
            count = len(pixel_values)
        text = self._tokens(prompt, count, text_len)
        return {**text, "pixel_values": pixel_values, "pixel_mask": pixel_mask}

    def _pad(self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """B x 3 x h x w pixels and B x h x w mask -> ``batch`` x 3 x H x W and ``batch`` x H x W on the
        canvas (grown to hold h x w): zeros and mask 0 around the images, blank images (zeros, mask 1: a
        mask of 0 alone would make their valid ratios 0 and their outputs NaN) after them."""
        h, w = pixel_values.shape[-2:]
        height, width = self.canvas or (0, 0)
        self.canvas = height, width = max(height, round_up(h)), max(width, round_up(w))
        pixel_values = F.pad(pixel_values, (0, width - w, 0, height - h))
        pixel_mask = F.pad(pixel_mask, (0, width - w, 0, height - h))
        extra = self.batch - len(pixel_values)
        if extra > 0:
            pixel_values = torch.cat([pixel_values, pixel_values.new_zeros(extra, *pixel_values.shape[1:])])
            pixel_mask = torch.cat([pixel_mask, pixel_mask.new_ones(extra, *pixel_mask.shape[1:])])
        return pixel_values, pixel_mask

    @torch.inference_mode()
    def detect(self, images: list[np.ndarray], classes: list[str] | list[list[str]]) -> list[Detections]:
        """Detect ``classes`` in ``images``.

        Args:
            images: H x W x 3 uint8 RGB arrays (sizes may differ).
            classes: class names, or per class a list of synonyms (each a phrase of the prompt; a box scores
                a class by its best token over all of them); ``Detections.labels`` index into this list.

        Returns:
            One ``Detections`` per image, boxes in XYXY pixels of that image, at most ``max_detections``.
        """
        if not images:
            return []
        passes = self.passes(classes)
        chunks, text_len = [images], None
        if self.fixed_shapes:
            if self.batch is None:
                self.batch = len(images)
            chunks = [images[i : i + self.batch] for i in range(0, len(images), self.batch)]
            text_len = self._text_length(passes)
        found: list[list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = [[] for _ in images]
        start = 0
        for chunk in chunks:
            for text in passes:
                for i, candidates in enumerate(self._detect_pass(chunk, text, text_len)):
                    found[start + i].append(candidates)
            start += len(chunk)
        results = []
        for candidates in found:
            boxes, det_scores, det_labels = (torch.cat(parts) for parts in zip(*candidates, strict=True))
            results.append(self.keep(boxes, det_scores, det_labels))
        return results


def tiny_random_tokenizer() -> BertTokenizer:
    """A BERT WordPiece tokenizer with a vocabulary generated here: special tokens, punctuation, and
    single-character word pieces, so any ASCII class name tokenizes without a download."""
    pieces = list(string.ascii_lowercase + string.digits)
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *string.punctuation, *pieces]
    tokens += [f"##{p}" for p in pieces]
    return BertTokenizer(vocab={token: i for i, token in enumerate(tokens)})


class MMGroundingDinoDetector(GroundingDinoDetector):
    """MM-Grounding-DINO (``transformers.MMGroundingDinoForObjectDetection``, OpenMMLab's re-trained Grounding
    DINO: a contrastive class head, unshared decoder heads). Same inputs, outputs and processor as Grounding
    DINO, so everything else (prompt, token -> class map, thresholds) is ``GroundingDinoDetector``'s."""

    model_class = MMGroundingDinoForObjectDetection
    hub_example = "openmmlab-community/mm_grounding_dino_tiny_o365v1_goldg_v3det"


def _tiny_random(
    config_class: Callable[..., GroundingDinoConfig | MMGroundingDinoConfig],
    detector_class: type[GroundingDinoDetector],
    seed: int,
    **kwargs,
) -> GroundingDinoDetector:
    """A tiny randomly initialised detector of the Grounding DINO family (Swin + BERT + deformable DETR)."""
    tokenizer = tiny_random_tokenizer()
    backbone = SwinConfig(
        embed_dim=8,
        depths=[1, 1, 1, 1],
        num_heads=[1, 1, 1, 1],
        window_size=7,
        out_features=["stage2", "stage3", "stage4"],
    )
    text = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=64,
    )
    config = config_class(
        backbone_config=backbone,
        text_config=text,
        d_model=32,
        encoder_layers=1,
        decoder_layers=2,  # the tied box heads need at least 2
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_n_points=2,
        decoder_n_points=2,
        num_queries=20,
        num_feature_levels=3,
        max_text_len=64,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = detector_class.model_class(config)
    image_processor = GroundingDinoImageProcessorPil(size={"shortest_edge": 128, "longest_edge": 192})
    processor = GroundingDinoProcessor(image_processor=image_processor, tokenizer=tokenizer)
    return detector_class(model, processor, **kwargs)


def tiny_random_grounding_dino(seed: int = 0, **kwargs) -> GroundingDinoDetector:
    """A tiny randomly initialised Grounding DINO of the real architecture (Swin + BERT + deformable DETR).

    Offline and fast; its boxes are meaningless. ``kwargs`` go to ``GroundingDinoDetector``.
    """
    return _tiny_random(GroundingDinoConfig, GroundingDinoDetector, seed, **kwargs)


def tiny_random_mm_grounding_dino(seed: int = 0, **kwargs) -> MMGroundingDinoDetector:
    """A tiny randomly initialised MM-Grounding-DINO of the real architecture (2 decoder layers).

    Offline and fast; its boxes are meaningless. ``kwargs`` go to ``MMGroundingDinoDetector``.
    """
    return _tiny_random(MMGroundingDinoConfig, MMGroundingDinoDetector, seed, **kwargs)
