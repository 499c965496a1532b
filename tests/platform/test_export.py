"""Exports of a labels folder built by hand with the real writer helpers: known shapes in, exact masks out."""

from __future__ import annotations

import csv
import json
import logging
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image, ImageDraw

from hqlabel.platform import storage
from hqlabel.platform.export import (
    _label_file_name,
    _stem_path,
    export_labels,
    mask_polygons,
)
from hqlabel.platform.rle import encode_masks, rle_to_bbox
from hqlabel.platform.schema import ERRORS_SCHEMA, IMAGES_SCHEMA, MASKS_SCHEMA
from tests.platform.test_rle import huge_rle

CLASSES = ["square", "circle", "ring", "blob"]


def disc(shape: tuple[int, int], center: tuple[float, float], radius: float) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - center[0]) ** 2 + (xx - center[1]) ** 2 <= radius**2


def rect(shape: tuple[int, int], y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    mask = np.zeros(shape, bool)
    mask[y0:y1, x0:x1] = True
    return mask


def source_images() -> dict[str, dict]:
    """image_id -> {"shard", "size", "instances": [(label, mask)], "error_stage"}: the shapes under test."""
    ring = disc((60, 64), (30, 32), 14) & ~disc((60, 64), (30, 32), 6)
    two_parts = rect((60, 64), 2, 12, 2, 14) | rect((60, 64), 46, 58, 48, 62)
    speck = rect((32, 48), 20, 30, 2, 14)
    speck[2, 30] = True  # a one-pixel part: below min_part_area, dropped from yolo-seg
    return {
        "a/rects.png": {
            "shard": "a",
            "size": (40, 50),
            "instances": [("square", rect((40, 50), 5, 15, 8, 20)), ("circle", disc((40, 50), (28, 30), 8))],
        },
        "b.jpg": {"shard": "a", "size": (60, 64), "instances": [("ring", ring), ("blob", two_parts)]},
        "empty.png": {"shard": "a", "size": (30, 30), "instances": []},
        "c/d.png": {
            "shard": "b",
            "size": (32, 48),
            "instances": [("square", rect((32, 48), 0, 10, 38, 48)), ("blob", speck)],
        },
        "failed.png": {"shard": "b", "size": None, "instances": [], "error_stage": "decode"},
    }


def write_labels_folder(out: str, classes: list[str] = CLASSES, options=storage.StorageOptions()) -> dict:
    """Write ``source_images()`` as a labeling job's output folder (2 shards) at ``out``; return them."""
    images = source_images()
    for shard in ("a", "b"):
        mask_rows, image_rows, error_rows = [], [], []
        for image_id in sorted(k for k, v in images.items() if v["shard"] == shard):
            item = images[image_id]
            if item.get("error_stage"):
                image_rows.append(
                    {
                        "image_id": image_id,
                        "height": None,
                        "width": None,
                        "num_instances": 0,
                        "error_stage": "decode",
                    }
                )
                error_rows.append(
                    {"image_id": image_id, "stage": "decode", "error": "not an image", "retryable": False}
                )
                continue
            h, w = item["size"]
            image_rows.append(
                {"image_id": image_id, "height": h, "width": w, "num_instances": len(item["instances"])}
            )
            masks = (
                np.stack([m for _, m in item["instances"]])
                if item["instances"]
                else np.zeros((0, h, w), bool)
            )
            for k, ((label, mask), rle) in enumerate(
                zip(item["instances"], encode_masks(masks), strict=True)
            ):
                mask_rows.append(
                    {
                        "image_id": image_id,
                        "instance_id": k,
                        "label": label,
                        "score": 0.9 - 0.1 * k,
                        "box": list(rle_to_bbox(rle)),
                        "mask": rle,
                        "area": int(mask.sum()),
                        "pred_iou": 0.8,
                    }
                )
        tables = {
            "masks": pa.Table.from_pylist(mask_rows, schema=MASKS_SCHEMA),
            "images": pa.Table.from_pylist(image_rows, schema=IMAGES_SCHEMA),
            "errors": pa.Table.from_pylist(error_rows, schema=ERRORS_SCHEMA),
        }
        for name, table in tables.items():
            storage.write_parquet(table, storage.join(out, name, f"part-{shard}.parquet"), options)
    job = {"job": "label", "spec": {"labeler": {"classes": classes}}, "summary": {"images": len(images)}}
    storage.write_bytes(storage.join(out, "job.json"), json.dumps(job).encode(), options)
    return images


@pytest.fixture
def labels(tmp_path: Path) -> tuple[Path, dict]:
    out = tmp_path / "labels"
    return out, write_labels_folder(str(out))


def test_coco_loads_in_pycocotools_and_reproduces_every_mask(labels, tmp_path):
    from pycocotools.coco import COCO

    folder, source = labels
    out = tmp_path / "coco" / "instances.json"
    summary = export_labels(str(folder), str(out), "coco")
    assert (summary.images, summary.instances, summary.skipped_images) == (4, 6, 1)

    coco = COCO(str(out))
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == CLASSES
    labeled = sorted(k for k, v in source.items() if v["size"])
    images = coco.loadImgs(coco.getImgIds())
    assert [(i["id"], i["file_name"]) for i in images] == list(enumerate(labeled, start=1))
    for image in images:
        assert (image["height"], image["width"]) == source[image["file_name"]]["size"]

    names = {c["id"]: c["name"] for c in coco.dataset["categories"]}
    found = 0
    for image in images:
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[image["id"]]))
        expected = source[image["file_name"]]["instances"]
        assert len(anns) == len(expected)
        for ann, (label, mask) in zip(anns, expected, strict=True):
            assert np.array_equal(coco.annToMask(ann).astype(bool), mask)
            assert names[ann["category_id"]] == label
            assert ann["area"] == int(mask.sum())
            ys, xs = np.nonzero(mask)
            assert ann["bbox"] == [xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()]
            assert ann["iscrowd"] == 0
            assert isinstance(ann["segmentation"]["counts"], str)
            assert ann["score"] in (0.9, 0.8)  # float32 written as its shortest decimal
            found += 1
    assert found == 6
    assert sorted(a["id"] for a in coco.dataset["annotations"]) == list(range(1, 7))


def test_coco_categories_of_a_boxes_job_are_the_distinct_labels_sorted(tmp_path):
    write_labels_folder(str(tmp_path / "labels"), classes=[])
    out = tmp_path / "instances.json"
    export_labels(str(tmp_path / "labels"), str(out), "coco")
    doc = json.loads(out.read_text())
    assert [c["name"] for c in doc["categories"]] == sorted(CLASSES)
    assert [c["id"] for c in doc["categories"]] == [1, 2, 3, 4]


def rasterise(line: str, size: tuple[int, int]) -> tuple[int, np.ndarray]:
    """One YOLO-seg line back to (class index, H x W bool) with PIL's polygon fill."""
    values = line.split()
    coords = np.array(values[1:], float).reshape(-1, 2) * [size[1], size[0]]
    canvas = Image.new("L", (size[1], size[0]), 0)
    ImageDraw.Draw(canvas).polygon([tuple(p) for p in coords], fill=1, outline=1)
    return int(values[0]), np.asarray(canvas, bool)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return (a & b).sum() / (a | b).sum()


def test_yolo_seg_polygons_rasterise_back_to_the_masks(labels, tmp_path):
    folder, source = labels
    out = tmp_path / "yolo"
    summary = export_labels(str(folder), str(out), "yolo-seg")
    assert (summary.images, summary.instances, summary.dropped_parts) == (4, 6, 1)

    files = sorted(str(p.relative_to(out / "labels")) for p in (out / "labels").rglob("*.txt"))
    assert files == ["a/rects.txt", "b.txt", "c/d.txt", "empty.txt"]  # failed.png: no label file
    assert (out / "labels" / "empty.txt").read_text() == ""

    lines_per_class = {}
    for image_id, item in source.items():
        if not item["size"]:
            continue
        lines = (out / "labels" / f"{_stem_path(image_id)}.txt").read_text().splitlines()
        drawn: dict[int, np.ndarray] = {}
        for line in lines:
            index, mask = rasterise(line, item["size"])
            drawn[index] = drawn.get(index, np.zeros(item["size"], bool)) | mask
            lines_per_class[(image_id, CLASSES[index])] = (
                lines_per_class.get((image_id, CLASSES[index]), 0) + 1
            )
        for label, mask in item["instances"]:
            if label == "ring":  # holes cannot be written: the ring comes back as its filled outer outline
                mask = disc(item["size"], (30, 32), 14)
            assert iou(drawn[CLASSES.index(label)], mask) > 0.9, (image_id, label)
            if label == "square":
                assert np.array_equal(drawn[CLASSES.index(label)], mask)  # axis-aligned: exact
    assert lines_per_class[("b.jpg", "ring")] == 1  # outer contour only
    assert lines_per_class[("b.jpg", "blob")] == 2  # one line per part
    assert lines_per_class[("c/d.png", "blob")] == 1  # the one-pixel speck is dropped

    text = (out / "data.yaml").read_text()
    assert "path:" in text and "train:" in text and "holes" in text
    yaml = pytest.importorskip("yaml")
    data = yaml.safe_load(text)
    assert data["names"] == CLASSES
    assert data["nc"] == 4


def test_masks_png_files_equal_the_masks(labels, tmp_path):
    folder, source = labels
    out = tmp_path / "png"
    summary = export_labels(str(folder), str(out), "masks-png")
    assert (summary.images, summary.instances) == (4, 6)
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*.png"))
    expected = []
    for image_id, item in source.items():
        for k, (label, mask) in enumerate(item["instances"]):
            path = out / _stem_path(image_id) / f"{k}_{label}.png"
            expected.append(str(path.relative_to(out)))
            png = np.asarray(Image.open(path))
            assert png.dtype == np.uint8 and set(np.unique(png)) <= {0, 255}
            assert np.array_equal(png == 255, mask)
    assert written == sorted(expected)


def test_mask_polygons_outer_contours_only():
    ring = disc((40, 40), (20, 20), 12) & ~disc((40, 40), (20, 20), 5)
    polygons, dropped = mask_polygons(ring)
    assert len(polygons) == 1 and dropped == 0
    assert polygons[0].shape[1] == 2 and len(polygons[0]) >= 3
    # every part below min_part_area: the largest stays, so no instance disappears
    specks = rect((20, 20), 2, 4, 2, 4) | rect((20, 20), 10, 13, 10, 13)
    polygons, dropped = mask_polygons(specks, min_part_area=100)
    assert len(polygons) == 1 and dropped == 1
    assert polygons[0][:, 0].min() == 10


def test_file_names_are_the_images_own_where_they_can_be():
    assert _stem_path("sub/img_1.jpg") == "sub/img_1"
    assert _stem_path("sub/my phöto 猫 1.png") == "sub/my phöto 猫 1"  # YOLO pairs by this stem
    assert _stem_path("../../etc/passwd") == "_/_/etc/passwd"
    assert _stem_path("/abs//x.tar.png") == "abs/x.tar"
    assert _stem_path("noext") == "noext"
    assert _stem_path("a\x00b\nc.png") == "a_b_c"
    long = _stem_path("é" * 200 + ".png")  # 400 bytes: cut to a prefix and a hash of the whole
    assert len(long.encode()) <= 255 and long.startswith("é" * 100) and long != _stem_path("é" * 201 + ".png")
    assert _label_file_name("traffic light/sign") == "traffic_light_sign"
    assert _label_file_name("..") == "label"


def test_repeated_image_ids_are_left_out(tmp_path):
    out = tmp_path / "labels"
    write_labels_folder(str(out))
    # a third shard repeats "b.jpg" (the input listed it twice): its masks cannot be told apart, so it goes
    rows = [{"image_id": "b.jpg", "height": 60, "width": 64, "num_instances": 0}]
    storage.write_parquet(
        pa.Table.from_pylist(rows, schema=IMAGES_SCHEMA), str(out / "images" / "part-c.parquet")
    )
    summary = export_labels(str(out), str(tmp_path / "i.json"), "coco")
    assert (summary.images, summary.instances, summary.repeated_images) == (3, 4, 2)  # both rows named b.jpg
    doc = json.loads((tmp_path / "i.json").read_text())
    assert "b.jpg" not in [i["file_name"] for i in doc["images"]]


def test_not_a_labels_folder(tmp_path):
    (tmp_path / "photos").mkdir()
    with pytest.raises(FileNotFoundError, match="not a labels folder"):
        export_labels(str(tmp_path / "photos"), str(tmp_path / "x.json"), "coco")
    with pytest.raises(ValueError, match="unknown export format"):
        export_labels(str(tmp_path / "photos"), str(tmp_path / "x"), "voc")


def add_shard_with_mask(out: Path, rle: dict, size: tuple[int, int]) -> None:
    """A third shard: one labeled image ``c/huge.png`` of ``size`` with one mask of RLE ``rle``."""
    mask_row = {"image_id": "c/huge.png", "instance_id": 0, "label": "blob", "score": 0.9,
                "box": [0.0, 0.0, 1.0, 1.0], "mask": rle, "area": 0, "pred_iou": 0.8}  # fmt: skip
    image_row = {"image_id": "c/huge.png", "height": size[0], "width": size[1], "num_instances": 1}
    storage.write_parquet(
        pa.Table.from_pylist([mask_row], schema=MASKS_SCHEMA), str(out / "masks" / "part-c.parquet")
    )
    storage.write_parquet(
        pa.Table.from_pylist([image_row], schema=IMAGES_SCHEMA), str(out / "images" / "part-c.parquet")
    )


@pytest.mark.parametrize("fmt", ["masks-png", "yolo-seg"])
def test_a_mask_declaring_a_huge_size_is_refused_not_decoded(tmp_path, fmt):
    """A few bytes of RLE declaring 50000 x 50000 pixels (5 GB to decode) in an untrusted labels folder."""
    if fmt == "yolo-seg":
        pytest.importorskip("cv2")
    out = tmp_path / "labels"
    write_labels_folder(str(out))
    add_shard_with_mask(out, huge_rle(50_000, 50_000), (50_000, 50_000))
    with pytest.raises(
        ValueError, match=r"image 'c/huge\.png': .* declares 2500000000 pixels, over the cap of 100000000"
    ):
        export_labels(str(out), str(tmp_path / "x"), fmt)
    summary = export_labels(str(out), str(tmp_path / "x.json"), "coco")  # copies RLE: decodes nothing
    assert summary.instances == 7


def test_the_mask_cap_is_the_labeling_job_max_pixels(tmp_path):
    out = tmp_path / "labels"
    write_labels_folder(str(out))
    job = json.loads((out / "job.json").read_text())
    job["spec"]["max_pixels"] = 60 * 64 - 1  # one pixel less than b.jpg, the largest image
    (out / "job.json").write_text(json.dumps(job))
    with pytest.raises(
        ValueError, match=rf"instance 0 of image 'b\.jpg': .* over the cap of {60 * 64 - 1} pixels"
    ):
        export_labels(str(out), str(tmp_path / "x"), "masks-png")
    job["spec"]["max_pixels"] = 60 * 64
    (out / "job.json").write_text(json.dumps(job))
    assert export_labels(str(out), str(tmp_path / "y"), "masks-png").instances == 6


@pytest.mark.parametrize("fmt", ["yolo-seg", "masks-png"])
def test_non_ascii_and_spaced_names_are_kept_and_mapped(tmp_path, monkeypatch, caplog, fmt):
    if fmt == "yolo-seg":
        pytest.importorskip("cv2")
    name = "my phöto 猫 1.png"
    images = {
        name: {"shard": "a", "size": (20, 24), "instances": [("square", rect((20, 24), 2, 10, 3, 12))]},
        "sub/ok.png": {"shard": "b", "size": (20, 24), "instances": []},
        "bad\x01name.png": {"shard": "b", "size": (20, 24), "instances": []},
    }
    monkeypatch.setattr(sys.modules[__name__], "source_images", lambda: images)
    write_labels_folder(str(tmp_path / "labels"))
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING):
        export_labels(str(tmp_path / "labels"), str(out), fmt)
    with open(out / "image_files.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    if fmt == "yolo-seg":
        assert (out / "labels" / "my phöto 猫 1.txt").read_text().startswith("0 ")
        paths = ["labels/bad_name.txt", "labels/my phöto 猫 1.txt", "labels/sub/ok.txt"]
    else:
        assert (out / "my phöto 猫 1" / "0_square.png").is_file()
        paths = ["bad_name", "my phöto 猫 1", "sub/ok"]
    assert rows == [
        ["image_id", "path"],
        *map(list, zip(["bad\x01name.png", name, "sub/ok.png"], paths, strict=True)),
    ]
    assert all((out / p).exists() for p in paths if fmt == "yolo-seg" or p.endswith("1"))
    assert "1 image id(s) cannot be used as file names" in caplog.text  # only the control character
