"""Ground-truth masks from public formats, as ``ImageInstances`` (see ``hqlabel.platform.instances``).

Two sources, local or ``s3://``, both read one image at a time:

* ``read_coco_instances``: a COCO instances JSON whose annotations carry a ``segmentation`` (polygons,
  uncompressed RLE with a ``counts`` list, or compressed RLE); image bytes from ``images_root`` joined with
  each ``file_name``. Image ids are the ``file_name``s; labels the category names; ``instance_id`` the kept
  annotation's index within its image (JSON order).
* ``read_mask_folder``: the DIS5K / ThinObject-5K layout, one binary mask per image::

      ROOT/im/NAME.jpg   (or images/, img/, image/; nested subfolders allowed)
      ROOT/gt/NAME.png   (or masks/, mask/; the same relative path and stem)

  foreground = grey value > 127 (RGB / palette masks are converted to grey first). Image ids are the image's
  path relative to the image folder.

Sizes are checked against the image header (after EXIF orientation, as ``decode_image`` sees the image), so a
dataset never pairs a mask with an image of another size. Skipped entries are logged as one warning per kind,
with counts; pass ``stats`` (a dict) to also get the counts back, filled in while iterating.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from typing import Any

import numpy as np
from PIL import Image

from hqlabel.platform import storage
from hqlabel.platform.coco import categories_by_id, load_document, parse_image, require_list
from hqlabel.platform.images import IMAGE_EXTENSIONS
from hqlabel.platform.instances import ImageInstances, Instance
from hqlabel.platform.rle import encode_mask
from hqlabel.platform.storage import StorageOptions

logger = logging.getLogger(__name__)

__all__ = ["IMAGE_DIRS", "MASK_DIRS", "image_size", "read_coco_instances", "read_mask_folder"]

IMAGE_DIRS: tuple[str, ...] = ("im", "images", "img", "image")
MASK_DIRS: tuple[str, ...] = ("gt", "masks", "mask")
MASK_EXTENSIONS: tuple[str, ...] = (".png", ".bmp", ".tif", ".tiff", ".jpg", ".jpeg", ".webp")
_ORIENTATION = 0x0112
_SWAPPED_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that rotate by 90 degrees
_NAMES_SHOWN = 5


def image_size(data: bytes, what: str) -> tuple[int, int]:
    """``(height, width)`` of encoded image bytes from the header, after EXIF orientation (what
    ``decode_image`` returns), without decoding the pixels.

    Raises:
        ValueError: the bytes are not a readable image (``what`` names it in the message).
    """
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            orientation = image.getexif().get(_ORIENTATION)
    except (OSError, Image.UnidentifiedImageError, SyntaxError) as e:
        raise ValueError(f"{what} is not a readable image ({e})") from e
    if orientation in _SWAPPED_ORIENTATIONS:
        width, height = height, width
    return height, width


def _few(names: list[str]) -> str:
    shown = ", ".join(names[:_NAMES_SHOWN])
    return shown + (", ..." if len(names) > _NAMES_SHOWN else "")


# ---------------------------------------------------------------------------------------------- COCO JSON


def _segmentation_rle(segm: Any, height: int, width: int, where: str) -> dict[str, Any] | None:
    """A COCO ``segmentation`` as compressed RLE ``{"size": [H, W], "counts": bytes}``; None when it holds no
    usable shape (missing, empty, or only polygons with fewer than 3 points).

    Raises:
        ValueError: an RLE whose ``size`` is not the image's, or a segmentation of an unknown form.
    """
    from pycocotools import mask as mask_utils

    if segm is None or (isinstance(segm, (list, dict)) and not segm):
        return None
    if isinstance(segm, list):  # polygons: [[x0, y0, x1, y1, ...], ...]
        polygons = []
        for poly in segm:
            if not isinstance(poly, (list, tuple)) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in poly
            ):
                raise ValueError(f"{where}: a polygon must be a list of numbers [x0, y0, x1, y1, ...]")
            if len(poly) >= 6 and len(poly) % 2 == 0:
                polygons.append([float(v) for v in poly])
        if not polygons:
            return None
        rle = mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
    elif isinstance(segm, dict) and "counts" in segm and "size" in segm:
        size = [int(v) for v in segm["size"]]
        if size != [height, width]:
            raise ValueError(
                f"{where}: RLE size {size} is not the image's [height, width] {[height, width]}; "
                "fix the annotation or the image entry"
            )
        counts = segm["counts"]
        if isinstance(counts, list):  # uncompressed RLE
            rle = mask_utils.frPyObjects({"size": size, "counts": [int(c) for c in counts]}, height, width)
        elif isinstance(counts, (str, bytes)):
            rle = {"size": size, "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
        else:
            raise ValueError(f"{where}: RLE counts must be a list of ints or a string")
    else:
        raise ValueError(
            f"{where}: segmentation must be a list of polygons or an RLE dict with 'size' and 'counts'"
        )
    return {"size": [height, width], "counts": bytes(rle["counts"])}


def read_coco_instances(
    uri: str,
    options: StorageOptions = StorageOptions(),
    *,
    images_root: str | None = None,
    include_crowd: bool = False,
    stats: dict[str, int] | None = None,
    max_json_bytes: int = storage.DEFAULT_MAX_JSON_BYTES,
) -> Iterator[ImageInstances]:
    """Images with their ground-truth masks from a COCO instances JSON (local or ``s3://``).

    Args:
        uri: the JSON file.
        images_root: folder of the ``file_name``s (default: the JSON's folder); local or a URI.
        include_crowd: keep ``iscrowd`` annotations (dropped by default).
        stats: filled in while iterating: ``images``, ``instances``, ``skipped_crowd``,
            ``skipped_no_segmentation`` (missing or empty segmentation, or an empty mask),
            ``skipped_images_without_annotations``.
        max_json_bytes: refuse a JSON file larger than this (``--max-json-bytes``) before reading it.

    Yields:
        One ``ImageInstances`` per image with at least one kept annotation, in the JSON's image order;
        masks are H x W compressed RLE, ``origin`` ``"gt"``, ``score`` / ``pred_iou`` None.

    Raises:
        FileNotFoundError: the JSON or an image is missing.
        TooLargeError: the JSON is over ``max_json_bytes`` (the message names ``--max-json-bytes``).
        ValueError: malformed COCO (see ``hqlabel.platform.coco.read_coco``), an image whose size differs
            from the JSON's ``height`` / ``width``, an unreadable image, a malformed segmentation.
    """
    stats = {} if stats is None else stats
    for key in ("images", "instances", "skipped_crowd", "skipped_no_segmentation"):
        stats.setdefault(key, 0)
    stats.setdefault("skipped_images_without_annotations", 0)
    doc = load_document(storage.read_bytes(uri, options, max_bytes=max_json_bytes, option="--max-json-bytes"))
    root = images_root or storage.absolute(uri).rstrip("/").rsplit("/", 1)[0]  # "gt.json": from here
    names = categories_by_id(doc)
    entries = [parse_image(entry, k, root) for k, entry in enumerate(require_list(doc, "images"))]
    by_id: dict[int, list[dict[str, Any]]] = {entry.coco_id: [] for entry in entries}
    annotations = doc.get("annotations") or []
    if not isinstance(annotations, list):
        raise ValueError(f"COCO 'annotations' must be a list, got {type(annotations).__name__}")
    for k, ann in enumerate(annotations):
        if not isinstance(ann, dict):
            raise ValueError(f"{uri}: annotation #{k} is a {type(ann).__name__}, expected an object")
        if ann.get("image_id") not in by_id:
            raise ValueError(
                f"{uri}: annotation {ann.get('id', f'#{k}')} names image_id {ann.get('image_id')!r}, which "
                "is not in 'images'; add the image entry or remove the annotation"
            )
        if ann.get("category_id") not in names:
            raise ValueError(
                f"{uri}: annotation {ann.get('id', f'#{k}')} has category_id {ann.get('category_id')!r}, "
                f"which is not in 'categories' (ids {sorted(names)})"
            )
        by_id[ann["image_id"]].append(ann)
    del doc

    try:
        for entry in entries:
            anns = by_id.pop(entry.coco_id)
            if not include_crowd:
                crowd = [a for a in anns if a.get("iscrowd", 0) == 1]
                stats["skipped_crowd"] += len(crowd)
                anns = [a for a in anns if a.get("iscrowd", 0) != 1]
            if not anns:
                stats["skipped_images_without_annotations"] += 1
                continue
            data = storage.read_bytes(entry.uri, options)
            height, width = image_size(data, f"COCO image {entry.image_id!r} ({entry.uri})")
            if entry.height not in (None, height) or entry.width not in (None, width):
                raise ValueError(
                    f"COCO image {entry.image_id!r}: the JSON says height x width {entry.height} x "
                    f"{entry.width}, the file {entry.uri} is {height} x {width}; fix the image entry or "
                    "point --images at the images the annotations were made on"
                )
            instances = []
            for ann in anns:
                where = f"{uri}: annotation {ann.get('id', '?')} of image {entry.image_id!r}"
                rle = _segmentation_rle(ann.get("segmentation"), height, width, where)
                instance = None if rle is None else Instance(len(instances), names[ann["category_id"]], rle)
                if instance is None or instance.area == 0:
                    stats["skipped_no_segmentation"] += 1
                    continue
                instances.append(instance)
            if not instances:
                stats["skipped_images_without_annotations"] += 1
                continue
            stats["images"] += 1
            stats["instances"] += len(instances)
            yield ImageInstances(entry.image_id, data, height, width, instances)
    finally:
        if stats["skipped_crowd"]:
            logger.warning("%s: skipped %d crowd annotation(s)", uri, stats["skipped_crowd"])
        if stats["skipped_no_segmentation"]:
            logger.warning(
                "%s: skipped %d annotation(s) without a segmentation (missing, empty or degenerate)",
                uri,
                stats["skipped_no_segmentation"],
            )
        if stats["skipped_images_without_annotations"]:
            logger.warning(
                "%s: skipped %d image(s) without annotations",
                uri,
                stats["skipped_images_without_annotations"],
            )


# -------------------------------------------------------------------------------------------- mask folder


def _find_dir(root: str, names: tuple[str, ...], options: StorageOptions) -> str | None:
    for name in names:
        candidate = storage.join(root, name)
        if storage.is_dir(candidate, options):
            return candidate
    return None


def _layout_error(root: str, problem: str) -> ValueError:
    return ValueError(
        f"{root}: {problem}. A mask folder holds ROOT/{{{'|'.join(IMAGE_DIRS)}}}/NAME.jpg and "
        f"ROOT/{{{'|'.join(MASK_DIRS)}}}/NAME.png (same relative path and stem; DIS5K / ThinObject-5K layout)"
    )


def _by_stem(files: list[str], folder: str, options: StorageOptions, what: str) -> dict[str, str]:
    """``{relative path without extension: relative path}`` of ``files`` under ``folder``."""
    prefix = folder.rstrip("/") if storage.is_s3(folder) else storage.resolve(folder, options)[1]
    found: dict[str, str] = {}
    for file in files:
        relative = file[len(prefix) :].lstrip("/")
        stem = relative.rsplit(".", 1)[0]
        if stem in found:
            raise ValueError(
                f"two {what} files with the same stem in {folder}: {found[stem]} and {relative}; "
                "keep one of them"
            )
        found[stem] = relative
    return found


def _read_binary_mask(data: bytes, what: str) -> np.ndarray:
    """H x W bool: grey value > 127 (RGB / palette / alpha masks converted to grey; 16-bit scaled to 8)."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            if image.mode == "1":
                return np.asarray(image, dtype=bool).copy()
            if image.mode.startswith("I;16") or image.mode == "I":
                values = np.asarray(image).astype(np.int64)
                return (values if values.max(initial=0) <= 255 else values // 257) > 127
            return np.asarray(image.convert("L")) > 127
    except (OSError, Image.UnidentifiedImageError, SyntaxError) as e:
        raise ValueError(f"mask {what} is not a readable image ({e})") from e


def read_mask_folder(
    uri: str,
    options: StorageOptions = StorageOptions(),
    *,
    label: str = "object",
    stats: dict[str, int] | None = None,
) -> Iterator[ImageInstances]:
    """One-object images from a DIS5K / ThinObject-5K style folder (local or ``s3://``).

    Args:
        uri: ROOT, holding an image folder (``im``, ``images``, ``img`` or ``image``) and a mask folder
            (``gt``, ``masks`` or ``mask``) with the same relative paths and stems.
        label: the class name of every mask.
        stats: filled in while iterating: ``pairs``, ``images``, ``instances``, ``images_without_mask``,
            ``masks_without_image``, ``empty_masks`` (an all-background mask: the image is skipped).

    Yields:
        One ``ImageInstances`` per pair, in sorted path order, id = the image's relative path, one instance
        (``instance_id`` 0, ``origin`` ``"gt"``).

    Raises:
        ValueError: no image or mask folder, zero image/mask pairs (the message describes the layout), a
            mask whose size differs from its image's (both files named), an unreadable image or mask.
    """
    stats = {} if stats is None else stats
    image_dir = _find_dir(uri, IMAGE_DIRS, options)
    mask_dir = _find_dir(uri, MASK_DIRS, options)
    if image_dir is None or mask_dir is None:
        if not storage.exists(uri, options):
            raise FileNotFoundError(f"mask folder {uri} does not exist")
        missing = "image" if image_dir is None else "mask"
        raise _layout_error(uri, f"found no {missing} folder")
    images = _by_stem(storage.list_files(image_dir, IMAGE_EXTENSIONS, options), image_dir, options, "image")
    masks = _by_stem(storage.list_files(mask_dir, MASK_EXTENSIONS, options), mask_dir, options, "mask")
    pairs = sorted(images.keys() & masks.keys())
    lonely_images = sorted(images[s] for s in images.keys() - masks.keys())
    lonely_masks = sorted(masks[s] for s in masks.keys() - images.keys())
    stats.update(
        pairs=len(pairs),
        images=0,
        instances=0,
        images_without_mask=len(lonely_images),
        masks_without_image=len(lonely_masks),
        empty_masks=0,
    )
    if lonely_images:
        logger.warning(
            "%s: skipped %d image(s) without a mask in %s: %s",
            uri,
            len(lonely_images),
            mask_dir,
            _few(lonely_images),
        )
    if lonely_masks:
        logger.warning(
            "%s: skipped %d mask(s) without an image in %s: %s",
            uri,
            len(lonely_masks),
            image_dir,
            _few(lonely_masks),
        )
    if not pairs:
        raise _layout_error(
            uri,
            f"found no image/mask pairs ({len(images)} images in {image_dir}, {len(masks)} masks in "
            f"{mask_dir}, no shared stems)",
        )
    empty: list[str] = []
    try:
        for stem in pairs:
            image_uri = storage.join(image_dir, images[stem])
            mask_uri = storage.join(mask_dir, masks[stem])
            data = storage.read_bytes(image_uri, options)
            height, width = image_size(data, f"image {image_uri}")
            mask = _read_binary_mask(storage.read_bytes(mask_uri, options), mask_uri)
            if mask.shape != (height, width):
                raise ValueError(
                    f"mask {mask_uri} is {mask.shape[0]} x {mask.shape[1]} (H x W) but image {image_uri} is "
                    f"{height} x {width}; masks must have their image's size"
                )
            if not mask.any():
                empty.append(images[stem])
                stats["empty_masks"] += 1
                continue
            stats["images"] += 1
            stats["instances"] += 1
            yield ImageInstances(images[stem], data, height, width, [Instance(0, label, encode_mask(mask))])
    finally:
        if empty:
            logger.warning("%s: skipped %d image(s) with an empty mask: %s", uri, len(empty), _few(empty))
