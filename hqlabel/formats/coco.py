"""COCO instances JSON export: one file, streamed.

Image ids 1..N in sorted ``image_id`` order, ``file_name`` = ``image_id``; category ids 1..C; annotation ids
1..M in shard order; ``bbox`` is the detector box as XYWH; ``segmentation`` the compressed RLE exactly as
labeled; extra fields ``score`` and ``pred_iou``. ``images`` and ``categories`` are written first, then the
annotations one record batch at a time (RLE bytes only, nothing decoded).
"""

from __future__ import annotations

import json
import os

from hqlabel.formats.common import ExportSummary, f32, open_output
from hqlabel.platform.labels import LabelsFolder

__all__ = ["export_coco"]

COCO_BATCH_ROWS = 1024  # annotations per record batch


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
    tmp, publish = open_output(out, labels.options)
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
                    x0, y0, x1, y1 = (f32(v) for v in row["box"])
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
                        "bbox": [x0, y0, f32(x1 - x0), f32(y1 - y0)],
                        "iscrowd": 0,
                        "score": f32(row["score"]),
                        "pred_iou": f32(row["pred_iou"]),
                    }
                    lines.append(("," if summary.instances > 1 else "") + "\n" + json.dumps(annotation))
                f.write("".join(lines))
            f.write("\n]}\n")
        publish()
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return summary
