"""Click to fix: HQ-SAM again on one instance, prompted with its box and the reviewer's points.

The segmenter is the labeling job's own (``job.json`` ``spec.labeler``: model, revision, HQ weights, preset,
HQ-token and multimask settings, mask threshold), built once and kept; only ``device`` may differ (the
reviewer's machine). The image encoder runs once per image (the last few embeddings are kept); each click
costs one decoder call.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import torch

from hqlabel.platform.config import LabelerConfig
from hqlabel.platform.rle import encode_masks, mask_area
from hqlabel.segmenters import HQSamSegmenter, Prompts
from hqlabel.segmenters.structures import EmbeddingsCache

__all__ = ["Fixer"]

_EMBEDDINGS_CACHE = 4


class Fixer:
    """Re-segments instances with extra point prompts, with the segmenter a labeling job used.

    Args:
        labeler: the job's labeler config (``job.json`` ``spec.labeler``).
        device: where the segmenter runs ("auto": CUDA when present), whatever the job used.
    """

    def __init__(self, labeler: dict[str, Any], device: str = "auto"):
        from hqlabel.workers.labeler import config_segmenter

        # the job's segmenter on this machine's device, not compiled (a reviewer's clicks are few)
        config = LabelerConfig(**(labeler | {"device": device, "compile": False}))
        self.segmenter: HQSamSegmenter = config_segmenter(config)
        self._embeddings = EmbeddingsCache(_EMBEDDINGS_CACHE)
        self._lock = threading.Lock()  # one model, one forward pass at a time

    def fix(
        self,
        image_id: str,
        image: np.ndarray,
        box: list[float],
        points: list[tuple[float, float, int]],
    ) -> tuple[dict[str, Any], int, float]:
        """The mask of the object in ``box`` given the clicks ``points``.

        Args:
            image_id: names ``image`` for the embeddings cache.
            image: H x W x 3 uint8 RGB, the original image.
            box: XYXY pixels of ``image`` (the instance's prompt box).
            points: (x, y, label) pixels of ``image``; label 1 = part of the object, 0 = not.

        Returns:
            ``(mask as COCO RLE at H x W, its area, HQ-SAM's predicted IoU)``.
        """
        height, width = image.shape[:2]
        with self._lock:
            embeddings, _ = self._embeddings.embed(self.segmenter, image, image_id)
            prompts = Prompts(
                boxes=torch.tensor([box], dtype=torch.float32),
                points=torch.tensor([[[x, y] for x, y, _ in points]], dtype=torch.float32)
                if points
                else None,
                point_labels=torch.tensor([[int(v) for _, _, v in points]]) if points else None,
            )
            logits = self.segmenter.predict(embeddings, [prompts])[0]
            chunk = next(self.segmenter.iter_masks(logits, (height, width)))
            rle = encode_masks(chunk[:, 0].cpu().numpy())[0]
            iou = float(logits.iou_scores[0, 0])
        return rle, mask_area(rle), iou
