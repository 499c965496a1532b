"""SAM 3 (``transformers.Sam3Model``, Promptable Concept Segmentation) as a text-prompted detector.

Each class name is its own text prompt (prompt ``c`` is ``classes[c]``, a short noun phrase as SAM 3 expects),
so a detection's label is the index of the prompt that found it and class names map back exactly. The image
encoder runs once per image; each class costs one pass of the text encoder and the DETR encoder / decoder on
the cached image features.

Scores are transformers' (``Sam3Processor.post_process_instance_segmentation``): ``sigmoid(pred_logits) *
sigmoid(presence_logits)``, a query's match score times the image-level "is this concept present" score.
``box_threshold`` keeps a detection whose score is above it (transformers' ``threshold``, 0.3 in its
examples); ``text_threshold`` drops a class from an image whose presence score (``sigmoid(presence_logits)``)
is under it (0 keeps every class, as transformers does). Boxes come out of the model as XYXY relative to the
image (resized to a square without padding) and scale by the image's own width and height. Detections of
different classes never suppress each other in NMS; same-class overlaps above ``nms_threshold`` do.

SAM 3 also predicts a mask per detection: ``Detections.masks`` holds its probabilities at the model's mask
resolution (N x m x m, covering the whole image); ``masks_at`` resizes them as transformers does (bilinear,
then ``> 0.5``). The labeler prompts HQ-SAM with the boxes and keeps these masks in the ``sam3_mask`` column.

Preprocessing is done here in torch (resize to the model's square input, antialiased bilinear; rescale to
[0, 1]; normalise with mean = std = 0.5, the values of SAM 3's image processor): transformers' SAM 3 image
processor needs torchvision, which HQLabel does not depend on. The text goes through the checkpoint's CLIP
tokenizer, padded to the text model's length (32 for ``facebook/sam3``) as ``Sam3Processor`` pads it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from transformers import Sam3Config, Sam3Model

from hqlabel.detectors.base import Detections, TransformersDetector, batched_nms, prompt_groups
from hqlabel.platform.config import Precision, compile_refused
from hqlabel.platform.preprocess import PREPROCESS_MODES, Preprocess

IMAGE_MEAN = (0.5, 0.5, 0.5)  # transformers' IMAGENET_STANDARD_MEAN / _STD, SAM 3's image processor's
IMAGE_STD = (0.5, 0.5, 0.5)
MASK_THRESHOLD = 0.5  # transformers' post_process_instance_segmentation default


def masks_at(probs: torch.Tensor, size: tuple[int, int], threshold: float = MASK_THRESHOLD) -> torch.Tensor:
    """N x m x m mask probabilities -> N x H x W bool at ``size`` (H, W): bilinear, then ``> threshold``."""
    if len(probs) == 0:
        return torch.zeros((0, *size), dtype=torch.bool, device=probs.device)
    resized = F.interpolate(probs[None].float(), size=size, mode="bilinear", align_corners=False)[0]
    return resized > threshold


class Sam3Detector(TransformersDetector):
    """SAM 3 with one text prompt per class and class-aware NMS; ``detect`` takes a batch of images and a
    class list and returns boxes, scores, labels and SAM 3's own mask probabilities.

    ``processor``: the CLIP tokenizer (``Sam3Processor.tokenizer``); images are preprocessed here.
    ``preprocess``: "auto", "processor" and "torch" all preprocess in torch on the device. ``compile`` is
    refused: ``--compile`` covers Grounding DINO detectors only so far.
    """

    model_class = Sam3Model
    hub_example = "facebook/sam3"

    def __init__(
        self,
        model: Sam3Model,
        processor: Any,
        *,
        box_threshold: float = 0.3,
        text_threshold: float = 0.0,
        nms_threshold: float = 0.5,
        max_detections: int = 100,
        device: str | torch.device = "cpu",
        precision: Precision = "fp32",
        preprocess: Preprocess = "auto",
        compile: bool = False,
    ) -> None:
        if compile:
            raise ValueError(compile_refused("sam3"))
        if preprocess not in PREPROCESS_MODES:
            raise ValueError(f"preprocess must be one of {PREPROCESS_MODES}, got {preprocess!r}")
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
        self._text_cache: dict[tuple[str, ...], dict[str, torch.Tensor]] = {}

    @classmethod
    def from_pretrained(cls, name_or_path: str, *, revision: str | None = None, **kwargs) -> Sam3Detector:
        """Load the model (``Sam3Model``: from a ``sam3`` config, or the detector part of ``facebook/sam3``'s
        ``sam3_video`` one) and its tokenizer from a hub id or directory, at ``revision``."""
        from transformers import AutoTokenizer

        from hqlabel.platform.hub import load_pretrained

        where = dict(what="detector", option="--detector", revision=revision)
        model = load_pretrained(Sam3Model.from_pretrained, name_or_path, **where)
        tokenizer = load_pretrained(AutoTokenizer.from_pretrained, name_or_path, **where)
        return cls(model, tokenizer, **kwargs)

    @property
    def tokenizer(self) -> Any:
        return getattr(self.processor, "tokenizer", self.processor)

    def prompts(self, classes: list[str]) -> dict[str, torch.Tensor]:
        """The text prompts of ``classes``, one per class: ``input_ids`` and ``attention_mask``, C x L (L: the
        text model's length), on the device."""
        key = tuple(classes)
        if key not in self._text_cache:
            max_len = self.model.config.text_config.max_position_embeddings
            lengths = [len(ids) for ids in self.tokenizer(classes)["input_ids"]]
            too_long = [name for name, n in zip(classes, lengths, strict=True) if n > max_len]
            if too_long:
                raise ValueError(
                    f"class names {too_long} are more than the SAM 3 detector's limit of {max_len} tokens "
                    "each; shorten them"
                )
            text = self.tokenizer(classes, padding="max_length", max_length=max_len, return_tensors="pt")
            self._text_cache[key] = {k: text[k].to(self.device) for k in ("input_ids", "attention_mask")}
        return self._text_cache[key]

    def pixel_values(self, images: list[np.ndarray]) -> torch.Tensor:
        """B x 3 x S x S float32 on the device: each image resized to the model's square input (aspect not
        kept, as SAM 3's processor does), rescaled to [0, 1] and normalised."""
        size = self.model.config.vision_config.image_size
        mean = torch.tensor(IMAGE_MEAN, device=self.device)[:, None, None]
        std = torch.tensor(IMAGE_STD, device=self.device)[:, None, None]
        out = []
        for image in images:
            x = torch.from_numpy(np.ascontiguousarray(image)).to(self.device).permute(2, 0, 1)[None].float()
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
            out.append((x[0] / 255.0 - mean) / std)
        return torch.stack(out)

    @torch.inference_mode()
    def raw_outputs(self, images: list[np.ndarray], classes: list[str]) -> list[Any]:
        """Per class, the model's outputs (``Sam3ImageSegmentationOutput``, batch of ``images``) for the
        prompt ``classes[c]``; the image encoder runs once for all classes."""
        text = self.prompts(classes)
        with self.autocast():
            vision = self.model.get_vision_features(pixel_values=self.pixel_values(images))
            return [
                self.model(
                    vision_embeds=vision,
                    input_ids=text["input_ids"][c : c + 1].expand(len(images), -1),
                    attention_mask=text["attention_mask"][c : c + 1].expand(len(images), -1),
                )
                for c in range(len(classes))
            ]

    @torch.inference_mode()
    def detect(self, images: list[np.ndarray], classes: list[str] | list[list[str]]) -> list[Detections]:
        """Detect ``classes`` in ``images``.

        Args:
            images: H x W x 3 uint8 RGB arrays (sizes may differ).
            classes: class names, one text prompt each, or per class a list of synonyms, one prompt each (the
                boxes of all of a class's prompts are that class's; the NMS runs on classes);
                ``Detections.labels`` index into this list.

        Returns:
            One ``Detections`` per image: boxes in XYXY pixels of that image, at most ``max_detections``, and
            ``masks`` (N x m x m float32 probabilities over the whole image; ``masks_at`` sizes them).
        """
        if not images:
            return []
        groups = prompt_groups(classes)
        owners = [c for c, group in enumerate(groups) for _ in group]
        per_class = self.raw_outputs(images, [phrase for group in groups for phrase in group])
        results = []
        for i, image in enumerate(images):
            h, w = image.shape[:2]
            scale = torch.tensor([w, h, w, h], dtype=torch.float32, device=self.device)
            boxes, scores, labels, masks = [], [], [], []
            for c, out in zip(owners, per_class, strict=True):
                presence = out.presence_logits[i].float().sigmoid()  # 1
                score = out.pred_logits[i].float().sigmoid() * presence  # Q
                keep = score > self.box_threshold
                if bool(presence < self.text_threshold):
                    keep = torch.zeros_like(keep)
                boxes.append(out.pred_boxes[i, keep].float() * scale)
                scores.append(score[keep])
                labels.append(torch.full((int(keep.sum()),), c, dtype=torch.int64, device=self.device))
                masks.append(out.pred_masks[i, keep].float().sigmoid())
            box = torch.cat(boxes)
            box[:, 0::2] = box[:, 0::2].clamp(0, w)
            box[:, 1::2] = box[:, 1::2].clamp(0, h)
            score, label, mask = torch.cat(scores), torch.cat(labels), torch.cat(masks)
            kept = batched_nms(box, score, label, self.nms_threshold, self.max_detections)
            results.append(
                Detections(box[kept].cpu(), score[kept].cpu(), label[kept].cpu(), masks=mask[kept].cpu())
            )
        return results


def tiny_random_sam3(seed: int = 0, **kwargs) -> Sam3Detector:
    """A tiny randomly initialised SAM 3 of the real architecture (ViT with windowed and global attention +
    FPN, CLIP text encoder, DETR encoder / decoder with a presence token, mask decoder; 56 x 56 input, 16 x 16
    masks), with a generated CLIP tokenizer.

    Offline and fast; its boxes and masks are meaningless. ``kwargs`` go to ``Sam3Detector``.
    """
    from transformers.models.sam3.configuration_sam3 import Sam3VisionConfig, Sam3ViTConfig

    from hqlabel.detectors.owlv2 import tiny_random_clip_tokenizer

    tokenizer = tiny_random_clip_tokenizer(max_length=16)
    layers = dict(hidden_size=32, num_attention_heads=2, intermediate_size=37)
    vit = Sam3ViTConfig(
        **layers,
        num_hidden_layers=2,
        image_size=56,
        patch_size=14,
        window_size=2,
        global_attn_indexes=[1],
        pretrain_image_size=28,
    )
    # feature sizes: the 4 x 4 patch grid at the FPN's scale factors 4, 2, 1 (0.5 is dropped by the model)
    vision = Sam3VisionConfig(
        backbone_config=vit, fpn_hidden_size=32, backbone_feature_sizes=[[16, 16], [8, 8], [4, 4]]
    )
    text = dict(
        model_type="clip_text_model",
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=37,
        projection_dim=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=16,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    config = Sam3Config(
        vision_config=vision,
        text_config=text,
        geometry_encoder_config=dict(**layers, num_layers=1),
        detr_encoder_config=dict(**layers, num_layers=1),
        detr_decoder_config=dict(**layers, num_layers=2, num_queries=20),
        mask_decoder_config=dict(hidden_size=32, num_attention_heads=2),
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = Sam3Model(config)
    return Sam3Detector(model, tokenizer, **kwargs)
