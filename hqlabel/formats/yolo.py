"""YOLO-seg export: ``labels/<image stem path>.txt`` polygons plus ``data.yaml``.

One line per mask part (outer contour from ``cv2.findContours``, ``RETR_EXTERNAL``, ``CHAIN_APPROX_SIMPLE``),
coordinates are pixel indices divided by width / height. YOLO-seg polygons cannot hold holes, so holes are
dropped: a ring becomes its filled outer outline. Parts with polygon area below ``min_part_area`` are
dropped, unless that would drop every part of the instance (then the largest stays). File names: see
``hqlabel.formats.common``.
"""

from __future__ import annotations

import json
from types import ModuleType

import numpy as np

from hqlabel.formats.common import DECODE_BATCH_ROWS, ExportSummary, unique_stems, write_file_map
from hqlabel.platform import storage
from hqlabel.platform.labels import LabelsFolder

__all__ = ["export_yolo_seg", "mask_polygons"]


def _cv2() -> ModuleType:
    """Import OpenCV or raise ImportError with the install hint."""
    try:
        import cv2
    except ImportError as e:
        raise ImportError(
            "the yolo-seg export needs OpenCV; install it with `pip install hqlabel[export]` "
            "(or `pip install opencv-python-headless`)"
        ) from e
    return cv2


def mask_polygons(mask: np.ndarray, min_part_area: float = 4.0) -> tuple[list[np.ndarray], int]:
    """Outer contours of a binary mask, one per part, as polygons.

    Args:
        mask: H x W bool.
        min_part_area: parts whose contour polygon area (``cv2.contourArea``, pixels) is below this are
            dropped, unless every part is: then the largest is kept.

    Returns:
        ``(polygons, dropped)``: polygons as K x 2 float arrays of pixel indices (x, y), K >= 3; ``dropped``
        the number of parts left out (too small, or fewer than 3 contour points).
    """
    cv2 = _cv2()
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    candidates = [c.reshape(-1, 2) for c in contours if len(c) >= 3]
    areas = [float(cv2.contourArea(c)) for c in candidates]
    kept = [c for c, a in zip(candidates, areas, strict=True) if a >= min_part_area]
    if not kept and candidates:
        kept = [candidates[int(np.argmax(areas))]]
    return [c.astype(np.float64) for c in kept], len(contours) - len(kept)


def _yaml_string(text: str) -> str:
    return json.dumps(text)  # a JSON string is a valid YAML double-quoted scalar


def export_yolo_seg(labels: LabelsFolder, out: str, min_part_area: float = 4.0) -> ExportSummary:
    """Write a YOLO-seg label folder at ``out``: ``labels/<image stem path>.txt`` and ``data.yaml``.

    Each line is ``class_index x1 y1 x2 y2 ...``: one outer-contour polygon of one mask part, coordinates
    normalised to 0..1 by the image width / height. Holes are not representable and are dropped. Labeled
    images without instances get an empty label file.
    """
    _cv2()  # fail before writing anything
    summary = ExportSummary("yolo-seg", out)
    images, summary.skipped_images, summary.repeated_images = labels.images()
    categories = labels.categories()
    index = {name: i for i, name in enumerate(categories)}
    stems = unique_stems(images["image_id"].to_pylist())
    summary.images = len(stems)

    def write_label_file(image_id: str, lines: list[str]) -> None:
        text = "".join(line + "\n" for line in lines)
        storage.write_bytes(
            storage.join(out, "labels", stems[image_id] + ".txt"), text.encode(), labels.options
        )

    written: set[str] = set()
    current: str | None = None
    lines: list[str] = []
    for batch in labels.batches(["image_id", "label", "mask"], batch_rows=DECODE_BATCH_ROWS):
        for row in batch.to_pylist():
            image_id = row["image_id"]
            if image_id not in stems:
                continue
            if image_id != current:
                if current is not None:
                    write_label_file(current, lines)
                    written.add(current)
                if image_id in written:
                    raise ValueError(
                        f"{labels.uri}/masks: rows of image {image_id!r} are not contiguous "
                        "(shard files are sorted by image_id); the labels folder is corrupt"
                    )
                current, lines = image_id, []
            mask = labels.decode_mask(row)
            height, width = mask.shape
            polygons, dropped = mask_polygons(mask, min_part_area)
            summary.dropped_parts += dropped
            summary.instances += 1
            for polygon in polygons:
                coords = (polygon / np.array([width, height])).reshape(-1)
                lines.append(f"{index[row['label']]} " + " ".join(f"{v:.6f}" for v in coords))
    if current is not None:
        write_label_file(current, lines)
        written.add(current)
    for image_id in stems:
        if image_id not in written:
            write_label_file(image_id, [])
    write_file_map(out, {i: f"labels/{stem}.txt" for i, stem in stems.items()}, labels.options)

    names = ", ".join(_yaml_string(name) for name in categories)
    data_yaml = (
        f"# YOLO-seg dataset exported by `hqlabel export` from {labels.uri}\n"
        "# Label files are labels/<image_id without extension>.txt: the images' own names (image_files.csv\n"
        "# maps each image_id to its file; a name changes only where it cannot be a file name). YOLO finds\n"
        "# an image's label file by replacing /images/ with /labels/ in the image path: put (or link) the\n"
        "# images under images/\n"
        "# next to labels/, with the same relative paths, then point `path` at this folder and\n"
        "# `train`/`val` at the image folders (relative to `path`). The values below are placeholders.\n"
        "# Polygons are outer contours only: YOLO-seg cannot hold holes, so a mask's holes are filled.\n"
        "path: .  # placeholder: the dataset root (this folder)\n"
        "train: images  # placeholder: training images, relative to path\n"
        "val: images  # placeholder: validation images, relative to path\n"
        f"nc: {len(categories)}\n"
        f"names: [{names}]\n"
    )
    storage.write_bytes(storage.join(out, "data.yaml"), data_yaml.encode(), labels.options)
    return summary
