"""Image decoding and discovery for large labeling jobs.

Every image that enters the pipeline goes through :func:`decode_image`, which turns raw file bytes into an
upright H x W x 3 uint8 RGB array or raises :class:`ImageDecodeError` with the reason. Callers record that
reason against the row instead of crashing the job. Pure PIL/numpy; no torch.
"""

from __future__ import annotations

import io
import re
import warnings

import numpy as np
from PIL import Image, ImageOps

__all__ = [
    "DEFAULT_MAX_BYTES",
    "DEFAULT_MAX_PIXELS",
    "IMAGE_EXTENSIONS",
    "ImageDecodeError",
    "decode_image",
    "resize_longest_side",
]

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
"""Lower-case file suffixes that an input listing (``readers.list_input``) treats as images."""

DEFAULT_MAX_PIXELS = 100_000_000
"""Default upper bound on width * height accepted by :func:`decode_image`."""

DEFAULT_MAX_BYTES = 512 * 2**20
"""Default upper bound on the size of an encoded image file read by a labeling job (``--max-bytes``): an
uncompressed 8-bit RGBA image of ``DEFAULT_MAX_PIXELS`` pixels (400 MB) fits under it."""

# Modes that carry an alpha channel; they are composited on white.
_ALPHA_MODES = frozenset({"LA", "La", "PA", "RGBA", "RGBa"})
_TIFF_BITS_PER_SAMPLE = 258
_TIFF_SAMPLE_FORMAT = 339
_TIFF_SAMPLE_FORMAT_SIGNED = 2


class ImageDecodeError(ValueError):
    """Raised when bytes cannot become a usable H x W x 3 uint8 RGB array; the message says why."""


def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode encoded image bytes into an upright RGB array.

    The format is detected from the content, never from a file name. EXIF orientation is applied, and
    every PIL mode is converted to RGB: transparent pixels are composited on a white background, 16-bit
    and 32-bit integer greyscale is scaled to 0..255 by its bit depth, float greyscale is clipped to
    0..255. Multi-frame files (animated GIF, WebP or PNG, multi-page TIFF) yield their first frame. PNG text
    and ICC chunks that decompress to more than Pillow's ``PngImagePlugin.MAX_TEXT_CHUNK`` (1 MB) are
    refused (``ImageDecodeError``). Error messages never quote the data.

    Args:
        data: the encoded file contents (JPEG, PNG, WebP, BMP, TIFF, GIF, ...); ``bytes``, ``bytearray``
            or ``memoryview``.
        max_pixels: largest accepted width * height. Checked from the header before any pixel data is
            decoded.

    Returns:
        H x W x 3 uint8 array, RGB, C-contiguous and writable.

    Raises:
        ImageDecodeError: the data is missing, empty, not an image, truncated, corrupt, zero-sized, larger
            than ``max_pixels`` or Pillow's decompression-bomb limit, or in a mode that has no RGB form.
        TypeError: ``data`` is not bytes-like.
        ValueError: ``max_pixels`` is not a positive integer.
    """
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 1:
        raise ValueError(f"max_pixels must be a positive int, got {max_pixels!r}")
    if data is None:
        raise ImageDecodeError("no image data: got None instead of the encoded image bytes")
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"data must be the encoded image bytes, got {type(data).__name__}")
    if len(data) == 0:
        raise ImageDecodeError("empty image data: the file has 0 bytes")

    try:
        with warnings.catch_warnings():
            # Turn Pillow's bomb warning into an error inside this block only; global state is restored.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(bytes(data))) as opened:
                width, height = opened.size
                if width <= 0 or height <= 0:
                    raise ImageDecodeError(f"image has zero size ({width} x {height} pixels)")
                if width * height > max_pixels:
                    raise ImageDecodeError(
                        f"image is {width} x {height} = {width * height} pixels, over the limit of "
                        f"{max_pixels} pixels; raise --max-pixels to accept it"
                    )
                opened.load()  # Full decode now, so truncated files fail here.
                upright = ImageOps.exif_transpose(opened)
                return _to_rgb_array(upright, source=opened)
    except ImageDecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        # Pillow checks its own limit while opening, before ours; name the one limit that refused it.
        found = re.search(r"\((\d+) pixels\)", str(e))
        pixels = int(found.group(1)) if found else None
        if pixels is not None and pixels > max_pixels:
            raise ImageDecodeError(
                f"image is {pixels} pixels, over the limit of {max_pixels} pixels; raise --max-pixels to "
                "accept it"
            ) from None
        raise ImageDecodeError(
            f"image is {pixels or 'more'} pixels, over Pillow's decompression-bomb limit "
            f"(PIL.Image.MAX_IMAGE_PIXELS = {Image.MAX_IMAGE_PIXELS}; labeling jobs lift it to --max-pixels)"
        ) from None
    except Image.UnidentifiedImageError as e:
        raise ImageDecodeError(  # never quote the bytes: they may be anything the reference reached
            f"not a recognised image ({len(data)} bytes): not JPEG, PNG, WebP, BMP, TIFF, GIF or another "
            "format Pillow reads"
        ) from e
    except MemoryError:
        raise
    except Exception as e:  # Any other Pillow failure is a bad image, recorded with its reason.
        raise ImageDecodeError(f"cannot decode image: {type(e).__name__}: {e}") from e


def _to_rgb_array(image: Image.Image, *, source: Image.Image) -> np.ndarray:
    """Convert a decoded PIL image of any mode to an H x W x 3 uint8 RGB array.

    ``source`` is the image as opened (before EXIF transposition); its format and TIFF tags tell the
    bit depth of ``I`` mode images.
    """
    mode = image.mode
    if mode.startswith("I"):
        grey = _int_grey_to_uint8(np.asarray(image), mode=mode, source=source)
        return np.ascontiguousarray(np.repeat(grey[:, :, None], 3, axis=2))
    if mode == "F":
        values = np.nan_to_num(np.asarray(image, dtype=np.float64), nan=0.0, posinf=255.0, neginf=0.0)
        grey = np.rint(np.clip(values, 0.0, 255.0)).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(grey[:, :, None], 3, axis=2))
    if mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = np.asarray(image.convert("RGBA"), dtype=np.uint16)
        rgb, alpha = rgba[:, :, :3], rgba[:, :, 3:]
        # Composite on white: out = rgb * a + 255 * (1 - a), with a in 0..1, rounded.
        out = (rgb * alpha + 255 * (255 - alpha) + 127) // 255
        return np.ascontiguousarray(out.astype(np.uint8))
    try:
        rgb_image = image if mode == "RGB" else image.convert("RGB")
    except ValueError as e:
        raise ImageDecodeError(f"image mode {mode!r} cannot be converted to RGB: {e}") from e
    return np.array(rgb_image, dtype=np.uint8, order="C", copy=True)


def _int_grey_to_uint8(values: np.ndarray, *, mode: str, source: Image.Image) -> np.ndarray:
    """Scale H x W integer greyscale (modes ``I;16*`` and ``I``) to H x W uint8 by its bit depth.

    16-bit data maps 0..65535 to 0..255 (32768 -> 128). 32-bit data maps the full unsigned range, or the
    full signed range when the data is signed, to 0..255. Nothing is clipped.
    """
    values = values.astype(np.int64)
    bits, signed = 32, False
    if mode.startswith("I;16"):
        bits, signed = 16, mode.endswith("S")
    elif source.format == "PNG":
        bits = 16  # PNG has no 32-bit greyscale; mode I always holds 16-bit samples.
    elif source.format == "TIFF" and hasattr(source, "tag_v2"):
        bits = _first_tag_value(source, _TIFF_BITS_PER_SAMPLE) or 32
        signed = _first_tag_value(source, _TIFF_SAMPLE_FORMAT) == _TIFF_SAMPLE_FORMAT_SIGNED
    elif values.size and values.min() >= 0 and values.max() <= 0xFFFF:
        bits = 16
    if values.size and values.min() < 0:
        signed = True
    if bits not in (8, 16, 32):
        bits = 32
    shifted = values + (1 << (bits - 1) if signed else 0)
    if bits < 32 and shifted.size and (shifted.min() < 0 or shifted.max() >= 1 << bits):
        # The header disagrees with the data: use the 32-bit range rather than wrap or clip.
        bits = 32
        shifted = values + (1 << 31 if signed else 0)
    if bits == 32 and not signed:
        shifted = shifted & 0xFFFFFFFF  # Reinterpret int32 as uint32 (Pillow stores uint32 TIFFs in I).
    scaled = np.rint(shifted.astype(np.float64) * (255.0 / ((1 << bits) - 1)))
    return scaled.astype(np.uint8)


def _first_tag_value(image: Image.Image, tag: int) -> int | None:
    """First value of a TIFF tag (Pillow returns an int or a tuple), or None if absent."""
    value = image.tag_v2.get(tag)  # type: ignore[attr-defined]
    if isinstance(value, tuple):
        value = value[0] if value else None
    return int(value) if isinstance(value, (int, np.integer)) else None


def resize_longest_side(image: np.ndarray, max_side: int) -> np.ndarray:
    """Downscale an image so its longer side is at most ``max_side`` pixels, keeping the aspect ratio.

    Args:
        image: H x W x 3 uint8 RGB array.
        max_side: largest allowed max(H, W), >= 1.

    Returns:
        ``image`` itself (same object) if max(H, W) <= max_side; otherwise a new h x w x 3 uint8 array
        resized with PIL bilinear filtering, where the longer side equals ``max_side`` and the shorter side
        is scaled and rounded, never below 1.

    Raises:
        ValueError: ``max_side`` < 1, or ``image`` is not H x W x 3 uint8.
    """
    if isinstance(max_side, bool) or not isinstance(max_side, (int, np.integer)) or max_side < 1:
        raise ValueError(f"max_side must be an int >= 1, got {max_side!r}")
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3:
        shape = getattr(image, "shape", type(image).__name__)
        raise ValueError(f"image must be an H x W x 3 uint8 array, got shape {shape}")
    if image.dtype != np.uint8:
        raise ValueError(f"image must be uint8, got dtype {image.dtype}; convert with .astype(np.uint8)")
    height, width = image.shape[:2]
    longest = max(height, width)
    if longest <= max_side:
        return image
    scale = max_side / longest
    new_width = max(1, round(width * scale))
    new_height = max(1, round(height * scale))
    resized = Image.fromarray(np.ascontiguousarray(image), mode="RGB").resize(
        (new_width, new_height), Image.Resampling.BILINEAR
    )
    return np.array(resized, dtype=np.uint8, order="C", copy=True)
