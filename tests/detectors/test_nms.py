"""Tests for hqlabel.detectors.base: pairwise IoU and class-aware NMS."""

from __future__ import annotations

import pytest
import torch

from hqlabel.detectors.base import Detections, batched_nms, box_iou


def test_iou_of_identical_boxes_is_one() -> None:
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [3.0, 4.0, 7.0, 20.0]])
    torch.testing.assert_close(box_iou(boxes, boxes).diagonal(), torch.ones(2))


def test_iou_of_disjoint_and_touching_boxes_is_zero() -> None:
    a = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    b = torch.tensor([[20.0, 20.0, 30.0, 30.0], [10.0, 0.0, 20.0, 10.0]])  # far away; sharing an edge
    torch.testing.assert_close(box_iou(a, b), torch.zeros(1, 2))


def test_iou_hand_computed_values() -> None:
    a = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    b = torch.tensor(
        [
            [5.0, 0.0, 15.0, 10.0],  # half overlap: inter 50, union 150
            [0.0, 0.0, 5.0, 10.0],  # contained half: inter 50, union 100
            [5.0, 5.0, 15.0, 15.0],  # quarter overlap: inter 25, union 175
        ]
    )
    torch.testing.assert_close(box_iou(a, b), torch.tensor([[1 / 3, 1 / 2, 1 / 7]]))


def test_iou_shape_is_n_by_m_and_symmetric() -> None:
    a = torch.rand(4, 2) * 50
    a = torch.cat([a, a + torch.rand(4, 2) * 50 + 1], dim=1)
    b = a[:3] + 2.0
    iou = box_iou(a, b)
    assert iou.shape == (4, 3)
    torch.testing.assert_close(iou, box_iou(b, a).T)
    assert ((iou >= 0) & (iou <= 1)).all()


def test_iou_of_degenerate_boxes_is_finite() -> None:
    point = torch.tensor([[5.0, 5.0, 5.0, 5.0]])
    iou = box_iou(point, point)
    assert torch.isfinite(iou).all()


def test_nms_keeps_only_the_best_of_overlapping_same_label_boxes() -> None:
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 0.0, 11.0, 10.0], [0.0, 1.0, 10.0, 11.0]])
    scores = torch.tensor([0.5, 0.9, 0.7])
    labels = torch.zeros(3, dtype=torch.int64)
    assert batched_nms(boxes, scores, labels, 0.5).tolist() == [1]


def test_nms_never_suppresses_across_labels() -> None:
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 10.0]])
    scores = torch.tensor([0.6, 0.9])
    labels = torch.tensor([3, 0])
    assert batched_nms(boxes, scores, labels, 0.5).tolist() == [1, 0]


def test_nms_keeps_boxes_at_or_below_the_iou_threshold() -> None:
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 0.0, 15.0, 10.0]])  # IoU 1/3
    scores = torch.tensor([0.9, 0.8])
    labels = torch.zeros(2, dtype=torch.int64)
    assert batched_nms(boxes, scores, labels, 0.5).tolist() == [0, 1]
    assert batched_nms(boxes, scores, labels, 0.3).tolist() == [0]


def test_nms_suppresses_only_above_the_threshold() -> None:
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 5.0, 10.0]])  # IoU exactly 1/2
    scores = torch.tensor([0.8, 0.9])
    labels = torch.zeros(2, dtype=torch.int64)
    assert batched_nms(boxes, scores, labels, 0.5).tolist() == [1, 0]
    assert batched_nms(boxes, scores, labels, 0.49).tolist() == [1]


def test_nms_suppressed_box_does_not_suppress_others() -> None:
    # B overlaps A and C, A and C don't overlap: greedy NMS keeps A and C (B is gone before it can act).
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [4.0, 0.0, 14.0, 10.0], [8.0, 0.0, 18.0, 10.0]])
    scores = torch.tensor([0.9, 0.8, 0.7])
    labels = torch.zeros(3, dtype=torch.int64)
    assert batched_nms(boxes, scores, labels, 0.4).tolist() == [0, 2]


def test_nms_returns_indices_by_decreasing_score() -> None:
    generator = torch.Generator().manual_seed(0)
    xy = torch.rand(30, 2, generator=generator) * 200
    boxes = torch.cat([xy, xy + 5 + torch.rand(30, 2, generator=generator) * 40], dim=1)
    scores = torch.rand(30, generator=generator)
    labels = torch.randint(0, 3, (30,), generator=generator)
    keep = batched_nms(boxes, scores, labels, 0.3)
    assert keep.dtype == torch.int64
    assert len(keep) > 1
    assert len(set(keep.tolist())) == len(keep)
    assert (scores[keep].diff() <= 0).all()
    # what survives never overlaps a same-label survivor above the threshold
    iou = box_iou(boxes[keep], boxes[keep])
    same = labels[keep][:, None] == labels[keep][None, :]
    off_diagonal = ~torch.eye(len(keep), dtype=torch.bool)
    assert not (iou[same & off_diagonal] > 0.3).any()


@pytest.mark.parametrize("iou_threshold", [0.0, 0.5, 1.0])
def test_nms_of_no_boxes_is_empty(iou_threshold: float) -> None:
    keep = batched_nms(
        torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.int64), iou_threshold=iou_threshold
    )
    assert keep.shape == (0,) and keep.dtype == torch.int64


def test_empty_detections() -> None:
    empty = Detections.empty()
    assert len(empty) == 0
    assert empty.boxes.shape == (0, 4) and empty.scores.shape == (0,) and empty.labels.dtype == torch.int64


def test_nms_max_keep_is_the_first_kept_boxes() -> None:
    generator = torch.Generator().manual_seed(0)
    xy = torch.rand(300, 2, generator=generator) * 200
    boxes = torch.cat([xy, xy + torch.rand(300, 2, generator=generator) * 60 + 1], dim=1)
    scores = torch.rand(300, generator=generator)
    labels = torch.randint(0, 3, (300,), generator=generator)
    every = batched_nms(boxes, scores, labels, 0.5)
    assert 10 < len(every) < 300  # some suppressed, more than 10 kept
    torch.testing.assert_close(batched_nms(boxes, scores, labels, 0.5, max_keep=10), every[:10])
