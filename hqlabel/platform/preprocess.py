"""Image preprocessing as torch operations on the model's device: the same resize, rescale, normalise and pad
as transformers' (PIL-backend) image processors, for the SAM / SAM-HQ and Grounding DINO processors.

On a GPU, the processors' per-image PIL resizes and numpy normalisation run on one CPU core inside the model's
process and leave the GPU waiting; here each image travels as uint8 (a quarter of float32's bytes) and is
resized on the device. Resizing is bilinear with antialiasing (``torch.nn.functional.interpolate``), which
follows PIL's bilinear filter; the values differ from PIL's by PIL's rounding to uint8 (under 1/255 before
normalisation), and the output sizes are the processors' own.

``Preprocess`` selects the path: "processor" (transformers' processor), "torch" (this module), or "auto"
(torch on CUDA, the processor elsewhere: on the CPU it is no faster, and it keeps the CPU results those of
the reference processors).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import get_args

import numpy as np
import torch
import torch.nn.functional as F

from hqlabel.platform.config import Preprocess

PREPROCESS_MODES = get_args(Preprocess)


def use_torch_preprocess(preprocess: str, device: torch.device) -> bool:
    """Whether ``preprocess`` ("auto" | "processor" | "torch") means the torch path on ``device``."""
    if preprocess not in PREPROCESS_MODES:
        raise ValueError(f"preprocess must be one of {PREPROCESS_MODES}, got {preprocess!r}")
    return preprocess == "torch" or (preprocess == "auto" and device.type == "cuda")


def _setting(value, name: str):
    """``image_processor.size`` etc. are ``SizeDict`` objects in transformers 5 and plain dicts in saved
    configs of older versions."""
    return value.get(name) if isinstance(value, dict) else getattr(value, name, None)


def resize_normalize_pad(
    images: Sequence[np.ndarray],
    sizes: Sequence[tuple[int, int]],
    *,
    image_processor,
    device: torch.device,
    pad_to: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Resize each H x W x 3 uint8 image to its (h, w) in ``sizes``, rescale and normalise as
    ``image_processor`` says, and pad all to ``pad_to`` (default: the batch's largest h and w) at the bottom
    and right with zeros.

    Returns:
        ``(B x 3 x H x W float32 pixel values, B x H x W int64 mask of the valid pixels)`` on ``device``.
    """
    height = pad_to[0] if pad_to else max(h for h, _ in sizes)
    width = pad_to[1] if pad_to else max(w for _, w in sizes)
    pixels = torch.zeros(len(images), 3, height, width, device=device)
    mask = torch.zeros(len(images), height, width, dtype=torch.int64, device=device)
    scale = float(image_processor.rescale_factor) if image_processor.do_rescale else 1.0
    if image_processor.do_normalize:
        mean = torch.tensor(image_processor.image_mean, device=device).view(3, 1, 1)
        std = torch.tensor(image_processor.image_std, device=device).view(3, 1, 1)
    for i, (image, (h, w)) in enumerate(zip(images, sizes, strict=True)):
        if h > height or w > width:
            raise ValueError(f"image {i} resizes to {(h, w)}, larger than the padded size {(height, width)}")
        # a contiguous, writable array (pixels from Arrow buffers are read-only, which torch warns about)
        x = torch.from_numpy(np.require(image, np.uint8, ["C", "W"])).to(device, non_blocking=True)
        x = x.permute(2, 0, 1).unsqueeze(0).float()
        if tuple(x.shape[-2:]) != (h, w):
            x = F.interpolate(x, size=(h, w), mode="bilinear", antialias=True, align_corners=False)
            x = x.clamp_(0, 255)
        x = x[0] * scale
        if image_processor.do_normalize:
            x = (x - mean) / std
        pixels[i, :, :h, :w] = x
        mask[i, :h, :w] = 1
    return pixels, mask


def sam_pixel_values(
    images: Sequence[np.ndarray], image_processor, device: torch.device
) -> tuple[torch.Tensor, list[tuple[int, int]], list[tuple[int, int]]]:
    """The SAM / SAM-HQ image processor's ``pixel_values`` computed on ``device``: longest side resized to
    ``size.longest_edge`` (sizes rounded as the processor rounds them), padded to ``pad_size``.

    Returns:
        ``(B x 3 x S x S pixel values, original (H, W) sizes, reshaped (h, w) sizes)``.
    """
    longest = _setting(image_processor.size, "longest_edge")
    if not image_processor.do_resize or not longest or not image_processor.do_pad:
        raise ValueError(
            "the torch preprocessing follows SAM processors that resize the longest side and pad; this one "
            f"(do_resize={image_processor.do_resize}, size={image_processor.size}, "
            f"do_pad={image_processor.do_pad}) does not: use preprocess='processor'"
        )
    originals = [tuple(int(s) for s in image.shape[:2]) for image in images]
    reshaped = [tuple(image_processor._get_preprocess_shape(size, longest)) for size in originals]
    pad = image_processor.pad_size
    pad_to = (int(_setting(pad, "height")), int(_setting(pad, "width")))
    pixels, _ = resize_normalize_pad(
        images, reshaped, image_processor=image_processor, device=device, pad_to=pad_to
    )
    return pixels, originals, reshaped


def grounding_dino_pixel_values(
    images: Sequence[np.ndarray], image_processor, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """The Grounding DINO image processor's ``(pixel_values, pixel_mask)`` computed on ``device``: shortest
    side to ``size.shortest_edge`` capped by ``size.longest_edge`` (the processor's own size arithmetic),
    padded to the batch's largest image."""
    from transformers.image_transforms import get_size_with_aspect_ratio

    size = image_processor.size
    shortest, longest = _setting(size, "shortest_edge"), _setting(size, "longest_edge")
    if not image_processor.do_resize or not shortest or not longest or not image_processor.do_pad:
        raise ValueError(
            "the torch preprocessing follows Grounding DINO processors that resize to a shortest/longest "
            f"edge and pad; this one (do_resize={image_processor.do_resize}, size={size}, "
            f"do_pad={image_processor.do_pad}) does not: use preprocess='processor'"
        )
    sizes = [tuple(get_size_with_aspect_ratio(image.shape[:2], shortest, longest)) for image in images]
    return resize_normalize_pad(images, sizes, image_processor=image_processor, device=device)
