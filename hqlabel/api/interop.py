"""supervision interop: ``LabelResult`` -> ``supervision.Detections``, and a ``Detections`` (or arrays) as box
prompts. supervision is an optional extra (``pip install hqlabel[supervision]``), imported on use."""

from __future__ import annotations

from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import supervision

    from hqlabel.api.results import LabelResult

__all__ = ["as_box_prompts", "to_detections"]


def _supervision() -> ModuleType:
    """Import supervision or raise ImportError with the install hint."""
    try:
        import supervision
    except ImportError as e:
        raise ImportError(
            "converting to supervision.Detections needs supervision; install it with "
            "`pip install hqlabel[supervision]` (or `pip install supervision`)"
        ) from e
    return supervision


def to_detections(result: LabelResult) -> supervision.Detections:
    """``result`` as a ``supervision.Detections`` (see ``LabelResult.to_supervision``)."""
    sv = _supervision()
    return sv.Detections(
        xyxy=np.asarray(result.boxes, np.float32).reshape(-1, 4),
        mask=result.masks,
        confidence=np.asarray(result.scores, np.float32),
        class_id=result.class_ids,
        data={
            "class_name": np.asarray(result.labels, dtype=str),
            "pred_iou": np.asarray(result.pred_iou, np.float32),
            **{
                name: np.asarray(getattr(result, name), np.float32)
                for name in ("stability", "hq_sam_iou", "box_iou")
                if getattr(result, name) is not None
            },
        },
    )


def as_box_prompts(boxes: Any, labels: list[str] | None, classes: list[str]) -> tuple[np.ndarray, list[str]]:
    """One image's box prompts as ``(N x 4 float32 XYXY pixels, N labels)``.

    Args:
        boxes: a ``supervision.Detections`` (its ``xyxy``; labels from ``data["class_name"]``, else
            ``classes[class_id]``), or anything array-like of N x 4 XYXY pixels.
        labels: N class names for the boxes (overrides the Detections'); default ``"object"`` each.
        classes: the labeler's class list, which a Detections' ``class_id`` indexes.

    Raises:
        ValueError: boxes not N x 4, a label count that differs from the box count, a ``class_id`` outside
            ``classes`` (without ``class_name``).
    """
    names: list[str] | None = None
    if hasattr(boxes, "xyxy") and hasattr(boxes, "data"):  # a supervision.Detections
        detections = boxes
        boxes = detections.xyxy
        if "class_name" in detections.data:
            names = [str(n) for n in detections.data["class_name"]]
        elif detections.class_id is not None:
            ids = [int(i) for i in detections.class_id]
            bad = [i for i in ids if not 0 <= i < len(classes)]
            if bad:
                raise ValueError(
                    f"Detections class_id {bad[0]} is not an index into the labeler's classes {classes}; "
                    'set detections.data["class_name"] or pass labels='
                )
            names = [classes[i] for i in ids]
    array = np.asarray(boxes, dtype=np.float32)
    if array.size == 0:
        array = array.reshape(0, 4)
    if array.ndim != 2 or array.shape[1] != 4:
        raise ValueError(f"boxes must be N x 4 XYXY pixels (or a supervision.Detections), got {array.shape}")
    if labels is not None:
        names = [str(n) for n in labels]
    if names is None:
        names = ["object"] * len(array)
    if len(names) != len(array):
        raise ValueError(f"{len(names)} labels for {len(array)} boxes; give one label per box")
    return array, names
