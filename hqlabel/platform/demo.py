"""Synthetic demo images (coloured shapes on textured backgrounds) for smoke runs, tests and benchmarks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle")


def make_demo_image(rng: np.random.Generator, size: tuple[int, int] = (480, 640)) -> Image.Image:
    """One H x W RGB image with 1-4 shapes (circles, squares, triangles) on a noisy background."""
    h, w = size
    background = rng.integers(0, 60, size=(h, w, 3), dtype=np.uint8) + rng.integers(
        0, 120, size=3, dtype=np.uint8
    )
    image = Image.fromarray(background)
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(1, 5))):
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        r = int(rng.integers(min(h, w) // 12, min(h, w) // 4))
        cx, cy = int(rng.integers(r, w - r)), int(rng.integers(r, h - r))
        colour = tuple(int(c) for c in rng.integers(120, 256, size=3))
        if shape == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
        elif shape == "square":
            draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=colour)
        else:
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
    return image


def make_demo_images(
    out_dir: str | Path, num_images: int = 8, *, seed: int = 0, size=(480, 640)
) -> list[Path]:
    """Write ``num_images`` demo JPEGs (``demo_00000.jpg``, ...) to ``out_dir``; returns their paths."""
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(num_images):
        path = out / f"demo_{i:05d}.jpg"
        make_demo_image(rng, size).save(path, quality=90)
        paths.append(path)
    return paths
