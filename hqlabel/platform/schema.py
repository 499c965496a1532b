"""Arrow schemas of everything HQLabel writes, and helpers that build tables in them.

The masks table is the output contract of a labeling job (one row per instance):

    image_id     string
    instance_id  int32            0..n-1 within the image
    label        string           a class name from the job's class list
    score        float32          detector confidence
    box          fixed_size_list<float32>[4]   XYXY pixels of the original image
    mask         struct<size: list<int32> [height, width], counts: binary>   COCO compressed RLE
    area         int64            mask pixels at the original resolution
    pred_iou     float32          SAM's IoU-head prediction for SAM's own mask (not the HQ-corrected one)
    sam3_mask    struct (as mask), nullable   the SAM 3 detector's own mask of the instance (``--detector
                                  sam3``), to compare with HQ-SAM's ``mask``; null for other detectors, and
                                  absent from outputs written before it existed (readers treat it as null)
    stability    float32 (null)   IoU of the final mask thresholded at mask_threshold -1 and +1 (logits)
    hq_sam_iou   float32 (null)   IoU of the final (HQ-corrected) mask with SAM's own mask; 1.0 for plain SAM
    box_iou      float32 (null)   IoU of the mask's tight bounding box with its prompt box

The last three (quality signals, ``SIGNAL_FIELDS``) are null in outputs written before they existed; readers
fill them in (``conform``), so old and new outputs read alike.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

RLE_TYPE = pa.struct([("size", pa.list_(pa.int32())), ("counts", pa.binary())])
BOX_TYPE = pa.list_(pa.float32(), 4)

# Per-mask quality signals (``hqlabel.workers.quality``), added after the first outputs were written:
# nullable, and absent from older outputs (``conform`` adds them as nulls).
SIGNAL_FIELDS: list[pa.Field] = [
    pa.field("stability", pa.float32()),
    pa.field("hq_sam_iou", pa.float32()),
    pa.field("box_iou", pa.float32()),
]
SIGNAL_NAMES: tuple[str, ...] = tuple(f.name for f in SIGNAL_FIELDS)
INSTANCE_FIELDS: list[pa.Field] = [
    pa.field("instance_id", pa.int32(), nullable=False),
    pa.field("label", pa.string(), nullable=False),
    pa.field("score", pa.float32(), nullable=False),
    pa.field("box", BOX_TYPE, nullable=False),
    pa.field("mask", RLE_TYPE, nullable=False),
    pa.field("area", pa.int64(), nullable=False),
    pa.field("pred_iou", pa.float32(), nullable=False),
    pa.field("sam3_mask", RLE_TYPE, nullable=True),
    *SIGNAL_FIELDS,
]
INSTANCE_TYPE = pa.struct(INSTANCE_FIELDS)

MASKS_SCHEMA = pa.schema([pa.field("image_id", pa.string(), nullable=False), *INSTANCE_FIELDS])
ERRORS_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("stage", pa.string(), nullable=False),
        pa.field("error", pa.string(), nullable=False),
        # True when the error may go away on a retry (storage after its retries, a broken device, an actor
        # that died labeling the image): `hqlabel label ... --retry-errors` relabels these. Outputs written
        # before this column existed lack it: read it as False.
        pa.field("retryable", pa.bool_(), nullable=False),
    ]
)

# One row per image of a labeling job (OUT/images/): what happened to it.
IMAGES_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("height", pa.int32()),  # original size; null when the image could not be read
        pa.field("width", pa.int32()),
        pa.field("num_instances", pa.int32(), nullable=False),
        pa.field("error_stage", pa.string()),  # null when labeled
    ]
)

# What flows between pipeline stages: one row per image, whatever happened to it. ``shard`` names the input
# shard the image came from (outputs are written per shard).
PROMPT_BOXES_TYPE = pa.list_(pa.list_(pa.float32(), 4))
_IMAGE_KEY_FIELDS = [
    pa.field("shard", pa.string()),
    pa.field("row", pa.int64()),  # position in the shard: tells apart rows whose ids are missing or repeat
    pa.field("image_id", pa.string()),
]
SOURCE_SCHEMA = pa.schema(
    [
        *_IMAGE_KEY_FIELDS,
        pa.field("image", pa.binary()),  # encoded bytes, or null when ``uri`` says where they are
        pa.field("uri", pa.string()),
        pa.field("boxes", PROMPT_BOXES_TYPE),  # given boxes (XYXY, original pixels) for --prompts boxes
        pa.field("labels", pa.list_(pa.string())),
    ]
)
DECODED_SCHEMA = pa.schema(
    [
        *_IMAGE_KEY_FIELDS,
        pa.field("pixels", pa.binary()),  # H x W x 3 uint8 RGB, row-major, at the working resolution
        pa.field("height", pa.int32()),  # working resolution
        pa.field("width", pa.int32()),
        pa.field("orig_height", pa.int32()),  # original resolution, what masks and boxes refer to
        pa.field("orig_width", pa.int32()),
        pa.field("boxes", PROMPT_BOXES_TYPE),  # given boxes, scaled to the original size like everything else
        pa.field("labels", pa.list_(pa.string())),
        pa.field("error_stage", pa.string()),
        pa.field("error", pa.string()),
        pa.field("retryable", pa.bool_()),  # with an error: may a retry succeed (see ERRORS_SCHEMA)
    ]
)
RESULT_SCHEMA = pa.schema(
    [
        *_IMAGE_KEY_FIELDS,
        pa.field("height", pa.int32()),
        pa.field("width", pa.int32()),
        pa.field("instances", pa.list_(INSTANCE_TYPE)),
        pa.field("error_stage", pa.string()),
        pa.field("error", pa.string()),
        pa.field("retryable", pa.bool_()),
        # The Ray node that labeled the image (null outside Ray): the job records where it ran; not written.
        pa.field("node_id", pa.string()),
    ]
)


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """``table`` in ``schema``: its columns in ``schema``'s order and types, and the nullable columns it lacks
    (a table written before they existed, e.g. the quality signals) added as nulls.

    Raises:
        ValueError: a non-nullable column of ``schema`` is missing.
    """
    missing = [f for f in schema if f.name not in table.column_names]
    required = [f.name for f in missing if not f.nullable]
    if required:
        raise ValueError(f"the table lacks the columns {required}; its columns: {table.column_names}")
    for f in missing:
        table = table.append_column(f, pa.nulls(table.num_rows, f.type))
    return table.select(schema.names).cast(schema)


def results_to_tables(results: pa.Table, *, with_row: bool = False) -> tuple[pa.Table, pa.Table, pa.Table]:
    """Split a per-image ``RESULT_SCHEMA`` table into the masks, errors and images tables.

    Args:
        with_row: add a ``_row`` column (the image's position in its shard) to each table, for the writer's
            bookkeeping of partial outputs.

    Returns:
        ``(masks, errors, images)`` in ``MASKS_SCHEMA``, ``ERRORS_SCHEMA`` and ``IMAGES_SCHEMA``; an image
        with an error contributes no masks, and every image one row of ``images``.
    """
    results = results.cast(RESULT_SCHEMA)
    failed = pc.is_valid(results["error"])
    errors = results.filter(failed)
    errors = pa.table(
        {
            "image_id": errors["image_id"],
            "stage": errors["error_stage"],
            "error": errors["error"],
            "retryable": pc.fill_null(errors["retryable"], False),
        }
    ).cast(ERRORS_SCHEMA)
    if with_row:
        errors = errors.append_column("_row", results.filter(failed)["row"])

    ok = results.filter(pc.invert(failed))
    instances = ok["instances"].combine_chunks()
    flat = pc.list_flatten(instances)
    parents = pc.list_parent_indices(instances)
    columns = {"image_id": pc.take(ok["image_id"], parents)}
    for field in INSTANCE_FIELDS:
        columns[field.name] = pc.struct_field(flat, field.name)
    masks = pa.Table.from_pydict(columns).cast(MASKS_SCHEMA)
    if with_row:
        masks = masks.append_column("_row", pc.take(ok["row"], parents))
    counts = pc.fill_null(pc.list_value_length(results["instances"]), 0)
    images = pa.table(
        {
            "image_id": results["image_id"],
            "height": results["height"],
            "width": results["width"],
            "num_instances": counts,
            "error_stage": results["error_stage"],
        }
    ).cast(IMAGES_SCHEMA)
    if with_row:
        images = images.append_column("_row", results["row"])
    return masks, errors, images
