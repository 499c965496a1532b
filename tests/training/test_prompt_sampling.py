"""Training prompts from ground-truth masks (sam-hq ``train.py``: box, points, noisy mask).

Not ``test_prompts.py``: tests/segmenters has one, and without ``__init__.py`` files pytest cannot collect
two test modules of the same name.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from hqlabel.training.prompts import (
    MASK_PROMPT_BACKGROUND_LOGIT,
    MASK_PROMPT_FOREGROUND_LOGIT,
    PROMPT_TYPES,
    masks_to_boxes,
    noisy_masks,
    sample_points,
    sample_prompt_type,
)


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rects(shape: tuple[int, int], *boxes: tuple[int, int, int, int]) -> torch.Tensor:
    """N x H x W bool, one mask per (y0, y1, x0, x1) slice."""
    masks = torch.zeros((len(boxes), *shape), dtype=torch.bool)
    for mask, (y0, y1, x0, x1) in zip(masks, boxes, strict=True):
        mask[y0:y1, x0:x1] = True
    return masks


def test_masks_to_boxes_of_known_rectangles():
    masks = rects((10, 12), (2, 5, 3, 9), (0, 10, 0, 12), (7, 8, 11, 12))
    masks[0, 4, 10] = True  # a stray pixel widens the box
    boxes = masks_to_boxes(masks)
    assert boxes.dtype == torch.float32
    torch.testing.assert_close(
        boxes, torch.tensor([[3.0, 2.0, 10.0, 4.0], [0.0, 0.0, 11.0, 9.0], [11.0, 7.0, 11.0, 7.0]])
    )
    assert masks_to_boxes(torch.zeros(0, 4, 4, dtype=torch.bool)).shape == (0, 4)


def test_masks_to_boxes_names_the_empty_mask():
    masks = rects((6, 6), (1, 3, 1, 3), (0, 0, 0, 0))
    with pytest.raises(ValueError, match="mask 1 is empty"):
        masks_to_boxes(masks)
    with pytest.raises(ValueError, match="N x H x W"):
        masks_to_boxes(torch.ones(4, 4, dtype=torch.bool))


def test_sample_points_lie_inside_their_masks():
    masks = rects((20, 30), (2, 9, 4, 25), (10, 20, 0, 5), (5, 6, 7, 10))  # the last has 3 pixels
    points = sample_points(masks, num_points=10, generator=seeded())
    assert points.shape == (3, 10, 2) and points.dtype == torch.float32
    assert torch.equal(points, points.round())  # integer pixel indices
    xs, ys = points[..., 0].long(), points[..., 1].long()
    for n in range(3):
        assert masks[n, ys[n], xs[n]].all()
    assert len({tuple(p) for p in points[0].tolist()}) == 10  # without replacement when possible
    assert len({tuple(p) for p in points[2].tolist()}) <= 3  # with replacement on a 3-pixel mask


def test_sample_points_are_reproducible():
    masks = rects((32, 32), (4, 28, 4, 28), (0, 8, 0, 32))
    a = sample_points(masks, 5, generator=seeded(1))
    b = sample_points(masks, 5, generator=seeded(1))
    c = sample_points(masks, 5, generator=seeded(2))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_sample_points_reject_empty_masks():
    with pytest.raises(ValueError, match="mask 0 is empty"):
        sample_points(torch.zeros(1, 8, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="num_points"):
        sample_points(rects((8, 8), (0, 4, 0, 4)), num_points=0)


def test_noisy_masks_equal_the_input_away_from_the_contour():
    masks = rects((64, 64), (16, 48, 16, 48), (0, 20, 30, 64))
    prompts = noisy_masks(masks, generator=seeded())
    assert prompts.shape == (2, 64, 64) and prompts.dtype == torch.float32
    assert set(prompts.unique().tolist()) <= {MASK_PROMPT_FOREGROUND_LOGIT, MASK_PROMPT_BACKGROUND_LOGIT}
    expected = torch.where(masks, MASK_PROMPT_FOREGROUND_LOGIT, MASK_PROMPT_BACKGROUND_LOGIT)
    # The 1/8 round trip blurs ~8 pixels either side of a contour; the inside and far outside are untouched.
    assert torch.equal(prompts[0, 28:36, 28:36], expected[0, 28:36, 28:36])
    assert torch.equal(prompts[0, :4], expected[0, :4]) and torch.equal(prompts[0, 60:], expected[0, 60:])
    changed = prompts != expected
    assert changed.any()  # the contour band is corrupted ...
    assert changed.float().mean() < 0.2  # ... and only that band


def test_noisy_masks_are_reproducible_and_accept_soft_masks():
    masks = rects((32, 32), (8, 24, 8, 24)).float() * 0.9
    a = noisy_masks(masks, generator=seeded(3))
    assert torch.equal(a, noisy_masks(masks, generator=seeded(3)))
    assert not torch.equal(a, noisy_masks(masks, generator=seeded(4)))
    with pytest.raises(ValueError, match="at least 8 x 8"):
        noisy_masks(torch.ones(1, 4, 4))


def test_sample_prompt_type_is_uniform_and_reproducible():
    draws = [sample_prompt_type(seeded(i)) for i in range(300)]
    counts = Counter(draws)
    assert set(counts) == set(PROMPT_TYPES)
    assert min(counts.values()) > 60
    generator = seeded(9)
    sequence = [sample_prompt_type(generator) for _ in range(20)]
    generator = seeded(9)
    assert sequence == [sample_prompt_type(generator) for _ in range(20)]
    assert sample_prompt_type(seeded(), ("box",)) == "box"
    with pytest.raises(ValueError, match="unknown prompt types"):
        sample_prompt_type(seeded(), ("box", "scribble"))
