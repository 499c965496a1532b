"""``hqlabel export`` end to end through ``main``: each format, a folder that is not a labels folder, S3."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from PIL import Image

from hqlabel.jobs.cli import main
from hqlabel.platform import storage
from tests.formats.labels_folder import CLASSES, add_shard_with_mask, write_labels_folder
from tests.platform.test_rle import huge_rle


@pytest.fixture
def labels(tmp_path):
    folder = tmp_path / "labels"
    return folder, write_labels_folder(str(folder))


def test_export_coco(labels, tmp_path, capsys):
    from pycocotools.coco import COCO

    folder, _ = labels
    out = tmp_path / "instances.json"
    assert main(["export", str(folder), "--format", "coco", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "exported 4 images, 6 instances as coco" in printed and "1 failed images left out" in printed
    coco = COCO(str(out))
    assert len(coco.getAnnIds()) == 6 and len(coco.getImgIds()) == 4


def test_export_yolo_seg(labels, tmp_path, capsys):
    folder, _ = labels
    out = tmp_path / "yolo"
    assert main(["export", str(folder), "--format", "yolo-seg", "--out", str(out)]) == 0
    assert "6 instances as yolo-seg" in capsys.readouterr().out
    assert len((out / "labels" / "b.txt").read_text().splitlines()) == 3  # ring + two-part blob
    assert "names:" in (out / "data.yaml").read_text()

    # every part below --min-part-area: each instance keeps its largest part only
    big = tmp_path / "yolo-big"
    assert (
        main(["export", str(folder), "--format", "yolo-seg", "--out", str(big), "--min-part-area", "1e6"])
        == 0
    )
    assert len((big / "labels" / "b.txt").read_text().splitlines()) == 2

    assert (
        main(["export", str(folder), "--format", "yolo-seg", "--out", str(big), "--min-part-area", "-1"]) == 2
    )
    assert "--min-part-area must be >= 0" in capsys.readouterr().err


def test_export_masks_png(labels, tmp_path, capsys):
    folder, source = labels
    out = tmp_path / "png"
    assert main(["export", str(folder), "--format", "masks-png", "--out", str(out)]) == 0
    assert "6 instances as masks-png" in capsys.readouterr().out
    png = np.asarray(Image.open(out / "b" / "0_ring.png")) == 255
    assert np.array_equal(png, source["b.jpg"]["instances"][0][1])


def test_export_of_a_folder_that_is_not_a_labels_folder_is_one_line(tmp_path, capsys):
    (tmp_path / "photos").mkdir()
    code = main(["export", str(tmp_path / "photos"), "--format", "coco", "--out", str(tmp_path / "x.json")])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("hqlabel: error:") and "not a labels folder" in err
    assert len(err.splitlines()) == 1
    assert not (tmp_path / "x.json").exists()


def test_a_mask_over_the_pixel_cap_is_one_line(labels, tmp_path, capsys):
    folder, _ = labels
    add_shard_with_mask(folder, huge_rle(50_000, 50_000), (50_000, 50_000))
    assert main(["export", str(folder), "--format", "masks-png", "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("hqlabel: error:") and len(err.splitlines()) == 1
    assert "c/huge.png" in err and "over the cap of 100000000 pixels" in err and "--max-pixels" in err


def test_yolo_seg_without_opencv_names_the_extra(labels, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "cv2", None)  # `import cv2` raises ImportError
    folder, _ = labels
    assert main(["export", str(folder), "--format", "yolo-seg", "--out", str(tmp_path / "y")]) == 2
    assert "pip install hqlabel[export]" in capsys.readouterr().err
    assert not (tmp_path / "y").exists()


def test_export_from_and_to_s3(s3_endpoint, s3_bucket, tmp_path, capsys):
    options = storage.StorageOptions(s3_endpoint=s3_endpoint)
    write_labels_folder(f"s3://{s3_bucket}/job", options=options)
    out = f"s3://{s3_bucket}/exports/instances.json"
    args = ["export", f"s3://{s3_bucket}/job", "--format", "coco", "--out", out, "--s3-endpoint", s3_endpoint]
    assert main(args) == 0
    doc = json.loads(storage.read_bytes(out, options))
    assert [c["name"] for c in doc["categories"]] == CLASSES
    assert len(doc["annotations"]) == 6
