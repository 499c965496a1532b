"""HQ-SAM's point-sampled BCE + dice mask loss (Mask2Former / sam-hq ``loss_mask.py``)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hqlabel.training.losses import (
    dice_loss,
    mask_loss,
    point_sample,
    sigmoid_ce_loss,
    uncertain_point_coords_with_randomness,
)


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def disc_targets(n: int = 3, size: int = 64) -> torch.Tensor:
    """N x 1 x size x size float discs of different radii."""
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    discs = [((yy - size / 2) ** 2 + (xx - size / 3) ** 2 < (size / 6 + 4 * i) ** 2) for i in range(n)]
    return torch.stack(discs)[:, None].float()


def test_point_sample_at_pixel_centres_is_indexing():
    values = torch.randn(2, 3, 5, 7, generator=seeded())
    rows = torch.tensor([[0, 4, 2, 3], [1, 0, 4, 2]])
    cols = torch.tensor([[0, 6, 3, 1], [5, 2, 0, 6]])
    coords = torch.stack([(cols + 0.5) / 7, (rows + 0.5) / 5], dim=-1)  # N x P x 2, (x, y)
    sampled = point_sample(values, coords)
    assert sampled.shape == (2, 3, 4)
    for n in range(2):
        torch.testing.assert_close(sampled[n], values[n][:, rows[n], cols[n]])


def test_point_sample_rejects_bad_shapes():
    with pytest.raises(ValueError, match="N x C x H x W"):
        point_sample(torch.zeros(3, 4, 4), torch.zeros(3, 2, 2))
    with pytest.raises(ValueError, match="N x P x 2"):
        point_sample(torch.zeros(2, 1, 4, 4), torch.zeros(3, 5, 2))


def test_uncertain_points_concentrate_where_logits_are_zero():
    width = 64
    x_centres = (torch.arange(width) + 0.5) / width
    logits = (40 * (x_centres - 0.5).abs()).expand(2, 1, width, width).contiguous()  # 0 on x = 0.5
    coords = uncertain_point_coords_with_randomness(logits, 1000, 3.0, 0.75, generator=seeded())
    assert coords.shape == (2, 1000, 2)
    assert coords.min() >= 0 and coords.max() <= 1
    uncertain, random = coords[:, :750], coords[:, 750:]
    # The 750 most uncertain of 3000 uniform points: the quarter nearest to the line (|x - 0.5| < 0.125),
    # but for a few within half a pixel of the top/bottom border, where grid_sample's zero padding halves
    # the logit (as in Mask2Former).
    near_line = (uncertain[..., 0] - 0.5).abs() < 0.14
    near_border = (uncertain[..., 1] < 0.5 / width) | (uncertain[..., 1] > 1 - 0.5 / width)
    assert (near_line | near_border).all()
    assert near_line.float().mean() > 0.98
    assert (random[..., 0] - 0.5).abs().max() > 0.4  # the rest stays uniform


def test_uncertain_points_are_reproducible_and_gradient_free():
    logits = torch.randn(3, 1, 16, 16, requires_grad=True)
    a = uncertain_point_coords_with_randomness(logits, 50, generator=seeded(7))
    b = uncertain_point_coords_with_randomness(logits, 50, generator=seeded(7))
    c = uncertain_point_coords_with_randomness(logits, 50, generator=seeded(8))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a, c)
    assert not a.requires_grad


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"oversample_ratio": 0.5}, "oversample_ratio"), ({"importance_sample_ratio": 1.5}, "importance")],
)
def test_uncertain_points_reject_bad_ratios(kwargs, match):
    with pytest.raises(ValueError, match=match):
        uncertain_point_coords_with_randomness(torch.zeros(1, 1, 4, 4), 10, **kwargs)


def test_losses_by_hand():
    logits = torch.tensor([[0.0, 0.0], [20.0, -20.0]])
    targets = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    # mask 0: every point log(2); mask 1: ~0. Sum over masks / num_masks.
    assert sigmoid_ce_loss(logits, targets, 2).item() == pytest.approx(torch.log(torch.tensor(2.0)) / 2)
    # mask 0: 1 - (2 * 0.5 + 1) / (1 + 1 + 1) = 1/3; mask 1: ~0.
    assert dice_loss(logits, targets, 2).item() == pytest.approx(1 / 6, abs=1e-6)


def test_perfect_logits_give_small_loss_and_wrong_ones_large():
    targets = disc_targets()
    perfect = targets * 40 - 20  # +-20 where the target is 1 / 0
    bce, dice = mask_loss(perfect, targets, num_points=2000, generator=seeded())
    # Only points between two pixel centres across the contour see blended values, but the importance
    # sampling picks exactly those.
    assert bce.item() < 0.25 and dice.item() < 0.1
    bce, dice = mask_loss(-perfect, targets, num_points=2000, generator=seeded())
    assert bce.item() > 15 and dice.item() > 0.95
    # An empty mask has no contour (and matches the zero padding at the border): the loss vanishes.
    zeros = torch.zeros(2, 1, 16, 16)
    bce, dice = mask_loss(zeros - 20, zeros, num_points=100, generator=seeded())
    assert bce.item() < 1e-3 and dice.item() < 1e-2


def test_mask_loss_with_low_res_logits_and_full_res_targets():
    targets = disc_targets(size=64)
    low_res = F.interpolate(targets * 40 - 20, size=(16, 16), mode="bilinear", antialias=True)
    bce, dice = mask_loss(low_res, targets, num_points=500, generator=seeded())
    assert bce.item() < 1.0 and dice.item() < 0.1
    bce_wrong, _ = mask_loss(-low_res, targets, num_points=500, generator=seeded())
    assert bce_wrong.item() > 5 * bce.item()


def test_mask_loss_is_reproducible_and_gradients_reach_the_logits():
    targets = disc_targets(2, size=32)
    logits = torch.randn(2, 1, 16, 16, generator=seeded(3), requires_grad=True)
    bce, dice = mask_loss(logits, targets, num_points=200, generator=seeded(5))
    again = mask_loss(logits, targets, num_points=200, generator=seeded(5))
    assert bce.item() == again[0].item() and dice.item() == again[1].item()
    (bce + dice).backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_mask_loss_rejects_empty_and_mismatched_batches():
    with pytest.raises(ValueError, match="at least one mask"):
        mask_loss(torch.zeros(0, 1, 8, 8), torch.zeros(0, 1, 8, 8))
    with pytest.raises(ValueError, match="N = 2"):
        mask_loss(torch.zeros(2, 1, 8, 8), torch.zeros(3, 1, 8, 8))
    with pytest.raises(ValueError, match="N x 1 x h x w"):
        mask_loss(torch.zeros(2, 8, 8), torch.zeros(2, 1, 8, 8))
