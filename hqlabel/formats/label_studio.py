"""Label Studio: tasks with brush pre-annotations (export), and a Label Studio JSON export read back as ground
truth (import). Brush masks are encoded and decoded by Label Studio's own converter
(``label_studio_converter.brush``: ``mask2rle`` / ``decode_rle``), not by hand.

Export (``hqlabel export --format label-studio --out tasks.json``):

* ``tasks.json``: a JSON list, one task per exported image, ``{"data": {"image": URL, "image_id": ID},
  "predictions": [{"model_version", "score", "result": [...]}]}``; one ``brushlabels`` result per instance,
  ``value = {"format": "rle", "rle": [...], "brushlabels": [label]}``, ``original_width`` /
  ``original_height`` the image size, ``score`` the detector score. The brush RLE holds the H x W x 4 RGBA
  layer Label Studio paints, every channel 255 on the mask. URL = ``image_root_url`` + the image id
  (URL-quoted, ``/`` kept; appended as is under ``s3://``, ``gs://`` and ``azure-blob://`` roots, which
  Label Studio reads as storage keys). The default root ``/data/local-files/?d=`` is Label Studio's local
  file serving (``LOCAL_FILES_SERVING_ENABLED``, paths relative to ``LOCAL_FILES_DOCUMENT_ROOT``).
* ``tasks.label_config.xml`` (``.json`` replaced; the converter's own naming): the project's labeling config,
  ``<Image name="image" value="$image"/>`` plus ``<BrushLabels name="label" toName="image">`` with one
  ``<Label>`` per category (names XML-escaped), the names the predictions use.

Import (``hqlabel import-gt export.json``): a Label Studio JSON export (the "JSON" format: a list of tasks
with ``annotations``). Per task the last annotation that was not cancelled is the ground truth (several are
counted and warned about; predictions are never read). ``brushlabels`` results are decoded with the
converter's ``decode_rle`` (foreground = alpha > 127); ``polygonlabels`` results (points in percent of the
image) are scaled to pixels as the converter's COCO export does (``x / 100 * width``) and rasterised with
pycocotools, as COCO polygons are. Other result types (rectangles, choices, ...) are skipped and counted. The
image of a task is ``images_root`` joined with its id: ``data.image_id`` when present (hqlabel's own export),
else ``data.image`` with ``image_root_url`` removed.
"""

from __future__ import annotations

import json
import logging
import os
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from types import ModuleType
from typing import Any
from urllib.parse import quote, unquote

import numpy as np

from hqlabel.formats.common import DECODE_BATCH_ROWS, ExportSummary, f32, open_output
from hqlabel.platform import storage
from hqlabel.platform.groundtruth import image_size
from hqlabel.platform.instances import ImageInstances, Instance
from hqlabel.platform.labels import LabelsFolder
from hqlabel.platform.rle import encode_mask
from hqlabel.platform.storage import StorageOptions

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_IMAGE_ROOT_URL",
    "export_label_studio",
    "image_url",
    "labeling_config",
    "read_label_studio_instances",
]

DEFAULT_IMAGE_ROOT_URL = "/data/local-files/?d="
FROM_NAME = "label"  # the BrushLabels control of the labeling config
TO_NAME = "image"  # the Image object of the labeling config
_STORAGE_SCHEMES = ("s3://", "gs://", "azure-blob://")  # Label Studio cloud storage keys: not URL-quoted
_ALPHA_THRESHOLD = 127


def _brush() -> ModuleType:
    """Label Studio's brush RLE codec, or ImportError with the install hint."""
    try:
        from label_studio_converter import brush
    except ImportError as e:
        raise ImportError(
            "Label Studio export and import need label-studio-converter; install it with "
            "`pip install hqlabel[labelstudio]` (or `pip install label-studio-converter`)"
        ) from e
    return brush


def image_url(image_root_url: str, image_id: str) -> str:
    """The task URL of ``image_id``: ``image_root_url`` + the id, URL-quoted (``/`` kept) unless the root is a
    cloud storage one (``s3://``, ``gs://``, ``azure-blob://``)."""
    if image_root_url.startswith(_STORAGE_SCHEMES):
        return image_root_url + image_id
    return image_root_url + quote(image_id, safe="/")


def image_id_of(data: dict[str, Any], image_root_url: str, where: str) -> str:
    """The image id of a task's ``data``: ``image_id`` if set, else ``image`` less ``image_root_url``
    (URL-unquoted as ``image_url`` quoted it).

    Raises:
        ValueError: no ``image`` / ``image_id``, or a URL that does not start with ``image_root_url``.
    """
    if isinstance(data.get("image_id"), str) and data["image_id"]:
        return data["image_id"]
    url = data.get("image")
    if not isinstance(url, str) or not url:
        raise ValueError(
            f"{where} has no data.image (data keys: {sorted(data)}); the labeling config's <Image> must read "
            "$image"
        )
    if not url.startswith(image_root_url):
        raise ValueError(
            f"{where}: image URL {url!r} does not start with --image-root-url {image_root_url!r}; pass the "
            "prefix the images were served under"
        )
    rest = url[len(image_root_url) :]
    return rest if image_root_url.startswith(_STORAGE_SCHEMES) else unquote(rest)


def labeling_config(categories: list[str]) -> str:
    """The project's labeling config XML: an ``Image`` reading ``$image`` and a ``BrushLabels`` control with
    one ``Label`` per category (XML-escaped by ElementTree)."""
    view = ET.Element("View")
    ET.SubElement(view, "Image", name=TO_NAME, value="$image", zoom="true")
    brush_labels = ET.SubElement(view, "BrushLabels", name=FROM_NAME, toName=TO_NAME)
    for name in categories:
        ET.SubElement(brush_labels, "Label", value=name)
    ET.indent(view)
    return ET.tostring(view, encoding="unicode") + "\n"


def config_path(out: str) -> str:
    """Where the labeling config of a tasks file ``out`` goes: ``.json`` replaced by ``.label_config.xml``."""
    stem = out[: -len(".json")] if out.lower().endswith(".json") else out
    return stem + ".label_config.xml"


def _model_version(labeler: dict[str, Any]) -> str:
    """What made the predictions: ``hqlabel --preset tiny-random`` (random weights: says so), else
    ``hqlabel DETECTOR+SEGMENTER`` (``+hq-weights PATH`` when retrained HQ weights were used)."""
    if labeler.get("preset"):
        return f"hqlabel --preset {labeler['preset']}"
    parts = [str(labeler[k]) for k in ("detector", "segmenter") if labeler.get(k)]
    if labeler.get("hq_weights"):
        parts.append(f"hq-weights {labeler['hq_weights']}")
    return " ".join(["hqlabel", "+".join(parts)]) if parts else "hqlabel"


def _task(image_id: str, url: str, model_version: str, results: list[dict[str, Any]], scores: list[float]):
    prediction = {"model_version": model_version, "result": results}
    if scores:
        prediction["score"] = f32(float(np.mean(scores)))
    return {"data": {"image": url, "image_id": image_id}, "predictions": [prediction]}


def export_label_studio(
    labels: LabelsFolder, out: str, image_root_url: str = DEFAULT_IMAGE_ROOT_URL
) -> ExportSummary:
    """Write Label Studio tasks with brush pre-annotations at ``out`` (a ``.json`` file, local or ``s3://``)
    and the project's labeling config next to it (``config_path(out)``).

    Masks are decoded one at a time and encoded with ``label_studio_converter.brush.mask2rle``.

    Raises:
        ImportError: label-studio-converter is not installed (before anything is written).
        ValueError: a mask declaring more pixels than the job's ``--max-pixels``; rows of one image that are
            not contiguous (a corrupt labels folder).
    """
    brush = _brush()
    summary = ExportSummary("label-studio", out)
    images, summary.skipped_images, summary.repeated_images = labels.images()
    sizes = {row["image_id"]: (row["height"], row["width"]) for row in images.to_pylist()}
    summary.images = len(sizes)
    categories = labels.categories()
    model_version = _model_version(labels.job.get("spec", {}).get("labeler", {}))

    tmp, publish = open_output(out, labels.options)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            written: set[str] = set()

            def write_task(image_id: str, results: list[dict[str, Any]], scores: list[float]) -> None:
                task = _task(image_id, image_url(image_root_url, image_id), model_version, results, scores)
                f.write(("[\n" if not written else ",\n") + json.dumps(task))
                written.add(image_id)

            current: str | None = None
            results: list[dict[str, Any]] = []
            scores: list[float] = []
            columns = ["image_id", "instance_id", "label", "score", "mask"]
            for batch in labels.batches(columns, batch_rows=DECODE_BATCH_ROWS):
                for row in batch.to_pylist():
                    image_id = row["image_id"]
                    if image_id not in sizes:
                        continue
                    if image_id != current:
                        if current is not None:
                            write_task(current, results, scores)
                        if image_id in written:
                            raise ValueError(
                                f"{labels.uri}/masks: rows of image {image_id!r} are not contiguous "
                                "(shard files are sorted by image_id); the labels folder is corrupt"
                            )
                        current, results, scores = image_id, [], []
                    mask = labels.decode_mask(row)
                    height, width = sizes[image_id]
                    rle = brush.mask2rle(mask.astype(np.uint8) * 255)
                    results.append(
                        {
                            "id": f"hq{row['instance_id']}",
                            "type": "brushlabels",
                            "from_name": FROM_NAME,
                            "to_name": TO_NAME,
                            "original_width": int(width),
                            "original_height": int(height),
                            "image_rotation": 0,
                            "value": {"format": "rle", "rle": rle, "brushlabels": [row["label"]]},
                            "score": f32(row["score"]),
                        }
                    )
                    scores.append(row["score"])
                    summary.instances += 1
            if current is not None:
                write_task(current, results, scores)
            for image_id in sizes:
                if image_id not in written:
                    write_task(image_id, [], [])
            f.write("\n]\n" if written else "[]\n")
        publish()
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    summary.config = config_path(out)
    storage.write_bytes(summary.config, labeling_config(categories).encode(), labels.options)
    return summary


# ------------------------------------------------------------------------------------------------- import


def _load_tasks(raw: bytes, uri: str) -> list[dict[str, Any]]:
    try:
        doc = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{uri} is not valid JSON ({e}); pass a Label Studio JSON export") from e
    if not isinstance(doc, list) or not all(isinstance(t, dict) and "data" in t for t in doc):
        raise ValueError(
            f"{uri} is not a Label Studio JSON export (a list of tasks, each with 'data' and "
            "'annotations'); export the project as JSON (not JSON-MIN, COCO or CSV)"
        )
    return doc


def _ground_truth(task: dict[str, Any], where: str) -> tuple[dict[str, Any] | None, int]:
    """``(annotation, kept)``: the last annotation not cancelled (None if none) and how many there were."""
    annotations = task.get("annotations", [])
    if not isinstance(annotations, list) or not all(isinstance(a, dict) for a in annotations):
        raise ValueError(f"{where}: 'annotations' must be a list of objects")
    kept = [a for a in annotations if not a.get("was_cancelled")]
    return (kept[-1] if kept else None), len(kept)


def _result_mask(brush: ModuleType, result: dict[str, Any], where: str) -> tuple[str, np.ndarray] | None:
    """``(label, H x W bool mask)`` of a ``brushlabels`` or ``polygonlabels`` result; None for other types.

    Raises:
        ValueError: a malformed result (no size, no label, an RLE of another size, bad points).
    """
    kind = result.get("type")
    if kind not in ("brushlabels", "polygonlabels"):
        return None
    value = result.get("value")
    height, width = result.get("original_height"), result.get("original_width")
    if not isinstance(value, dict) or not all(isinstance(v, int) and v > 0 for v in (height, width)):
        raise ValueError(f"{where}: a {kind} result needs 'value', 'original_width' and 'original_height'")
    names = value.get(kind)
    if not isinstance(names, list) or not names or not isinstance(names[0], str):
        raise ValueError(f"{where}: the {kind} result has no label (value.{kind} is {names!r})")
    if kind == "brushlabels":
        rle = value.get("rle")
        if value.get("format", "rle") != "rle" or not isinstance(rle, list) or not rle:
            raise ValueError(f"{where}: a brushlabels result needs value.format 'rle' and value.rle (a list)")
        try:
            rgba = brush.decode_rle(rle)
        except (ValueError, IndexError, TypeError) as e:
            raise ValueError(f"{where}: value.rle is not a Label Studio brush RLE ({e})") from e
        if rgba.size != height * width * 4:
            raise ValueError(
                f"{where}: value.rle holds {rgba.size} values, not original_height x original_width x 4 = "
                f"{height} x {width} x 4"
            )
        return names[0], rgba.reshape(height, width, 4)[:, :, 3] > _ALPHA_THRESHOLD
    from pycocotools import mask as mask_utils

    points = value.get("points")
    ok = isinstance(points, list) and len(points) >= 3
    ok = ok and all(
        isinstance(p, (list, tuple))
        and len(p) == 2
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in p)
        for p in points
    )
    if not ok:
        raise ValueError(f"{where}: polygon value.points must be 3 or more [x, y] pairs in percent")
    flat = [float(v) for x, y in points for v in (x / 100 * width, y / 100 * height)]
    rle = mask_utils.merge(mask_utils.frPyObjects([flat], height, width))
    return names[0], mask_utils.decode(rle).astype(bool)


def read_label_studio_instances(
    uri: str,
    options: StorageOptions = StorageOptions(),
    *,
    images_root: str | None = None,
    image_root_url: str = DEFAULT_IMAGE_ROOT_URL,
    stats: dict[str, int] | None = None,
    max_json_bytes: int = storage.DEFAULT_MAX_JSON_BYTES,
) -> Iterator[ImageInstances]:
    """Images with their ground-truth masks from a Label Studio JSON export (local or ``s3://``).

    Args:
        uri: the export (``[{"data": ..., "annotations": [{"result": [...]}, ...]}, ...]``).
        images_root: folder of the image ids (default: the JSON's folder); local or a URI.
        image_root_url: the prefix of ``data.image`` to remove to get the image id (tasks without
            ``data.image_id``).
        stats: filled in while iterating: ``tasks``, ``images``, ``instances``, ``skipped_unannotated``
            (no annotation, or only cancelled ones), ``several_annotations`` (tasks where the last was
            taken), ``skipped_results`` (result types other than brush and polygon), ``skipped_empty``
            (masks without a pixel).
        max_json_bytes: refuse a JSON file larger than this (``--max-json-bytes``) before reading it.

    Yields:
        One ``ImageInstances`` per task with at least one mask, in task order; masks are H x W compressed
        RLE, ``instance_id`` the result's index among the kept ones, ``origin`` ``"gt"``.

    Raises:
        ImportError: label-studio-converter is not installed.
        FileNotFoundError: the JSON or an image is missing.
        ValueError: not a Label Studio JSON export, a malformed result, an image id that is not under
            ``image_root_url``, an image whose size differs from the results' ``original_width`` /
            ``original_height``, an unreadable image.
    """
    brush = _brush()
    stats = {} if stats is None else stats
    keys = ("tasks", "images", "instances", "skipped_unannotated", "several_annotations")
    for key in (*keys, "skipped_results", "skipped_empty"):
        stats.setdefault(key, 0)
    tasks = _load_tasks(
        storage.read_bytes(uri, options, max_bytes=max_json_bytes, option="--max-json-bytes"), uri
    )
    root = images_root or storage.absolute(uri).rstrip("/").rsplit("/", 1)[0]
    skipped_types: set[str] = set()
    try:
        for k, task in enumerate(tasks):
            where = f"{uri}: task {task.get('id', f'#{k}')}"
            stats["tasks"] += 1
            if not isinstance(task["data"], dict):
                raise ValueError(f"{where}: 'data' must be an object")
            image_id = image_id_of(task["data"], image_root_url, where)
            annotation, count = _ground_truth(task, where)
            if annotation is None:
                stats["skipped_unannotated"] += 1
                continue
            stats["several_annotations"] += count > 1
            results = annotation.get("result", [])
            if not isinstance(results, list) or not all(isinstance(r, dict) for r in results):
                raise ValueError(f"{where}: annotation 'result' must be a list of objects")
            masks: list[tuple[str, np.ndarray]] = []
            for j, result in enumerate(results):
                found = _result_mask(brush, result, f"{where}, result {result.get('id', f'#{j}')}")
                if found is None:
                    stats["skipped_results"] += 1
                    skipped_types.add(str(result.get("type")))
                elif not found[1].any():
                    stats["skipped_empty"] += 1
                else:
                    masks.append(found)
            if not masks:
                stats["skipped_unannotated"] += 1
                continue
            image_uri = storage.join(root, image_id)
            data = storage.read_bytes(image_uri, options)
            height, width = image_size(data, f"image {image_id!r} ({image_uri})")
            for _, mask in masks:
                if mask.shape != (height, width):
                    raise ValueError(
                        f"{where}: the results are for a {mask.shape[0]} x {mask.shape[1]} (H x W) image, "
                        f"{image_uri} is {height} x {width}; point --images at the images that were labeled"
                    )
            instances = [Instance(i, label, encode_mask(mask)) for i, (label, mask) in enumerate(masks)]
            stats["images"] += 1
            stats["instances"] += len(instances)
            yield ImageInstances(image_id, data, height, width, instances)
    finally:
        if stats["skipped_unannotated"]:
            logger.warning(
                "%s: skipped %d task(s) without an annotated brush or polygon mask",
                uri,
                stats["skipped_unannotated"],
            )
        if stats["several_annotations"]:
            logger.warning(
                "%s: %d task(s) have several annotations; the last one of each was taken",
                uri,
                stats["several_annotations"],
            )
        if stats["skipped_results"]:
            logger.warning(
                "%s: skipped %d result(s) that are not brush or polygon masks (%s)",
                uri,
                stats["skipped_results"],
                ", ".join(sorted(skipped_types)),
            )
