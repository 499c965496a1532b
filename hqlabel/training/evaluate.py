"""mIoU and boundary mIoU of a segmenter on ground-truth masks, prompted with the ground-truth boxes.

The protocol of the HQ-SAM paper's tables: one box prompt per GT instance (its tight box), one mask per
prompt (no multimask), compared with the GT mask at the image's own resolution; boundary IoU with dilation
0.02 of the image diagonal.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np
import torch

from hqlabel.platform.images import decode_image
from hqlabel.platform.instances import ImageInstances
from hqlabel.segmenters import HQSamSegmenter
from hqlabel.training.metrics import MaskMetrics


def _batches(items: Iterable[ImageInstances], size: int) -> Iterator[list[ImageInstances]]:
    batch: list[ImageInstances] = []
    for item in items:
        if item.instances:
            batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def evaluate_segmenter(
    segmenter: HQSamSegmenter,
    images: Iterable[ImageInstances],
    *,
    batch_size: int = 4,
    dilation_ratio: float = 0.02,
) -> MaskMetrics:
    """Segment every GT instance of ``images`` from its box and score the masks.

    Args:
        segmenter: SAM or HQ-SAM; its ``hq_token_only`` / ``multimask`` settings apply (use "off").
        images: images with GT instances (an image without instances is skipped).
        batch_size: images per encoder call.

    Returns:
        The accumulated per-instance metrics (``summary()`` gives mIoU / mBIoU).
    """
    metrics = MaskMetrics(dilation_ratio=dilation_ratio)
    for batch in _batches(images, batch_size):
        pixels = [decode_image(item.image) for item in batch]
        for item, array in zip(batch, pixels, strict=True):
            if array.shape[:2] != (item.height, item.width):
                raise ValueError(
                    f"image {item.image_id!r} decodes to {array.shape[1]} x {array.shape[0]} (W x H) but its "
                    f"masks are {item.width} x {item.height}; fix the dataset's sizes"
                )
        embeddings = segmenter.embed(pixels)
        boxes = [torch.tensor([list(i.box) for i in item.instances], dtype=torch.float32) for item in batch]
        logits = segmenter.predict_boxes(embeddings, boxes)
        for item, image_logits in zip(batch, logits, strict=True):
            masks = torch.cat(list(segmenter.iter_masks(image_logits, (item.height, item.width))))
            predicted = masks[:, 0].cpu().numpy()
            for pred, gt in zip(predicted, item.masks(), strict=True):
                metrics.update(pred, gt)
    return metrics


def shard(items: list, rank: int, world_size: int) -> list:
    """Every ``world_size``-th item starting at ``rank``: the part of an evaluation one worker does."""
    return items[rank::world_size]


def metrics_table(rows: list[tuple[str, dict]]) -> str:
    """A Markdown table of ``(model name, MaskMetrics.summary())`` rows; "empty/empty" counts the instances
    left out of the means (empty prediction of an empty ground truth)."""
    lines = ["| model | mIoU | mBIoU | instances | empty/empty |", "|---|---:|---:|---:|---:|"]
    for name, summary in rows:
        miou, mbiou = format_percent(summary["miou"]), format_percent(summary["mbiou"])
        lines.append(f"| {name} | {miou} | {mbiou} | {summary['count']} | {summary.get('empty', 0)} |")
    return "\n".join(lines) + "\n"


def format_percent(value: float | None) -> str:
    """A metric in [0, 1] as a percentage with 2 decimals; "n/a" for a missing or NaN one (no instances)."""
    return "n/a" if value is None or np.isnan(value) else f"{100 * value:.2f}"
