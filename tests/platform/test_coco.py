"""Tests for hqlabel.platform.coco: COCO instances JSON -> images with XYXY boxes and category names."""

from __future__ import annotations

import copy
import json
import logging
import os
from pathlib import Path

import pytest

from hqlabel.platform.coco import CocoImage, coco_categories, read_coco


@pytest.fixture
def coco() -> dict:
    """3 images, 2 categories (ids out of order), crowd + plain boxes, a degenerate box, an empty image."""
    return {
        "images": [
            {"id": 7, "file_name": "b/img_7.jpg", "width": 640, "height": 480},
            {"id": 3, "file_name": "a/img_3.jpg", "width": 320, "height": 240},
            {"id": 5, "file_name": "img_5.jpg"},
        ],
        "annotations": [
            {"id": 101, "image_id": 3, "category_id": 2, "bbox": [10.5, 20.25, 30.0, 40.75], "iscrowd": 0},
            {"id": 102, "image_id": 7, "category_id": 1, "bbox": [0, 0, 5, 6], "iscrowd": 0},
            {"id": 103, "image_id": 3, "category_id": 1, "bbox": [1, 2, 3, 4], "iscrowd": 1},
            {"id": 104, "image_id": 3, "category_id": 1, "bbox": [100, 50, 12.5, 8]},
            {"id": 105, "image_id": 7, "category_id": 2, "bbox": [5, 5, 0, 10], "iscrowd": 0},
        ],
        "categories": [{"id": 2, "name": "dog"}, {"id": 1, "name": "cat"}],
    }


def test_images_in_json_order_with_xyxy_boxes_and_names(coco: dict) -> None:
    images, categories = read_coco(coco, "/data/images")
    assert categories == ["cat", "dog"]
    assert [im.image_id for im in images] == ["b/img_7.jpg", "a/img_3.jpg", "img_5.jpg"]
    assert [im.coco_id for im in images] == [7, 3, 5]
    assert images[1] == CocoImage(
        image_id="a/img_3.jpg",
        uri=os.path.join("/data/images", "a/img_3.jpg"),
        width=320,
        height=240,
        boxes=[[10.5, 20.25, 40.5, 61.0], [100.0, 50.0, 112.5, 58.0]],
        labels=["dog", "cat"],
        coco_id=3,
    )
    assert images[0].boxes == [[0.0, 0.0, 5.0, 6.0]] and images[0].labels == ["cat"]
    assert all(isinstance(v, float) for box in images[0].boxes for v in box)


def test_image_without_annotations_is_kept(coco: dict) -> None:
    images, _ = read_coco(coco, "/data")
    assert images[2].boxes == [] and images[2].labels == []
    assert images[2].width is None and images[2].height is None


def test_bytes_str_and_dict_inputs_agree(coco: dict) -> None:
    text = json.dumps(coco)
    expected = read_coco(coco, "/r")
    assert read_coco(text, "/r") == expected
    assert read_coco(text.encode(), "/r") == expected


def test_input_dict_not_mutated(coco: dict) -> None:
    before = copy.deepcopy(coco)
    read_coco(coco, "/r")
    assert coco == before


def test_missing_annotations_key_means_no_annotations(coco: dict) -> None:
    del coco["annotations"]
    images, categories = read_coco(coco, "/r")
    assert len(images) == 3 and all(im.boxes == [] and im.labels == [] for im in images)
    assert categories == ["cat", "dog"]


def test_degenerate_box_skipped_with_warning(coco: dict, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="hqlabel.platform.coco"):
        images, _ = read_coco(coco, "/r")
    assert images[0].labels == ["cat"]  # annotation 105 (w == 0) dropped
    assert "skipped 1 degenerate" in caplog.text


def test_crowd_excluded_by_default(coco: dict) -> None:
    images, _ = read_coco(coco, "/r")
    assert [1.0, 2.0, 4.0, 6.0] not in images[1].boxes


def test_crowd_included_with_flag(coco: dict) -> None:
    images, _ = read_coco(coco, "/r", include_crowd=True)
    assert images[1].boxes == [[10.5, 20.25, 40.5, 61.0], [1.0, 2.0, 4.0, 6.0], [100.0, 50.0, 112.5, 58.0]]
    assert images[1].labels == ["dog", "cat", "cat"]


def test_uri_local_root(coco: dict, tmp_path: Path) -> None:
    images, _ = read_coco(coco, str(tmp_path))
    assert images[0].uri == os.path.join(str(tmp_path), "b", "img_7.jpg")


def test_uri_local_root_does_not_resolve_symlinks(coco: dict, tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    images, _ = read_coco(coco, str(tmp_path / "link"))
    assert images[2].uri == os.path.join(str(tmp_path / "link"), "img_5.jpg")


@pytest.mark.parametrize("root", ["s3://bucket/data", "s3://bucket/data/"])
def test_uri_s3_root(coco: dict, root: str) -> None:
    images, _ = read_coco(coco, root)
    assert [im.uri for im in images] == [
        "s3://bucket/data/b/img_7.jpg",
        "s3://bucket/data/a/img_3.jpg",
        "s3://bucket/data/img_5.jpg",
    ]


@pytest.mark.parametrize(
    ("root", "uri"), [("file:///x/y", "file:///x/y/img_5.jpg"), ("file:///", "file:///img_5.jpg")]
)
def test_uri_file_root(coco: dict, root: str, uri: str) -> None:
    images, _ = read_coco(coco, root)
    assert images[2].uri == uri


def test_coco_categories_in_id_order(coco: dict) -> None:
    assert coco_categories(coco) == ["cat", "dog"]
    assert coco_categories(json.dumps(coco)) == ["cat", "dog"]


def test_error_not_json() -> None:
    with pytest.raises(ValueError, match="not valid JSON"):
        read_coco("instances_val.json", "/r")


def test_error_not_json_bytes() -> None:
    with pytest.raises(ValueError, match="not valid JSON"):
        read_coco(b"\xff\xfe{not json", "/r")


def test_error_json_not_an_object() -> None:
    with pytest.raises(ValueError, match="must be an object"):
        read_coco("[1, 2]", "/r")


def test_error_wrong_type() -> None:
    with pytest.raises(TypeError, match="bytes, str or dict"):
        read_coco(Path("instances.json"), "/r")  # type: ignore[arg-type]


def test_error_missing_images(coco: dict) -> None:
    del coco["images"]
    with pytest.raises(ValueError, match="no 'images' key"):
        read_coco(coco, "/r")


def test_error_missing_categories(coco: dict) -> None:
    del coco["categories"]
    with pytest.raises(ValueError, match="no 'categories' key"):
        read_coco(coco, "/r")


def test_error_unknown_image_id(coco: dict) -> None:
    coco["annotations"][1]["image_id"] = 99
    with pytest.raises(ValueError, match="annotation 102 refers to image_id 99"):
        read_coco(coco, "/r")


def test_error_unknown_category_id(coco: dict) -> None:
    coco["annotations"][3]["category_id"] = 42
    with pytest.raises(ValueError, match="annotation 104 refers to category_id 42"):
        read_coco(coco, "/r")


def test_error_duplicate_image_id(coco: dict) -> None:
    coco["images"][2]["id"] = 7
    with pytest.raises(ValueError, match="duplicate COCO image id 7"):
        read_coco(coco, "/r")


def test_error_image_without_file_name(coco: dict) -> None:
    del coco["images"][1]["file_name"]
    with pytest.raises(ValueError, match=r"image #1 \(id 3\) has no 'file_name'"):
        read_coco(coco, "/r")


@pytest.mark.parametrize("bbox", [[1, 2, 3], [1, 2, 3, 4, 5], [1, "2", 3, 4], None, [1, 2, float("nan"), 4]])
def test_error_bad_bbox(coco: dict, bbox: object) -> None:
    coco["annotations"][0]["bbox"] = bbox
    with pytest.raises(ValueError, match=r"annotation 101 has bbox .*expected 4 finite numbers"):
        read_coco(coco, "/r")


def test_error_duplicate_category_id(coco: dict) -> None:
    coco["categories"].append({"id": 2, "name": "bird"})
    with pytest.raises(ValueError, match="duplicate COCO category id 2"):
        read_coco(coco, "/r")


@pytest.mark.parametrize("include_crowd", [False, True])
def test_matches_pycocotools(coco: dict, tmp_path: Path, include_crowd: bool) -> None:
    pycoco = pytest.importorskip("pycocotools.coco")
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(coco))
    api = pycoco.COCO(str(path))
    images, _ = read_coco(path.read_bytes(), str(tmp_path), include_crowd=include_crowd)
    for image in images:
        anns = api.loadAnns(api.getAnnIds(imgIds=[image.coco_id]))
        kept = [a for a in anns if (include_crowd or not a.get("iscrowd")) and min(a["bbox"][2:]) > 0]
        expected = [[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in kept)]
        names = [api.loadCats(a["category_id"])[0]["name"] for a in kept]
        assert image.boxes == expected
        assert image.labels == names
