"""CPU step: bytes (inline or fetched from a URI) -> upright RGB pixels at a bounded working resolution."""

from __future__ import annotations

import pyarrow as pa
from PIL import Image

from hqlabel.platform import storage
from hqlabel.platform.images import (
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_PIXELS,
    ImageDecodeError,
    decode_image,
)
from hqlabel.platform.references import ReferencePolicy
from hqlabel.platform.schema import DECODED_SCHEMA
from hqlabel.platform.storage import StorageOptions, TooLargeError
from hqlabel.workers.tiling import working_image

DEFAULT_MAX_SIDE = 1333  # Grounding DINO's longest edge; SAM-HQ resizes to 1024 on top of this


def _read(
    row: dict, options: StorageOptions, max_bytes: int | None, references: ReferencePolicy | None
) -> bytes:
    if row.get("image") is not None:
        if max_bytes is not None and len(row["image"]) > max_bytes:
            raise TooLargeError(
                f"the inline image is {len(row['image'])} bytes, over the cap of {max_bytes} bytes; "
                "raise --max-bytes to accept it"
            )
        return bytes(row["image"])
    if row.get("uri") is None:
        raise ValueError("row has neither image bytes nor a uri")
    uri = row["uri"] if references is None else references.check(row["uri"])
    return storage.read_bytes(uri, options, max_bytes=max_bytes)


def decode_batch(
    batch: pa.Table,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_side: int = DEFAULT_MAX_SIDE,
    options: StorageOptions = StorageOptions(),
    max_bytes: int | None = DEFAULT_MAX_BYTES,
    references: ReferencePolicy | None = None,
    tile: int | None = None,
) -> pa.Table:
    """Decode a batch of ``SOURCE_SCHEMA`` rows for the labeling actors.

    Args:
        max_pixels: images with more pixels are rejected (decompression bombs).
        max_bytes: encoded images larger than this are rejected: files by their stated size, before they
            are read (``storage.read_bytes``), inline bytes before they are decoded. None: no cap.
        max_side: images whose longest side is larger are downscaled to it (masks still come out at the
            original resolution).
        references: the references (``uri``) rows may read: a refused one is not read and becomes an error
            row (stage "read", the reason). None: any (only for rows from a trusted source).
        tile: the labeler's tile size (``--tile``): images whose longer side is over it keep their full
            resolution (``tiling.working_image``: the detector runs on full-resolution tiles of them).

    Returns:
        One ``DECODED_SCHEMA`` row per input row, in order: pixels and sizes, or ``error_stage`` /
        ``error`` set ("read" when the bytes could not be had, are over ``max_bytes`` or their reference is
        refused, "decode" when they are not a usable image) and ``retryable``: True only for a read that
        failed with a transient storage error (``storage.is_transient``) after ``storage.read_bytes``'s own
        retries, which ``hqlabel label --retry-errors`` tries again.
    """
    if Image.MAX_IMAGE_PIXELS is not None and max_pixels > Image.MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = max_pixels  # one pixel limit: ours (this runs in pipeline worker processes)
    rows = []
    for row in batch.to_pylist():
        out = dict.fromkeys(DECODED_SCHEMA.names)
        out.update(
            shard=row["shard"],
            row=row.get("row"),
            image_id="" if row.get("image_id") is None else str(row["image_id"]),
            boxes=row.get("boxes"),
            labels=row.get("labels"),
        )
        stage = "read"
        try:
            if not out["image_id"]:
                raise ValueError("row has no image id")
            data = _read(row, options, max_bytes, references)
            stage = "decode"
            image = decode_image(data, max_pixels=max_pixels)
            work = working_image(image, max_side, tile)
        except (OSError, ValueError, ImageDecodeError) as e:
            # A read that failed after the storage layer's retries (a timeout, a 5xx, a dropped connection)
            # may succeed later; a missing, refused, oversized or undecodable image will not.
            retryable = stage == "read" and storage.is_transient(e)
            out.update(error_stage=stage, error=f"{type(e).__name__}: {e}", retryable=retryable)
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
