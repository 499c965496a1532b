"""HQ-SAM's mask loss: BCE + dice on sampled points (sam-hq ``train/utils/loss_mask.py``).

Same as Mask2Former (and PointRend before it): instead of every pixel, the loss looks at ``num_points``
points per mask, 75 % of them the most uncertain points of the prediction (logit nearest 0, i.e. along the
predicted contour) and the rest uniformly random. Point coordinates are normalised to [0, 1], so the
prediction (low-res logits, 256 x 256) and the target (full-res mask, 1024 x 1024) need not share a size.

All randomness comes from an optional ``torch.Generator``, so a seeded run picks the same points.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def point_sample(input: torch.Tensor, point_coords: torch.Tensor) -> torch.Tensor:
    """Bilinearly sample ``input`` at normalised points.

    Args:
        input: N x C x H x W.
        point_coords: N x P x 2, (x, y) in [0, 1] of the image extent: (0, 0) is the top-left corner of the
            top-left pixel, so pixel (i, j) has its centre at ((j + 0.5) / W, (i + 0.5) / H).

    Returns:
        N x C x P. Outside the pixel centres' hull (within half a pixel of the border) values are blended
        with zero padding, as in Mask2Former and sam-hq.
    """
    if input.ndim != 4:
        raise ValueError(f"input must be N x C x H x W, got shape {tuple(input.shape)}")
    if point_coords.ndim != 3 or point_coords.shape[-1] != 2 or point_coords.shape[0] != input.shape[0]:
        raise ValueError(
            f"point_coords must be N x P x 2 with N = {input.shape[0]}, got shape {tuple(point_coords.shape)}"
        )
    grid = 2.0 * point_coords.to(input.dtype).unsqueeze(2) - 1.0  # N x P x 1 x 2 in [-1, 1]
    return F.grid_sample(input, grid, align_corners=False).squeeze(3)


def _rand(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """Uniform [0, 1) numbers drawn from ``generator`` (on its own device), moved to ``device``."""
    source = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=source).to(device)


@torch.no_grad()
def uncertain_point_coords_with_randomness(
    logits: torch.Tensor,
    num_points: int,
    oversample_ratio: float = 3.0,
    importance_sample_ratio: float = 0.75,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pick ``num_points`` training points per mask, biased towards uncertain logits (PointRend sampling).

    Draws ``int(num_points * oversample_ratio)`` uniform points, keeps the ``int(importance_sample_ratio *
    num_points)`` with the highest uncertainty ``-|logit|``, and fills up with fresh uniform points.

    Args:
        logits: N x 1 x H x W mask logits.
        num_points: points per mask, P.
        oversample_ratio: >= 1.
        importance_sample_ratio: in [0, 1].
        generator: source of all random numbers (a CPU generator works for CUDA logits).

    Returns:
        N x P x 2 point coordinates, (x, y) in [0, 1] (see ``point_sample``), without gradient.
    """
    if logits.ndim != 4 or logits.shape[1] != 1:
        raise ValueError(f"logits must be N x 1 x H x W, got shape {tuple(logits.shape)}")
    if num_points < 1:
        raise ValueError(f"num_points must be >= 1, got {num_points}")
    if oversample_ratio < 1:
        raise ValueError(f"oversample_ratio must be >= 1, got {oversample_ratio}")
    if not 0 <= importance_sample_ratio <= 1:
        raise ValueError(f"importance_sample_ratio must be in [0, 1], got {importance_sample_ratio}")
    num_masks = logits.shape[0]
    num_sampled = int(num_points * oversample_ratio)
    coords = _rand((num_masks, num_sampled, 2), generator, logits.device)
    uncertainty = -point_sample(logits, coords)[:, 0].abs()  # N x num_sampled
    num_uncertain = int(importance_sample_ratio * num_points)
    idx = uncertainty.topk(num_uncertain, dim=1).indices  # N x num_uncertain
    coords = coords.gather(1, idx[..., None].expand(-1, -1, 2))
    num_random = num_points - num_uncertain
    if num_random > 0:
        coords = torch.cat([coords, _rand((num_masks, num_random, 2), generator, logits.device)], dim=1)
    return coords


def sigmoid_ce_loss(logits: torch.Tensor, targets: torch.Tensor, num_masks: float) -> torch.Tensor:
    """Binary cross-entropy: mean over the points of each mask, summed over masks, divided by ``num_masks``.

    Args:
        logits: N x P.
        targets: N x P, in [0, 1].
        num_masks: normaliser (the number of masks in the batch, summed over workers if distributed).

    Returns:
        scalar.
    """
    loss = F.binary_cross_entropy_with_logits(logits, targets.to(logits.dtype), reduction="none")
    return loss.flatten(1).mean(1).sum() / num_masks


def dice_loss(logits: torch.Tensor, targets: torch.Tensor, num_masks: float) -> torch.Tensor:
    """Dice loss ``1 - (2 sum(p t) + 1) / (sum(p) + sum(t) + 1)`` per mask, ``p = sigmoid(logits)``, summed
    over masks and divided by ``num_masks``. Shapes as ``sigmoid_ce_loss``; returns a scalar."""
    probs = logits.sigmoid().flatten(1)
    targets = targets.to(probs.dtype).flatten(1)
    numerator = 2 * (probs * targets).sum(-1)
    denominator = probs.sum(-1) + targets.sum(-1)
    loss = 1 - (numerator + 1) / (denominator + 1)
    return loss.sum() / num_masks


def mask_loss(
    pred_logits: torch.Tensor,
    targets: torch.Tensor,
    num_points: int = 112 * 112,
    oversample_ratio: float = 3.0,
    importance_sample_ratio: float = 0.75,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """HQ-SAM's mask loss (sam-hq ``loss_masks``): BCE and dice on uncertainty-sampled points.

    Args:
        pred_logits: N x 1 x h x w predicted mask logits (e.g. 256 x 256 low-res logits).
        targets: N x 1 x H x W ground-truth masks, float in [0, 1] (any size: points are normalised).
        num_points: points per mask (sam-hq: 112 * 112).
        oversample_ratio, importance_sample_ratio, generator: see ``uncertain_point_coords_with_randomness``.

    Returns:
        (bce, dice), scalars, each normalised by N.
    """
    if pred_logits.ndim != 4 or pred_logits.shape[1] != 1:
        raise ValueError(f"pred_logits must be N x 1 x h x w, got shape {tuple(pred_logits.shape)}")
    if targets.ndim != 4 or targets.shape[1] != 1 or targets.shape[0] != pred_logits.shape[0]:
        raise ValueError(
            f"targets must be N x 1 x H x W with N = {pred_logits.shape[0]} (one per predicted mask), "
            f"got shape {tuple(targets.shape)}"
        )
    num_masks = pred_logits.shape[0]
    if num_masks == 0:
        raise ValueError("mask_loss needs at least one mask; skip the loss for images without instances")
    with torch.no_grad():
        coords = uncertain_point_coords_with_randomness(
            pred_logits, num_points, oversample_ratio, importance_sample_ratio, generator
        )
        point_targets = point_sample(targets.to(pred_logits.dtype), coords)[:, 0]
    point_logits = point_sample(pred_logits, coords)[:, 0]
    return (
        sigmoid_ce_loss(point_logits, point_targets, num_masks),
        dice_loss(point_logits, point_targets, num_masks),
    )
