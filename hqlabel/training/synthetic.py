"""A small synthetic fine-structure dataset with exact masks, for HQ-token training smoke runs and tests.

Each image is ``size`` x ``size`` RGB on a textured, noisy background (smooth low-frequency colour variation
plus per-pixel noise) with one to three objects drawn on top, each in its own colour (a random offset of
40-90 grey levels per channel from the local background, so objects are visible but not trivially separable):

* ``lines``: one to three polylines / curves, 1-3 px wide;
* ``ring``: an elliptical ring 2-6 px thick, or a filled shape with round holes;
* ``lattice``: a grid of 1-2 px bars, or a diagonal fence (chain-link) pattern, inside a rectangle.

Masks are exact (drawn without anti-aliasing on the pixel grid; a later object occludes an earlier one, whose
mask loses those pixels). Everything is deterministic per ``seed`` (image ``k`` uses the random stream
``(seed, k)``), and images are PNG-encoded, so pixels are exact too.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator

import numpy as np
from PIL import Image, ImageDraw

from hqlabel.platform.instances import ImageInstances, Instance, write_instances
from hqlabel.platform.rle import encode_mask
from hqlabel.platform.storage import StorageOptions

__all__ = [
    "LABELS",
    "iter_fine_structure_dataset",
    "make_fine_structure_dataset",
    "write_fine_structure_dataset",
]

LABELS: tuple[str, ...] = ("lines", "ring", "lattice")
MIN_SIZE = 32


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """size x size x 3 float: a base colour, smooth colour blobs and per-pixel noise."""
    base = rng.uniform(60, 190, size=3)
    coarse = rng.normal(0, 25, size=(5, 5, 3))
    smooth = np.asarray(
        Image.fromarray(((coarse + 128).clip(0, 255)).astype(np.uint8)).resize(
            (size, size), Image.Resampling.BICUBIC
        ),
        dtype=np.float64,
    )
    return base + (smooth - 128) + rng.normal(0, 8, size=(size, size, 3))


def _lines(rng: np.random.Generator, size: int, draw: ImageDraw.ImageDraw) -> None:
    for _ in range(int(rng.integers(1, 4))):
        width = int(rng.integers(1, 4))
        if rng.random() < 0.5:  # a sine-like curve across the image
            t = np.linspace(0, 1, 40)
            angle = rng.uniform(0, np.pi)
            cx, cy = rng.uniform(0.3, 0.7, size=2) * size
            length = rng.uniform(0.5, 0.9) * size
            amp, freq, phase = rng.uniform(2, size / 8), rng.uniform(0.5, 2.5), rng.uniform(0, 2 * np.pi)
            u = (t - 0.5) * length
            v = amp * np.sin(2 * np.pi * freq * t + phase)
            xs = cx + u * np.cos(angle) - v * np.sin(angle)
            ys = cy + u * np.sin(angle) + v * np.cos(angle)
        else:  # a random polyline
            n = int(rng.integers(3, 6))
            xs, ys = rng.uniform(0.05, 0.95, size=(2, n)) * size
        draw.line(list(zip(xs.tolist(), ys.tolist(), strict=True)), fill=1, width=width)


def _ring(rng: np.random.Generator, size: int, draw: ImageDraw.ImageDraw) -> None:
    cx, cy = rng.uniform(0.35, 0.65, size=2) * size
    rx, ry = rng.uniform(0.15, 0.35, size=2) * size
    if rng.random() < 0.5:  # an elliptical ring
        thickness = rng.uniform(2, 6)
        draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=1)
        draw.ellipse(
            [cx - rx + thickness, cy - ry + thickness, cx + rx - thickness, cy + ry - thickness], fill=0
        )
    else:  # a filled rectangle or ellipse with round holes
        shape = draw.rectangle if rng.random() < 0.5 else draw.ellipse
        shape([cx - rx, cy - ry, cx + rx, cy + ry], fill=1)
        for _ in range(int(rng.integers(2, 6))):
            hx = cx + rng.uniform(-0.5, 0.5) * rx
            hy = cy + rng.uniform(-0.5, 0.5) * ry
            r = rng.uniform(1.5, max(2.0, min(rx, ry) / 3))
            draw.ellipse([hx - r, hy - r, hx + r, hy + r], fill=0)


def _lattice(rng: np.random.Generator, size: int, draw: ImageDraw.ImageDraw) -> None:
    x0, y0 = rng.uniform(0.05, 0.3, size=2) * size
    x1, y1 = rng.uniform(0.7, 0.95, size=2) * size
    width = int(rng.integers(1, 3))
    step = float(rng.uniform(7, 13))
    if rng.random() < 0.5:  # a grid of bars
        for x in np.arange(x0, x1 + 1e-6, step):
            draw.line([(x, y0), (x, y1)], fill=1, width=width)
        for y in np.arange(y0, y1 + 1e-6, step):
            draw.line([(x0, y), (x1, y)], fill=1, width=width)
    else:  # a diagonal fence: lines at +-45 degrees, clipped to the rectangle afterwards
        span = (x1 - x0) + (y1 - y0)
        for offset in np.arange(-span, span, step):
            draw.line([(x0 + offset, y0), (x0 + offset + span, y0 + span)], fill=1, width=width)
            draw.line([(x0 + offset, y0), (x0 + offset - span, y0 + span)], fill=1, width=width)
        draw.rectangle([0, 0, size, y0 - 1], fill=0)
        draw.rectangle([0, y1 + 1, size, size], fill=0)
        draw.rectangle([0, 0, x0 - 1, size], fill=0)
        draw.rectangle([x1 + 1, 0, size, size], fill=0)


_DRAWERS: dict[str, Callable[[np.random.Generator, int, ImageDraw.ImageDraw], None]] = {
    "lines": _lines,
    "ring": _ring,
    "lattice": _lattice,
}


def _object_mask(rng: np.random.Generator, label: str, size: int) -> np.ndarray:
    canvas = Image.new("L", (size, size), 0)
    _DRAWERS[label](rng, size, ImageDraw.Draw(canvas))
    return np.asarray(canvas) > 0


def make_fine_structure_image(
    index: int, *, size: int = 128, seed: int = 0, max_objects: int = 3
) -> ImageInstances:
    """Image ``index`` of the dataset for ``seed``: ``synthetic-{index:05d}.png``, PNG bytes, 1 to
    ``max_objects`` (at most 3) objects. ``max_objects=1`` gives one object per image, the layout of DIS5K /
    ThinObject-5K; it draws the same first object as the default.

    The first object's kind cycles through ``LABELS`` with ``index``, so every kind occurs.
    """
    if not 1 <= max_objects <= 3:
        raise ValueError(f"max_objects must be 1, 2 or 3, got {max_objects}")
    if size < MIN_SIZE:
        raise ValueError(f"size must be >= {MIN_SIZE} pixels, got {size}")
    rng = np.random.default_rng([seed, index])
    image = _background(rng, size)
    kinds = [LABELS[index % len(LABELS)]]
    extra = rng.integers(0, len(LABELS), size=int(rng.integers(0, 3)))  # drawn whatever max_objects is
    kinds += [LABELS[int(k)] for k in extra[: max_objects - 1]]
    masks: list[np.ndarray] = []
    for label in kinds:
        mask = _object_mask(rng, label, size)
        for earlier in masks:  # the new object occludes the earlier ones
            earlier &= ~mask
        masks.append(mask)
        offset = rng.uniform(40, 90, size=3) * rng.choice([-1.0, 1.0], size=3)
        local = image[mask].mean(axis=0) if mask.any() else image.mean(axis=(0, 1))
        colour = np.where((local + offset < 10) | (local + offset > 245), local - offset, local + offset)
        image[mask] = colour + rng.normal(0, 6, size=(int(mask.sum()), 3))
    pixels = image.clip(0, 255).round().astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    instances = [
        Instance(k, label, encode_mask(mask), origin="synthetic")
        for k, (label, mask) in enumerate(zip(kinds, masks, strict=True))
        if mask.any()
    ]
    for k, instance in enumerate(instances):
        instance.instance_id = k
    return ImageInstances(f"synthetic-{index:05d}.png", buf.getvalue(), size, size, instances)


def iter_fine_structure_dataset(
    n_images: int, *, size: int = 128, seed: int = 0, max_objects: int = 3
) -> Iterator[ImageInstances]:
    """``make_fine_structure_image(k)`` for k = 0..n_images-1, one at a time."""
    if n_images < 1:
        raise ValueError(f"the number of images must be >= 1, got {n_images}")
    for index in range(n_images):
        yield make_fine_structure_image(index, size=size, seed=seed, max_objects=max_objects)


def make_fine_structure_dataset(
    n_images: int, *, size: int = 128, seed: int = 0, max_objects: int = 3
) -> list[ImageInstances]:
    """``n_images`` synthetic fine-structure images with exact masks (labels ``lines``, ``ring``,
    ``lattice``), deterministic per ``seed``."""
    return list(iter_fine_structure_dataset(n_images, size=size, seed=seed, max_objects=max_objects))


def write_fine_structure_dataset(
    out: str,
    n_images: int,
    size: int = 128,
    seed: int = 0,
    options: StorageOptions = StorageOptions(),
    *,
    max_objects: int = 3,
) -> dict:
    """Write the dataset as an instance dataset (kind ``"synthetic"``) at ``out``, local or ``s3://``.

    Returns:
        The ``dataset.json`` document.
    """
    return write_instances(
        iter_fine_structure_dataset(n_images, size=size, seed=seed, max_objects=max_objects),
        out,
        kind="synthetic",
        source=f"hqlabel.training.synthetic:fine-structure({seed=}, {size=}, {max_objects=})",
        provenance={
            "generator": "fine-structure",
            "n_images": n_images,
            "size": size,
            "seed": seed,
            "max_objects": max_objects,
        },
        options=options,
    )
