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


def mask_ap(
    images: list[ImageInstances], predictions: list[list[dict]], classes: list[str]
) -> dict[str, float]:
    """COCO mask AP (pycocotools ``COCOeval``, ``iouType="segm"``) of ``predictions`` against ``images``' GT.

    Args:
        images: the ground truth; a GT instance whose label is not in ``classes`` is left out.
        predictions: per image, instance dicts with ``label``, ``score`` and ``mask`` (COCO RLE at the image's
            size), as ``Labeler.label`` returns them.
        classes: the categories, in order.

    Returns:
        ``{"ap": AP@[.5:.95], "ap50": AP@.5, "ap75": AP@.75}`` in [0, 1]; 0.0 when nothing was predicted.
    """
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from hqlabel.platform.rle import _to_pycocotools

    category = {name: k + 1 for k, name in enumerate(classes)}
    gt = {
        "images": [{"id": n, "height": im.height, "width": im.width} for n, im in enumerate(images)],
        "categories": [{"id": k, "name": name} for name, k in category.items()],
        "annotations": [],
    }
    results = []
    for n, (image, preds) in enumerate(zip(images, predictions, strict=True)):
        for inst in image.instances:
            if inst.label not in category:
                continue
            x0, y0, x1, y1 = inst.box
            gt["annotations"].append(
                {
                    "id": len(gt["annotations"]) + 1,
                    "image_id": n,
                    "category_id": category[inst.label],
                    "segmentation": _to_pycocotools(inst.mask),
                    "area": float(inst.area),
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "iscrowd": 0,
                }
            )
        results += [
            {
                "image_id": n,
                "category_id": category[p["label"]],
                "segmentation": _to_pycocotools(p["mask"]),
                "score": float(p["score"]),
            }
            for p in preds
        ]
    if not results or not gt["annotations"]:
        return {"ap": 0.0, "ap50": 0.0, "ap75": 0.0}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress and summary
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        coco_eval = COCOeval(coco_gt, coco_gt.loadRes(results), iouType="segm")
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    # stats[k] is -1 where no GT exists for the setting; AP over all areas always has GT here
    return {key: max(0.0, float(coco_eval.stats[k])) for k, key in enumerate(("ap", "ap50", "ap75"))}


def matched_mask_metrics(
    images: list[ImageInstances], predictions: list[list[dict]], *, dilation_ratio: float = 0.02
) -> MaskMetrics:
    """mIoU / mBIoU of a labeling run against GT: each GT instance is compared with the predicted mask of
    its own label that overlaps it best (an empty mask when there is none, IoU 0). Not one-to-one: one
    prediction may serve several GT instances; AP (``mask_ap``) is the one-to-one, score-ranked measure."""
    from hqlabel.platform.rle import decode_mask

    metrics = MaskMetrics(dilation_ratio=dilation_ratio)
    for image, preds in zip(images, predictions, strict=True):
        decoded = [(p["label"], decode_mask(p["mask"]).astype(bool)) for p in preds]
        for inst, gt in zip(image.instances, image.masks(), strict=True):
            candidates = [mask for label, mask in decoded if label == inst.label]
            best = np.zeros_like(gt)
            best_iou = -1.0
            for mask in candidates:
                union = np.logical_or(mask, gt).sum()
                iou = np.logical_and(mask, gt).sum() / union if union else 0.0
                if iou > best_iou:
                    best, best_iou = mask, iou
            metrics.update(best, gt)
    return metrics
