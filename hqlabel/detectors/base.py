"""The detector interface and box utilities shared by every open-vocabulary detector."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch


@dataclass
class Detections:
    """Boxes found in one image.

    Attributes:
        boxes: N x 4 float32, XYXY pixels of the image given to the detector.
        scores: N float32 in [0, 1].
        labels: N int64, indices into the class list given to the detector.
    """

    boxes: torch.Tensor
    scores: torch.Tensor
    labels: torch.Tensor

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
