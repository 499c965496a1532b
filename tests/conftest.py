"""Shared fixtures: one Ray instance per test session (2 CPUs, like the CI machine), tiny generated images."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray with 2 CPUs for the whole session; jobs find it with ``ray.is_initialized()``."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


def random_image(seed: int, size: tuple[int, int] = (48, 64)) -> np.ndarray:
    """H x W x 3 uint8 image with some structure (a bright rectangle on noise)."""
    rng = np.random.default_rng(seed)
    h, w = size
    image = rng.integers(0, 80, size=(h, w, 3), dtype=np.uint8)
    y0, x0 = int(rng.integers(0, h // 2)), int(rng.integers(0, w // 2))
    image[y0 : y0 + h // 3, x0 : x0 + w // 3] = rng.integers(150, 256, size=3, dtype=np.uint8)
    return image


def encode(image: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """Five small images of different sizes and formats in a nested folder."""
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    sizes = [(48, 64), (64, 48), (40, 40), (30, 70), (52, 36)]
    for i, size in enumerate(sizes):
        folder = root / "sub" if i % 2 else root
        fmt, ext = [("PNG", "png"), ("JPEG", "jpg"), ("WEBP", "webp")][i % 3]
        (folder / f"img_{i}.{ext}").write_bytes(encode(random_image(i, size), fmt))
    return root
