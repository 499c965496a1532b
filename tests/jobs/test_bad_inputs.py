"""Bad inputs through the real labeling job: one dataset holding every case, one run, one assertion per case.

Each case is a row of one Parquet shard (inline ``image`` bytes, or a ``uri`` to a file next to it); the job
runs once on the session's 2-CPU Ray and each test reads what became of its row. The whole bad-input set (45
kinds, 24 of them here) is listed in ``tests/platform/test_untrusted_inputs.py``'s docstring.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import encode, random_image
from PIL import Image

from hqlabel.jobs.label import run_label_job
from hqlabel.jobs.spec import LabelJobSpec
from hqlabel.platform.config import LabelerConfig
from hqlabel.platform.rle import decode_mask
from hqlabel.workers import Labeler
from tests.platform.test_untrusted_inputs import (
    SECRET,
    _chunk,
    animated,
    giant_header_png,
    inflating_chunk,
    png_with_chunks,
    sixteen_bit_tiff,
)

pytestmark = pytest.mark.timeout(240)

MAX_PIXELS = 2000  # every good case is smaller; the "too big" one is 100 x 100
MAX_BYTES = 32_768  # every other case is smaller (the "too big" one: 24 kB); the "too many bytes" ones 43 kB


def _save(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def _exif_rotated_jpeg() -> bytes:
    """A 56 wide x 32 high JPEG whose EXIF orientation 6 says: rotate 90 degrees clockwise to display."""
    image = Image.fromarray(random_image(7, (32, 56)))
    exif = image.getexif()
    exif[0x0112] = 6  # Orientation
    return _save(image, "JPEG", exif=exif.tobytes())


def _sixteen_bit_png() -> bytes:
    """36 x 44 greyscale, 16 bits per sample, values over the whole 0..65535 range."""
    grey = np.linspace(0, 65535, 36 * 44).reshape(36, 44).astype(np.uint16)
    return _save(Image.fromarray(grey), "PNG")


@dataclass(frozen=True)
class Result:
    """What the job made of one input row."""

    stage: str | None  # error stage; None when labeled
    error: str | None
    size: tuple[int, int] | None  # (height, width) in the images table
    mask_sizes: frozenset[tuple[int, int]]  # decoded sizes of its masks
    rows: int  # rows of the images table with this id


@dataclass(frozen=True)
class Run:
    input_ids: list[str]  # one per input row
    image_ids: list[str]  # the images table's ids, sorted
    results: dict[str, Result]  # by input id


@pytest.fixture(scope="module")
def run(ray_session, tmp_path_factory) -> Run:
    root = tmp_path_factory.mktemp("bad_inputs")
    dataset, files = root / "dataset", root / "dataset" / "files"
    files.mkdir(parents=True)
    (files / "png-named.jpg").write_bytes(encode(random_image(1, (36, 52)), "PNG"))
    (files / "zero-size.jpg").write_bytes(b"")
    outside = root / "outside"  # a Parquet shard reached through a symlinked folder: not part of the input
    outside.mkdir()
    linked = pa.table({"image_id": ["through-symlink"], "image": [encode(random_image(8, (20, 20)))]})
    pq.write_table(linked, outside / "linked.parquet")
    (dataset / "linked").symlink_to(outside)
    many_bytes = encode(np.random.default_rng(9).integers(0, 256, (120, 120, 3), np.uint8))  # noise: 43 kB
    (files / "many-bytes.png").write_bytes(many_bytes)
    cases: dict[str, tuple[bytes | None, str | None]] = {  # id -> (inline bytes, uri)
        "plain.png": (encode(random_image(0, (40, 48))), None),
        "truncated.jpg": (encode(random_image(2, (40, 48)), "JPEG")[:200], None),
        "png-named.jpg": (None, "files/png-named.jpg"),
        "cmyk.jpg": (_save(Image.fromarray(random_image(3, (40, 48))).convert("CMYK"), "JPEG"), None),
        "16bit.png": (_sixteen_bit_png(), None),
        "1x1.png": (encode(np.full((1, 1, 3), 200, np.uint8)), None),
        "3-high.png": (encode(np.random.default_rng(6).integers(0, 256, (3, 50, 3), np.uint8)), None),
        "too-big.png": (encode(random_image(5, (100, 100))), None),
        "missing.jpg": (None, "files/missing.jpg"),
        "null-bytes": (None, None),
        "zero-size.jpg": (None, "files/zero-size.jpg"),
        "exif-rotated.jpg": (_exif_rotated_jpeg(), None),
        "many-bytes-inline.png": (many_bytes, None),
        "many-bytes-file.png": (None, "files/many-bytes.png"),
        "animated.gif": (animated("GIF"), None),
        "animated.webp": (animated("WEBP"), None),
        "16bit.tif": (sixteen_bit_tiff(), None),
        "giant-header.png": (giant_header_png(), None),
        "ztxt-bomb.png": (png_with_chunks(inflating_chunk(b"zTXt")), None),
        "iccp-bomb.png": (png_with_chunks(inflating_chunk(b"iCCP")), None),
        "big-text.png": (png_with_chunks(_chunk(b"tEXt", b"note\x00" + b"B" * 20_000)), None),
        "secret.txt": (f"{SECRET}: not an image".encode(), None),
    }
    table = pa.table(
        {
            "image_id": list(cases),
            "image": pa.array([image for image, _ in cases.values()], pa.binary()),
            "uri": pa.array([uri for _, uri in cases.values()], pa.string()),
        }
    )
    pq.write_table(table, dataset / "cases.parquet")
    out = root / "labels"
    spec = LabelJobSpec(
        input=str(dataset),
        out=str(out),
        labeler=LabelerConfig(classes=["cat", "dog"], preset="tiny-random", box_threshold=0.3),
        max_pixels=MAX_PIXELS,
        max_bytes=MAX_BYTES,
        batch_size=4,
    )
    run_label_job(spec, progress=False)

    images = pq.read_table(out / "images").to_pylist()
    errors = {e["image_id"]: e["error"] for e in pq.read_table(out / "errors").to_pylist()}
    mask_sizes: dict[str, set[tuple[int, int]]] = {}
    for row in pq.read_table(out / "masks").to_pylist():
        mask_sizes.setdefault(row["image_id"], set()).add(decode_mask(row["mask"]).shape)
    results = {}
    for image_id in cases:
        rows = [r for r in images if r["image_id"] == image_id]
        row = rows[0] if rows else {"error_stage": "lost", "height": None, "width": None}
        size = None if row["height"] is None else (row["height"], row["width"])
        masks = frozenset(mask_sizes.get(image_id, ()))
        results[image_id] = Result(row["error_stage"], errors.get(image_id), size, masks, len(rows))
    return Run(sorted(cases), sorted(r["image_id"] for r in images), results)


@pytest.fixture(scope="module")
def results(run) -> dict[str, Result]:
    return run.results


def _labeled(size: tuple[int, int]) -> Result:
    """A row labeled at ``size`` (height, width) with every mask at that size."""
    return Result(None, None, size, frozenset({size}), 1)


def test_every_input_row_is_in_the_images_table_exactly_once(run):
    """... and no row of the Parquet file behind the symlinked folder ``linked/`` leading out of the input."""
    assert run.image_ids == run.input_ids


def test_plain_png_is_labeled(results):
    assert results["plain.png"] == _labeled((40, 48))


def test_truncated_jpeg_is_a_decode_error(results):
    assert (results["truncated.jpg"].stage, results["truncated.jpg"].rows) == ("decode", 1)


def test_png_bytes_with_a_jpg_name_are_labeled(results):
    assert results["png-named.jpg"] == _labeled((36, 52))


def test_cmyk_jpeg_is_labeled_at_its_size(results):
    assert results["cmyk.jpg"] == _labeled((40, 48))


def test_sixteen_bit_png_is_labeled(results):
    assert results["16bit.png"] == _labeled((36, 44))


def test_one_pixel_image_is_labeled(results):
    assert results["1x1.png"] == _labeled((1, 1))


def test_three_pixel_high_image_is_labeled(results):
    assert results["3-high.png"] == _labeled((3, 50))


def test_image_over_max_pixels_is_a_decode_error_naming_the_option(results):
    result = results["too-big.png"]
    assert result.stage == "decode" and "--max-pixels" in result.error and "10000 pixels" in result.error


@pytest.mark.parametrize("image_id", ["many-bytes-inline.png", "many-bytes-file.png"])
def test_image_over_max_bytes_is_a_read_error_naming_the_option(results, image_id):
    """Over --max-bytes (and over --max-pixels too: the byte cap comes first, before any decoding)."""
    result = results[image_id]
    assert (result.stage, result.rows) == ("read", 1)
    assert "--max-bytes" in result.error and f"over the cap of {MAX_BYTES} bytes" in result.error


def test_missing_file_is_a_read_error_naming_it(results):
    result = results["missing.jpg"]
    assert result.stage == "read" and "files/missing.jpg" in result.error


def test_row_without_bytes_or_uri_is_a_read_error(results):
    assert results["null-bytes"].stage == "read"


def test_zero_size_file_is_a_decode_error(results):
    result = results["zero-size.jpg"]
    assert result.stage == "decode" and "0 bytes" in result.error


def test_exif_rotated_jpeg_is_labeled_upright(results):
    assert results["exif-rotated.jpg"] == _labeled((56, 32))  # stored 32 high x 56 wide, orientation 6


@pytest.mark.parametrize("image_id", ["animated.gif", "animated.webp"])
def test_animated_image_is_labeled_from_its_first_frame(results, image_id):
    assert results[image_id] == _labeled((20, 30))


def test_sixteen_bit_tiff_is_labeled(results):
    assert results["16bit.tif"] == _labeled((20, 30))


def test_giant_declared_size_is_a_decode_error_naming_max_pixels(results):
    result = results["giant-header.png"]
    assert (result.stage, result.rows, "--max-pixels" in result.error) == ("decode", 1, True)


@pytest.mark.parametrize("image_id", ["ztxt-bomb.png", "iccp-bomb.png"])
def test_png_chunk_bomb_is_a_decode_error(results, image_id):
    result = results[image_id]
    assert (result.stage, "MAX_TEXT_CHUNK" in result.error) == ("decode", True)


def test_png_with_a_large_plain_text_chunk_is_labeled(results):
    assert results["big-text.png"] == _labeled((8, 8))


def test_non_image_is_a_decode_error_quoting_none_of_it(results):
    result = results["secret.txt"]
    assert (result.stage, "TOP" in result.error, "bytes" in result.error) == ("decode", False, True)


def test_no_error_row_quotes_file_contents(results):
    assert not any(r.error and SECRET[:8] in r.error for r in results.values())


@pytest.fixture(scope="module")
def labeler() -> Labeler:
    return Labeler.from_config(LabelerConfig(classes=["cat"], preset="tiny-random", device="cpu"))


@pytest.mark.parametrize("size", [(1, 1), (1, 40), (3, 50), (40, 3)])
def test_thin_images_reach_the_models_upright(labeler, size):
    """An H x W x 3 array with H 1 or 3 must not be taken for channels-first by the models' processors (a
    1-high image failed, a 3-high one was scrambled)."""
    image = np.random.default_rng(0).integers(0, 256, (*size, 3), np.uint8)
    embedded, detected = labeler.segmenter.embed([image]), labeler.detector.detect([image], ["cat"])
    assert (embedded.original_sizes, len(detected)) == ([size], 1)


def test_missing_and_repeated_ids_keep_every_row(ray_session, tmp_path):
    """Rows are accounted by position, not id: a shard with missing or repeated ids still completes."""
    ids = [None, "dup.png", None, "dup.png", "ok.png"]
    images = [encode(random_image(20 + k, (30, 40))) for k in range(len(ids))]
    pq.write_table(
        pa.table({"image_id": pa.array(ids, pa.string()), "image": images}), tmp_path / "ids.parquet"
    )
    out = tmp_path / "labels"
    spec = LabelJobSpec(
        input=str(tmp_path / "ids.parquet"),
        out=str(out),
        labeler=LabelerConfig(classes=["cat"], preset="tiny-random", box_threshold=0.3),
        batch_size=2,
    )
    summary = run_label_job(spec, progress=False)
    table = pq.read_table(out / "images")
    errors = pq.read_table(out / "errors").to_pylist()
    assert (summary.images, table.num_rows) == (5, 5)
    assert sorted(table["image_id"].to_pylist()) == ["", "", "dup.png", "dup.png", "ok.png"]
    assert [(e["stage"], "image id" in e["error"]) for e in errors] == [("read", True), ("read", True)]
