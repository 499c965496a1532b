"""Open-vocabulary detectors (plain torch / transformers, no Ray)."""

from hqlabel.detectors.base import Detections, Detector, batched_nms, box_iou

__all__ = ["Detections", "Detector", "batched_nms", "box_iou"]
