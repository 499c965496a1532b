"""YOLO-seg export: polygons rasterise back to the masks (holes filled, specks dropped)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from hqlabel.formats import export_labels
from hqlabel.formats.common import stem_path
from hqlabel.formats.yolo import mask_polygons
from tests.formats.labels_folder import CLASSES, disc, rect, write_labels_folder


@pytest.fixture
def labels(tmp_path: Path) -> tuple[Path, dict]:
    out = tmp_path / "labels"
    return out, write_labels_folder(str(out))


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
        lines = (out / "labels" / f"{stem_path(image_id)}.txt").read_text().splitlines()
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
