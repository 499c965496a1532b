"""Drawing masks on images: coloured fills with outlines, boxes, captions and prompt points."""

from __future__ import annotations

import colorsys
from collections.abc import Iterable

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from hqlabel.review.fonts import draw_text, text_box


def colour(i: int) -> tuple[int, int, int]:
    """The ``i``-th of well-separated, saturated RGB colours (golden-ratio hues); ``palette(n)[i]``."""
    r, g, b = colorsys.hsv_to_rgb((i * 0.618033988749895) % 1.0, 0.75, 1.0)
    return int(r * 255), int(g * 255), int(b * 255)


def palette(n: int) -> list[tuple[int, int, int]]:
    """``n`` well-separated, saturated RGB colours (golden-ratio hues)."""
    return [colour(i) for i in range(n)]


def mask_outline(mask: np.ndarray, width: int = 1) -> np.ndarray:
    """H x W bool: the pixels of ``mask`` that touch its outside (inner boundary, ``width`` pixels)."""
    image = Image.fromarray(mask.astype(np.uint8) * 255)
    eroded = np.asarray(image.filter(ImageFilter.MinFilter(2 * width + 1))) > 0
    return mask & ~eroded


def overlay_masks(
    image: np.ndarray,
    masks: Iterable[np.ndarray],
    *,
    boxes: list[tuple[float, float, float, float]] | None = None,
    captions: list[str] | None = None,
    points: list[tuple[float, float, int]] | None = None,
    alpha: float = 0.45,
) -> Image.Image:
    """Draw masks over an image.

    Args:
        image: H x W x 3 uint8 RGB.
        masks: H x W bool masks, one colour each, drawn one at a time as the iterable yields them (a
            generator that decodes each mask when asked keeps one mask in memory, not all of them).
        boxes: XYXY pixel boxes, drawn in their mask's colour (white past the last mask).
        captions: text drawn at each box's top-left corner (e.g. "cat 0.91").
        points: (x, y, label) prompt points: label 1 green, 0 red.
        alpha: opacity of the mask fill.
    """
    out = image.astype(np.float32).copy()
    count = 0
    for mask in masks:
        if mask.shape != image.shape[:2]:
            raise ValueError(f"mask shape {mask.shape} does not match the image's {image.shape[:2]}")
        fill = colour(count)
        out[mask] = (1 - alpha) * out[mask] + alpha * np.asarray(fill, np.float32)
        out[mask_outline(mask)] = fill
        count += 1
        del mask  # let it go before the iterable makes the next one
    canvas = Image.fromarray(out.round().astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    for k, box in enumerate(boxes or []):
        box_colour = colour(k) if k < count else (255, 255, 255)
        draw.rectangle([float(v) for v in box], outline=box_colour, width=2)
        if captions and k < len(captions):
            x0, y0 = float(box[0]), float(box[1])
            left, top, right, bottom = text_box(draw, (x0, y0), captions[k])
            draw.rectangle((left, top - 2, right + 2, bottom), fill=box_colour)
            draw_text(draw, (x0 + 1, y0 - 1), captions[k], fill=(0, 0, 0))  # any script: see fonts
    for x, y, label in points or []:
        point_colour = (40, 220, 40) if label == 1 else (230, 40, 40)
        draw.ellipse((x - 4, y - 4, x + 4, y + 4), fill=point_colour, outline=(255, 255, 255))
    return canvas
