"""COCO instances JSON: read images with their boxes and category names for a labeling job.

Pure Python + ``json``; pycocotools is not needed for reading. COCO boxes are ``[x, y, w, h]`` in pixels;
everything returned here is XYXY pixels.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from typing import Any

from hqlabel.platform import storage

logger = logging.getLogger(__name__)


@dataclass
class CocoImage:
    """One COCO image entry with its annotations.

    Attributes:
        image_id: the COCO ``file_name``, POSIX, exactly as given in the JSON.
        uri: where the image lives: ``images_root`` joined with ``file_name`` (a local path or a URI).
        width: image width in pixels, or ``None`` when the JSON does not say.
        height: image height in pixels, or ``None`` when the JSON does not say.
        boxes: N x 4, XYXY pixels (converted from COCO's XYWH), in the JSON's annotation order.
        labels: N category names, aligned with ``boxes``.
        coco_id: the COCO image ``id``.
    """

    image_id: str
    uri: str
    width: int | None
    height: int | None
    boxes: list[list[float]]
    labels: list[str]
    coco_id: int


def read_coco(
    data: bytes | str | dict, images_root: str, *, include_crowd: bool = False
) -> tuple[list[CocoImage], list[str]]:
    """Parse a COCO instances JSON into images with XYXY boxes and category names.

    Args:
        data: the JSON document as bytes or text, or an already-loaded dict (not a file path).
        images_root: folder holding the images: a local path, or a URI such as ``s3://bucket/prefix`` or
            ``file:///data/images``. Joined with each ``file_name``; symlinks are never resolved.
        include_crowd: keep annotations with ``iscrowd == 1`` (dropped by default).

    Returns:
        ``(images, categories)``: images in the order of the JSON's ``images`` list (images without
        annotations are kept, with empty lists), and the category names in category-id order.
        Degenerate boxes (``w <= 0`` or ``h <= 0``) are skipped, with one warning giving their count.

    Raises:
        ValueError: not JSON, a missing ``images`` / ``categories`` key (a missing ``annotations`` key means
            no annotations), a malformed or duplicate image or category, an annotation naming an unknown
            image or category id, or a bbox that is not 4 finite numbers.
        TypeError: ``data`` is not bytes, str or dict.
    """
    doc = load_document(data)
    names_by_id = categories_by_id(doc)
    images: list[CocoImage] = []
    by_coco_id: dict[int, CocoImage] = {}
    for index, entry in enumerate(require_list(doc, "images")):
        image = parse_image(entry, index, images_root)
        if image.coco_id in by_coco_id:
            raise ValueError(
                f"duplicate COCO image id {image.coco_id} (file_names {by_coco_id[image.coco_id].image_id!r} "
                f"and {image.image_id!r}); give every entry of 'images' a unique 'id'"
            )
        by_coco_id[image.coco_id] = image
        images.append(image)

    annotations = doc.get("annotations")
    if annotations is None:
        annotations = []
    elif not isinstance(annotations, list):
        raise ValueError(f"COCO 'annotations' must be a list, got {type(annotations).__name__}")
    degenerate = 0
    for index, ann in enumerate(annotations):
        if not isinstance(ann, dict):
            raise ValueError(f"COCO annotation #{index} is a {type(ann).__name__}, expected an object")
        ann_id = ann.get("id", f"#{index}")
        image = by_coco_id.get(ann.get("image_id"))
        if image is None:
            raise ValueError(
                f"COCO annotation {ann_id} refers to image_id {ann.get('image_id')!r}, which is not in "
                "'images'; add the image entry or remove the annotation"
            )
        name = names_by_id.get(ann.get("category_id"))
        if name is None:
            raise ValueError(
                f"COCO annotation {ann_id} refers to category_id {ann.get('category_id')!r}, which is not in "
                f"'categories' (ids {sorted(names_by_id)}); add the category or fix the annotation"
            )
        x, y, w, h = _parse_bbox(ann.get("bbox"), ann_id)
        if ann.get("iscrowd", 0) == 1 and not include_crowd:
            continue
        if w <= 0 or h <= 0:
            degenerate += 1
            continue
        image.boxes.append([x, y, x + w, y + h])
        image.labels.append(name)
    if degenerate:
        logger.warning("skipped %d degenerate COCO box(es) with width or height <= 0", degenerate)
    return images, [names_by_id[k] for k in sorted(names_by_id)]


def coco_categories(data: bytes | str | dict) -> list[str]:
    """Category names of a COCO JSON (same inputs as :func:`read_coco`), in category-id order."""
    names_by_id = categories_by_id(load_document(data))
    return [names_by_id[k] for k in sorted(names_by_id)]


def load_document(data: bytes | str | dict) -> dict[str, Any]:
    """A COCO JSON document (file contents as bytes or str, or the parsed dict), checked to be an object."""
    if isinstance(data, dict):
        doc = data
    elif isinstance(data, (bytes, str)):
        try:
            doc = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(
                f"COCO data is not valid JSON ({e}); pass the file's contents (e.g. Path.read_bytes()), "
                "not its path"
            ) from e
    else:
        raise TypeError(f"COCO data must be bytes, str or dict, got {type(data).__name__}")
    if not isinstance(doc, dict):
        raise ValueError(
            f"COCO JSON must be an object with 'images' and 'categories', got {type(doc).__name__}"
        )
    return doc


def require_list(doc: dict[str, Any], key: str) -> list:
    """``doc[key]``, which must be a list (``images``, ``annotations``, ``categories``)."""
    if key not in doc:
        raise ValueError(
            f"COCO JSON has no {key!r} key (keys: {sorted(doc)}); pass a COCO instances file "
            "with 'images', 'annotations' and 'categories'"
        )
    value = doc[key]
    if not isinstance(value, list):
        raise ValueError(f"COCO {key!r} must be a list, got {type(value).__name__}")
    return value


def categories_by_id(doc: dict[str, Any]) -> dict[int, str]:
    """Category name by category id; ids must be unique integers."""
    names: dict[int, str] = {}
    for index, cat in enumerate(require_list(doc, "categories")):
        if not isinstance(cat, dict) or not _is_int(cat.get("id")) or not isinstance(cat.get("name"), str):
            raise ValueError(f"COCO category #{index} ({cat!r}) needs an integer 'id' and a string 'name'")
        if cat["id"] in names:
            raise ValueError(f"duplicate COCO category id {cat['id']}; give every category a unique 'id'")
        names[cat["id"]] = cat["name"]
    return names


def parse_image(entry: Any, index: int, images_root: str) -> CocoImage:
    """The ``index``-th ``images`` entry, checked, as a ``CocoImage`` under ``images_root`` (no boxes yet)."""
    if not isinstance(entry, dict):
        raise ValueError(f"COCO image #{index} is a {type(entry).__name__}, expected an object")
    file_name = entry.get("file_name")
    if not isinstance(file_name, str) or not file_name:
        raise ValueError(
            f"COCO image #{index} (id {entry.get('id')!r}) has no 'file_name'; add the image's path "
            "relative to the images root"
        )
    coco_id = entry.get("id")
    if not _is_int(coco_id):
        raise ValueError(f"COCO image {file_name!r} has id {coco_id!r}; COCO image ids must be integers")
    width, height = entry.get("width"), entry.get("height")
    for key, value in (("width", width), ("height", height)):
        if value is not None and not _is_int(value):
            raise ValueError(f"COCO image {file_name!r} has {key} {value!r}; expected an integer or nothing")
    return CocoImage(
        image_id=file_name,
        uri=storage.join(images_root, file_name),  # a leading '/' in the name stays under the root
        width=width,
        height=height,
        boxes=[],
        labels=[],
        coco_id=coco_id,
    )


def _parse_bbox(bbox: Any, ann_id: Any) -> tuple[float, float, float, float]:
    ok = isinstance(bbox, (list, tuple)) and len(bbox) == 4
    ok = ok and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in bbox
    )
    if not ok:
        raise ValueError(
            f"COCO annotation {ann_id} has bbox {bbox!r}; expected 4 finite numbers [x, y, width, height]"
        )
    x, y, w, h = (float(v) for v in bbox)
    return x, y, w, h


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
