"""COCO compressed run-length encoding (RLE) of binary masks, compatible with pycocotools.

An RLE is a dict ``{"size": [H, W], "counts": bytes}``: column-major (Fortran order) run lengths in
pycocotools' compressed string form. ``counts`` stays ``bytes`` here; call ``.decode("ascii")`` when
writing JSON. pycocotools is imported lazily.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import numpy as np

from hqlabel.platform.images import DEFAULT_MAX_PIXELS

__all__ = ["decode_mask", "encode_mask", "encode_masks", "mask_area", "rle_to_bbox"]


def _mask_utils() -> ModuleType:
    """Import ``pycocotools.mask`` or raise ImportError with the install hint."""
    try:
        from pycocotools import mask as mask_utils
    except ImportError as e:
        raise ImportError("RLE encoding needs pycocotools; install it with `pip install pycocotools`") from e
    return mask_utils


def encode_masks(masks: np.ndarray) -> list[dict[str, Any]]:
    """Encode a stack of binary masks as COCO compressed RLE.

    Args:
        masks: N x H x W array, bool or integer (nonzero is foreground, so 0/1 and 0/255 both work).

    Returns:
        N dicts ``{"size": [H, W], "counts": bytes}`` with python-int sizes; ``[]`` when N == 0.

    Raises:
        ValueError: ``masks`` is not 3-D, or is float (threshold it first).
    """
    masks = np.asarray(masks)
    if masks.ndim != 3:
        raise ValueError(
            f"masks must be N x H x W, got shape {masks.shape}; use encode_mask for a single H x W mask"
        )
    if masks.dtype != np.bool_ and not np.issubdtype(masks.dtype, np.integer):
        raise ValueError(
            f"masks must be bool or integer 0/1, got dtype {masks.dtype}; "
            "threshold it first, e.g. masks > 0.5"
        )
    if masks.shape[0] == 0:
        return []
    # pycocotools wants H x W x N uint8 in Fortran order with values exactly 0/1. Bool masks are 0/1 bytes:
    # when they are laid out column-major already (``HQSamSegmenter.iter_masks`` yields them so), view them.
    stacked = masks.transpose(1, 2, 0) if masks.dtype == np.bool_ else (masks != 0).transpose(1, 2, 0)
    if stacked.flags.f_contiguous:
        fortran = stacked.view(np.uint8)
    else:
        fortran = np.asfortranarray(stacked, dtype=np.uint8)
    encoded = _mask_utils().encode(fortran)
    height, width = int(masks.shape[1]), int(masks.shape[2])
    return [{"size": [height, width], "counts": bytes(rle["counts"])} for rle in encoded]


def encode_mask(mask: np.ndarray) -> dict[str, Any]:
    """Encode one H x W binary mask (bool or integer, nonzero is foreground) as COCO compressed RLE.

    Returns:
        ``{"size": [H, W], "counts": bytes}``.

    Raises:
        ValueError: ``mask`` is not 2-D or is float.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(
            f"mask must be H x W, got shape {mask.shape}; use encode_masks for an N x H x W stack"
        )
    return encode_masks(mask[None])[0]


def _to_pycocotools(rle: dict[str, Any]) -> dict[str, Any]:
    """Validate an RLE dict and return it in the form pycocotools accepts (list size, bytes counts).

    Uncompressed RLE (``counts`` a list of ints) is converted to compressed form as well.
    """
    if not isinstance(rle, dict) or "size" not in rle or "counts" not in rle:
        got = sorted(rle) if isinstance(rle, dict) else type(rle).__name__
        raise ValueError(f'rle must be a dict with "size" and "counts", got {got}')
    try:
        height, width = (int(v) for v in np.asarray(rle["size"]).reshape(-1))
    except (TypeError, ValueError) as e:
        raise ValueError(f'rle["size"] must be [H, W], got {rle["size"]!r}') from e
    if height < 0 or width < 0:
        raise ValueError(f'rle["size"] must be non-negative [H, W], got {[height, width]}')
    counts = rle["counts"]
    if isinstance(counts, str):
        counts = counts.encode("ascii")
    elif isinstance(counts, (bytearray, memoryview)):
        counts = bytes(counts)
    elif isinstance(counts, (list, tuple, np.ndarray)):
        if len(counts) > height * width + 1:  # runs alternate, each at least one pixel (the first may be 0)
            raise ValueError(
                f'rle["counts"] holds {len(counts)} runs, more than a {height} x {width} mask can have; '
                "the RLE is corrupt"
            )
        uncompressed = {"size": [height, width], "counts": [int(c) for c in counts]}
        return _mask_utils().frPyObjects(uncompressed, height, width)
    elif not isinstance(counts, bytes):
        raise ValueError(f'rle["counts"] must be bytes or str, got {type(counts).__name__}')
    return {"size": [height, width], "counts": counts}


def decode_mask(rle: dict[str, Any], *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode a COCO RLE dict to a binary mask.

    Args:
        rle: ``{"size": [H, W], "counts": ...}``; counts as bytes or str (compressed) or a list of ints
            (uncompressed); size as list, tuple or array.
        max_pixels: refuse a declared size of more than this many pixels (H * W) before allocating the
            mask (2 bytes a pixel while decoding): RLE read back from files is untrusted, and a few bytes of
            counts can declare any size. Default: the labeling default ``--max-pixels``; None: no cap.

    Returns:
        H x W bool array, C-contiguous.

    Raises:
        ValueError: the dict is malformed, or its size is over ``max_pixels``.
    """
    checked = _to_pycocotools(rle)
    height, width = checked["size"]
    if max_pixels is not None and height * width > max_pixels:
        raise ValueError(
            f'rle["size"] {[height, width]} declares {height * width} pixels, over the cap of {max_pixels} '
            "pixels (max_pixels, the labeling job's --max-pixels); refused instead of decoded: the RLE is "
            "corrupt, or comes from a job with a larger --max-pixels"
        )
    decoded = _mask_utils().decode(checked)
    return np.ascontiguousarray(decoded, dtype=bool)


def mask_area(rle: dict[str, Any]) -> int:
    """Number of foreground pixels of an RLE mask (pycocotools ``area``)."""
    return int(_mask_utils().area(_to_pycocotools(rle)))


def rle_to_bbox(rle: dict[str, Any]) -> tuple[float, float, float, float]:
    """Tight box around an RLE mask's foreground, XYXY pixels.

    The box uses pixel edges: a mask filling rows y0..y1-1 and columns x0..x1-1 gives (x0, y0, x1, y1).
    An empty mask gives (0.0, 0.0, 0.0, 0.0).
    """
    x, y, w, h = (float(v) for v in _mask_utils().toBbox(_to_pycocotools(rle)))
    return (x, y, x + w, y + h)
