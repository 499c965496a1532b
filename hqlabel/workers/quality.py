"""Per-instance quality signals and mask de-duplication of one image's labeled instances (Ray-free).

The logits-level signals (``stability``, ``hq_sam_iou``) come from ``HQSamSegmenter.iter_masks``
(``hqlabel.segmenters.quality.MaskSignals``); this module adds the box agreement (``box_iou``) from the
encoded masks, and removes duplicate masks that box NMS missed (``mask_nms``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from hqlabel.platform.rle import _mask_utils, _to_pycocotools, rle_to_bbox


def box_iou(boxes_a: np.ndarray, boxes_b: np.ndarray) -> np.ndarray:
    """Elementwise IoU of paired XYXY boxes, N x 4 and N x 4 -> N (0.0 where both are empty)."""
    a, b = np.asarray(boxes_a, np.float64).reshape(-1, 4), np.asarray(boxes_b, np.float64).reshape(-1, 4)
    wh = np.clip(np.minimum(a[:, 2:], b[:, 2:]) - np.maximum(a[:, :2], b[:, :2]), 0, None)
    inter = wh[:, 0] * wh[:, 1]
    area_a = np.clip(a[:, 2] - a[:, 0], 0, None) * np.clip(a[:, 3] - a[:, 1], 0, None)
    area_b = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    union = area_a + area_b - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def mask_box_iou(rles: list[dict[str, Any]], prompt_boxes: np.ndarray) -> list[float]:
    """Per mask, the IoU of its tight bounding box (pixel edges, ``rle_to_bbox``) with its prompt box (XYXY
    pixels of the mask's frame); 0.0 for an empty mask."""
    if not rles:
        return []
    tight = np.asarray([rle_to_bbox(rle) for rle in rles], np.float64)
    return box_iou(tight, prompt_boxes).astype(np.float32).tolist()  # float32 values, as written


def mask_nms(rles: list[dict[str, Any]], scores: list[float], iou_threshold: float) -> list[int]:
    """Class-agnostic greedy NMS by mask IoU: of two masks overlapping by more than ``iou_threshold`` (IoU of
    the masks' pixels, computed on the RLEs), the one with the higher score stays (the earlier one on a tie).

    Returns:
        The indices kept, in their original order.
    """
    if len(rles) < 2:
        return list(range(len(rles)))
    coco = [_to_pycocotools(r) for r in rles]
    overlaps = np.asarray(_mask_utils().iou(coco, coco, [0] * len(coco))) > iou_threshold
    order = sorted(range(len(rles)), key=lambda k: (-scores[k], k))
    suppressed = np.zeros(len(rles), dtype=bool)
    keep = []
    for k in order:
        if suppressed[k]:
            continue
        keep.append(k)
        suppressed |= overlaps[k]
    return sorted(keep)


def dedupe_instances(instances: list[dict[str, Any]], iou_threshold: float | None) -> list[dict[str, Any]]:
    """``instances`` (one image's, ``INSTANCE_TYPE`` dicts) without the masks that ``mask_nms`` removes at
    ``iou_threshold``, ``instance_id`` renumbered 0..n-1 in the same order; all of them when it is None."""
    if iou_threshold is None or len(instances) < 2:
        return instances
    keep = mask_nms([i["mask"] for i in instances], [i["score"] for i in instances], iou_threshold)
    return [{**instances[k], "instance_id": n} for n, k in enumerate(keep)]
