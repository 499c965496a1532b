"""Training and validation resizing for HQ-SAM: Large Scale Jitter, horizontal flip, longest-side resize.

As sam-hq's ``train/utils/dataloader.py`` (``LargeScaleJitter``, ``RandomHFlip``): an image and its
instance masks are rescaled so that the longest side is ``s * output_size`` with ``s`` uniform in the scale
range, randomly cropped to at most ``output_size`` square, and pasted at the top-left of an
``output_size`` square canvas; the valid (non-padding) size is returned next to the arrays.

Resizing is bilinear with antialiasing (torch) for images and masks alike, masks then thresholded at 0.5,
so both move by the same geometry. (sam-hq resizes without antialiasing; at the 0.1 end of the scale range
that aliases badly.) Instances may end up empty after a crop; callers drop them.

All randomness comes from the ``numpy.random.Generator`` passed in.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

_MASK_CHUNK = 8  # masks resized per interpolate call: bounds memory at large scales


def _check_inputs(image: np.ndarray, masks: np.ndarray) -> None:
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be H x W x 3 uint8 RGB, got shape {image.shape} dtype {image.dtype}")
    if masks.ndim != 3 or masks.shape[1:] != image.shape[:2]:
        raise ValueError(
            f"masks must be N x H x W with H x W = {image.shape[:2]} (the image's), got shape {masks.shape}"
        )


def _check_size(output_size: int) -> None:
    if output_size < 1:
        raise ValueError(f"output_size must be >= 1, got {output_size}")


def _resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    if image.shape[:2] == size:
        return image.copy()
    tensor = torch.from_numpy(image).permute(2, 0, 1)[None].to(torch.float32)
    tensor = F.interpolate(tensor, size, mode="bilinear", align_corners=False, antialias=True)
    return tensor[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()


def _resize_masks(
    masks: np.ndarray, size: tuple[int, int], crop: tuple[int, int, int, int] | None = None
) -> np.ndarray:
    """N x H x W bool -> N x h x w bool resized to ``size``, then cropped to (y0, y1, x0, x1) if given."""
    y0, y1, x0, x1 = crop if crop is not None else (0, size[0], 0, size[1])
    out = np.zeros((len(masks), y1 - y0, x1 - x0), dtype=bool)
    for start in range(0, len(masks), _MASK_CHUNK):
        chunk = torch.from_numpy(np.ascontiguousarray(masks[start : start + _MASK_CHUNK] != 0))
        chunk = chunk[:, None].to(torch.float32)
        if chunk.shape[2:] != size:
            chunk = F.interpolate(chunk, size, mode="bilinear", align_corners=False, antialias=True)
        out[start : start + _MASK_CHUNK] = (chunk[:, 0, y0:y1, x0:x1] > 0.5).numpy()
    return out


def _paste(
    image: np.ndarray, masks: np.ndarray, output_size: int, pad_value: int
) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    height, width = image.shape[:2]
    canvas = np.full((output_size, output_size, 3), pad_value, dtype=np.uint8)
    canvas[:height, :width] = image
    mask_canvas = np.zeros((len(masks), output_size, output_size), dtype=bool)
    mask_canvas[:, :height, :width] = masks
    return canvas, mask_canvas, (height, width)


def large_scale_jitter(
    image: np.ndarray,
    masks: np.ndarray,
    output_size: int,
    scale_range: tuple[float, float] = (0.1, 2.0),
    generator: np.random.Generator | None = None,
    *,
    pad_value: int = 0,
) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """Large Scale Jitter (sam-hq ``LargeScaleJitter``).

    Resizes so that the longest side is ``round(s * output_size)``, ``s ~ U(scale_range)``, keeping the
    aspect ratio; crops a random window of at most ``output_size`` x ``output_size``; pastes it at the
    top-left of an ``output_size`` square canvas.

    Args:
        image: H x W x 3 uint8 RGB.
        masks: N x H x W bool instance masks (N may be 0).
        output_size: side S of the square output (1024 for SAM).
        scale_range: (min, max) of ``s``, 0 < min <= max.
        generator: source of the scale and the crop offset; None draws from a fresh unseeded generator.
        pad_value: canvas value around the image. sam-hq pads with 128 (about SAM's pixel mean, so ~0 after
            normalisation); or crop to the valid size and let the processor pad.

    Returns:
        (image S x S x 3 uint8, masks N x S x S bool, (valid_h, valid_w)): the resized content occupies
        ``[:valid_h, :valid_w]``. Masks may be empty after the crop.
    """
    _check_inputs(image, masks)
    _check_size(output_size)
    low, high = scale_range
    if not 0 < low <= high:
        raise ValueError(f"scale_range must be (min, max) with 0 < min <= max, got {scale_range}")
    generator = generator if generator is not None else np.random.default_rng()
    height, width = image.shape[:2]
    scale = float(generator.uniform(low, high))
    longest = max(1, round(scale * output_size))
    factor = min(longest / height, longest / width)
    size = (max(1, round(height * factor)), max(1, round(width * factor)))
    crop_h, crop_w = min(output_size, size[0]), min(output_size, size[1])
    y0 = int(generator.integers(0, size[0] - crop_h + 1))
    x0 = int(generator.integers(0, size[1] - crop_w + 1))
    crop = (y0, y0 + crop_h, x0, x0 + crop_w)
    resized = _resize_image(image, size)[crop[0] : crop[1], crop[2] : crop[3]]
    return _paste(resized, _resize_masks(masks, size, crop), output_size, pad_value)


def random_hflip(
    image: np.ndarray, masks: np.ndarray, generator: np.random.Generator, p: float = 0.5
) -> tuple[np.ndarray, np.ndarray]:
    """Flip image (H x W x 3) and masks (N x H x W) left-right together with probability ``p``.

    Flip before ``large_scale_jitter``: flipping its output would move the content to the right of the
    padding.
    """
    _check_inputs(image, masks)
    if not 0 <= p <= 1:
        raise ValueError(f"p must be a probability in [0, 1], got {p}")
    if generator.random() < p:
        return np.ascontiguousarray(image[:, ::-1]), np.ascontiguousarray(masks[:, :, ::-1])
    return image, masks


def resize_longest(
    image: np.ndarray, masks: np.ndarray, output_size: int, *, pad_value: int = 0
) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """Validation resize: longest side exactly ``output_size`` (SAM's ``ResizeLongestSide`` rounding), padded
    at the bottom and right to ``output_size`` square.

    Args:
        image: H x W x 3 uint8 RGB.
        masks: N x H x W bool.
        output_size: side S of the square output.
        pad_value: canvas value around the image (see ``large_scale_jitter``).

    Returns:
        (image S x S x 3 uint8, masks N x S x S bool, (valid_h, valid_w)).
    """
    _check_inputs(image, masks)
    _check_size(output_size)
    height, width = image.shape[:2]
    factor = output_size / max(height, width)
    size = (max(1, int(height * factor + 0.5)), max(1, int(width * factor + 0.5)))
    return _paste(_resize_image(image, size), _resize_masks(masks, size), output_size, pad_value)
