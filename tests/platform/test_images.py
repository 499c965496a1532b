"""Tests for hqlabel.platform.images: decoding every mode to RGB, size limits, resizing, discovery."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from hqlabel.platform.images import (
    IMAGE_EXTENSIONS,
    ImageDecodeError,
    decode_image,
    resize_longest_side,
)

EXIF_ORIENTATION = 0x0112


def _encode(image: Image.Image, fmt: str, **save_kwargs: object) -> bytes:
    """Encode a PIL image to bytes in the given format."""
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save_kwargs)
    return buffer.getvalue()


def _gradient_rgb(height: int = 24, width: int = 32) -> Image.Image:
    """H x W RGB image with smooth gradients (compresses well, survives lossy formats)."""
    ys, xs = np.mgrid[0:height, 0:width]
    array = np.stack(
        [xs * 255 // max(width - 1, 1), ys * 255 // max(height - 1, 1), np.full_like(xs, 90)], -1
    )
    return Image.fromarray(array.astype(np.uint8), mode="RGB")


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "BMP", "TIFF"])
def test_rgb_round_trip_shape_and_dtype(fmt: str) -> None:
    out = decode_image(_encode(_gradient_rgb(24, 32), fmt))
    assert out.shape == (24, 32, 3)
    assert out.dtype == np.uint8
    assert out.flags["C_CONTIGUOUS"]


def test_lossless_png_round_trip_is_exact() -> None:
    image = _gradient_rgb(7, 5)
    np.testing.assert_array_equal(decode_image(_encode(image, "PNG")), np.asarray(image))


def test_png_named_jpg_is_found_and_decoded(tmp_path: Path) -> None:
    image = _gradient_rgb(6, 9)
    (tmp_path / "actually_png.jpg").write_bytes(_encode(image, "PNG"))
    data = (tmp_path / "actually_png.jpg").read_bytes()
    np.testing.assert_array_equal(decode_image(data), np.asarray(image))


def test_greyscale_l_becomes_three_equal_channels() -> None:
    grey = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    out = decode_image(_encode(Image.fromarray(grey, mode="L"), "PNG"))
    np.testing.assert_array_equal(out, np.repeat(grey[:, :, None], 3, axis=2))


def test_palette_with_transparency_composites_on_white() -> None:
    image = Image.new("P", (2, 1))
    image.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    image.putpixel((0, 0), 0)
    image.putpixel((1, 0), 1)
    out = decode_image(_encode(image, "PNG", transparency=0))
    assert out[0, 0].tolist() == [255, 255, 255]
    assert out[0, 1].tolist() == [0, 0, 255]


def test_palette_without_transparency_keeps_colours() -> None:
    image = Image.new("P", (1, 1))
    image.putpalette([10, 200, 30] + [0] * 765)
    assert decode_image(_encode(image, "PNG"))[0, 0].tolist() == [10, 200, 30]


def test_rgba_composites_on_white_not_black() -> None:
    rgba = np.array([[[0, 0, 0, 0], [200, 10, 10, 255], [0, 0, 0, 128]]], dtype=np.uint8)
    out = decode_image(_encode(Image.fromarray(rgba, mode="RGBA"), "PNG"))
    assert out[0, 0].tolist() == [255, 255, 255]
    assert out[0, 1].tolist() == [200, 10, 10]
    assert out[0, 2].tolist() == [127, 127, 127]


def test_la_composites_on_white() -> None:
    image = Image.new("LA", (1, 1), (0, 0))
    assert decode_image(_encode(image, "PNG"))[0, 0].tolist() == [255, 255, 255]


def test_cmyk_jpeg_decodes_to_rgb() -> None:
    image = Image.new("CMYK", (9, 5), (0, 255, 255, 0))  # Pure red in CMYK.
    out = decode_image(_encode(image, "JPEG", quality=95))
    assert out.shape == (5, 9, 3)
    np.testing.assert_allclose(out[2, 4].astype(int), [255, 0, 0], atol=12)


def test_one_bit_image() -> None:
    image = Image.new("1", (2, 1), 0)
    image.putpixel((1, 0), 1)
    out = decode_image(_encode(image, "PNG"))
    assert out[0].tolist() == [[0, 0, 0], [255, 255, 255]]


def test_16_bit_png_scaled_by_bit_depth() -> None:
    values = np.array([[0, 32768, 65535, 257]], dtype=np.uint16)
    image = Image.fromarray(values)
    assert image.mode == "I;16"
    out = decode_image(_encode(image, "PNG"))
    assert out[0, :, 0].tolist() == [0, 128, 255, 1]
    assert (out[..., 0] == out[..., 2]).all()


def test_16_bit_tiff_scaled_by_bit_depth() -> None:
    values = np.array([[0, 65535]], dtype=np.uint16)
    out = decode_image(_encode(Image.fromarray(values), "TIFF"))
    assert out[0, :, 0].tolist() == [0, 255]


def test_float_image_is_clipped() -> None:
    values = np.array([[-5.0, 100.4, 300.0]], dtype=np.float32)
    out = decode_image(_encode(Image.fromarray(values, mode="F"), "TIFF"))
    assert out[0, :, 0].tolist() == [0, 100, 255]


def test_exif_orientation_is_applied() -> None:
    width, height = 40, 20
    array = np.zeros((height, width, 3), dtype=np.uint8)
    array[:8, :8] = (255, 0, 0)  # Red top-left corner when stored.
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6  # Display rotated 90 degrees clockwise.
    data = _encode(Image.fromarray(array, mode="RGB"), "JPEG", quality=95, exif=exif.tobytes())
    out = decode_image(data)
    assert out.shape == (width, height, 3)
    # A clockwise quarter turn moves the top-left corner to the top-right.
    np.testing.assert_allclose(out[2, height - 3].astype(int), [255, 0, 0], atol=40)
    np.testing.assert_allclose(out[2, 2].astype(int), [0, 0, 0], atol=40)


def test_one_by_one_image() -> None:
    out = decode_image(_encode(Image.new("RGB", (1, 1), (1, 2, 3)), "PNG"))
    assert out.tolist() == [[[1, 2, 3]]]


def test_first_frame_of_multi_frame_gif() -> None:
    frames = [Image.new("RGB", (3, 2), colour) for colour in [(255, 0, 0), (0, 0, 255)]]
    data = _encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    assert decode_image(data)[0, 0].tolist() == [255, 0, 0]


def test_truncated_jpeg_raises() -> None:
    assert not ImageFile.LOAD_TRUNCATED_IMAGES
    data = _encode(_gradient_rgb(64, 64), "JPEG")
    with pytest.raises(ImageDecodeError):
        decode_image(data[: len(data) // 2])


def test_garbage_bytes_raise() -> None:
    garbage = np.random.default_rng(0).integers(0, 256, size=512, dtype=np.uint8).tobytes()
    with pytest.raises(ImageDecodeError, match="not a recognised image"):
        decode_image(garbage)


def test_empty_bytes_raise() -> None:
    with pytest.raises(ImageDecodeError, match="empty"):
        decode_image(b"")


def test_none_raises() -> None:
    with pytest.raises(ImageDecodeError, match="None"):
        decode_image(None)  # type: ignore[arg-type]


def test_over_max_pixels_rejected_before_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    data = _encode(_gradient_rgb(20, 20), "PNG")

    def fail_load(self: Image.Image) -> None:
        raise AssertionError("pixel data was decoded before the size check")

    monkeypatch.setattr(ImageFile.ImageFile, "load", fail_load)
    with pytest.raises(ImageDecodeError, match="max-pixels") as info:
        decode_image(data, max_pixels=100)
    assert "20 x 20" in str(info.value) and "100" in str(info.value)


def test_at_max_pixels_is_accepted() -> None:
    assert decode_image(_encode(_gradient_rgb(10, 10), "PNG"), max_pixels=100).shape == (10, 10, 3)


@pytest.mark.parametrize("pil_limit", [50, 10], ids=["bomb-warning", "bomb-error"])
def test_pillow_bomb_limit_becomes_decode_error(monkeypatch: pytest.MonkeyPatch, pil_limit: int) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", pil_limit)
    with pytest.raises(ImageDecodeError, match="decompression-bomb") as info:
        decode_image(_encode(_gradient_rgb(10, 10), "PNG"))
    assert "image is 100 pixels" in str(info.value) and "max-pixels to accept" not in str(info.value)


def test_pillow_refusing_over_max_pixels_names_max_pixels_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pillow refuses at open, before our check: the message names ``--max-pixels``, one limit only."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 40)
    with pytest.raises(ImageDecodeError) as info:
        decode_image(_encode(_gradient_rgb(10, 10), "PNG"), max_pixels=50)
    expected = "image is 100 pixels, over the limit of 50 pixels; raise --max-pixels to accept it"
    assert str(info.value) == expected


@pytest.mark.parametrize("max_pixels", [0, -1, 1.5])
def test_bad_max_pixels_raises_value_error(max_pixels: object) -> None:
    with pytest.raises(ValueError, match="max_pixels"):
        decode_image(b"x", max_pixels=max_pixels)  # type: ignore[arg-type]


def test_resize_downscales_longest_side() -> None:
    image = np.zeros((100, 300, 3), dtype=np.uint8)
    out = resize_longest_side(image, 30)
    assert out.shape == (10, 30, 3) and out.dtype == np.uint8


def test_resize_keeps_thin_side_at_least_one() -> None:
    assert resize_longest_side(np.zeros((1, 500, 3), dtype=np.uint8), 10).shape == (1, 10, 3)


def test_resize_returns_same_object_when_small_enough() -> None:
    image = np.zeros((30, 20, 3), dtype=np.uint8)
    assert resize_longest_side(image, 30) is image


def test_resize_rejects_bad_max_side() -> None:
    with pytest.raises(ValueError, match="max_side"):
        resize_longest_side(np.zeros((2, 2, 3), dtype=np.uint8), 0)


def test_image_extensions_are_lower_case() -> None:
    assert all(ext == ext.lower() and ext.startswith(".") for ext in IMAGE_EXTENSIONS)
