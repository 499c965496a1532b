"""Tiled detection (``hqlabel.workers.tiling``): the tile layout, the merge of the tiles' boxes, and the
labeler with tiling on a large generated image (3000 x 2000) with small objects near and across tile borders.

Random-weight detectors find nothing meaningful, so the merge is tested on constructed detections: by hand,
and from ``ColourDetector``, a real (if trivial) detector for generated images: it boxes each object's
colour in the pixels it is given, and like a real detector misses objects that are small next to its input.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from hqlabel.detectors.base import Detections
from hqlabel.platform.config import LabelerConfig
from hqlabel.platform.rle import decode_mask
from hqlabel.workers.tiling import (
    Tiling,
    cut_sides,
    detect_tiled,
    is_tiled,
    merge_detections,
    tile_layout,
    tile_starts,
    working_image,
)

pytestmark = pytest.mark.timeout(120)

H, W = 2000, 3000
TILE, OVERLAP = 640, 0.2  # x starts 0, 512, ..., 2048, 2360; y starts 0, 512, 1024, 1360

# (x0, y0, x1, y1, class): true extents in pixels. Tiles: x 0..640, 512..1152, 1024..1664, 1536..2176,
# 2048..2688, 2360..3000; y 0..640, 512..1152, 1024..1664, 1360..2000.
OBJECTS = [
    (100, 100, 140, 130, 0),  # inside the first tile
    (540, 300, 600, 340, 1),  # inside the overlap strip x 512..640: both tiles see it whole
    (600, 700, 660, 730, 0),  # over x = 640 only: whole in the second tile, cut in the first
    (1140, 100, 1180, 130, 1),  # over x = 1152: 12 pixels of it in the second tile (too few to detect)
    (450, 900, 700, 940, 1),  # across the whole strip x 512..640: no tile holds it, two cut parts
    (1450, 450, 1520, 700, 0),  # across the strip y 512..640: a top and a bottom part
    (2000, 1300, 2230, 1700, 1),  # across a corner (strips x 2048..2176, y 1360..1664): four parts
    (200, 1200, 1300, 1900, 0),  # larger than a tile: six parts, the middle column cut on both sides
    (2970, 1960, 3000, 2000, 0),  # at the image's own corner (the image's borders cut nothing)
    (1100, 1980, 1130, 2000, 1),  # on the bottom edge, in the strip x 1024..1152
]


class ColourDetector:
    """Boxes each object of ``OBJECTS`` by its colour in the pixels it is given (exact extents, XYXY), and
    misses regions whose longer side is under ``min_share`` of the input's longer side (a real detector,
    resizing its input, misses them too). Class: the object's."""

    def __init__(self, min_share: float = 0.02) -> None:
        self.min_share = min_share
        self.calls: list[tuple[int, int]] = []

    def detect(self, images: list[np.ndarray], classes: list[str]) -> list[Detections]:
        out = []
        for image in images:
            self.calls.append(image.shape[:2])
            boxes, labels = [], []
            ids = image[..., 0]  # object k is painted with red k + 1 (``colour``), the background 0
            present = np.bincount(ids.ravel(), minlength=len(OBJECTS) + 1)
            for k, obj in enumerate(OBJECTS):
                if not present[k + 1]:
                    continue
                mask = ids == k + 1
                xs, ys = np.flatnonzero(mask.any(axis=0)), np.flatnonzero(mask.any(axis=1))
                box = [xs[0], ys[0], xs[-1] + 1, ys[-1] + 1]
                if max(box[2] - box[0], box[3] - box[1]) >= self.min_share * max(image.shape[:2]):
                    boxes.append(box)
                    labels.append(obj[4])
            n = len(boxes)
            out.append(
                Detections(
                    torch.tensor(boxes, dtype=torch.float32).reshape(n, 4),
                    torch.linspace(0.9, 0.5, n) if n else torch.zeros(0),
                    torch.tensor(labels, dtype=torch.int64),
                )
            )
        return out


def colour(k: int) -> tuple[int, int, int]:
    return (k + 1, 200 - 10 * k, 77)


@pytest.fixture(scope="module")
def scene() -> np.ndarray:
    image = np.zeros((H, W, 3), np.uint8)
    for k, (x0, y0, x1, y1, _) in enumerate(OBJECTS):
        image[y0:y1, x0:x1] = colour(k)
    return image


def test_tile_layout_covers_the_image_with_the_overlap():
    tiles = tile_layout(H, W, TILE, OVERLAP)
    assert tile_starts(W, TILE, OVERLAP) == [0, 512, 1024, 1536, 2048, 2360]
    assert tile_starts(H, TILE, OVERLAP) == [0, 512, 1024, 1360]
    assert len(tiles) == 24
    covered = np.zeros((H, W), np.int32)
    for x0, y0, x1, y1 in tiles:
        assert (x1 - x0, y1 - y0) == (TILE, TILE)  # full tiles: the last one is flush with the edge
        assert min(x0, y0) >= 0 and x1 <= W and y1 <= H
        covered[y0:y1, x0:x1] += 1
    assert covered.min() >= 1  # every pixel
    for starts in (tile_starts(W, TILE, OVERLAP), tile_starts(H, TILE, OVERLAP)):
        shared = [TILE - (b - a) for a, b in itertools.pairwise(starts)]
        assert min(shared) >= int(TILE * OVERLAP)  # neighbours share at least the overlap
    # overlap 0: a partition where the side divides; one side under the tile: one row of shorter tiles
    assert tile_starts(2560, 640, 0.0) == [0, 640, 1280, 1920]
    assert [x0 for x0, _, _, _ in tile_layout(500, 3000, 1024, 0.25)] == [0, 768, 1536, 1976]
    assert {(y0, y1) for _, y0, _, y1 in tile_layout(500, 3000, 1024, 0.25)} == {(0, 500)}
    assert tile_layout(600, 800, 1024, 0.2) == [(0, 0, 800, 600)]


def test_images_up_to_the_tile_size_are_not_tiled_and_keep_the_usual_downscale():
    assert not is_tiled(1024, 700, 1024) and is_tiled(1025, 700, 1024) and not is_tiled(5000, 5000, None)
    big = np.zeros((2000, 3000, 3), np.uint8)
    assert working_image(big, 1333, 1024) is big  # tiled: full resolution
    assert working_image(big, 1333, None).shape == (889, 1333, 3)  # not tiled: downscaled to --max-side
    assert working_image(big, 1333, 4000).shape == (889, 1333, 3)


def test_cut_sides_are_tile_borders_inside_the_image():
    boxes = np.array([[600.0, 10, 640, 50], [0, 0, 30, 30], [2980, 1960, 3000, 2000]])
    assert cut_sides(boxes, (0, 0, 640, 640), (H, W), 6.4).tolist()[:2] == [
        [False, False, True, False],  # the tile's right border, inside the image
        [False, False, False, False],  # the image's own corner
    ]
    assert not cut_sides(boxes[2:], (2360, 1360, 3000, 2000), (H, W), 6.4).any()


def _merge(parts, **kwargs):
    """``merge_detections`` of (box, class, cuts "ltrb" letters) parts, scores decreasing."""
    boxes = [p[0] for p in parts]
    cuts = [[side in p[2] for side in "ltrb"] for p in parts]
    scores = np.linspace(0.9, 0.6, len(parts))
    return merge_detections(boxes, scores, [p[1] for p in parts], cuts, Tiling(TILE, OVERLAP, **kwargs))


def test_an_object_cut_by_a_border_becomes_one_box_of_its_true_extent():
    # (450, 900, 700, 940) seen by the tile 0..640 (cut right) and the tile 512..1152 (cut left)
    boxes, scores, labels = _merge([((450, 901, 640, 940), 1, "r"), ((512, 900, 699, 939), 1, "l")])
    assert boxes.tolist() == [[450, 900, 699, 940]] and labels.tolist() == [1]
    assert scores.tolist() == pytest.approx([0.9])  # the better part's score


def test_an_object_over_a_tile_corner_becomes_one_box():
    # (100, 100, 300, 300) over the strips x 160..220 and y 160..220: a quarter in each of four tiles
    quarters = [
        ((100, 100, 220, 220), 0, "rb"),
        ((160, 100, 300, 220), 0, "lb"),
        ((100, 160, 220, 300), 0, "rt"),
        ((160, 160, 300, 300), 0, "lt"),
    ]
    for order in (quarters, quarters[::-1], [quarters[i] for i in (0, 3, 1, 2)]):
        boxes, _, _ = _merge(order)
        assert boxes.tolist() == [[100, 100, 300, 300]]


def test_a_truncated_view_gives_way_to_the_whole_one_and_duplicates_to_nms():
    whole, truncated = ((600, 700, 660, 730), 0, ""), ((600, 700, 640, 730), 0, "r")
    boxes, _, _ = _merge([truncated, whole])  # the truncated view scores higher, and still goes
    assert boxes.tolist() == [[600, 700, 660, 730]]
    boxes, _, _ = _merge([((540, 300, 600, 340), 1, ""), ((541, 300, 600, 341), 1, "")])  # the strip's twins
    assert len(boxes) == 1


def test_parts_that_do_not_line_up_or_differ_in_class_stay_apart():
    left, right = ((450, 900, 640, 940), 1, "r"), ((512, 960, 700, 1000), 1, "l")  # y overlap 0
    assert len(_merge([left, right])[0]) == 2
    assert len(_merge([left, ((512, 900, 700, 940), 0, "l")])[0]) == 2  # another class
    assert len(_merge([((300, 900, 640, 940), 1, "r"), ((600, 900, 800, 940), 1, "")])[0]) == 2  # not cut
    # two objects of one tile at its opposite borders are no pair (their cuts do not face each other)
    assert len(_merge([((512, 10, 552, 50), 0, "l"), ((1112, 10, 1152, 50), 0, "r")])[0]) == 2
    parts = [((300, 900, 640, 940), 1, "r"), ((512, 900, 900, 940), 1, "l")]  # IoU 0.21: NMS keeps both
    assert _merge(parts)[0].tolist() == [[300, 900, 900, 940]]
    assert len(_merge(parts, edge_match=1.01)[0]) == 2  # the edge rule off: two boxes


def _check_one_box_per_object(detections: Detections, objects=OBJECTS, tol: float = 1.0):
    boxes = detections.boxes.numpy()
    assert len(boxes) == len(objects), boxes.tolist()
    for x0, y0, x1, y1, k in objects:
        match = np.abs(boxes - np.array([x0, y0, x1, y1])).max(axis=1) <= tol
        assert match.sum() == 1, (x0, y0, x1, y1)
        assert int(detections.labels[np.flatnonzero(match)[0]]) == k


def test_tiles_find_every_object_once_at_its_true_extent(scene):
    detector = ColourDetector()
    (found,) = detect_tiled(detector, [scene], ["cat", "dog"], Tiling(TILE, OVERLAP, full_image=False))
    assert detector.calls == [(TILE, TILE)] * 24  # tiles only, at full resolution
    _check_one_box_per_object(found)
    whole = ColourDetector().detect([scene], ["cat", "dog"])[0]  # the whole image misses the small ones
    assert 0 < len(whole) < len(OBJECTS)


def test_with_the_full_image_pass_every_object_is_one_box(scene):
    detector = ColourDetector()
    (found,) = detect_tiled(detector, [scene], ["cat", "dog"], Tiling(TILE, OVERLAP))
    assert sorted(detector.calls) == sorted([(TILE, TILE)] * 24 + [(H, W)])
    _check_one_box_per_object(found)


def test_small_images_in_the_batch_are_detected_whole(scene):
    detector = ColourDetector()
    small = np.ascontiguousarray(scene[:600, :600])
    found = detect_tiled(detector, [small, scene], ["cat", "dog"], Tiling(TILE, OVERLAP))
    assert detector.calls[0] == (600, 600) and detector.calls[1] == (H, W)  # one call, as without tiles
    assert found[0].boxes.tolist() == detector.detect([small], ["cat", "dog"])[0].boxes.tolist()


@pytest.fixture(scope="module")
def tiny_tiled():
    from hqlabel.workers.labeler import Labeler

    config = LabelerConfig(
        classes=["cat", "dog"], preset="tiny-random", box_threshold=0.3, tile=1024, max_detections=5
    )
    return Labeler.from_config(config)


def test_the_labeler_tiles_large_images_and_masks_them_whole(tiny_tiled, scene):
    calls = []
    detect = tiny_tiled.detector.detect

    def recording(images, classes):  # the real tiny-random detector, its inputs' sizes noted
        calls.extend(image.shape[:2] for image in images)
        return detect(images, classes)

    tiny_tiled.detector.detect = recording
    try:
        (instances,) = tiny_tiled.label([scene])
    finally:
        tiny_tiled.detector.detect = detect
    assert sorted(calls) == sorted([(H, W)] + [(1024, 1024)] * 12)  # 4 x 3 tiles and the whole image
    assert instances, "random weights fire"
    assert [r["instance_id"] for r in instances] == list(range(len(instances)))
    for row in instances:
        assert decode_mask(row["mask"]).shape == (H, W)  # HQ-SAM on the whole image: original resolution
        x0, y0, x1, y1 = row["box"]
        assert 0 <= x0 <= x1 <= W and 0 <= y0 <= y1 <= H


def test_tiling_options_are_checked_in_one_line():
    config = LabelerConfig(classes=["cat"], tile=512)
    assert (config.tile_overlap, config.tile_full_image) == (0.2, True)
    assert Tiling.from_config(config) == Tiling(512, 0.2, True)
    assert Tiling.from_config(LabelerConfig(classes=["cat"])) is None
    for kwargs, message in [
        ({"tile": 100}, "--tile 100 is too small"),
        ({"tile": 512, "tile_overlap": 0.95}, r"--tile-overlap 0.95 is out of range.*\[0, 0.9\]"),
        ({"tile": 512, "tile_overlap": -0.1}, "--tile-overlap -0.1 is out of range"),
        ({"tile_overlap": 0.3}, "--tile-overlap applies to tiled detection: give --tile"),
        ({"tile_full_image": False}, "--tile-full-image applies to tiled detection"),
    ]:
        with pytest.raises(ValueError, match=message):
            LabelerConfig(classes=["cat"], **kwargs)
