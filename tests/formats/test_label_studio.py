"""Label Studio round trip through Label Studio's own converter (label-studio-converter): our brush export
decodes to our masks with its decoder; an export built with its encoders (brush ``image2annotation``, COCO ->
Label Studio polygons ``create_segmentation``) imports to the masks it was built from."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pytest
from PIL import Image

from hqlabel.formats import export_labels
from hqlabel.formats.label_studio import image_id_of, image_url
from hqlabel.jobs.cli import main
from hqlabel.platform.instances import iter_instances
from tests.formats.labels_folder import CLASSES, disc, rect, write_labels_folder

brush = pytest.importorskip("label_studio_converter.brush")
ls_coco = pytest.importorskip("label_studio_converter.imports.coco")
label_config = pytest.importorskip("label_studio_tools.core.label_config")


@pytest.fixture
def labels(tmp_path: Path) -> tuple[Path, dict]:
    out = tmp_path / "labels"
    return out, write_labels_folder(str(out))


def write_images(root: Path, sizes: dict[str, tuple[int, int]]) -> None:
    """A grey image of each (H, W) at ``root/<image_id>`` (the format its extension names)."""
    for image_id, (height, width) in sizes.items():
        path = root / image_id
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((height, width, 3), 128, np.uint8)).save(path)


def test_export_decodes_with_the_converter_to_the_exact_masks(labels, tmp_path):
    folder, source = labels
    out = tmp_path / "ls" / "tasks.json"
    summary = export_labels(str(folder), str(out), "label-studio")
    assert (summary.images, summary.instances, summary.skipped_images) == (4, 6, 1)
    assert summary.config == str(tmp_path / "ls" / "tasks.label_config.xml")
    assert "labeling config" in str(summary)

    tasks = json.loads(out.read_text())
    by_id = {task["data"]["image_id"]: task for task in tasks}
    assert sorted(by_id) == sorted(k for k, v in source.items() if v["size"])  # failed.png left out
    for image_id, task in by_id.items():
        height, width = source[image_id]["size"]
        assert task["data"]["image"] == "/data/local-files/?d=" + image_id
        (prediction,) = task["predictions"]
        assert prediction["model_version"] == "hqlabel"  # the job.json names no models
        results = prediction["result"]
        assert len(results) == len(source[image_id]["instances"])
        for result, (label, mask) in zip(results, source[image_id]["instances"], strict=True):
            assert result["type"] == "brushlabels"
            assert (result["from_name"], result["to_name"]) == ("label", "image")
            assert (result["original_height"], result["original_width"]) == (height, width)
            assert result["value"]["brushlabels"] == [label] and result["value"]["format"] == "rle"
            rgba = brush.decode_rle(result["value"]["rle"]).reshape(height, width, 4)
            assert np.array_equal(rgba, np.repeat(mask[:, :, None].astype(np.uint8) * 255, 4, axis=2))
        # the converter's own brush export path (results as it flattens them) gives the same layers
        layers = brush.decode_from_annotation("label", [{**r, **r["value"]} for r in results])
        assert len(layers) == len(results)
        for layer, (_, mask) in zip(layers.values(), source[image_id]["instances"], strict=True):
            assert np.array_equal(layer == 255, mask)
    assert by_id["empty.png"]["predictions"][0]["result"] == []

    config = label_config.parse_config((tmp_path / "ls" / "tasks.label_config.xml").read_text())
    assert config["label"]["type"] == "BrushLabels" and config["label"]["to_name"] == ["image"]
    assert config["label"]["labels"] == CLASSES
    assert config["label"]["inputs"] == [{"type": "Image", "value": "image"}]


def test_model_version_names_the_models_or_the_random_preset():
    from hqlabel.formats.label_studio import _model_version

    assert _model_version({"detector": "d", "segmenter": "s", "preset": "tiny-random"}) == (
        "hqlabel --preset tiny-random"
    )
    assert _model_version({"detector": "d", "segmenter": "s", "hq_weights": "runs/a"}) == (
        "hqlabel d+s+hq-weights runs/a"
    )


def test_image_urls_under_a_root_and_back():
    name = "sub/my phöto #1&2.png"
    url = image_url("https://host/images/", name)
    assert url == "https://host/images/sub/my%20ph%C3%B6to%20%231%262.png"
    assert image_id_of({"image": url}, "https://host/images/", "task 1") == name
    assert image_url("s3://bucket/imgs/", name) == "s3://bucket/imgs/" + name  # a storage key: as is
    assert image_id_of({"image": "s3://bucket/imgs/" + name}, "s3://bucket/imgs/", "task 1") == name
    assert image_id_of({"image": "x", "image_id": name}, "/data/local-files/?d=", "task 1") == name
    with pytest.raises(ValueError, match=r"does not start with --image-root-url '/data/local-files/\?d='"):
        image_id_of({"image": "/data/upload/1/abc-x.png"}, "/data/local-files/?d=", "task 1")


def test_accepted_predictions_import_back_to_the_exported_masks(labels, tmp_path, capsys):
    """Export, accept every prediction in Label Studio (each becomes the annotation), then import-gt."""
    folder, source = labels
    out = tmp_path / "tasks.json"
    url = "https://example.org/data/"
    assert (
        main(["export", str(folder), "--format", "label-studio", "--out", str(out), "--image-root-url", url])
        == 0
    )
    assert "6 instances as label-studio" in capsys.readouterr().out
    tasks = json.loads(out.read_text())
    for k, task in enumerate(tasks):
        assert task["data"]["image"] == url + quote(task["data"]["image_id"])
        del task["data"]["image_id"]  # as if Label Studio had not kept it: the URL alone names the image
        task.update(id=k + 1, annotations=[{"id": k + 1, "result": task["predictions"][0]["result"]}])
    out.write_text(json.dumps(tasks))
    write_images(tmp_path / "images", {k: v["size"] for k, v in source.items() if v["size"]})

    ds = tmp_path / "ds"
    args = [
        "import-gt",
        str(out),
        "--out",
        str(ds),
        "--images",
        str(tmp_path / "images"),
        "--image-root-url",
        url,
    ]
    assert main(args) == 0
    assert "imported 3 images, 6 instances (label-studio)" in capsys.readouterr().out  # empty.png: no mask
    imported = {item.image_id: item for item in iter_instances(str(ds))}
    assert sorted(imported) == ["a/rects.png", "b.jpg", "c/d.png"]
    for image_id, item in imported.items():
        expected = source[image_id]["instances"]
        assert [i.label for i in item.instances] == [label for label, _ in expected]
        assert np.array_equal(item.masks(), np.stack([m for _, m in expected]))


def ls_export_built_by_the_converter(root: Path) -> tuple[Path, dict[str, list[tuple[str, np.ndarray]]]]:
    """A Label Studio JSON export whose results come from the converter's own encoders, with its images, and
    the masks each task should import as."""
    from pycocotools import mask as mask_utils

    size = (40, 56)
    write_images(root / "images", {"one.png": size, "two/b.jpg": (30, 20), "three.png": size})
    ring = disc(size, (20, 28), 15) & ~disc(size, (20, 28), 6)
    Image.fromarray(ring.astype(np.uint8) * 255).save(root / "ring.png")
    brush_result = brush.image2annotation(str(root / "ring.png"), "ring", "label", "image")["result"][0]
    # a COCO polygon (pixels) turned into a Label Studio polygon (percent) by the converter's COCO importer
    polygon = [3, 4, 30, 4, 30, 22, 12, 35, 3, 22]
    coco_annotation = {"category_id": 1, "segmentation": [polygon]}
    polygon_result = ls_coco.create_segmentation(coco_annotation, {1: "kite"}, "label", 40, 56, "image")
    kite = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects([polygon], 40, 56))).astype(bool)
    square = rect((30, 20), 5, 15, 4, 12)
    Image.fromarray(square.astype(np.uint8) * 255).save(root / "square.png")
    square_result = brush.image2annotation(str(root / "square.png"), "square", "label", "image")["result"][0]
    rectangle = {"type": "rectanglelabels", "value": {"x": 1, "y": 1, "width": 5, "height": 5}, "id": "r"}

    local = "/data/local-files/?d="
    tasks = [
        {
            "id": 1,
            "data": {"image": local + "one.png"},
            "annotations": [{"id": 11, "result": [brush_result, polygon_result, rectangle]}],
            "predictions": [],
        },
        {  # two annotations, the first cancelled: the other is the ground truth
            "id": 2,
            "data": {"image": local + "two/b.jpg"},
            "annotations": [
                {"id": 21, "result": [brush_result], "was_cancelled": True},
                {"id": 22, "result": [square_result], "was_cancelled": False},
            ],
        },
        {"id": 3, "data": {"image": local + "three.png"}, "annotations": []},  # not labeled yet
    ]
    path = root / "project-1-at-2026-11-30.json"
    path.write_text(json.dumps(tasks))
    return path, {"one.png": [("ring", ring), ("kite", kite)], "two/b.jpg": [("square", square)]}


def test_import_of_an_export_built_with_the_converter(tmp_path, capsys, caplog):
    path, expected = ls_export_built_by_the_converter(tmp_path)
    ds = tmp_path / "ds"
    assert main(["import-gt", str(path), "--out", str(ds), "--images", str(tmp_path / "images")]) == 0
    assert "imported 2 images, 3 instances (label-studio)" in capsys.readouterr().out
    imported = {item.image_id: item for item in iter_instances(str(ds))}
    assert sorted(imported) == sorted(expected)
    for image_id, item in imported.items():
        assert [i.label for i in item.instances] == [label for label, _ in expected[image_id]]
        assert np.array_equal(item.masks(), np.stack([m for _, m in expected[image_id]]))
    manifest = json.loads((ds / "dataset.json").read_text())
    counts = manifest["provenance"]["counts"]
    assert (counts["skipped_results"], counts["skipped_unannotated"], counts["tasks"]) == (1, 1, 3)
    assert "rectanglelabels" in caplog.text


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ("{not json", "is not valid JSON"),
        ('[{"image": "a.png"}]', "is not a Label Studio JSON export (a list of tasks"),
        ('[{"data": {"img": "a.png"}, "annotations": []}]', "has no data.image (data keys: ['img'])"),
        (
            '[{"data": {"image": "/data/local-files/?d=a.png"}, "annotations": [{"result": [{"type": '
            '"brushlabels", "original_width": 4, "original_height": 4, "value": {"format": "rle", '
            f'"rle": {brush.mask2rle(np.zeros((2, 2), np.uint8))}, "brushlabels": ["x"]}}}}]}}]}}]',
            "value.rle holds 16 values, not original_height x original_width x 4 = 4 x 4 x 4",
        ),
        (
            '[{"id": 7, "data": {"image": "/data/local-files/?d=a.png"}, "annotations": [{"result": '
            '[{"type": "polygonlabels", "original_width": 4, "original_height": 4, "value": '
            '{"points": [[1, 2]], "polygonlabels": ["x"]}}]}]}]',
            "task 7, result #0: polygon value.points must be 3 or more [x, y] pairs in percent",
        ),
        (
            '[{"id": 3, "data": {"image": "/data/upload/1/0c8e-a.png"}, "annotations": []}]',
            "task 3: image URL '/data/upload/1/0c8e-a.png' does not start with --image-root-url",
        ),
    ],
)
def test_a_bad_label_studio_export_is_one_line(tmp_path, capsys, document, message):
    path = tmp_path / "export.json"
    path.write_text(document)
    args = ["import-gt", str(path), "--out", str(tmp_path / "ds"), "--format", "label-studio"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("hqlabel: error:") and len(err.splitlines()) == 1
    assert message in err


def test_results_for_an_image_of_another_size_are_one_line(tmp_path, capsys):
    write_images(tmp_path, {"a.png": (5, 5)})
    result = {
        "type": "brushlabels",
        "original_width": 4,
        "original_height": 4,
        "value": {
            "format": "rle",
            "rle": brush.mask2rle(np.full((4, 4), 255, np.uint8)),
            "brushlabels": ["x"],
        },
    }
    tasks = [
        {"id": 1, "data": {"image": "/data/local-files/?d=a.png"}, "annotations": [{"result": [result]}]}
    ]
    (tmp_path / "export.json").write_text(json.dumps(tasks))
    assert main(["import-gt", str(tmp_path / "export.json"), "--out", str(tmp_path / "ds")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "task 1: the results are for a 4 x 4 (H x W) image" in err and "a.png is 5 x 5" in err


def test_export_to_s3(s3_endpoint, s3_bucket, labels):
    from hqlabel.platform import storage

    folder, _ = labels
    options = storage.StorageOptions(s3_endpoint=s3_endpoint)
    out = f"s3://{s3_bucket}/ls/tasks.json"
    summary = export_labels(str(folder), out, "label-studio", options)
    assert summary.config == f"s3://{s3_bucket}/ls/tasks.label_config.xml"
    assert len(json.loads(storage.read_bytes(out, options))) == 4
    assert b"<BrushLabels" in storage.read_bytes(summary.config, options)


def test_without_the_converter_the_error_names_the_extra(labels, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "label_studio_converter", None)  # `import` raises ImportError
    folder, _ = labels
    out = tmp_path / "tasks.json"
    assert main(["export", str(folder), "--format", "label-studio", "--out", str(out)]) == 2
    assert "pip install hqlabel[labelstudio]" in capsys.readouterr().err
    assert not out.exists()


def test_an_option_of_another_format_is_refused(labels, tmp_path, capsys):
    folder, _ = labels
    with pytest.raises(ValueError, match="--image-root-url is not an option of the coco export"):
        export_labels(str(folder), str(tmp_path / "x.json"), "coco", image_root_url="https://x/")
    args = [
        "export",
        str(folder),
        "--format",
        "coco",
        "--out",
        str(tmp_path / "x.json"),
        "--min-part-area",
        "4",
    ]
    assert main(args) == 2
    assert (
        "--min-part-area is not an option of the coco export; it is for yolo-seg" in capsys.readouterr().err
    )
