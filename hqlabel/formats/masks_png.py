"""masks-png export: ``OUT/<image_id without extension>/<instance_id>_<label>.png``, one 0/255
single-channel PNG per instance. File names: see ``hqlabel.formats.common``."""

from __future__ import annotations

import io
import re

import numpy as np

from hqlabel.formats.common import DECODE_BATCH_ROWS, ExportSummary, unique_stems, write_file_map
from hqlabel.platform import storage
from hqlabel.platform.labels import LabelsFolder

__all__ = ["export_masks_png", "label_file_name"]

_UNSAFE = re.compile(r"[^A-Za-z0-9._\-+=@,]+")  # class names in masks-png file names


def label_file_name(label: str) -> str:
    return _UNSAFE.sub("_", label).strip("._") or "label"


def export_masks_png(labels: LabelsFolder, out: str) -> ExportSummary:
    """Write one binary 0/255 PNG per instance: ``out/<image_id without extension>/<instance_id>_<label>.png``
    (label made file-name safe: characters outside ``[A-Za-z0-9._-+=@,]`` become ``_``)."""
    from PIL import Image

    summary = ExportSummary("masks-png", out)
    images, summary.skipped_images, summary.repeated_images = labels.images()
    stems = unique_stems(images["image_id"].to_pylist())
    summary.images = len(stems)
    for batch in labels.batches(["image_id", "instance_id", "label", "mask"], batch_rows=DECODE_BATCH_ROWS):
        for row in batch.to_pylist():
            if row["image_id"] not in stems:
                continue
            mask = labels.decode_mask(row)
            buf = io.BytesIO()
            Image.fromarray(mask.astype(np.uint8) * 255, mode="L").save(buf, format="PNG")
            name = f"{row['instance_id']}_{label_file_name(row['label'])}.png"
            storage.write_bytes(
                storage.join(out, stems[row["image_id"]], name), buf.getvalue(), labels.options
            )
            summary.instances += 1
    write_file_map(out, {i: stem for i, stem in stems.items()}, labels.options)
    return summary
