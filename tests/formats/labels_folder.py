"""A labeling job's output folder built by hand with the real schemas and RLE encoder, for the export tests:
known shapes in (``source_images``), so every format can be checked against exact masks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa

from hqlabel.platform import storage
from hqlabel.platform.rle import encode_masks, rle_to_bbox
from hqlabel.platform.schema import ERRORS_SCHEMA, IMAGES_SCHEMA, MASKS_SCHEMA

CLASSES = ["square", "circle", "ring", "blob"]


def disc(shape: tuple[int, int], center: tuple[float, float], radius: float) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - center[0]) ** 2 + (xx - center[1]) ** 2 <= radius**2


def rect(shape: tuple[int, int], y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    mask = np.zeros(shape, bool)
    mask[y0:y1, x0:x1] = True
    return mask


def source_images() -> dict[str, dict]:
    """image_id -> {"shard", "size", "instances": [(label, mask)], "error_stage"}: the shapes under test."""
    ring = disc((60, 64), (30, 32), 14) & ~disc((60, 64), (30, 32), 6)
    two_parts = rect((60, 64), 2, 12, 2, 14) | rect((60, 64), 46, 58, 48, 62)
    speck = rect((32, 48), 20, 30, 2, 14)
    speck[2, 30] = True  # a one-pixel part: below min_part_area, dropped from yolo-seg
    return {
        "a/rects.png": {
            "shard": "a",
            "size": (40, 50),
            "instances": [("square", rect((40, 50), 5, 15, 8, 20)), ("circle", disc((40, 50), (28, 30), 8))],
        },
        "b.jpg": {"shard": "a", "size": (60, 64), "instances": [("ring", ring), ("blob", two_parts)]},
        "empty.png": {"shard": "a", "size": (30, 30), "instances": []},
        "c/d.png": {
            "shard": "b",
            "size": (32, 48),
            "instances": [("square", rect((32, 48), 0, 10, 38, 48)), ("blob", speck)],
        },
        "failed.png": {"shard": "b", "size": None, "instances": [], "error_stage": "decode"},
    }


def write_labels_folder(out: str, classes: list[str] = CLASSES, options=storage.StorageOptions()) -> dict:
    """Write ``source_images()`` as a labeling job's output folder (2 shards) at ``out``; return them."""
    images = source_images()
    for shard in ("a", "b"):
        mask_rows, image_rows, error_rows = [], [], []
        for image_id in sorted(k for k, v in images.items() if v["shard"] == shard):
            item = images[image_id]
            if item.get("error_stage"):
                image_rows.append(
                    {
                        "image_id": image_id,
                        "height": None,
                        "width": None,
                        "num_instances": 0,
                        "error_stage": "decode",
                    }
                )
                error_rows.append(
                    {"image_id": image_id, "stage": "decode", "error": "not an image", "retryable": False}
                )
                continue
            h, w = item["size"]
            image_rows.append(
                {"image_id": image_id, "height": h, "width": w, "num_instances": len(item["instances"])}
            )
            masks = (
                np.stack([m for _, m in item["instances"]])
                if item["instances"]
                else np.zeros((0, h, w), bool)
            )
            for k, ((label, mask), rle) in enumerate(
                zip(item["instances"], encode_masks(masks), strict=True)
            ):
                mask_rows.append(
                    {
                        "image_id": image_id,
                        "instance_id": k,
                        "label": label,
                        "score": 0.9 - 0.1 * k,
                        "box": list(rle_to_bbox(rle)),
                        "mask": rle,
                        "area": int(mask.sum()),
                        "pred_iou": 0.8,
                    }
                )
        tables = {
            "masks": pa.Table.from_pylist(mask_rows, schema=MASKS_SCHEMA),
            "images": pa.Table.from_pylist(image_rows, schema=IMAGES_SCHEMA),
            "errors": pa.Table.from_pylist(error_rows, schema=ERRORS_SCHEMA),
        }
        for name, table in tables.items():
            storage.write_parquet(table, storage.join(out, name, f"part-{shard}.parquet"), options)
    job = {"job": "label", "spec": {"labeler": {"classes": classes}}, "summary": {"images": len(images)}}
    storage.write_bytes(storage.join(out, "job.json"), json.dumps(job).encode(), options)
    return images


def add_shard_with_mask(out: Path, rle: dict, size: tuple[int, int]) -> None:
    """A third shard: one labeled image ``c/huge.png`` of ``size`` with one mask of RLE ``rle``."""
    mask_row = {"image_id": "c/huge.png", "instance_id": 0, "label": "blob", "score": 0.9,
                "box": [0.0, 0.0, 1.0, 1.0], "mask": rle, "area": 0, "pred_iou": 0.8}  # fmt: skip
    image_row = {"image_id": "c/huge.png", "height": size[0], "width": size[1], "num_instances": 1}
    storage.write_parquet(
        pa.Table.from_pylist([mask_row], schema=MASKS_SCHEMA), str(out / "masks" / "part-c.parquet")
    )
    storage.write_parquet(
        pa.Table.from_pylist([image_row], schema=IMAGES_SCHEMA), str(out / "images" / "part-c.parquet")
    )
