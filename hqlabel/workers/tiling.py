"""Tiled (SAHI-style) detection: small objects in large images, found on overlapping full-resolution tiles.

An image whose longer side is over the tile size is cut into ``size`` x ``size`` tiles that overlap by
``overlap`` of a tile (``tile_layout``); the detector runs on every tile at the image's own resolution (and,
with ``full_image``, once on the whole image, which the detector downscales: the large objects no tile holds
whole), the tile boxes are shifted back to image pixels and merged (``merge_detections``):

1. Edge merge. A box is *cut* on a side when that side lies within ``edge_margin`` pixels of its tile's
   border and that border is inside the image (not the image's own edge). Two same-class boxes are parts of
   one object cut by a border when one is cut on its right (bottom) side, the other on its left (top) side,
   they cross each other's cut (``a.x0 < b.x0 < a.x1 < b.x1``, each by more than the margin: both cover the
   overlap strip between their tiles) and their extents along the shared edge (the y intervals for a
   vertical border) have a 1-D IoU of at least ``edge_match``. They become their union box with the higher
   score; repeated until no pair is left, so an object over a tile corner (four parts) becomes one box.
2. Containment. A box still cut on some side whose area lies at least ``contained`` inside a larger
   same-class box is dropped: the truncated view of an object that another tile (or the full-image pass)
   saw whole.
3. Class-aware NMS at the detector's ``nms_threshold`` (duplicates of the tiles' overlap strips and of the
   full-image pass), then the ``max_detections`` best boxes.

Masks are not tiled: HQ-SAM is prompted with the merged boxes on the whole image, so each mask is one piece
at the image's original resolution. Ray-free and torch-free at import (the decode tasks import
``working_image``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from hqlabel.platform.config import DEFAULT_TILE_OVERLAP
from hqlabel.platform.images import resize_longest_side

if TYPE_CHECKING:
    from hqlabel.detectors.base import Detections, Detector
    from hqlabel.platform.config import LabelerConfig

TILE_BATCH = 8  # tiles per detector call (all tiles of an image have one size: no padding between them)
EDGE_MARGIN = 0.01  # of the tile size (at least 2 pixels): a box side this close to a tile border is cut
EDGE_MATCH = 0.5  # 1-D IoU, along the shared border, of two parts of one object
CONTAINED = 0.8  # share of a cut box's area inside a larger same-class box that makes it a truncated view

Box = tuple[int, int, int, int]


@dataclass(frozen=True)
class Tiling:
    """How ``detect_tiled`` cuts images and merges the tiles' boxes (see the module docstring).

    Attributes:
        size: tile side, pixels of the original image; images whose longer side is at most this are not
            tiled. overlap: share of a tile shared with its neighbour, in [0, 0.9]. full_image: also run the
            detector on the whole image. nms_threshold / max_detections: the detector's.
    """

    size: int
    overlap: float = DEFAULT_TILE_OVERLAP
    full_image: bool = True
    nms_threshold: float = 0.5
    max_detections: int = 100
    edge_match: float = EDGE_MATCH
    contained: float = CONTAINED

    @classmethod
    def from_config(cls, config: LabelerConfig) -> Tiling | None:
        """The tiling ``config`` asks for (``tile``, ``tile_overlap``, ``tile_full_image``), or None."""
        if config.tile is None:
            return None
        return cls(
            size=config.tile,
            overlap=DEFAULT_TILE_OVERLAP if config.tile_overlap is None else config.tile_overlap,
            full_image=config.tile_full_image is not False,
            nms_threshold=config.nms_threshold,
            max_detections=config.max_detections,
        )

    @property
    def edge_margin(self) -> float:
        return max(2.0, EDGE_MARGIN * self.size)


def is_tiled(height: int, width: int, size: int | None) -> bool:
    """Whether an image of ``height`` x ``width`` is cut into tiles of ``size`` (None: no tiling)."""
    return size is not None and max(height, width) > size


def working_image(image: np.ndarray, max_side: int, tile: int | None) -> np.ndarray:
    """The pixels the models get: the image itself when it will be tiled (the tiles need its full
    resolution), else the image downscaled to ``max_side`` (``resize_longest_side``)."""
    if is_tiled(image.shape[0], image.shape[1], tile):
        return image
    return resize_longest_side(image, max_side)


def tile_starts(length: int, size: int, overlap: float) -> list[int]:
    """Offsets of the tiles along one side of ``length`` pixels: a stride of ``floor(size * (1 - overlap))``
    from 0, and a last tile flush with the end (its overlap with the one before is then larger). One tile at
    0 when ``length <= size``."""
    if length <= size:
        return [0]
    stride = max(1, math.floor(size * (1 - overlap)))
    return [*range(0, length - size, stride), length - size]


def tile_layout(height: int, width: int, size: int, overlap: float) -> list[Box]:
    """The tiles of an image, row by row: XYXY pixel rectangles of ``min(size, height)`` x ``min(size,
    width)`` that cover every pixel, neighbours sharing at least ``floor(size * overlap)`` pixels."""
    return [
        (x, y, x + min(size, width), y + min(size, height))
        for y in tile_starts(height, size, overlap)
        for x in tile_starts(width, size, overlap)
    ]


def cut_sides(boxes: np.ndarray, tile: Box, image_size: tuple[int, int], margin: float) -> np.ndarray:
    """N x 4 bool (left, top, right, bottom): which sides of ``boxes`` (N x 4 XYXY image pixels, found in
    ``tile``) lie within ``margin`` of a border of the tile that is inside the image."""
    height, width = image_size
    x0, y0, x1, y1 = tile
    inner = np.array([x0 > 0, y0 > 0, x1 < width, y1 < height])
    near = np.stack(
        [
            boxes[:, 0] - x0 <= margin,
            boxes[:, 1] - y0 <= margin,
            x1 - boxes[:, 2] <= margin,
            y1 - boxes[:, 3] <= margin,
        ],
        axis=1,
    )
    return near & inner


def _interval_iou(lo_a: float, hi_a: float, lo_b: np.ndarray, hi_b: np.ndarray) -> np.ndarray:
    inter = np.clip(np.minimum(hi_a, hi_b) - np.maximum(lo_a, lo_b), 0, None)
    union = np.maximum(hi_a, hi_b) - np.minimum(lo_a, lo_b)
    return inter / np.maximum(union, 1e-9)


def _edge_partner(
    i: int, boxes: np.ndarray, labels: np.ndarray, cuts: np.ndarray, alive: np.ndarray, t: Tiling
) -> int | None:
    """The alive box that continues box ``i`` across a tile border (module docstring, rule 1), or None."""
    m = t.edge_margin
    best, best_iou = None, t.edge_match
    b = boxes[i]
    others = alive & (labels == labels[i])
    others[i] = False
    for axis in (0, 1):  # 0: a vertical border (x), 1: a horizontal one (y)
        lo, hi, plo, phi = axis, axis + 2, 1 - axis, 3 - axis
        along = _interval_iou(b[plo], b[phi], boxes[:, plo], boxes[:, phi])
        # i before the border (cut on its high side), the other after it (cut on its low side), and reverse
        after = cuts[i, hi] & cuts[:, lo] & (b[lo] < boxes[:, lo] - m) & (boxes[:, lo] < b[hi] - m)
        after &= b[hi] < boxes[:, hi] - m
        before = cuts[i, lo] & cuts[:, hi] & (boxes[:, lo] < b[lo] - m) & (b[lo] < boxes[:, hi] - m)
        before &= boxes[:, hi] < b[hi] - m
        candidates = others & (after | before) & (along >= best_iou)
        if candidates.any():
            j = int(np.flatnonzero(candidates)[np.argmax(along[candidates])])
            best, best_iou = j, float(along[j])
    return best


def _union(a: np.ndarray, b: np.ndarray, cuts_a: np.ndarray, cuts_b: np.ndarray, margin: float):
    """The union box of ``a`` and ``b`` and its cut sides: each side is cut when the box that gives it (both,
    when they end within ``margin`` of each other) is cut there."""
    box = np.concatenate([np.minimum(a[:2], b[:2]), np.maximum(a[2:], b[2:])])
    cuts = (cuts_a & (np.abs(a - box) <= margin)) | (cuts_b & (np.abs(b - box) <= margin))
    return box, cuts


def merge_detections(
    boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, cuts: np.ndarray, tiling: Tiling
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Merge the boxes of an image's tiles (and full-image pass) into one box per object.

    Args:
        boxes: N x 4 float, XYXY image pixels. scores: N. labels: N int (class indices).
        cuts: N x 4 bool (left, top, right, bottom), ``cut_sides``; all False for full-image boxes.

    Returns:
        ``(boxes, scores, labels)`` kept, by decreasing score, at most ``tiling.max_detections``.
    """
    boxes = np.array(boxes, dtype=np.float64).reshape(-1, 4)
    scores = np.array(scores, dtype=np.float64).reshape(-1)
    labels = np.array(labels, dtype=np.int64).reshape(-1)
    cuts = np.array(cuts, dtype=bool).reshape(-1, 4)
    alive = np.ones(len(boxes), dtype=bool)
    margin = tiling.edge_margin
    # 1. edge merge, the best-scored boxes first, until no pair is left
    merged = True
    while merged:
        merged = False
        for i in np.argsort(-scores, kind="stable"):
            if not alive[i] or not cuts[i].any():
                continue
            j = _edge_partner(i, boxes, labels, cuts, alive, tiling)
            while j is not None:
                boxes[i], cuts[i] = _union(boxes[i], boxes[j], cuts[i], cuts[j], margin)
                scores[i] = max(scores[i], scores[j])
                alive[j], merged = False, True
                j = _edge_partner(i, boxes, labels, cuts, alive, tiling) if cuts[i].any() else None
    # 2. containment: a cut box mostly inside a larger same-class box is that object's truncated view
    areas = (boxes[:, 2] - boxes[:, 0]).clip(0) * (boxes[:, 3] - boxes[:, 1]).clip(0)
    for i in np.argsort(areas, kind="stable"):
        if not alive[i] or not cuts[i].any():
            continue
        wh = np.minimum(boxes[i, 2:], boxes[:, 2:]) - np.maximum(boxes[i, :2], boxes[:, :2])
        inter = wh.clip(0).prod(axis=1)
        hosts = alive & (labels == labels[i]) & (areas > areas[i]) & (inter >= tiling.contained * areas[i])
        hosts[i] = False
        if hosts.any():
            alive[i] = False
    # 3. class-aware NMS over what is left, best first, capped
    import torch

    from hqlabel.detectors.base import batched_nms

    keep = np.flatnonzero(alive)
    kept = batched_nms(
        torch.from_numpy(boxes[keep]).float(),
        torch.from_numpy(scores[keep]).float(),
        torch.from_numpy(labels[keep]),
        tiling.nms_threshold,
        tiling.max_detections,
    ).numpy()
    keep = keep[kept]
    return boxes[keep], scores[keep], labels[keep]


def detect_tiled(
    detector: Detector, images: list[np.ndarray], classes: list[str], tiling: Tiling
) -> list[Detections]:
    """``detector.detect`` with tiling: one ``Detections`` per image, boxes in XYXY pixels of that image.

    Images not over ``tiling.size`` and the full-image passes go to the detector together, as one call
    (as without tiling); tiles go in calls of ``TILE_BATCH``. A large image costs its number of tiles (plus
    one with ``full_image``) detector passes.
    """
    import torch

    from hqlabel.detectors.base import Detections

    whole = [i for i, im in enumerate(images) if not is_tiled(*im.shape[:2], tiling.size)]
    tiled = [i for i in range(len(images)) if i not in whole]
    found: dict[int, list[tuple[Detections, Box | None]]] = {i: [] for i in range(len(images))}
    passes = whole + (tiled if tiling.full_image else [])
    if passes:
        for i, d in zip(passes, detector.detect([images[i] for i in passes], classes), strict=True):
            found[i].append((d, None))
    crops = [(i, t) for i in tiled for t in tile_layout(*images[i].shape[:2], tiling.size, tiling.overlap)]
    for start in range(0, len(crops), TILE_BATCH):
        chunk = crops[start : start + TILE_BATCH]
        pixels = [np.ascontiguousarray(images[i][y0:y1, x0:x1]) for i, (x0, y0, x1, y1) in chunk]
        for (i, tile), d in zip(chunk, detector.detect(pixels, classes), strict=True):
            found[i].append((d, tile))
    results = []
    for i, image in enumerate(images):
        if i in whole:
            results.append(found[i][0][0])
            continue
        parts, cut_parts = [], []
        for d, tile in found[i]:
            b = d.boxes.detach().float().cpu().numpy().astype(np.float64).reshape(-1, 4)
            if tile is None:
                cut_parts.append(np.zeros((len(b), 4), dtype=bool))
            else:
                b = b + np.array(tile[:2] * 2, dtype=np.float64)
                cut_parts.append(cut_sides(b, tile, image.shape[:2], tiling.edge_margin))
            parts.append((b, d.scores.detach().float().cpu().numpy(), d.labels.cpu().numpy()))
        boxes, scores, labels = merge_detections(
            np.concatenate([p[0] for p in parts]),
            np.concatenate([p[1] for p in parts]),
            np.concatenate([p[2] for p in parts]),
            np.concatenate(cut_parts),
            tiling,
        )
        results.append(
            Detections(
                torch.from_numpy(boxes).float(),
                torch.from_numpy(scores).float(),
                torch.from_numpy(labels).long(),
            )
        )
    return results
