"""CPU step: bytes (or a file path) -> upright RGB pixels at a bounded working resolution, or an error row."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
from PIL import Image

from hqlabel.platform.images import DEFAULT_MAX_PIXELS, ImageDecodeError, decode_image, resize_longest_side
from hqlabel.platform.schema import DECODED_SCHEMA

DEFAULT_MAX_SIDE = 1333  # Grounding DINO's longest edge; SAM-HQ resizes to 1024 on top of this


def _read(row: dict, image_column: str, path_column: str) -> bytes:
    data = row.get(image_column)
    if data is not None:
        return bytes(data)
    path = row.get(path_column)
    if path is None:
        raise ValueError(f"row has neither an '{image_column}' value nor a '{path_column}' value")
    return Path(path).read_bytes()


def decode_batch(
    batch: pa.Table,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_side: int = DEFAULT_MAX_SIDE,
    id_column: str = "image_id",
    image_column: str = "image",
    path_column: str = "path",
) -> pa.Table:
    """Decode a batch of images for the labeling actors.

    Args:
        batch: rows with ``id_column`` and either ``image_column`` (encoded bytes) or ``path_column``.
        max_pixels: images with more pixels are rejected (decompression bombs).
        max_side: images whose longest side is larger are downscaled to it (masks still come out at the
            original resolution).

    Returns:
        One ``DECODED_SCHEMA`` row per input row, in order: pixels and sizes, or ``error_stage`` /
        ``error`` set ("read" when the bytes could not be had, "decode" when they are not a usable image).
    """
    if Image.MAX_IMAGE_PIXELS is not None and max_pixels > Image.MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = max_pixels  # one pixel limit: ours (this runs in pipeline worker processes)
    rows = []
    for row in batch.to_pylist():
        out = dict.fromkeys(DECODED_SCHEMA.names)
        out["image_id"] = "" if row.get(id_column) is None else str(row[id_column])
        stage = "read"
        try:
            if not out["image_id"]:
                raise ValueError(f"row has no '{id_column}' value")
            data = _read(row, image_column, path_column)
            stage = "decode"
            image = decode_image(data, max_pixels=max_pixels)
            work = resize_longest_side(image, max_side)
        except (OSError, ValueError, ImageDecodeError) as e:
            out.update(error_stage=stage, error=f"{type(e).__name__}: {e}")
        else:
            out.update(
                pixels=work.tobytes(),
                height=work.shape[0],
                width=work.shape[1],
                orig_height=image.shape[0],
                orig_width=image.shape[1],
            )
        rows.append(out)
    return pa.Table.from_pylist(rows, schema=DECODED_SCHEMA)
