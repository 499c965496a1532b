"""COCO export of a hand-built labels folder: pycocotools reads it back to the exact masks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from hqlabel.formats import export_labels
from hqlabel.platform import storage
from hqlabel.platform.schema import IMAGES_SCHEMA
from tests.formats.labels_folder import CLASSES, write_labels_folder


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
