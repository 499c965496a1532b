"""Bad and hostile inputs below the Ray level: image bytes (``decode_image``), listings (``storage.walk``,
``list_input``), JSON documents, RLE read back, class lists. One assertion per kind.

The bad-input set: 45 distinct kinds, each asserted at least once, here (H), through one labeling job that
holds many of them as rows (J: ``tests/jobs/test_bad_inputs.py``), or in the reference tests (R:
``tests/platform/test_references.py``, most also through a job in ``tests/jobs/test_untrusted_references.py``;
RLE: ``tests/platform/test_rle.py``).

- image bytes (22): truncated JPEG (J), truncated PNG (H), PNG bytes named .jpg (J), CMYK JPEG (J), 16-bit
  PNG (J), 16-bit TIFF (H, J), 1 x 1 (J), 3 pixels high (J), EXIF rotation (J), animated GIF and animated
  WebP: first frame (H, J), over ``--max-pixels`` (J), a giant declared size, 100,000 x 100,000 in a 60-byte
  header (J), PNG zTXt and iCCP chunks inflating past Pillow's limit (H, J), a large plain tEXt chunk (J),
  bytes that are no image, holding a secret the error must not quote (H, J), inline bytes and a file over
  ``--max-bytes`` (J), a zero-byte file (J), a missing file (J), a row without bytes or uri (J);
- tables (4): null ids, duplicate ids (J), a corrupt Parquet footer, wrong column types (H);
- references and listings (12): a symlinked folder leading out of a folder input (H, J), a symlinked file
  leading out of it (H), a relative ``..`` climbing out, a COCO ``file_name`` climbing out, an absolute path
  outside, a ``file://`` URI outside, a prefix lookalike, another bucket, another prefix of the bucket, ``..``
  above the bucket, another scheme, a ``uri`` through a symlink leading out (R);
- documents and labels (7): a COCO JSON input, a ground-truth COCO JSON and a decisions file over
  ``--max-json-bytes`` (H), an RLE declaring more than ``--max-pixels`` (RLE), an RLE with more runs than its
  size allows (H), unicode class names, an empty class list (H).
"""

from __future__ import annotations

import io
import json
import logging
import struct
import zlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import encode, random_image
from PIL import Image

from hqlabel.jobs.cli import main
from hqlabel.jobs.curate import read_decisions
from hqlabel.platform import storage
from hqlabel.platform.config import LabelerConfig, parse_classes
from hqlabel.platform.groundtruth import read_coco_instances
from hqlabel.platform.images import ImageDecodeError, decode_image
from hqlabel.platform.readers import list_input
from hqlabel.platform.rle import decode_mask
from hqlabel.platform.storage import TooLargeError

SECRET = "TOP-SECRET-CONTENT"


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_with_chunks(*chunks: bytes, width: int = 8, height: int = 8) -> bytes:
    """A grey ``height`` x ``width`` RGB PNG with ``chunks`` (from ``_chunk``) between its header and data."""
    raw = b"".join(b"\x00" + b"\x80" * (width * 3) for _ in range(height))
    header = _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    return (
        b"\x89PNG\r\n\x1a\n"
        + header
        + b"".join(chunks)
        + _chunk(b"IDAT", zlib.compress(raw))
        + _chunk(b"IEND", b"")
    )


def inflating_chunk(kind: bytes) -> bytes:
    """A zTXt or iCCP chunk of ~2 kB that inflates to 2 MB, over Pillow's 1 MB ``MAX_TEXT_CHUNK``."""
    return _chunk(kind, b"name\x00\x00" + zlib.compress(b"A" * (2 << 20)))


def giant_header_png(side: int = 100_000) -> bytes:
    """A 60-byte PNG whose header declares ``side`` x ``side`` pixels (no pixel data)."""
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0))
        + _chunk(b"IEND", b"")
    )


def animated(fmt: str) -> bytes:
    """Five 20 x 30 frames of grey levels 0, 40, ..., 160 as an animated GIF or WebP."""
    frames = [Image.fromarray(np.full((20, 30, 3), 40 * k, np.uint8)) for k in range(5)]
    buf = io.BytesIO()
    frames[0].save(buf, format=fmt, save_all=True, append_images=frames[1:], lossless=True)
    return buf.getvalue()


def sixteen_bit_tiff() -> bytes:
    """20 x 30 greyscale TIFF, 16 bits per sample, from 0 to 65535."""
    buf = io.BytesIO()
    Image.fromarray(np.linspace(0, 65535, 600).reshape(20, 30).astype(np.uint16)).save(buf, format="TIFF")
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["GIF", "WEBP"])
def test_animated_image_decodes_its_first_frame(fmt):
    image = decode_image(animated(fmt))
    assert (image.shape, int(image.max())) == ((20, 30, 3), 0)  # frame 0 is black; the others are not


def test_sixteen_bit_tiff_is_scaled_by_its_bit_depth():
    image = decode_image(sixteen_bit_tiff())
    assert (image.shape, int(image[0, 0, 0]), int(image[-1, -1, 0])) == ((20, 30, 3), 0, 255)


@pytest.mark.parametrize("kind", [b"zTXt", b"iCCP"])
def test_png_chunk_inflating_past_the_text_limit_is_refused(kind):
    with pytest.raises(ImageDecodeError, match="MAX_TEXT_CHUNK"):
        decode_image(png_with_chunks(inflating_chunk(kind)))


@pytest.mark.parametrize(
    "data",
    [f"{SECRET} is not an image".encode(), encode(random_image(0, (40, 48)))[:60] + SECRET.encode()],
    ids=["text", "truncated-png"],
)
def test_decode_errors_quote_no_file_contents(data):
    with pytest.raises(ImageDecodeError) as error:
        decode_image(data)
    assert SECRET[:4] not in str(error.value) and "TOP" not in str(error.value)


@pytest.fixture
def folder_with_links(tmp_path):
    """``dataset/`` with ``in.png``, a symlinked folder ``linked/`` and a symlinked file ``link.png`` leading
    to ``outside/``, and ``inner/`` linking back inside."""
    dataset, outside = tmp_path / "dataset", tmp_path / "outside"
    dataset.mkdir()
    outside.mkdir()
    image = encode(random_image(0, (20, 20)))
    (dataset / "in.png").write_bytes(image)
    (outside / "secret.png").write_bytes(image)
    (dataset / "linked").symlink_to(outside)
    (dataset / "link.png").symlink_to(outside / "secret.png")
    (dataset / "real").mkdir()
    (dataset / "real" / "r.png").write_bytes(image)
    (dataset / "inner").symlink_to(dataset / "real")
    return dataset, outside


def test_symlinks_leading_out_of_a_folder_are_skipped_at_listing_with_a_warning(folder_with_links, caplog):
    dataset, _ = folder_with_links
    with caplog.at_level(logging.WARNING, logger="hqlabel.platform.storage"):
        listed = [e.uri[len(str(dataset)) + 1 :] for e in storage.walk(str(dataset), (".png",))]
    warned = sorted(str(r.args[0]).rsplit("/", 1)[1] for r in caplog.records)
    assert (listed, warned) == (["in.png", "inner/r.png"], ["link.png", "linked"])  # real/ once, as inner/


def test_symlinks_leading_under_an_allowed_prefix_are_listed(folder_with_links):
    dataset, outside = folder_with_links
    listed = [
        e.uri[len(str(dataset)) + 1 :] for e in storage.walk(str(dataset), (".png",), allow=(str(outside),))
    ]
    assert listed == ["in.png", "inner/r.png", "link.png", "linked/secret.png"]


@pytest.mark.parametrize("damage", ["magic", "metadata"])
def test_parquet_with_a_corrupt_footer_is_refused_before_the_job(tmp_path, damage):
    good = io.BytesIO()
    pq.write_table(pa.table({"image_id": ["a"], "image": [b"x"]}), good)
    data = good.getvalue()
    length = struct.unpack("<I", data[-8:-4])[0]  # the footer: metadata, its length, "PAR1"
    if damage == "magic":
        data = data[:-4] + b"\0\0\0\0"
    else:
        data = data[: -8 - length] + b"\xff" * length + data[-8:]
    (tmp_path / "data.parquet").write_bytes(data)
    with pytest.raises(
        ValueError, match=r"data.parquet is not a readable Parquet file .*corrupt or truncated"
    ):
        list_input(str(tmp_path), listing=str(tmp_path / "listing"))


@pytest.mark.parametrize(
    "column, values, expected",
    [
        (
            "image_id",
            pa.array([1.5]),
            "column 'image_id' \\(--id-column\\) is double, expected strings or integers",
        ),
        ("image", pa.array(["not bytes"]), "column 'image' \\(--image-column\\) is string, expected binary"),
        ("boxes", pa.array(["0,0,1,1"]), "column 'boxes' \\(--boxes-column\\) is string, expected a list of"),
    ],
    ids=["float-ids", "string-image", "string-boxes"],
)
def test_parquet_columns_of_the_wrong_type_are_refused_naming_the_column(tmp_path, column, values, expected):
    columns = {"image_id": pa.array(["a"]), "image": pa.array([b"x"]), column: values}
    pq.write_table(pa.table(columns), tmp_path / "data.parquet")
    with pytest.raises(ValueError, match=expected):
        list_input(str(tmp_path), listing=str(tmp_path / "listing"))


def test_parquet_columns_of_equivalent_types_are_accepted(tmp_path):
    """Dictionary-encoded ids (a pandas categorical) and large binary images read like strings and binary."""
    ids = pa.array(["a", "b"]).dictionary_encode()
    pq.write_table(
        pa.table({"image_id": ids, "image": pa.array([b"x", b"y"], pa.large_binary())}),
        tmp_path / "d.parquet",
    )
    assert list_input(str(tmp_path), listing=str(tmp_path / "listing")).num_images == 2


def _coco(tmp_path) -> str:
    doc = {
        "images": [{"id": 1, "file_name": "a.png", "height": 8, "width": 8}],
        "annotations": [],
        "categories": [],
    }
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(doc))
    return str(path)


def test_coco_input_over_the_json_cap_is_refused_naming_the_option(tmp_path):
    with pytest.raises(TooLargeError, match="over the cap of 100 bytes; raise --max-json-bytes"):
        list_input(_coco(tmp_path), listing=str(tmp_path / "listing"), max_json_bytes=100)


def test_label_cli_refuses_a_coco_input_over_the_json_cap_in_one_line(tmp_path, capsys):
    args = [
        "label",
        _coco(tmp_path),
        "--classes",
        "cat",
        "--preset",
        "tiny-random",
        "--out",
        str(tmp_path / "o"),
    ]
    assert main([*args, "--max-json-bytes", "100"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("hqlabel: error:")]
    assert len(errors) == 1 and "raise --max-json-bytes" in errors[0]


def test_ground_truth_json_over_the_cap_is_refused_naming_the_option(tmp_path):
    with pytest.raises(TooLargeError, match="raise --max-json-bytes"):
        next(read_coco_instances(_coco(tmp_path), max_json_bytes=100))


def test_decisions_file_over_the_cap_is_refused_naming_the_option(tmp_path):
    path = tmp_path / "review.jsonl"
    path.write_text(
        "".join(
            json.dumps({"image_id": f"{k}", "instance_id": 0, "decision": "accept"}) + "\n" for k in range(20)
        )
    )
    with pytest.raises(TooLargeError, match="raise --max-json-bytes"):
        read_decisions(str(path), max_bytes=100)


def test_rle_with_more_runs_than_its_size_allows_is_refused_before_converting():
    with pytest.raises(ValueError, match="holds 1000000 runs, more than a 2 x 2 mask can have"):
        decode_mask({"size": [2, 2], "counts": [1] * 1_000_000})


def test_unicode_class_names_are_kept_and_label_the_masks():
    """Names outside ASCII keep their spelling; each maps to detector tokens, and masks carry them."""
    from hqlabel.workers import Labeler

    classes = parse_classes("猫, café, İstanbul, Straße")
    config = LabelerConfig(classes=classes, preset="tiny-random", device="cpu", box_threshold=0.0)
    labels = {i["label"] for i in Labeler.from_config(config).label([random_image(0, (40, 48))])[0]}
    assert classes == ["猫", "café", "İstanbul", "Straße"] and labels and labels <= set(classes)


def test_empty_class_list_is_a_one_line_error_naming_the_option(tmp_path, capsys):
    (tmp_path / "a.png").write_bytes(encode(random_image(0, (20, 20))))
    assert (
        main(
            [
                "label",
                str(tmp_path),
                "--classes",
                " , ,",
                "--preset",
                "tiny-random",
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("hqlabel: error:")]
    assert len(errors) == 1 and "--classes" in errors[0]
