"""Instance datasets: images with their object masks, the input of ``hqlabel train`` and ``hqlabel eval``.

One format for every source of training / evaluation masks (curated labels, imported ground truth, the
synthetic fine-structure set), self-contained so that a cluster job needs nothing else:

    DIR/dataset.json                  {"format": "hqlabel-instances/1", "kind", "source", "provenance",
                                       "num_images", "num_instances", "labels"}
    DIR/instances/part-00000.parquet  one row per image, INSTANCES_SCHEMA, row groups of ROW_GROUP_SIZE

    image_id   string
    image      binary            the encoded image (JPEG / PNG bytes)
    height     int32             image size, what masks and boxes refer to
    width      int32
    instances  list<struct>      one entry per object:
        instance_id  int32
        label        string
        box          fixed_size_list<float32>[4]   XYXY pixels (tight box of the mask, pixel edges)
        mask         struct<size, counts>          COCO compressed RLE, H x W
        area         int64
        score        float32 (null for ground truth)   detector confidence of a curated label
        pred_iou     float32 (null for ground truth)   HQ-SAM IoU prediction of a curated label
        origin       string           where the mask came from: "gt", "labels:<labels folder>", "synthetic"
        review       string (null: not reviewed)   a curated label's review: "accept", "relabel", or "fix"
                                                   (corrected, no decision); see ``hqlabel review``
        corrected    bool (null: not reviewed)     the mask is a reviewer's click fix, not the labeler's

``open_instances`` also reads COCO instances JSON and mask folders directly (converted in memory), so
``--data`` takes any of them.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from hqlabel.platform import storage
from hqlabel.platform.schema import BOX_TYPE, RLE_TYPE
from hqlabel.platform.storage import StorageOptions

FORMAT = "hqlabel-instances/1"
DEFAULT_PART_SIZE = 256  # images per Parquet part
ROW_GROUP_SIZE = 8  # images per Parquet row group: what reading one image lazily reads (training's index)

INSTANCE_ENTRY_TYPE = pa.struct(
    [
        pa.field("instance_id", pa.int32(), nullable=False),
        pa.field("label", pa.string(), nullable=False),
        pa.field("box", BOX_TYPE, nullable=False),
        pa.field("mask", RLE_TYPE, nullable=False),
        pa.field("area", pa.int64(), nullable=False),
        pa.field("score", pa.float32()),
        pa.field("pred_iou", pa.float32()),
        pa.field("origin", pa.string()),
        pa.field("review", pa.string()),
        pa.field("corrected", pa.bool_()),
    ]
)
INSTANCES_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("image", pa.binary(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("instances", pa.list_(INSTANCE_ENTRY_TYPE), nullable=False),
    ]
)


@dataclass
class Instance:
    """One object mask. ``mask`` is COCO RLE ``{"size": [H, W], "counts": bytes}``; ``box`` XYXY pixels."""

    instance_id: int
    label: str
    mask: dict[str, Any]
    box: tuple[float, float, float, float] | None = None
    area: int | None = None
    score: float | None = None
    pred_iou: float | None = None
    origin: str = "gt"
    review: str | None = None
    corrected: bool | None = None

    def __post_init__(self) -> None:
        from hqlabel.platform.rle import mask_area, rle_to_bbox

        if self.box is None:
            self.box = rle_to_bbox(self.mask)
        if self.area is None:
            self.area = mask_area(self.mask)

    @classmethod
    def from_row(cls, row: dict[str, Any], *, origin: str | None = None) -> Instance:
        """From a row with the instance fields (an ``instances`` entry, or a labels folder's masks row);
        ``origin`` overrides the row's (a masks row has none)."""
        return cls(
            int(row["instance_id"]),
            row["label"],
            row["mask"],
            tuple(row["box"]),
            int(row["area"]),
            row["score"],
            row["pred_iou"],
            origin or row.get("origin") or "gt",
            row.get("review"),
            row.get("corrected"),
        )


@dataclass
class ImageInstances:
    """One image with its objects. ``image`` holds the encoded bytes; ``height``/``width`` its size."""

    image_id: str
    image: bytes
    height: int
    width: int
    instances: list[Instance] = field(default_factory=list)

    def masks(self, indices: Iterable[int] | None = None) -> np.ndarray:
        """N x H x W bool, in ``instances`` order; only those at ``indices`` (in their order) if given."""
        from hqlabel.platform.rle import decode_mask

        chosen = self.instances if indices is None else [self.instances[int(k)] for k in indices]
        if not chosen:
            return np.zeros((0, self.height, self.width), dtype=bool)
        return np.stack([decode_mask(i.mask) for i in chosen])

    def to_row(self) -> dict[str, Any]:
        for inst in self.instances:
            size = [int(v) for v in inst.mask["size"]]
            if size != [self.height, self.width]:
                raise ValueError(
                    f"image {self.image_id!r}: instance {inst.instance_id} mask is {size}, "
                    f"the image is {[self.height, self.width]} (H, W); masks must have the image's size"
                )
        return {
            "image_id": self.image_id,
            "image": self.image,
            "height": self.height,
            "width": self.width,
            "instances": [
                {
                    "instance_id": i.instance_id,
                    "label": i.label,
                    "box": list(i.box),
                    "mask": {"size": [int(v) for v in i.mask["size"]], "counts": _counts_bytes(i.mask)},
                    "area": i.area,
                    "score": i.score,
                    "pred_iou": i.pred_iou,
                    "origin": i.origin,
                    "review": i.review,
                    "corrected": i.corrected,
                }
                for i in self.instances
            ],
        }

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> ImageInstances:
        return cls(
            row["image_id"],
            row["image"],
            int(row["height"]),
            int(row["width"]),
            [Instance.from_row(i) for i in row["instances"]],
        )


def _counts_bytes(rle: dict[str, Any]) -> bytes:
    counts = rle["counts"]
    if isinstance(counts, str):
        return counts.encode("ascii")
    if isinstance(counts, (bytes, bytearray, memoryview)):
        return bytes(counts)
    raise ValueError(
        f"instance masks must be compressed RLE (counts bytes or str), got counts of type "
        f"{type(counts).__name__}; convert with hqlabel.platform.rle.encode_mask(decode_mask(rle))"
    )


def part_uri(out: str, index: int) -> str:
    return storage.join(out, "instances", f"part-{index:05d}.parquet")


def write_instances(
    images: Iterable[ImageInstances],
    out: str,
    *,
    kind: str,
    source: str,
    provenance: dict[str, Any] | None = None,
    options: StorageOptions = StorageOptions(),
    part_size: int = DEFAULT_PART_SIZE,
) -> dict[str, Any]:
    """Stream ``images`` into an instance dataset at ``out`` (local or s3://), ``part_size`` images a part.

    ``dataset.json`` is written last, so a folder without it is an unfinished write (its ``instances/``
    parts are replaced). An existing dataset at ``out`` is refused (choose another folder or delete it).
    ``provenance`` is serialised after ``images`` is exhausted, so a generator may fill in counts as it goes.

    Returns:
        The ``dataset.json`` document.
    """
    if part_size < 1:
        raise ValueError(f"part_size must be >= 1, got {part_size}")
    manifest_uri = storage.join(out, "dataset.json")
    if storage.exists(manifest_uri, options):
        raise ValueError(f"{out} already holds an instance dataset; choose another --out or delete it")
    storage.delete(storage.join(out, "instances"), options)  # parts of an unfinished earlier write
    rows: list[dict[str, Any]] = []
    parts = num_images = num_instances = 0
    labels: dict[str, int] = {}
    seen: set[str] = set()

    def flush() -> None:
        nonlocal parts, rows
        if rows:
            table = pa.Table.from_pylist(rows, schema=INSTANCES_SCHEMA)
            with storage.parquet_writer(part_uri(out, parts), INSTANCES_SCHEMA, options) as writer:
                writer.write_table(table, row_group_size=ROW_GROUP_SIZE)
            parts += 1
            rows = []

    for image in images:
        if image.image_id in seen:
            raise ValueError(f"image id {image.image_id!r} appears twice; image ids must be unique")
        seen.add(image.image_id)
        rows.append(image.to_row())
        num_images += 1
        num_instances += len(image.instances)
        for inst in image.instances:
            labels[inst.label] = labels.get(inst.label, 0) + 1
        if len(rows) >= part_size:
            flush()
    flush()
    manifest = {
        "format": FORMAT,
        "kind": kind,
        "source": source,
        "provenance": provenance or {},
        "num_images": num_images,
        "num_instances": num_instances,
        "num_parts": parts,
        "labels": dict(sorted(labels.items())),
    }
    storage.write_bytes(manifest_uri, json.dumps(manifest, indent=2).encode(), options)
    return manifest


def is_instance_dataset(uri: str, options: StorageOptions = StorageOptions()) -> bool:
    return storage.exists(storage.join(uri, "dataset.json"), options)


def read_manifest(uri: str, options: StorageOptions = StorageOptions()) -> dict[str, Any]:
    manifest_uri = storage.join(uri, "dataset.json")
    if not storage.exists(manifest_uri, options):
        raise FileNotFoundError(
            f"{uri} is not an instance dataset (no dataset.json); make one with `hqlabel curate` or "
            "`hqlabel import-gt`, or pass a COCO instances JSON or a mask folder"
        )
    manifest = json.loads(storage.read_bytes(manifest_uri, options))
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{manifest_uri} has format {manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest


def part_uris(uri: str, options: StorageOptions = StorageOptions()) -> list[str]:
    """The Parquet parts of the instance dataset at ``uri``, in order."""
    manifest = read_manifest(uri, options)
    if "num_parts" in manifest:  # exactly the parts this dataset.json describes
        return [part_uri(uri, k) for k in range(int(manifest["num_parts"]))]
    return storage.list_files(storage.join(uri, "instances"), (".parquet",), options)


def iter_instances(uri: str, options: StorageOptions = StorageOptions()) -> Iterator[ImageInstances]:
    """Images of an instance dataset written by ``write_instances``, part by part, in order."""
    for part in part_uris(uri, options):
        table = storage.read_parquet(part, options)
        for row in table.to_pylist():
            yield ImageInstances.from_row(row)


def open_instances(
    uri: str,
    options: StorageOptions = StorageOptions(),
    *,
    images_root: str | None = None,
    label: str = "object",
) -> Iterator[ImageInstances]:
    """Images with masks from any supported source, detected from ``uri``:

    - an instance dataset folder (``dataset.json``), from ``hqlabel curate`` / ``hqlabel import-gt``;
    - a COCO instances JSON (``.json``; polygons or RLE), images under ``images_root`` (default: its folder);
    - a mask folder (DIS5K / ThinObject-5K layout: an image folder and a mask folder of same-stem PNGs),
      one object per image named ``label``.
    """
    if is_instance_dataset(uri, options):
        return iter_instances(uri, options)
    from hqlabel.platform import groundtruth

    if uri.lower().endswith(".json"):
        return groundtruth.read_coco_instances(uri, options, images_root=images_root)
    if storage.is_dir(uri, options):
        return groundtruth.read_mask_folder(uri, options, label=label)
    raise FileNotFoundError(
        f"{uri}: not an instance dataset folder, a COCO instances .json or a mask folder; check the path"
    )
