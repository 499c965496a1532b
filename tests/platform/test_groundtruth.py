"""Ground-truth import: COCO (polygons, RLE, uncompressed RLE) and DIS5K-style mask folders, local and S3."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from conftest import encode, random_image
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from hqlabel.jobs.import_gt import run_import_gt
from hqlabel.platform.groundtruth import read_coco_instances, read_mask_folder
from hqlabel.platform.instances import iter_instances
from hqlabel.platform.storage import StorageOptions

pytestmark = pytest.mark.timeout(60)


def _uncompressed(mask: np.ndarray) -> list[int]:
    """COCO uncompressed RLE counts (column-major runs, starting with background)."""
    flat = mask.flatten(order="F").astype(np.uint8)
    counts, current, run = [], 0, 0
    for v in flat:
        if v != current:
            counts.append(run)
            current, run = v, 0
        run += 1
    counts.append(run)
    return counts


def make_coco(root: Path) -> Path:
    """3 images: polygons, compressed + uncompressed RLE, crowd, one without segmentation, one unannotated."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "a.png").write_bytes(encode(random_image(0, (48, 64))))
    (root / "sub").mkdir()
    (root / "sub" / "b.png").write_bytes(encode(random_image(1, (40, 50))))
    (root / "c.png").write_bytes(encode(random_image(2, (30, 30))))
    rle_mask = np.zeros((40, 50), dtype=np.uint8)
    rle_mask[5:20, 7:33] = 1
    rle_mask[10:12, 12:14] = 0
    compressed = mask_utils.encode(np.asfortranarray(rle_mask))
    ring = np.zeros((40, 50), dtype=np.uint8)
    ring[25:38, 30:48] = 1
    ring[28:35, 34:44] = 0
    doc = {
        "images": [
            {"id": 1, "file_name": "a.png", "height": 48, "width": 64},
            {"id": 2, "file_name": "sub/b.png", "height": 40, "width": 50},
            {"id": 3, "file_name": "c.png", "height": 30, "width": 30},
        ],
        "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 5, 20, 20], "iscrowd": 0,
             "segmentation": [[10, 5, 30, 5, 30, 25, 10, 25], [40, 30, 60, 30, 50, 45]]},
            {"id": 2, "image_id": 1, "category_id": 2, "bbox": [0, 0, 5, 5], "iscrowd": 0},
            {"id": 3, "image_id": 2, "category_id": 2, "bbox": [7, 5, 26, 15], "iscrowd": 0,
             "segmentation": {"size": [40, 50], "counts": compressed["counts"].decode()}},
            {"id": 4, "image_id": 2, "category_id": 1, "bbox": [30, 25, 18, 13], "iscrowd": 0,
             "segmentation": {"size": [40, 50], "counts": _uncompressed(ring)}},
            {"id": 5, "image_id": 2, "category_id": 1, "bbox": [0, 0, 50, 40], "iscrowd": 1,
             "segmentation": {"size": [40, 50], "counts": _uncompressed(ring)}},
        ],
    }  # fmt: skip
    path = root / "instances.json"
    path.write_text(json.dumps(doc))
    return path


def _expected(path: Path, include_crowd: bool = False) -> dict[str, list[tuple[str, np.ndarray]]]:
    coco = COCO(str(path))
    names = {c["id"]: c["name"] for c in coco.loadCats(coco.getCatIds())}
    out: dict[str, list] = {}
    for image in coco.loadImgs(coco.getImgIds()):
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=image["id"])):
            if "segmentation" not in ann or (ann["iscrowd"] and not include_crowd):
                continue
            out.setdefault(image["file_name"], []).append((names[ann["category_id"]], coco.annToMask(ann)))
    return out


@pytest.mark.parametrize("include_crowd", [False, True])
def test_coco_import_matches_pycocotools(tmp_path, caplog, include_crowd):
    path = make_coco(tmp_path / "coco")
    stats: dict[str, int] = {}
    with caplog.at_level(logging.WARNING):
        got = list(read_coco_instances(str(path), include_crowd=include_crowd, stats=stats))
    want = _expected(path, include_crowd)
    assert [g.image_id for g in got] == ["a.png", "sub/b.png"]  # c.png has no annotations
    for image in got:
        assert image.image == (tmp_path / "coco" / image.image_id).read_bytes()
        assert [i.label for i in image.instances] == [label for label, _ in want[image.image_id]]
        assert [i.instance_id for i in image.instances] == list(range(len(image.instances)))
        for inst, (_, mask) in zip(image.instances, want[image.image_id], strict=True):
            np.testing.assert_array_equal(image.masks()[inst.instance_id], mask.astype(bool))
            assert inst.origin == "gt" and inst.score is None and inst.area == int(mask.sum())
    assert stats["skipped_no_segmentation"] == 1 and stats["skipped_images_without_annotations"] == 1
    assert stats["skipped_crowd"] == (0 if include_crowd else 1)
    assert "without a segmentation" in caplog.text and "without annotations" in caplog.text


def test_coco_size_mismatch_names_image_and_fix(tmp_path):
    path = make_coco(tmp_path / "coco")
    doc = json.loads(path.read_text())
    doc["images"][0]["height"] = 50
    path.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=r"'a.png'.*48 x 64.*fix the image entry"):
        list(read_coco_instances(str(path)))


def test_import_gt_bare_file_name_from_its_folder(tmp_path, monkeypatch):
    """`hqlabel import-gt instances.json --out ds` in the JSON's folder: the images are next to it, and the
    dataset records the source as an absolute path."""
    make_coco(tmp_path / "coco")
    monkeypatch.chdir(tmp_path / "coco")
    manifest = run_import_gt("instances.json", "ds")
    assert manifest["num_images"] == 2 and manifest["num_instances"] == 3
    assert manifest["source"] == str(tmp_path / "coco" / "instances.json")
    assert manifest["provenance"]["images_root"] == str(tmp_path / "coco")
    monkeypatch.chdir(tmp_path)  # read from elsewhere
    assert [i.image_id for i in iter_instances(str(tmp_path / "coco" / "ds"))] == ["a.png", "sub/b.png"]


def test_import_gt_coco_with_images_root(tmp_path):
    path = make_coco(tmp_path / "coco")
    moved = tmp_path / "ann.json"
    moved.write_bytes(path.read_bytes())
    manifest = run_import_gt(str(moved), str(tmp_path / "ds"), images=str(tmp_path / "coco"))
    assert manifest["kind"] == "coco" and manifest["num_images"] == 2 and manifest["num_instances"] == 3
    assert manifest["provenance"]["counts"]["skipped_crowd"] == 1
    assert [i.image_id for i in iter_instances(str(tmp_path / "ds"))] == ["a.png", "sub/b.png"]


def make_mask_folder(root: Path, image_dir: str = "im", mask_dir: str = "gt") -> dict[str, np.ndarray]:
    """Pairs a.jpg / sub/b.png (RGB mask) / c.png (palette mask); an unpaired image and an unpaired mask."""
    masks = {}
    for k, (name, size) in enumerate([("a.jpg", (40, 50)), ("sub/b.png", (32, 32)), ("c.png", (20, 30))]):
        image_path = root / image_dir / name
        image_path.parent.mkdir(parents=True, exist_ok=True)
        image_path.write_bytes(encode(random_image(k, size), "JPEG" if name.endswith("jpg") else "PNG"))
        mask = np.zeros(size, dtype=np.uint8)
        mask[3 : size[0] // 2, 4 : size[1] - 3 - k] = 255
        mask[5, 6] = 100  # grey below 128: background
        masks[name] = mask > 127
        mask_path = (root / mask_dir / name).with_suffix(".png")
        mask_path.parent.mkdir(parents=True, exist_ok=True)
        if k == 1:
            Image.fromarray(np.stack([mask] * 3, axis=-1)).save(mask_path)
        elif k == 2:
            Image.fromarray(mask).convert("P").save(mask_path)
        else:
            Image.fromarray(mask).save(mask_path)
    (root / image_dir / "lonely.png").write_bytes(encode(random_image(5)))
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / mask_dir / "orphan.png")
    return masks


def test_mask_folder_pairs_and_warns_about_unpaired(tmp_path, caplog):
    masks = make_mask_folder(tmp_path / "dis")
    stats: dict[str, int] = {}
    with caplog.at_level(logging.WARNING):
        got = list(read_mask_folder(str(tmp_path / "dis"), label="thing", stats=stats))
    assert [g.image_id for g in got] == ["a.jpg", "c.png", "sub/b.png"]
    for image in got:
        assert image.image == (tmp_path / "dis" / "im" / image.image_id).read_bytes()
        assert [i.label for i in image.instances] == ["thing"]
        np.testing.assert_array_equal(image.masks()[0], masks[image.image_id])
    assert stats["images_without_mask"] == 1 and stats["masks_without_image"] == 1
    assert "1 image(s) without a mask" in caplog.text and "lonely.png" in caplog.text
    assert "1 mask(s) without an image" in caplog.text and "orphan.png" in caplog.text


def test_mask_folder_size_mismatch_and_zero_pairs(tmp_path):
    make_mask_folder(tmp_path / "dis", "images", "masks")
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(tmp_path / "dis" / "masks" / "a.png")
    with pytest.raises(ValueError, match=r"masks/a.png.*im.*a.jpg"):
        list(read_mask_folder(str(tmp_path / "dis")))
    (tmp_path / "empty" / "im").mkdir(parents=True)
    (tmp_path / "empty" / "gt").mkdir()
    (tmp_path / "empty" / "im" / "x.png").write_bytes(encode(random_image(0)))
    with pytest.raises(ValueError, match=r"no image/mask pairs.*ROOT/\{im\|images"):
        list(read_mask_folder(str(tmp_path / "empty")))
    with pytest.raises(ValueError, match="found no image folder"):
        list(read_mask_folder(str(tmp_path / "empty" / "im")))


def test_mask_folder_on_s3(tmp_path, s3_endpoint, s3_bucket, s3_client):
    masks = make_mask_folder(tmp_path / "dis")
    for path in (tmp_path / "dis").rglob("*"):
        if path.is_file():
            key = f"dis/{path.relative_to(tmp_path / 'dis').as_posix()}"
            s3_client.put_object(Bucket=s3_bucket, Key=key, Body=path.read_bytes())
    options = StorageOptions(s3_endpoint=s3_endpoint)
    manifest = run_import_gt(f"s3://{s3_bucket}/dis", f"s3://{s3_bucket}/ds", options=options)
    assert manifest["kind"] == "mask-folder" and manifest["num_images"] == 3
    got = list(iter_instances(f"s3://{s3_bucket}/ds", options))
    for image in got:
        np.testing.assert_array_equal(image.masks()[0], masks[image.image_id])
