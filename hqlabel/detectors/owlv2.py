"""OWLv2 (``transformers.Owlv2ForObjectDetection``) as an open-vocabulary detector.

Each class name is its own text query (query ``c`` is ``classes[c]``), so a box's label is the index of its
best query and class names map back exactly. OWLv2 predicts one box per image patch and scores it against
every query: the score of box ``p`` for class ``c`` is ``sigmoid(logits[p, c])``, independently per query
(not a softmax over classes, and not a token score as in Grounding DINO, whose class score is the best of the
class's prompt tokens). ``box_threshold`` keeps a box whose best class score is above it; ``text_threshold``
drops a class from a box whose score for it is under it (as for Grounding DINO; with one query per class it
only matters when it is above ``box_threshold``). OWLv2's scores run lower than Grounding DINO's:
transformers' OWLv2 examples use 0.1 where Grounding DINO's default is 0.35.

Images are padded at the bottom and right to a square (``max(H, W)``) before they are resized, so the
model's boxes are relative to that square: both axes scale by ``max(H, W)``, as in transformers'
``post_process_object_detection``. Boxes are then clipped to the image, and those left with no area (they
lay in the padding) are dropped.
"""

from __future__ import annotations

import numpy as np
import torch
from transformers import (
    CLIPTokenizer,
    Owlv2Config,
    Owlv2ForObjectDetection,
    Owlv2Processor,
)
from transformers.models.owlv2.image_processing_pil_owlv2 import Owlv2ImageProcessorPil

from hqlabel.detectors.base import Detections, TransformersDetector, prompt_groups
from hqlabel.platform.config import Precision, compile_refused
from hqlabel.platform.preprocess import PREPROCESS_MODES, Preprocess


def _require_scipy() -> None:
    """transformers' OWLv2 image processor (the PIL backend: torchvision is not a dependency) resizes with
    scipy."""
    try:
        import scipy.ndimage  # noqa: F401
    except ImportError as e:
        raise ImportError("the OWLv2 detector needs scipy: pip install 'hqlabel[owlv2]' (or scipy)") from e


def boxes_to_image(pred_boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """P x 4 (cx, cy, w, h) relative to the padded square -> P x 4 XYXY pixels of the H x W image, clipped
    to it."""
    cx, cy, bw, bh = pred_boxes.float().unbind(-1)
    boxes = torch.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], -1) * max(height, width)
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
    return boxes


class Owlv2Detector(TransformersDetector):
    """OWLv2 with class-aware NMS; ``detect`` takes a batch of images and a class list.

    ``precision``: see ``TransformersDetector``. ``preprocess``: OWLv2's images go through transformers' image
    processor on the CPU whatever the mode ("auto", "processor"); "torch" is refused (no on-device OWLv2
    preprocessing yet). ``compile`` is refused: ``--compile`` covers Grounding DINO detectors only so far.
    """

    model_class = Owlv2ForObjectDetection
    processor_class = Owlv2Processor
    hub_example = "google/owlv2-base-patch16-ensemble"

    def __init__(
        self,
        model: Owlv2ForObjectDetection,
        processor: Owlv2Processor,
        *,
        box_threshold: float = 0.1,
        text_threshold: float = 0.0,
        nms_threshold: float = 0.5,
        max_detections: int = 100,
        device: str | torch.device = "cpu",
        precision: Precision = "fp32",
        preprocess: Preprocess = "auto",
        compile: bool = False,
    ) -> None:
        if compile:
            raise ValueError(compile_refused("owlv2"))
        if preprocess not in PREPROCESS_MODES:
            raise ValueError(f"preprocess must be one of {PREPROCESS_MODES}, got {preprocess!r}")
        if preprocess == "torch":
            raise ValueError(
                "the OWLv2 detector preprocesses with its image processor only; "
                "use --preprocess auto or processor"
            )
        _require_scipy()
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
        self._query_cache: dict[tuple[str, ...], dict[str, torch.Tensor]] = {}

    def queries(self, classes: list[str]) -> dict[str, torch.Tensor]:
        """The text queries of ``classes``, one per class: ``input_ids`` and ``attention_mask``, C x L (L: the
        text model's length), on the device."""
        key = tuple(classes)
        if key not in self._query_cache:
            max_len = self.model.config.text_config.max_position_embeddings
            lengths = [len(ids) for ids in self.processor.tokenizer(classes)["input_ids"]]
            too_long = [name for name, n in zip(classes, lengths, strict=True) if n > max_len]
            if too_long:
                raise ValueError(
                    f"class names {too_long} are more than the OWLv2 detector's limit of {max_len} tokens "
                    "each; shorten them"
                )
            text = self.processor.tokenizer(
                classes, padding="max_length", max_length=max_len, return_tensors="pt"
            )
            self._query_cache[key] = {k: text[k].to(self.device) for k in ("input_ids", "attention_mask")}
        return self._query_cache[key]

    def pixel_values(self, images: list[np.ndarray]) -> torch.Tensor:
        """B x 3 x S x S float32 on the device: each image rescaled, padded to a square, resized and
        normalised."""
        pixels = self.processor.image_processor(
            images,
            return_tensors="pt",
            input_data_format="channels_last",  # else a 1- or 3-pixel-high image reads as channels-first
        )["pixel_values"]
        return pixels.to(self.device)

    @torch.inference_mode()
    def detect(self, images: list[np.ndarray], classes: list[str] | list[list[str]]) -> list[Detections]:
        """Detect ``classes`` in ``images``.

        Args:
            images: H x W x 3 uint8 RGB arrays (sizes may differ).
            classes: class names, one text query each, or per class a list of synonyms, one query each (a
                box's logit for a class is its best over the class's queries); ``Detections.labels`` index
                into this list.

        Returns:
            One ``Detections`` per image, boxes in XYXY pixels of that image, at most ``max_detections``.
        """
        if not images:
            return []
        groups = prompt_groups(classes)
        text = self.queries([phrase for group in groups for phrase in group])
        inputs = {k: v.repeat(len(images), 1) for k, v in text.items()}  # (B * C) x L, image-major
        with self.autocast():
            outputs = self.model(pixel_values=self.pixel_values(images), **inputs)
        # B x P x C; the best class by logit, as transformers' post-processing (sigmoid saturates to 1.0 in
        # float32 and would tie classes); a class under text_threshold is not a candidate
        logits = outputs.logits.float()
        if any(len(group) > 1 for group in groups):  # B x P x queries -> B x P x C, a class's best query
            owner = torch.tensor([c for c, group in enumerate(groups) for _ in group], device=logits.device)
            logits = logits.new_full((*logits.shape[:2], len(groups)), float("-inf")).scatter_reduce(
                -1, owner.expand_as(logits), logits, "amax"
            )
        logits = logits.masked_fill(logits.sigmoid() < self.text_threshold, float("-inf"))
        best, labels = logits.max(-1)
        scores = best.sigmoid()

        results = []
        for i, image in enumerate(images):
            h, w = image.shape[:2]
            boxes = boxes_to_image(outputs.pred_boxes[i], h, w)
            area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
            keep = (scores[i] > self.box_threshold) & (area > 0)
            results.append(self.keep(boxes[keep], scores[i, keep], labels[i, keep]))
        return results


def tiny_random_clip_tokenizer(max_length: int = 16) -> CLIPTokenizer:
    """A byte-level BPE CLIP tokenizer with a vocabulary generated here (every byte, alone and word-final, no
    merges), so any class name tokenizes without a download. As in CLIP, ``<|startoftext|>`` and
    ``<|endoftext|>`` have the highest ids (the text model pools at the highest id) and ``!`` (id 0) pads."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    tokens = [*chars, *(c + "</w>" for c in chars), "<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(
        vocab={token: i for i, token in enumerate(tokens)},
        merges=[],
        pad_token="!",
        model_max_length=max_length,
    )


def tiny_random_owlv2(seed: int = 0, **kwargs) -> Owlv2Detector:
    """A tiny randomly initialised OWLv2 of the real architecture (CLIP ViT + text transformer, box and class
    heads per patch; 64 x 64 input, 16 patches).

    Offline and fast; its boxes are meaningless. ``kwargs`` go to ``Owlv2Detector``.
    """
    tokenizer = tiny_random_clip_tokenizer()
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=16,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    vision = dict(
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=64,
        patch_size=16,
    )
    config = Owlv2Config(text_config=text, vision_config=vision, projection_dim=32)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = Owlv2ForObjectDetection(config)
        # the default init saturates the box head (every box a corner or a line); small last-layer weights
        # leave boxes near their patch, about a patch in size, as a trained model's are
        with torch.no_grad():
            model.box_head.dense2.weight.mul_(0.01)
            model.box_head.dense2.bias.zero_()
    image_processor = Owlv2ImageProcessorPil(size={"height": 64, "width": 64})
    processor = Owlv2Processor(image_processor=image_processor, tokenizer=tokenizer)
    return Owlv2Detector(model, processor, **kwargs)
