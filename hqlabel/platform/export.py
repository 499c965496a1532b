"""Export a labeling job's output folder to COCO instances JSON, YOLO-seg polygons or per-instance mask PNGs.

Everything streams: the masks table is read one shard file (``masks/part-*.parquet``) at a time and, within a
file, one record batch at a time, so memory holds one batch of masks (as RLE), never the whole table, and the
formats that need pixels decode one mask at a time. Only the images table (one small row per image) is held
whole. RLE read back from a labels folder is untrusted: a mask declaring more pixels than the job's
``--max-pixels`` is refused (ValueError) before it is decoded.

Format decisions:

* Images whose processing failed (``error_stage`` set; listed in ``errors/``) are left out of every export:
  as unannotated images they would read as "no objects here". Labeled images with no instances are kept
  (COCO image entry, empty YOLO label file). An ``image_id`` that occurs more than once (the input repeated
  it) is left out with a warning: masks name their image by id only, so its instances cannot be assigned.
* Categories are the job's class list (``job.json`` ``spec.labeler.classes``) in its order; labels found in
  the masks but not in that list (``--prompts boxes`` jobs, whose class list is empty) follow, sorted.
* COCO: image ids 1..N in sorted ``image_id`` order, ``file_name`` = ``image_id``; category ids 1..C;
  annotation ids 1..M in shard order; ``bbox`` is the detector box as XYWH; ``segmentation`` the compressed
  RLE exactly as labeled; extra fields ``score`` and ``pred_iou``.
* YOLO-seg: one line per mask part (outer contour from ``cv2.findContours``, ``RETR_EXTERNAL``,
  ``CHAIN_APPROX_SIMPLE``), coordinates are pixel indices divided by width / height. YOLO-seg polygons cannot
  hold holes, so holes are dropped: a ring becomes its filled outer outline. Parts with polygon area below
  ``min_part_area`` are dropped, unless that would drop every part of the instance (then the largest stays).
* masks-png: ``OUT/<image_id without extension>/<instance_id>_<label>.png``, 0/255 single-channel PNG.
* File names (yolo-seg, masks-png) are the image ids' own (any script, spaces: ``my phöto 猫 1.png`` ->
  ``labels/my phöto 猫 1.txt``), as YOLO pairs images and labels by stem; only a part that cannot be a file
  name changes (``..``, control characters, over 255 bytes). ``OUT/image_files.csv`` maps every exported
  ``image_id`` to its path, and a warning says when a name changed.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import logging
import os
import re
import tempfile
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import PurePosixPath
from types import ModuleType
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from hqlabel.platform import storage
from hqlabel.platform.images import DEFAULT_MAX_PIXELS
from hqlabel.platform.rle import decode_mask
from hqlabel.platform.storage import StorageOptions

logger = logging.getLogger(__name__)

__all__ = [
    "FORMATS",
    "ExportSummary",
    "LabelsFolder",
    "export_coco",
    "export_labels",
    "export_masks_png",
    "export_yolo_seg",
]

FORMATS: tuple[str, ...] = ("coco", "yolo-seg", "masks-png")
MASK_COLUMNS = ["image_id", "instance_id", "label", "score", "box", "mask", "area", "pred_iou"]
COCO_BATCH_ROWS = 1024  # annotations per record batch (RLE bytes only, nothing decoded)
DECODE_BATCH_ROWS = 64  # masks per record batch where every mask is decoded to H x W


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


@dataclass
class ExportSummary:
    """What an export wrote.

    Attributes:
        format: ``coco``, ``yolo-seg`` or ``masks-png``.
        out: the file (coco) or folder written.
        images: images exported (labeled ones, with or without instances).
        instances: instances exported.
        skipped_images: images left out because their processing failed (listed in ``errors/``).
        repeated_images: labeled images left out because their ``image_id`` occurs more than once.
        dropped_parts: yolo-seg only: mask parts below ``min_part_area`` or with fewer than 3 contour points.
    """

    format: str
    out: str
    images: int = 0
    instances: int = 0
    skipped_images: int = 0
    repeated_images: int = 0
    dropped_parts: int = 0

    def __str__(self) -> str:
        text = f"exported {self.images} images, {self.instances} instances as {self.format} to {self.out}"
        if self.skipped_images:
            text += f" ({self.skipped_images} failed images left out; see errors/)"
        if self.repeated_images:
            text += f" ({self.repeated_images} images with a repeated image_id left out)"
        if self.dropped_parts:
            text += f"; {self.dropped_parts} tiny mask parts dropped"
        return text


def _f32(value: float) -> float:
    """A float32 as the shortest Python float that reads back as the same float32 (0.9, not 0.899999976)."""
    return float(str(np.float32(value)))


class LabelsFolder:
    """Read side of a labeling job's output folder (``OUT`` of ``hqlabel label``), local or ``s3://``.

    Raises:
        FileNotFoundError: ``uri`` holds no ``job.json`` or no ``images/`` table.
        ValueError: ``job.json`` is not valid JSON.
    """

    def __init__(self, uri: str, options: StorageOptions = StorageOptions()):
        self.uri = uri.rstrip("/") or uri
        self.options = options
        try:
            raw = storage.read_bytes(storage.join(self.uri, "job.json"), options)
        except (FileNotFoundError, IsADirectoryError) as e:
            raise FileNotFoundError(
                f"{uri} is not a labels folder (no job.json); pass the --out folder of an `hqlabel label` run"
            ) from e
        try:
            self.job: dict[str, Any] = json.loads(raw)
        except json.JSONDecodeError as e:
            raise ValueError(f"{uri}/job.json is not valid JSON ({e}); is this a labels folder?") from e
        self.image_files = storage.list_files(storage.join(self.uri, "images"), (".parquet",), options)
        if not self.image_files:
            raise FileNotFoundError(
                f"{uri} is not a labels folder (no images/part-*.parquet); "
                "has its labeling job finished a shard?"
            )
        self.mask_files = storage.list_files(storage.join(self.uri, "masks"), (".parquet",), options)
        # No labeled image (so no mask) is larger than the job's --max-pixels.
        self.max_pixels = int(self.job.get("spec", {}).get("max_pixels") or DEFAULT_MAX_PIXELS)
        incomplete = self.job.get("shards", {}).get("incomplete")
        if incomplete or "summary" not in self.job:
            logger.warning("the labeling job in %s has not finished; exporting the shards done so far", uri)

    @contextlib.contextmanager
    def _parquet(self, uri: str) -> Iterator[pq.ParquetFile]:
        """One Parquet file, open for reading (metadata only until columns are read); closed on exit."""
        fs, path = storage.resolve(uri, self.options)
        with fs.open_input_file(path) as f:
            yield pq.ParquetFile(f)

    def decode_mask(self, row: dict[str, Any]) -> np.ndarray:
        """The H x W bool mask of one masks-table row (``image_id``, ``mask``; ``instance_id`` if read).

        Raises:
            ValueError: its RLE is malformed or declares more than ``max_pixels`` pixels (refused before
                decoding); the message names the image.
        """
        try:
            return decode_mask(row["mask"], max_pixels=self.max_pixels)
        except ValueError as e:
            instance = f"instance {row['instance_id']} of " if "instance_id" in row else ""
            raise ValueError(f"{self.uri}/masks: {instance}image {row['image_id']!r}: {e}") from e

    def images(self) -> tuple[pa.Table, int, int]:
        """The exportable images and what was left out, as ``(table, failed, repeated)``.

        ``table``: ``image_id``, ``height``, ``width`` of every labeled image, sorted by ``image_id``.
        ``failed``: images whose processing failed (``error_stage`` set, or no size). ``repeated``: images
        whose ``image_id`` occurs more than once in the job (the input repeated it): their masks cannot be
        told apart by id, so all rows with that id are left out, with a warning.
        """
        tables = []
        for uri in self.image_files:
            with self._parquet(uri) as parquet:
                tables.append(parquet.read(columns=["image_id", "height", "width", "error_stage"]))
        images = pa.concat_tables(tables)
        ok = pc.and_(
            pc.and_(pc.is_null(images["error_stage"]), pc.is_valid(images["height"])),
            pc.is_valid(images["image_id"]),
        )
        labeled = images.filter(ok).select(["image_id", "height", "width"])
        num_labeled = len(labeled)
        counts = pc.value_counts(images["image_id"].drop_null())
        repeated = pc.filter(counts.field("values"), pc.greater(counts.field("counts"), 1))
        if len(repeated):
            shown = ", ".join(repr(v) for v in repeated.to_pylist()[:5])
            logger.warning(
                "%d image ids occur more than once (%s); their images are left out", len(repeated), shown
            )
            labeled = labeled.filter(pc.invert(pc.is_in(labeled["image_id"], value_set=repeated)))
        return labeled.sort_by("image_id"), len(images) - num_labeled, num_labeled - len(labeled)

    def categories(self) -> list[str]:
        """Class names in export order: the job's class list, then other labels found in the masks, sorted."""
        classes = list(self.job.get("spec", {}).get("labeler", {}).get("classes") or [])
        seen: set[str] = set()
        for batch in self.batches(["label"], batch_rows=65536):
            seen.update(pc.unique(batch.column("label")).to_pylist())
        extra = sorted(seen - set(classes))
        if classes and extra:
            logger.warning("labels %s are not in the job's class list; appended as extra categories", extra)
        return classes + extra

    def batches(
        self, columns: list[str] = MASK_COLUMNS, batch_rows: int = COCO_BATCH_ROWS
    ) -> Iterator[pa.RecordBatch]:
        """Record batches of the masks table, one shard file at a time (never the whole table)."""
        for uri in self.mask_files:
            with self._parquet(uri) as parquet:
                yield from parquet.iter_batches(batch_size=batch_rows, columns=columns)


def _open_output(uri: str, options: StorageOptions) -> tuple[str, Callable[[], None]]:
    """``(tmp, publish)``: a local file path to stream ``uri``'s content into, and the function that puts it
    at ``uri`` when it is complete (the caller removes ``tmp`` if anything fails).

    Local: a temporary file next to ``uri``, renamed over it. S3: a local temporary file, copied up at the end
    (an S3 object appears whole or not at all).
    """
    fs, path = storage.resolve(uri, options)
    if isinstance(fs, pafs.LocalFileSystem):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{uuid.uuid4().hex[:8]}.tmp")

        def publish() -> None:
            os.replace(tmp, path)

    else:
        handle, tmp = tempfile.mkstemp(suffix=".json")
        os.close(handle)

        def publish() -> None:
            storage.with_retries(
                lambda: pafs.copy_files(
                    tmp, path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs
                ),
                f"uploading {uri}",
            )

    return tmp, publish


def export_coco(labels: LabelsFolder, out: str) -> ExportSummary:
    """Write one COCO instances JSON at ``out`` (a file path, local or ``s3://``).

    ``images`` and ``categories`` are written first, then annotations are streamed one record batch at a time.
    Segmentations are compressed RLE ``{"size": [H, W], "counts": str}``, exactly the labeled masks.
    """
    summary = ExportSummary("coco", out)
    images, summary.skipped_images, summary.repeated_images = labels.images()
    categories = labels.categories()
    category_ids = {name: i + 1 for i, name in enumerate(categories)}
    image_ids = {image_id: i + 1 for i, image_id in enumerate(images["image_id"].to_pylist())}
    summary.images = len(image_ids)
    tmp, publish = _open_output(out, labels.options)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            info = {"description": f"hqlabel export of {labels.uri}", "version": "1.0"}
            f.write('{"info": ' + json.dumps(info) + ', "licenses": [],\n"images": [')
            for i, row in enumerate(images.to_pylist()):
                entry = {
                    "id": i + 1,
                    "file_name": row["image_id"],
                    "height": row["height"],
                    "width": row["width"],
                }
                f.write(("," if i else "") + "\n" + json.dumps(entry))
            cats = [{"id": i + 1, "name": name, "supercategory": ""} for i, name in enumerate(categories)]
            f.write('],\n"categories": ' + json.dumps(cats) + ',\n"annotations": [')
            for batch in labels.batches(batch_rows=COCO_BATCH_ROWS):
                lines = []
                for row in batch.to_pylist():
                    if row["image_id"] not in image_ids:
                        continue  # a row of a failed image (cannot happen in a well-formed folder)
                    x0, y0, x1, y1 = (_f32(v) for v in row["box"])
                    summary.instances += 1
                    annotation = {
                        "id": summary.instances,
                        "image_id": image_ids[row["image_id"]],
                        "category_id": category_ids[row["label"]],
                        "segmentation": {
                            "size": [int(v) for v in row["mask"]["size"]],
                            "counts": row["mask"]["counts"].decode("ascii"),
                        },
                        "area": int(row["area"]),
                        "bbox": [x0, y0, _f32(x1 - x0), _f32(y1 - y0)],
                        "iscrowd": 0,
                        "score": _f32(row["score"]),
                        "pred_iou": _f32(row["pred_iou"]),
                    }
                    lines.append(("," if summary.instances > 1 else "") + "\n" + json.dumps(annotation))
                f.write("".join(lines))
            f.write("\n]}\n")
        publish()
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return summary


_UNSAFE = re.compile(r"[^A-Za-z0-9._\-+=@,]+")  # class names in masks-png file names
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")  # characters no file name should hold
MAX_NAME_BYTES = 255  # the longest file name most file systems take (ext4, APFS, NTFS in UTF-16 units)
FILE_MAP = "image_files.csv"  # image_id -> the path written for it, in every yolo-seg / masks-png export


def _usable_name(part: str) -> str:
    """A path part as a file name: itself unless it holds control characters (each run becomes ``_``), is
    ``..`` (``_``), or is longer than ``MAX_NAME_BYTES`` in UTF-8 (a prefix plus a hash of the whole)."""
    part = "_" if part == ".." else _CONTROL.sub("_", part)
    if len(part.encode()) <= MAX_NAME_BYTES:
        return part
    digest = hashlib.sha1(part.encode()).hexdigest()[:12]
    return part.encode()[: MAX_NAME_BYTES - 13].decode(errors="ignore") + "~" + digest


def _stem_path(image_id: str) -> str:
    """``image_id`` as a relative POSIX path without its extension: ``sub/my phöto 猫 1.png`` ->
    ``sub/my phöto 猫 1``. The image's own names are kept (any script, spaces): YOLO pairs an image with its
    label file by that stem. Only what cannot be a file name changes: ``\\`` separates folders like ``/``,
    empty and ``.`` parts are dropped, and ``_usable_name`` applies to each part.
    """
    parts = [p for p in image_id.replace("\\", "/").split("/") if p not in ("", ".")]
    parts = [_usable_name(p) for p in parts] or ["_"]
    last = PurePosixPath(parts[-1])
    parts[-1] = last.stem if last.suffix and last.stem else last.name
    return "/".join(parts)


def _own_stem(image_id: str) -> str:
    """``image_id`` without its extension, as a POSIX path: what ``_stem_path`` gives when no part changes."""
    path = PurePosixPath(image_id.replace("\\", "/").lstrip("/"))
    return path.with_suffix("").as_posix() if path.suffix and path.stem else path.as_posix()


def _unique_stems(image_ids: list[str]) -> dict[str, str]:
    """``image_id -> stem path``; raises ValueError when two ids map to the same path."""
    stems: dict[str, str] = {}
    owners: dict[str, str] = {}
    for image_id in image_ids:
        stem = _stem_path(image_id)
        if stem in owners:
            raise ValueError(
                f"image ids {owners[stem]!r} and {image_id!r} both export to {stem!r}; "
                "image ids must differ by more than their extension"
            )
        owners[stem] = image_id
        stems[image_id] = stem
    return stems


def _write_file_map(out: str, paths: dict[str, str], options: StorageOptions) -> None:
    """``OUT/image_files.csv``: ``image_id,path`` per exported image (``path`` relative to ``OUT``), in
    ``image_id`` order; warns when a name had to change (then the images need that name too for YOLO)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["image_id", "path"])
    writer.writerows(sorted(paths.items()))
    storage.write_bytes(storage.join(out, FILE_MAP), buf.getvalue().encode(), options)
    changed = [i for i in paths if _stem_path(i) != _own_stem(i)]
    if changed:
        logger.warning(
            "%d image id(s) cannot be used as file names as they are (e.g. %r -> %r); %s maps each image "
            "id to the file written for it",
            len(changed),
            changed[0],
            _stem_path(changed[0]),
            storage.join(out, FILE_MAP),
        )


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
    stems = _unique_stems(images["image_id"].to_pylist())
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
    _write_file_map(out, {i: f"labels/{stem}.txt" for i, stem in stems.items()}, labels.options)

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


def _label_file_name(label: str) -> str:
    return _UNSAFE.sub("_", label).strip("._") or "label"


def export_masks_png(labels: LabelsFolder, out: str) -> ExportSummary:
    """Write one binary 0/255 PNG per instance: ``out/<image_id without extension>/<instance_id>_<label>.png``
    (label made file-name safe: characters outside ``[A-Za-z0-9._-+=@,]`` become ``_``)."""
    from PIL import Image

    summary = ExportSummary("masks-png", out)
    images, summary.skipped_images, summary.repeated_images = labels.images()
    stems = _unique_stems(images["image_id"].to_pylist())
    summary.images = len(stems)
    for batch in labels.batches(["image_id", "instance_id", "label", "mask"], batch_rows=DECODE_BATCH_ROWS):
        for row in batch.to_pylist():
            if row["image_id"] not in stems:
                continue
            mask = labels.decode_mask(row)
            buf = io.BytesIO()
            Image.fromarray(mask.astype(np.uint8) * 255, mode="L").save(buf, format="PNG")
            name = f"{row['instance_id']}_{_label_file_name(row['label'])}.png"
            storage.write_bytes(
                storage.join(out, stems[row["image_id"]], name), buf.getvalue(), labels.options
            )
            summary.instances += 1
    _write_file_map(out, {i: stem for i, stem in stems.items()}, labels.options)
    return summary


def export_labels(
    labels: str,
    out: str,
    fmt: str,
    options: StorageOptions = StorageOptions(),
    *,
    min_part_area: float = 4.0,
) -> ExportSummary:
    """Export the labels folder ``labels`` (local or ``s3://``) to ``out`` in format ``fmt``.

    Args:
        labels: a labeling job's ``--out`` folder.
        out: coco: the JSON file to write; yolo-seg / masks-png: the folder to write into.
        fmt: one of ``FORMATS``.
        min_part_area: yolo-seg: smallest mask part (contour polygon area, pixels) written as a polygon.

    Raises:
        ValueError: unknown format, or (yolo-seg, masks-png) a mask declaring more pixels than the job's
        ``--max-pixels``; FileNotFoundError: not a labels folder; ImportError: yolo-seg without OpenCV.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    folder = LabelsFolder(labels, options)
    if fmt == "coco":
        return export_coco(folder, out)
    if fmt == "yolo-seg":
        return export_yolo_seg(folder, out, min_part_area)
    return export_masks_png(folder, out)
