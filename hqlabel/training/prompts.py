"""Training prompts made from ground-truth masks, as HQ-SAM's ``train/train.py`` does.

Each instance gets one prompt type, drawn uniformly from box, points and noisy mask: a tight box, 10 random
foreground points, or the mask itself (at the decoder's low resolution) corrupted along its contour.

All randomness comes from an optional ``torch.Generator``, so a seeded run draws the same prompts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

PROMPT_TYPES: tuple[str, ...] = ("box", "point", "noise_mask")

# Mask prompts are low-res logits: HQLabel's decoder gets earlier predictions (``MaskLogits.logits``) as mask
# prompts, like SAM's predictor, so training feeds the same scale. sam-hq trains with 0 / 255 instead; +-20
# is a confidently saturated logit (sigmoid(20) = 1 - 2e-9) on the right side of the 0 threshold.
MASK_PROMPT_FOREGROUND_LOGIT = 20.0
MASK_PROMPT_BACKGROUND_LOGIT = -20.0

# sam-hq ``misc.masks_noise``: the incoherent region is where a mask differs from its 1/8-scale round trip.
_NOISE_DOWNSCALE = 8
_INCOHERENT_THRESHOLD = 0.01
_NOISE_STD = 1.0


def _check_masks(masks: torch.Tensor, what: str = "N x H x W bool") -> torch.Tensor:
    masks = torch.as_tensor(masks)
    if masks.ndim != 3:
        raise ValueError(f"masks must be {what}, got shape {tuple(masks.shape)}")
    return masks


def _empty_index(masks: torch.Tensor) -> int | None:
    empty = (~masks.flatten(1).any(1)).nonzero()
    return int(empty[0, 0]) if len(empty) else None


def masks_to_boxes(masks: torch.Tensor) -> torch.Tensor:
    """Tight boxes of N masks (sam-hq ``misc.masks_to_boxes``, torchvision ``masks_to_boxes``).

    Args:
        masks: N x H x W bool (non-zero is foreground).

    Returns:
        N x 4 float32, XYXY pixels: the min and max column and row index of the foreground, so a mask that is
        the single pixel (row 3, col 5) gives (5, 3, 5, 3). SAM's prompt encoder adds 0.5 (the pixel
        centre) to box corners, so these are the centres of the extreme pixels.

    Raises:
        ValueError: for an empty mask (drop empty instances before prompting).
    """
    masks = _check_masks(masks) != 0
    empty = _empty_index(masks)
    if empty is not None:
        raise ValueError(f"mask {empty} is empty and has no box; drop empty instances before prompting")
    if len(masks) == 0:
        return torch.zeros((0, 4), dtype=torch.float32, device=masks.device)
    cols = masks.any(1)  # N x W
    rows = masks.any(2)  # N x H
    width, height = cols.shape[1], rows.shape[1]
    # argmax of a bool row: its first True
    x_min = cols.to(torch.uint8).argmax(1)
    x_max = width - 1 - cols.flip(1).to(torch.uint8).argmax(1)
    y_min = rows.to(torch.uint8).argmax(1)
    y_max = height - 1 - rows.flip(1).to(torch.uint8).argmax(1)
    return torch.stack([x_min, y_min, x_max, y_max], dim=1).to(torch.float32)


def sample_points(
    masks: torch.Tensor, num_points: int = 10, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Random foreground points of each mask (sam-hq ``misc.masks_sample_points``).

    Distinct pixels where the mask has at least ``num_points``, else drawn with replacement (sam-hq then
    drops point prompts for the whole batch).

    Args:
        masks: N x H x W bool (non-zero is foreground).
        num_points: points per mask, P.
        generator: source of the random numbers.

    Returns:
        N x P x 2 float32, XY integer pixel indices (column, row), on ``masks``' device. SAM's prompt
        encoder adds 0.5, so they denote pixel centres; pass them as foreground points (label 1).

    Raises:
        ValueError: for an empty mask.
    """
    masks = _check_masks(masks) != 0
    if num_points < 1:
        raise ValueError(f"num_points must be >= 1, got {num_points}")
    empty = _empty_index(masks)
    if empty is not None:
        raise ValueError(f"mask {empty} is empty; no points to sample. Drop empty instances before prompting")
    width = masks.shape[2]
    source = generator.device if generator is not None else torch.device("cpu")
    points = []
    for mask in masks.cpu():
        foreground = mask.flatten().nonzero()[:, 0]  # row-major pixel indices
        count = len(foreground)
        if count >= num_points:
            pick = torch.randperm(count, generator=generator, device=source)[:num_points]
        else:
            pick = torch.randint(count, (num_points,), generator=generator, device=source)
        pick = pick.cpu()
        flat = foreground[pick]
        points.append(torch.stack([flat % width, flat // width], dim=1))
    if not points:
        return torch.zeros((0, num_points, 2), dtype=torch.float32, device=masks.device)
    return torch.stack(points).to(device=masks.device, dtype=torch.float32)


def noisy_masks(masks: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Mask prompts corrupted along the contour (sam-hq ``misc.masks_noise``).

    The incoherent region is where ``|m - up(down(m, 1/8))| >= 0.01`` (bilinear both ways): a band along
    the contour and around thin parts. Gaussian noise (std 1) is added there only, then the mask is
    thresholded at 0.5, so the prompt equals the mask away from its contour.

    Args:
        masks: N x h x w, bool or float in [0, 1], already at the mask-prompt resolution (256 x 256 for SAM),
            h and w >= 8.
        generator: source of the noise (a CPU generator works for CUDA masks).

    Returns:
        N x h x w float32 mask-prompt logits: ``MASK_PROMPT_FOREGROUND_LOGIT`` on the noisy mask,
        ``MASK_PROMPT_BACKGROUND_LOGIT`` elsewhere.
    """
    masks = _check_masks(masks, "N x h x w (low-resolution masks)").to(torch.float32)
    height, width = masks.shape[1:]
    if height < _NOISE_DOWNSCALE or width < _NOISE_DOWNSCALE:
        raise ValueError(
            f"masks must be at least {_NOISE_DOWNSCALE} x {_NOISE_DOWNSCALE} for the 1/{_NOISE_DOWNSCALE} "
            f"round trip, got {height} x {width}; pass them at the mask-prompt resolution (256 x 256)"
        )
    batch = masks[:, None]  # N x 1 x h x w
    small = F.interpolate(batch, (height // _NOISE_DOWNSCALE, width // _NOISE_DOWNSCALE), mode="bilinear")
    recovered = F.interpolate(small, (height, width), mode="bilinear")
    incoherent = ((batch - recovered).abs() >= _INCOHERENT_THRESHOLD)[:, 0]
    source = generator.device if generator is not None else masks.device
    noise = torch.randn(masks.shape, generator=generator, device=source).to(masks.device) * _NOISE_STD
    noisy = (masks + noise * incoherent) > 0.5
    return torch.where(
        noisy,
        torch.tensor(MASK_PROMPT_FOREGROUND_LOGIT, device=masks.device),
        torch.tensor(MASK_PROMPT_BACKGROUND_LOGIT, device=masks.device),
    )


def sample_prompt_type(
    generator: torch.Generator | None = None, types: tuple[str, ...] = PROMPT_TYPES
) -> str:
    """One of ``types``, drawn uniformly (sam-hq draws one per batch; a recipe may draw one per instance)."""
    if not types:
        raise ValueError(f"types must name at least one prompt type, e.g. {PROMPT_TYPES}")
    unknown = set(types) - set(PROMPT_TYPES)
    if unknown:
        raise ValueError(f"unknown prompt types {sorted(unknown)}; choose from {PROMPT_TYPES}")
    return types[int(torch.randint(len(types), (1,), generator=generator))]
