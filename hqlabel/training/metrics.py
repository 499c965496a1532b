"""Mask IoU and Boundary IoU, the two numbers HQ-SAM reports (Ke et al. 2023, ``train/utils/misc.py``).

Boundary IoU (Cheng et al. 2021) compares only the pixels within ``d`` of each mask's contour, so it
rewards the fine structures that plain mask IoU barely sees. ``mask_to_boundary`` reproduces sam-hq's
OpenCV definition (pad by one zero pixel, ``cv2.erode`` with a 3 x 3 kernel ``d`` times, crop) with torch
running sums, so it needs no OpenCV, runs on the GPU, and costs the same for any ``d``.

``MaskMetrics`` keeps sums and counts only, so workers can all-reduce or pickle their state and merge it. Like
sam-hq's evaluation (whose IoU of an empty prediction against an empty ground truth is 0 / 0 = NaN), it leaves
such pairs out of the means, and counts them (``empty``).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

Mask = np.ndarray | torch.Tensor


def _as_bool_mask(mask: Mask, name: str, ndim: int = 2) -> torch.Tensor:
    tensor = torch.as_tensor(mask)
    if tensor.ndim != ndim:
        want = "H x W" if ndim == 2 else "N x H x W"
        raise ValueError(f"{name} must be a {want} mask, got shape {tuple(tensor.shape)}")
    if tensor.dtype == torch.bool:
        return tensor
    if tensor.is_floating_point():
        return tensor > 0.5
    return tensor != 0


def _check_same_shape(pred: torch.Tensor, gt: torch.Tensor) -> None:
    if pred.shape != gt.shape:
        raise ValueError(
            f"pred and gt must have the same shape, got {tuple(pred.shape)} and {tuple(gt.shape)}; "
            "resize the prediction to the ground truth first"
        )


def _iou(a: torch.Tensor, b: torch.Tensor) -> float:
    union = int((a | b).sum())
    if union == 0:
        return 1.0
    return int((a & b).sum()) / union


def mask_iou(pred: Mask, gt: Mask) -> float:
    """Intersection over union of two H x W masks (bool; floats are thresholded at 0.5, integers at != 0).

    Two empty masks agree perfectly: 1.0.
    """
    pred_t, gt_t = _as_bool_mask(pred, "pred"), _as_bool_mask(gt, "gt")
    _check_same_shape(pred_t, gt_t)
    return _iou(pred_t, gt_t.to(pred_t.device))


def boundary_dilation(height: int, width: int, dilation_ratio: float = 0.02) -> int:
    """Boundary width ``d`` in pixels: ``max(1, round(dilation_ratio * image diagonal))``, as sam-hq."""
    if dilation_ratio <= 0:
        raise ValueError(f"dilation_ratio must be > 0, got {dilation_ratio}")
    # Python rounds half to even, like sam-hq's int(round(np.float64)).
    return max(1, round(dilation_ratio * math.sqrt(height**2 + width**2)))


def mask_to_boundary(mask: Mask, dilation_ratio: float = 0.02) -> Mask:
    """The inner boundary band of an H x W mask: mask pixels within ``d`` pixels of the background.

    Same as sam-hq's ``misc.mask_to_boundary``: pad with one zero pixel, erode ``d`` times with a 3 x 3
    kernel (OpenCV semantics), crop, subtract. That equals a (2d+1) x (2d+1) min filter with zeros outside
    the image, so pixels within ``d`` of the image border count as boundary too. Computed as a separable
    "any background pixel in the window" test with running sums.

    Args:
        mask: H x W, bool (floats are thresholded at 0.5, integers at != 0); numpy or torch.
        dilation_ratio: ``d`` as a fraction of the image diagonal (see ``boundary_dilation``).

    Returns:
        H x W bool, numpy if ``mask`` is numpy, else a tensor on ``mask``'s device.
    """
    mask_t = _as_bool_mask(mask, "mask")
    d = boundary_dilation(*mask_t.shape, dilation_ratio=dilation_ratio)
    background = F.pad((~mask_t).to(torch.int32), (d, d, d, d), value=1)  # outside the image: background
    background = _any_in_window(background, 2 * d + 1, dim=0)
    background = _any_in_window(background, 2 * d + 1, dim=1)
    boundary = mask_t & background
    return boundary.cpu().numpy() if isinstance(mask, np.ndarray) else boundary


def _any_in_window(values: torch.Tensor, size: int, dim: int) -> torch.Tensor:
    """Whether any of ``size`` consecutive entries along ``dim`` is non-zero ("valid" windows: the output is
    ``size - 1`` shorter along ``dim``). A running sum, so the cost does not grow with ``size``."""
    values = (values != 0).to(torch.int32)
    pad = (0, 0, 1, 0) if dim == 0 else (1, 0)
    totals = F.pad(values.cumsum(dim, dtype=torch.int32), pad)
    length = values.shape[dim]
    window = totals.narrow(dim, size, length + 1 - size) - totals.narrow(dim, 0, length + 1 - size)
    return window > 0


def boundary_iou(gt: Mask, pred: Mask, dilation_ratio: float = 0.02) -> float:
    """Boundary IoU of two H x W masks: the IoU of their ``mask_to_boundary`` bands (sam-hq
    ``misc.boundary_iou``).

    Two empty boundaries (two empty masks) agree perfectly: 1.0.
    """
    gt_t, pred_t = _as_bool_mask(gt, "gt"), _as_bool_mask(pred, "pred")
    _check_same_shape(pred_t, gt_t)
    gt_boundary = mask_to_boundary(gt_t, dilation_ratio)
    pred_boundary = mask_to_boundary(pred_t.to(gt_t.device), dilation_ratio)
    return _iou(gt_boundary, pred_boundary)


class MaskMetrics:
    """Running mean mask IoU (mIoU) and Boundary IoU (mBIoU) over instances.

    An instance whose prediction and ground truth are both empty has no IoU (sam-hq computes NaN): it is
    left out of the means and counted in ``empty`` instead (``mask_iou`` alone would score it 1.0).

    Holds plain sums and counts: ``state()`` is a dict of Python numbers that can be all-reduced (sum each
    value) or sent to another process, and ``from_state`` / ``merge`` combine them.

    Args:
        dilation_ratio: boundary width for Boundary IoU (sam-hq evaluates with 0.02).
    """

    def __init__(self, dilation_ratio: float = 0.02) -> None:
        if dilation_ratio <= 0:
            raise ValueError(f"dilation_ratio must be > 0, got {dilation_ratio}")
        self.dilation_ratio = dilation_ratio
        self.iou_sum = 0.0
        self.biou_sum = 0.0
        self.count = 0
        self.empty = 0

    def update(self, pred: Mask, gt: Mask) -> None:
        """Add instances: ``pred`` and ``gt`` are H x W (one instance) or N x H x W (N instances), bool.
        An empty/empty pair is counted in ``empty``, not scored."""
        pred_t, gt_t = torch.as_tensor(pred), torch.as_tensor(gt)
        if pred_t.ndim == 2:
            pred_t, gt_t = pred_t[None], gt_t[None]
        pred_t = _as_bool_mask(pred_t, "pred", ndim=3)
        gt_t = _as_bool_mask(gt_t, "gt", ndim=3).to(pred_t.device)
        _check_same_shape(pred_t, gt_t)
        for p, g in zip(pred_t, gt_t, strict=True):
            if not p.any() and not g.any():
                self.empty += 1
                continue
            self.iou_sum += _iou(p, g)
            self.biou_sum += boundary_iou(g, p, self.dilation_ratio)
            self.count += 1

    def merge(self, other: MaskMetrics) -> None:
        """Add ``other``'s instances to these (in place)."""
        if other.dilation_ratio != self.dilation_ratio:
            raise ValueError(
                f"cannot merge metrics with dilation_ratio {other.dilation_ratio} into {self.dilation_ratio}"
            )
        self.iou_sum += other.iou_sum
        self.biou_sum += other.biou_sum
        self.count += other.count
        self.empty += other.empty

    def state(self) -> dict[str, float | int]:
        """``{"iou_sum": float, "biou_sum": float, "count": int, "empty": int}``: sum these across workers to
        combine."""
        return {
            "iou_sum": float(self.iou_sum),
            "biou_sum": float(self.biou_sum),
            "count": int(self.count),
            "empty": int(self.empty),
        }

    @classmethod
    def from_state(cls, state: dict[str, float | int], dilation_ratio: float = 0.02) -> MaskMetrics:
        """Rebuild from ``state()`` (or from element-wise sums of several states); ``empty`` defaults to 0."""
        missing = {"iou_sum", "biou_sum", "count"} - set(state)
        if missing:
            raise ValueError(f"metrics state lacks {sorted(missing)}; build it with MaskMetrics.state()")
        metrics = cls(dilation_ratio)
        metrics.iou_sum = float(state["iou_sum"])
        metrics.biou_sum = float(state["biou_sum"])
        metrics.count = round(float(state["count"]))  # all-reduce may hand the counts back as floats
        metrics.empty = round(float(state.get("empty", 0)))
        return metrics

    def summary(self) -> dict[str, float | int]:
        """``{"miou": float, "mbiou": float, "count": int, "empty": int}``: means over the ``count`` scored
        instances (NaN if none) and the number of empty/empty pairs left out."""
        if self.count == 0:
            return {"miou": float("nan"), "mbiou": float("nan"), "count": 0, "empty": self.empty}
        return {
            "miou": self.iou_sum / self.count,
            "mbiou": self.biou_sum / self.count,
            "count": self.count,
            "empty": self.empty,
        }
