"""Export formats of a labels folder, one module each: ``coco``, ``yolo`` (yolo-seg), ``masks_png`` and
``label_studio`` (which also reads Label Studio exports back as ground truth).

Everything streams: the masks table is read one shard file (``masks/part-*.parquet``) at a time and, within a
file, one record batch at a time (``hqlabel.platform.labels.LabelsFolder``), so memory holds one batch of
masks (as RLE), never the whole table, and the formats that need pixels decode one mask at a time. Only the
images table (one small row per image) is held whole.

Decisions every format shares:

* Images whose processing failed (``error_stage`` set; listed in ``errors/``) are left out of every export:
  as unannotated images they would read as "no objects here". Labeled images with no instances are kept
  (COCO image entry, empty YOLO label file, a Label Studio task with an empty prediction). An ``image_id``
  that occurs more than once (the input repeated it) is left out with a warning: masks name their image by
  id only, so its instances cannot be assigned.
* Categories are the job's class list (``job.json`` ``spec.labeler.classes``) in its order; labels found in
  the masks but not in that list (``--prompts boxes`` jobs, whose class list is empty) follow, sorted.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from hqlabel.formats.coco import export_coco
from hqlabel.formats.common import ExportSummary
from hqlabel.formats.label_studio import export_label_studio
from hqlabel.formats.masks_png import export_masks_png
from hqlabel.formats.yolo import export_yolo_seg
from hqlabel.platform.labels import LabelsFolder
from hqlabel.platform.storage import StorageOptions

__all__ = ["FORMATS", "ExportSummary", "export_labels"]

# format name -> writer(labels folder, out, **format options); the options each takes are in FORMAT_OPTIONS
FORMATS: dict[str, Callable[..., ExportSummary]] = {
    "coco": export_coco,
    "yolo-seg": export_yolo_seg,
    "masks-png": export_masks_png,
    "label-studio": export_label_studio,
}
FORMAT_OPTIONS: dict[str, tuple[str, ...]] = {
    "coco": (),
    "yolo-seg": ("min_part_area",),
    "masks-png": (),
    "label-studio": ("image_root_url",),
}


def export_labels(
    labels: str,
    out: str,
    fmt: str,
    options: StorageOptions = StorageOptions(),
    **format_options: Any,
) -> ExportSummary:
    """Export the labels folder ``labels`` (local or ``s3://``) to ``out`` in format ``fmt``.

    Args:
        labels: a labeling job's ``--out`` folder.
        out: coco / label-studio: the JSON file to write; yolo-seg / masks-png: the folder to write into.
        fmt: a name of ``FORMATS``.
        format_options: options of that format (``FORMAT_OPTIONS``): yolo-seg ``min_part_area`` (smallest
            mask part, contour polygon area in pixels, written as a polygon); label-studio ``image_root_url``
            (the prefix of every task's image URL). ``None`` values mean the format's default.

    Raises:
        ValueError: unknown format, or (yolo-seg, masks-png, label-studio) a mask declaring more pixels than
        the job's ``--max-pixels``; FileNotFoundError: not a labels folder; ImportError: a format whose
        optional dependency is missing (its install hint).
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    given = {k: v for k, v in format_options.items() if v is not None}
    for name in given:
        if name not in FORMAT_OPTIONS[fmt]:
            takers = [f for f, names in FORMAT_OPTIONS.items() if name in names]
            raise ValueError(
                f"--{name.replace('_', '-')} is not an option of the {fmt} export; it is for "
                f"{', '.join(takers) or 'no format'}"
            )
    return FORMATS[fmt](LabelsFolder(labels, options), out, **given)
