"""Dataset readers: an input location -> shards of images -> rows of image bytes or references.

A job's unit of work and of output is the *shard*: one Parquet file of a sharded dataset, or a fixed-size
run of images of a folder or COCO file (sorted, so the same input always gives the same shards). Listing
happens once in the driver and is cheap (names and Parquet footers); reading happens in tasks, a Parquet row
group at a time, so memory stays bounded whatever the dataset size.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from hqlabel.platform import storage
from hqlabel.platform.images import IMAGE_EXTENSIONS
from hqlabel.platform.schema import PROMPT_BOXES_TYPE, SOURCE_SCHEMA
from hqlabel.platform.storage import StorageOptions

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class InputColumns:
    """Column names of a Parquet input."""

    id: str = "image_id"
    image: str = "image"  # encoded bytes inline
    uri: str = "uri"  # or a reference: s3://, file:// or a path relative to the dataset root
    boxes: str = "boxes"  # existing XYXY boxes (for --prompts boxes)
    labels: str = "labels"  # their class names


@dataclass
class Shard:
    """A unit of work: ``source`` (a Parquet file read in a task) or ``rows`` listed up front."""

    shard_id: str
    num_images: int
    source: str | None = None
    rows: list[dict] = field(default_factory=list, repr=False)

    def manifest(self) -> dict:
        return {"id": self.shard_id, "source": self.source, "num_images": self.num_images}


@dataclass
class DatasetInput:
    kind: str  # "folder", "parquet" or "coco"
    root: str
    shards: list[Shard]

    @property
    def num_images(self) -> int:
        return sum(s.num_images for s in self.shards)


def _shard_id(index: int) -> str:
    return f"{index:05d}"


def list_input(
    uri: str,
    *,
    columns: InputColumns = InputColumns(),
    options: StorageOptions = StorageOptions(),
    shard_size: int = 1000,
    coco_images: str | None = None,
    need_boxes: bool = False,
) -> DatasetInput:
    """Resolve a folder of images, a Parquet file or folder of shards, or a COCO JSON file (local or S3).

    Args:
        need_boxes: the job takes its prompts from existing boxes (``--prompts boxes``), so the input must
            have them (a ``boxes`` column, or COCO annotations).

    Raises:
        FileNotFoundError: ``uri`` does not exist.
        ValueError: no images in it, or it lacks the columns the job needs.
    """
    if shard_size < 1:
        raise ValueError(f"shard size must be >= 1, got {shard_size}")
    if not storage.exists(uri, options):
        raise FileNotFoundError(
            f"input {uri!r} does not exist; pass a folder of images, Parquet or COCO JSON"
        )
    # Local paths become absolute: a bare file name has a folder, and relative image references resolve the
    # same in every worker, whatever its working directory.
    uri = uri if storage.is_s3(uri) else storage.resolve(uri, options)[1]
    if coco_images is not None and not storage.is_s3(coco_images):
        coco_images = storage.resolve(coco_images, options)[1]
    if uri.lower().endswith(".json"):
        return _list_coco(uri, coco_images, shard_size, options)
    if not storage.is_dir(uri, options):
        if not uri.lower().endswith(".parquet"):
            raise ValueError(
                f"input file {uri} is not Parquet or COCO JSON; pass a folder, .parquet or .json"
            )
        return _list_parquet([uri], uri.rsplit("/", 1)[0], columns, options, need_boxes)
    parquet = storage.list_files(uri, (".parquet",), options)
    if parquet:
        return _list_parquet(parquet, uri, columns, options, need_boxes)
    if need_boxes:
        raise ValueError(
            f"--prompts boxes needs existing boxes, but {uri} is a folder of images; give a COCO JSON or "
            "Parquet with a boxes column"
        )
    images = storage.list_files(uri, IMAGE_EXTENSIONS, options)
    if not images:
        raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) and no Parquet files found under {uri}")
    prefix = uri.rstrip("/") if storage.is_s3(uri) else storage.resolve(uri, options)[1]
    rows = [
        {
            "image_id": image[len(prefix) :].lstrip("/"),
            "image": None,
            "uri": image,
            "boxes": None,
            "labels": None,
        }
        for image in images
    ]
    return DatasetInput("folder", uri, _chunk(rows, shard_size))


def _chunk(rows: list[dict], shard_size: int) -> list[Shard]:
    shards = []
    for index, start in enumerate(range(0, len(rows), shard_size)):
        shard_id = _shard_id(index)
        part = [dict(row, shard=shard_id, row=k) for k, row in enumerate(rows[start : start + shard_size])]
        shards.append(Shard(shard_id, len(part), rows=part))
    return shards


def _list_parquet(
    files: list[str], root: str, columns: InputColumns, options: StorageOptions, need_boxes: bool
) -> DatasetInput:
    shards = []
    for index, file in enumerate(files):
        fs, path = storage.resolve(file, options)
        meta = storage.with_retries(lambda fs=fs, path=path: pq.read_metadata(path, filesystem=fs), file)
        names = meta.schema.to_arrow_schema().names  # top-level columns (not nested leaves)
        problems = []
        if columns.id not in names:
            problems.append(f"no image id column '{columns.id}' (--id-column)")
        if columns.image not in names and columns.uri not in names:
            problems.append(
                f"neither image bytes '{columns.image}' (--image-column) nor '{columns.uri}' (--uri-column)"
            )
        if need_boxes and columns.boxes not in names:
            problems.append(f"no boxes column '{columns.boxes}' (--boxes-column) for --prompts boxes")
        if problems:
            raise ValueError(f"Parquet input {file}: {'; '.join(problems)}. Its columns: {names}")
        shards.append(Shard(_shard_id(index), meta.num_rows, source=file))
    return DatasetInput("parquet", root, shards)


def _list_coco(uri: str, images_root: str | None, shard_size: int, options: StorageOptions) -> DatasetInput:
    from hqlabel.platform.coco import read_coco

    root = images_root or uri.rsplit("/", 1)[0]
    images, _ = read_coco(storage.read_bytes(uri, options), root)
    if not images:
        raise ValueError(f"COCO file {uri} lists no images")
    rows = [
        {"image_id": im.image_id, "image": None, "uri": im.uri, "boxes": im.boxes, "labels": im.labels}
        for im in images
    ]
    return DatasetInput("coco", root, _chunk(rows, shard_size))


def _resolve_uri(reference: str, root: str) -> str:
    """A row's ``uri``: absolute (``s3://``, ``file://``, ``/path``) or relative to the dataset root."""
    if reference.startswith(("s3://", "file://", "/")):
        return reference
    return storage.join(root, reference)


def read_parquet_shards(
    batch: pa.Table, *, root: str, columns: InputColumns, options: StorageOptions
) -> Iterator[pa.Table]:
    """Ray Data UDF: for each (``shard``, ``source``) row, yield the shard's images a row group at a time,
    as ``SOURCE_SCHEMA`` tables (whatever the input's column names)."""
    for item in batch.to_pylist():
        fs, path = storage.resolve(item["source"], options)
        parquet = storage.with_retries(
            lambda fs=fs, path=path: pq.ParquetFile(fs.open_input_file(path)), path
        )
        names = parquet.schema_arrow.names
        offset = 0
        wanted = [
            c for c in (columns.id, columns.image, columns.uri, columns.boxes, columns.labels) if c in names
        ]
        for group in range(parquet.num_row_groups):
            table = storage.with_retries(
                lambda group=group, parquet=parquet, wanted=wanted: parquet.read_row_group(
                    group, columns=wanted
                ),
                f"{path} row group {group}",
            )
            n = table.num_rows

            def column(name: str, type_: pa.DataType, table=table, n=n) -> pa.Array:
                if name not in table.column_names:
                    return pa.nulls(n, type_)
                return table[name].combine_chunks().cast(type_)

            uris = column(columns.uri, pa.string()).to_pylist()
            yield pa.table(
                {
                    "shard": pa.array([item["shard"]] * n, pa.string()),
                    "row": pa.array(range(offset, offset + n), pa.int64()),
                    "image_id": column(columns.id, pa.string()),
                    "image": column(columns.image, pa.binary()),
                    "uri": pa.array(
                        [None if u is None else _resolve_uri(u, root) for u in uris], pa.string()
                    ),
                    "boxes": column(columns.boxes, PROMPT_BOXES_TYPE),
                    "labels": column(columns.labels, pa.list_(pa.string())),
                },
                schema=SOURCE_SCHEMA,
            )
            offset += n
