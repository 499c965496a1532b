"""The detector interface and box utilities shared by every open-vocabulary detector."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np
import torch

from hqlabel.platform.config import Precision, autocast, resolve_precision


@dataclass
class Detections:
    """Boxes found in one image.

    Attributes:
        boxes: N x 4 float32, XYXY pixels of the image given to the detector.
        scores: N float32 in [0, 1].
        labels: N int64, indices into the class list given to the detector.
        masks: the detector's own masks where it makes them (SAM 3), else None: N x m x m float32
            probabilities over the whole image at the model's mask resolution (``sam3.masks_at`` sizes them).
    """

    boxes: torch.Tensor
    scores: torch.Tensor
    labels: torch.Tensor
    masks: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.boxes.shape[0])

    @classmethod
    def empty(cls) -> Detections:
        return cls(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.int64))


class Detector(Protocol):
    """An open-vocabulary detector: images + class names in, boxes with class indices out."""

    def detect(self, images: list[np.ndarray], classes: list[str] | list[list[str]]) -> list[Detections]:
        """Detect ``classes`` in each of ``images`` (H x W x 3 uint8 RGB); one ``Detections`` per image.
        A class is a name or a list of synonyms (``prompt_groups``); labels index ``classes``."""
        ...


class TransformersDetector:
    """What every transformers-backed detector shares: device, precision, thresholds, loading and saving, and
    the last step (class-aware NMS, at most ``max_detections``). A subclass names its ``model_class`` and
    ``processor_class`` and implements ``detect``.

    ``precision`` ("fp32", "bf16", "fp16" on GPUs, or "auto": bf16 on a CUDA device that supports it, else
    fp32) runs the model under ``torch.autocast``; weights stay float32, and scores and boxes are float32
    before thresholding and NMS whatever the precision.
    """

    model_class: ClassVar[Any]
    processor_class: ClassVar[Any]
    hub_example: ClassVar[str]

    def __init__(
        self,
        model: Any,
        processor: Any,
        *,
        box_threshold: float,
        text_threshold: float,
        nms_threshold: float = 0.5,
        max_detections: int = 100,
        device: str | torch.device = "cpu",
        precision: Precision = "fp32",
    ) -> None:
        self.device = torch.device(device)
        self.precision = precision
        self.autocast_dtype = resolve_precision(precision, self.device)
        self.model = model.to(self.device).eval()
        self.processor = processor
        self.box_threshold = box_threshold
        self.text_threshold = text_threshold
        self.nms_threshold = nms_threshold
        self.max_detections = max_detections

    def autocast(self) -> contextlib.AbstractContextManager:
        """``torch.autocast`` at this detector's precision (a no-op context at fp32)."""
        return autocast(self.device, self.autocast_dtype)

    @classmethod
    def from_pretrained(cls, name_or_path: str, *, revision: str | None = None, **kwargs) -> Any:
        """Load model and processor from a hub id (``cls.hub_example``, at ``revision``: a commit hash, branch
        or tag) or a directory."""
        from hqlabel.platform.hub import load_pretrained

        where = dict(what="detector", option="--detector", revision=revision)
        model = load_pretrained(cls.model_class.from_pretrained, name_or_path, **where)
        processor = load_pretrained(cls.processor_class.from_pretrained, name_or_path, **where)
        return cls(model, processor, **kwargs)

    def save_pretrained(self, directory: str | Path) -> None:
        """Write model and processor so that ``from_pretrained(directory)`` rebuilds this detector."""
        self.model.save_pretrained(directory)
        self.processor.save_pretrained(directory)

    def keep(self, boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor) -> Detections:
        """One image's candidates (N x 4 XYXY pixels, N scores, N labels) after class-aware NMS: at most
        ``max_detections``, by decreasing score, on the CPU."""
        kept = batched_nms(boxes, scores, labels, self.nms_threshold, self.max_detections)
        return Detections(boxes[kept].cpu(), scores[kept].cpu(), labels[kept].cpu())


def prompt_groups(classes: list[str] | list[list[str]]) -> list[list[str]]:
    """Per class, the phrases a detector is prompted with: a name alone, or the class's list of synonyms."""
    return [[c] if isinstance(c, str) else list(c) for c in classes]


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise IoU of XYXY boxes: N x 4 and M x 4 -> N x M."""
    area_a = (a[:, 2] - a[:, 0]).clamp(min=0) * (a[:, 3] - a[:, 1]).clamp(min=0)
    area_b = (b[:, 2] - b[:, 0]).clamp(min=0) * (b[:, 3] - b[:, 1]).clamp(min=0)
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area_a[:, None] + area_b[None, :] - inter
    return inter / union.clamp(min=torch.finfo(inter.dtype).eps)


def batched_nms(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    labels: torch.Tensor,
    iou_threshold: float,
    max_keep: int | None = None,
) -> torch.Tensor:
    """Class-aware greedy non-maximum suppression (torchvision's ``batched_nms`` without torchvision).

    Boxes of different labels never suppress each other: they are shifted apart by a per-label offset. The
    IoU matrix is computed where the boxes are; the greedy pass runs on the CPU over it (one transfer: a
    loop of GPU reads would synchronise once per box), and stops after ``max_keep`` kept boxes.

    Returns:
        Indices of the kept boxes, by decreasing score (at most ``max_keep``).
    """
    if boxes.numel() == 0:
        return torch.zeros(0, dtype=torch.int64, device=boxes.device)
    offset = labels.to(boxes.dtype) * (boxes.max() + 1)
    shifted = boxes + offset[:, None]
    order = scores.argsort(descending=True)
    overlaps = (box_iou(shifted[order], shifted[order]) > iou_threshold).cpu().numpy()
    suppressed = np.zeros(len(order), dtype=bool)
    keep = []
    for i in range(len(order)):
        if suppressed[i]:
            continue
        keep.append(i)
        if max_keep is not None and len(keep) >= max_keep:
            break
        suppressed |= overlaps[i]
    return order[torch.tensor(keep, dtype=torch.int64, device=boxes.device)]
