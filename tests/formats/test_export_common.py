"""What the export formats share: file names, the mask cap, a folder that is not a labels folder."""

from __future__ import annotations

import csv
import json
import logging

import pytest

from hqlabel.formats import export_labels
from hqlabel.formats.common import stem_path
from hqlabel.formats.masks_png import label_file_name
from tests.formats import labels_folder
from tests.formats.labels_folder import add_shard_with_mask, rect, write_labels_folder
from tests.platform.test_rle import huge_rle


def test_file_names_are_the_images_own_where_they_can_be():
    assert stem_path("sub/img_1.jpg") == "sub/img_1"
    assert stem_path("sub/my phöto 猫 1.png") == "sub/my phöto 猫 1"  # YOLO pairs by this stem
    assert stem_path("../../etc/passwd") == "_/_/etc/passwd"
    assert stem_path("/abs//x.tar.png") == "abs/x.tar"
    assert stem_path("noext") == "noext"
    assert stem_path("a\x00b\nc.png") == "a_b_c"
    long = stem_path("é" * 200 + ".png")  # 400 bytes: cut to a prefix and a hash of the whole
    assert len(long.encode()) <= 255 and long.startswith("é" * 100) and long != stem_path("é" * 201 + ".png")
    assert label_file_name("traffic light/sign") == "traffic_light_sign"
    assert label_file_name("..") == "label"


def test_not_a_labels_folder(tmp_path):
    (tmp_path / "photos").mkdir()
    with pytest.raises(FileNotFoundError, match="not a labels folder"):
        export_labels(str(tmp_path / "photos"), str(tmp_path / "x.json"), "coco")
    with pytest.raises(ValueError, match="unknown export format"):
        export_labels(str(tmp_path / "photos"), str(tmp_path / "x"), "voc")


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
    monkeypatch.setattr(labels_folder, "source_images", lambda: images)
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
