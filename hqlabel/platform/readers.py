"""Dataset readers: an input location -> shards of images -> rows of image bytes or references.

A job's unit of work and of output is the *shard*: one Parquet file of a sharded dataset, or a fixed-size
run of images of a folder or COCO file (sorted, so the same input always gives the same shards). Folders and
COCO files are listed *into* per-shard listing files (``LISTING_SCHEMA`` Parquet, written under the job's
output), streaming: the process that lists holds one shard of entries at a time, and what it keeps is one
``Shard`` per shard (id, count, listing file, fingerprint), never a row per image. Reading happens in tasks, a
Parquet row group at a time, from the dataset's own Parquet files or from the listings, so memory stays
bounded whatever the dataset size.
"""

from __future__ import annotations

import hashlib
import io
import logging
import multiprocessing
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from hqlabel.platform import storage
from hqlabel.platform.images import IMAGE_EXTENSIONS
from hqlabel.platform.schema import PROMPT_BOXES_TYPE, SOURCE_SCHEMA
from hqlabel.platform.storage import FileEntry, StorageOptions

logger = logging.getLogger(__name__)

# One row per image of a listed (folder / COCO) shard: what ``read_parquet_shards`` reads, plus what the
# fingerprint covers (``size`` and ``version``: modification time or ETag; null for COCO entries).
LISTING_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("uri", pa.string()),
        ("boxes", PROMPT_BOXES_TYPE),
        ("labels", pa.list_(pa.string())),
        ("size", pa.int64()),
        ("version", pa.string()),
    ]
)
COCO_IN_PROCESS_BYTES = 32 << 20  # larger COCO files are parsed in a child process (see ``_list_coco``)
METADATA_THREADS = 32  # concurrent Parquet footer reads when listing a sharded dataset


@dataclass(frozen=True)
class InputColumns:
    """Column names of a Parquet input."""

    id: str = "image_id"
    image: str = "image"  # encoded bytes inline
    uri: str = "uri"  # or a reference: s3://, file:// or a path relative to the dataset root
    boxes: str = "boxes"  # existing XYXY boxes (for --prompts boxes)
    labels: str = "labels"  # their class names


LISTING_COLUMNS = InputColumns()  # a listing file's columns


@dataclass(frozen=True)
class Shard:
    """A unit of work: ``source`` is the Parquet file its rows are read from (a file of the dataset, or the
    shard's listing file), ``fingerprint`` a digest of what identifies its images (ids, references, sizes and
    versions; for a dataset file its size and version), so a changed input is noticed on resume."""

    shard_id: str
    num_images: int
    source: str
    fingerprint: str = ""

    def manifest(self) -> dict:
        return {
            "id": self.shard_id,
            "source": self.source,
            "num_images": self.num_images,
            "fingerprint": self.fingerprint,
        }

    @classmethod
    def from_manifest(cls, entry: dict) -> Shard:
        return cls(entry["id"], entry["num_images"], entry["source"], entry.get("fingerprint", ""))


@dataclass
class DatasetInput:
    kind: str  # "folder", "parquet" or "coco"
    root: str
    shards: list[Shard] = field(default_factory=list)

    @property
    def num_images(self) -> int:
        return sum(s.num_images for s in self.shards)

    @property
    def columns_override(self) -> InputColumns | None:
        """The columns to read the shards' sources with when they are listings (not the dataset's own)."""
        return None if self.kind == "parquet" else LISTING_COLUMNS

    def manifest(self) -> dict:
        return {"kind": self.kind, "root": self.root, "shards": [s.manifest() for s in self.shards]}

    @classmethod
    def from_manifest(cls, manifest: dict) -> DatasetInput:
        """The input a job listed (``OUT/_manifest.json``), without listing it again.

        Raises:
            ValueError: the manifest is from a version that did not record the input's kind.
        """
        if "kind" not in manifest:
            raise ValueError("the manifest does not record the input's kind (an older version wrote it)")
        return cls(manifest["kind"], manifest["root"], [Shard.from_manifest(e) for e in manifest["shards"]])


def _shard_id(index: int) -> str:
    return f"{index:05d}"


def listing_uri(listing: str, shard: str) -> str:
    """Where shard ``shard``'s listing file lives in the listing folder ``listing``."""
    return storage.join(listing, f"{shard}.parquet")


def check_input_exists(uri: str, options: StorageOptions = StorageOptions()) -> None:
    """Fail fast when the input is missing, before anything is listed or written.

    Raises:
        FileNotFoundError: ``uri`` does not exist (the message says what an input can be).
    """
    if not storage.exists(uri, options):
        raise FileNotFoundError(
            f"input {uri!r} does not exist; pass a folder of images, Parquet or COCO JSON"
        )


def list_input(
    uri: str,
    *,
    listing: str,
    write_listing: bool = True,
    columns: InputColumns = InputColumns(),
    options: StorageOptions = StorageOptions(),
    shard_size: int = 1000,
    coco_images: str | None = None,
    need_boxes: bool = False,
    earlier: list[Shard] | None = None,
    allow: tuple[str, ...] = (),
    max_json_bytes: int = storage.DEFAULT_MAX_JSON_BYTES,
) -> DatasetInput:
    """Resolve a folder of images, a Parquet file or folder of shards, or a COCO JSON file (local or S3).

    Args:
        listing: folder for the listing files of a folder or COCO input (one ``SHARD.parquet`` each, local or
            S3; a job uses ``OUT/_listing``).
        write_listing: write them; False only computes the shards and their fingerprints (to compare a
            resumed job's input with the earlier run's, whose listings are kept).
        need_boxes: the job takes its prompts from existing boxes (``--prompts boxes``), so the input must
            have them (a ``boxes`` column, or COCO annotations).
        earlier: the shards of an earlier listing of the same input (a resumed job): Parquet files whose size
            and version have not changed are not opened again.
        allow: places outside the input (``--allow-prefix``) that a local folder's symlinks may lead to;
            other symlinks leading out of the folder are skipped, with a warning (``storage.walk``).
        max_json_bytes: a COCO file larger than this is refused (``--max-json-bytes``) before it is read.

    Raises:
        FileNotFoundError: ``uri`` does not exist.
        ValueError: no images in it, or it lacks the columns the job needs (or they have the wrong types).
        TooLargeError: a COCO file over ``max_json_bytes``.
    """
    if shard_size < 1:
        raise ValueError(f"shard size must be >= 1, got {shard_size}")
    check_input_exists(uri, options)
    # Local paths become absolute: a bare file name has a folder, and relative image references resolve the
    # same in every worker, whatever its working directory.
    uri = uri if storage.is_s3(uri) else storage.resolve(uri, options)[1]
    if coco_images is not None and not storage.is_s3(coco_images):
        coco_images = storage.resolve(coco_images, options)[1]
    writer = _ListingWriter(listing, shard_size, options, write=write_listing)
    if uri.lower().endswith(".json"):
        return _list_coco(uri, coco_images, writer, options, max_json_bytes)
    if not storage.is_dir(uri, options):
        if not uri.lower().endswith(".parquet"):
            raise ValueError(
                f"input file {uri} is not Parquet or COCO JSON; pass a folder, .parquet or .json"
            )
        entry = storage.FileEntry(uri, 0, "")
        root = uri.rsplit("/", 1)[0]
        return _list_parquet([entry], root, columns, options, need_boxes, stat=True, earlier=earlier)
    if next(storage.walk(uri, (".parquet",), options, allow=allow), None) is not None:
        parquet = list(storage.walk(uri, (".parquet",), options, allow=allow))  # one entry per shard
        return _list_parquet(parquet, uri, columns, options, need_boxes, earlier=earlier)
    if need_boxes:
        raise ValueError(
            f"--prompts boxes needs existing boxes, but {uri} is a folder of images; give a COCO JSON or "
            "Parquet with a boxes column"
        )
    prefix = uri.rstrip("/")
    for image in storage.walk(uri, IMAGE_EXTENSIONS, options, allow=allow):
        writer.add(image.uri[len(prefix) :].lstrip("/"), image.uri, size=image.size, version=image.version)
    shards = writer.close()
    if not shards:
        raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) and no Parquet files found under {uri}")
    return DatasetInput("folder", uri, shards)


class _ListingWriter:
    """Cuts a stream of listed images into shards of ``shard_size``; writes each shard's listing file into
    ``listing`` (when ``write``) and keeps only its ``Shard``."""

    def __init__(self, listing: str, shard_size: int, options: StorageOptions, *, write: bool = True):
        self.listing, self.shard_size, self.options, self.write = listing, shard_size, options, write
        self.rows: list[dict[str, Any]] = []
        self.shards: list[Shard] = []

    def add(self, image_id: str, uri: str, *, size=None, version=None, boxes=None, labels=None) -> None:
        self.rows.append(
            {
                "image_id": image_id,
                "uri": uri,
                "boxes": boxes,
                "labels": labels,
                "size": size,
                "version": version,
            }
        )
        if len(self.rows) == self.shard_size:
            self._flush()

    def _flush(self) -> None:
        shard_id = _shard_id(len(self.shards))
        digest = hashlib.sha256()
        for row in self.rows:
            digest.update(repr(tuple(row.values())).encode())
        source = listing_uri(self.listing, shard_id)
        if self.write:
            buf = io.BytesIO()
            pq.write_table(pa.Table.from_pylist(self.rows, schema=LISTING_SCHEMA), buf, compression="zstd")
            storage.write_bytes(source, buf.getvalue(), self.options)
        self.shards.append(Shard(shard_id, len(self.rows), source, digest.hexdigest()[:32]))
        self.rows = []

    def close(self) -> list[Shard]:
        if self.rows:
            self._flush()
        return self.shards


def _parquet_shard(
    index: int, entry: FileEntry, columns: InputColumns, options: StorageOptions, need_boxes: bool, stat: bool
) -> Shard:
    fs, path = storage.resolve(entry.uri, options)
    if stat:  # a single file named directly: its size and version were not listed
        info = storage.with_retries(lambda: fs.get_file_info(path), entry.uri)
        version = str(info.mtime_ns) if info.mtime_ns is not None else ""
        entry = FileEntry(entry.uri, info.size or 0, version)

    def corrupt(error: Exception) -> ValueError:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        return ValueError(
            f"Parquet input {entry.uri} is not a readable Parquet file (corrupt or truncated footer: "
            f"{reason}); replace or remove it"
        )

    def footer() -> pq.FileMetaData:
        try:
            return pq.read_metadata(path, filesystem=fs)
        except OSError as e:  # garbage metadata is an OSError too: a corrupt file, not a fault to retry
            if "thrift" in str(e).lower():
                raise corrupt(e) from None
            raise

    try:
        meta = storage.with_retries(footer, entry.uri)
        arrow_schema = meta.schema.to_arrow_schema()
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:  # not OSError: a corrupt file, not a fault
        raise corrupt(e) from None
    names = arrow_schema.names  # top-level columns (not nested leaves)
    problems = [
        f"column '{name}' ({option}) is {arrow_schema.field(name).type}, expected {wanted}"
        for name, option, wanted, ok in _column_checks(columns)
        if name in names and not ok(arrow_schema.field(name).type)
    ]
    if columns.id not in names:
        problems.append(f"no image id column '{columns.id}' (--id-column)")
    if columns.image not in names and columns.uri not in names:
        problems.append(
            f"neither image bytes '{columns.image}' (--image-column) nor '{columns.uri}' (--uri-column)"
        )
    if need_boxes and columns.boxes not in names:
        problems.append(f"no boxes column '{columns.boxes}' (--boxes-column) for --prompts boxes")
    if problems:
        raise ValueError(f"Parquet input {entry.uri}: {'; '.join(problems)}. Its columns: {names}")
    return Shard(_shard_id(index), meta.num_rows, entry.uri, _file_fingerprint(entry, meta.num_rows))


def _list(type_: pa.DataType) -> bool:
    return pa.types.is_list(type_) or pa.types.is_large_list(type_) or pa.types.is_fixed_size_list(type_)


def _is_boxes(type_: pa.DataType) -> bool:
    """A list (per image) of lists (per box) of numbers: castable to ``PROMPT_BOXES_TYPE``."""
    return (
        _list(type_)
        and _list(type_.value_type)
        and (
            pa.types.is_integer(type_.value_type.value_type)
            or pa.types.is_floating(type_.value_type.value_type)
        )
    )


def _values(type_: pa.DataType) -> pa.DataType:
    """A dictionary-encoded type's value type (a pandas categorical's strings); other types as they are."""
    return type_.value_type if pa.types.is_dictionary(type_) else type_


def _is_string(type_: pa.DataType) -> bool:
    type_ = _values(type_)
    return pa.types.is_string(type_) or pa.types.is_large_string(type_) or pa.types.is_string_view(type_)


def _is_id(type_: pa.DataType) -> bool:
    return _is_string(type_) or pa.types.is_integer(_values(type_))


def _is_bytes(type_: pa.DataType) -> bool:
    type_ = _values(type_)
    return pa.types.is_binary(type_) or pa.types.is_large_binary(type_) or pa.types.is_binary_view(type_)


def _is_labels(type_: pa.DataType) -> bool:
    return _list(type_) and _is_string(type_.value_type)


def _column_checks(columns: InputColumns):
    """``(column, option, expected, check)`` of each input column: what a Parquet column's type must be for
    ``read_parquet_shards`` to read it (so a wrong type is refused at listing, before the job starts)."""
    return [
        (columns.id, "--id-column", "strings or integers", _is_id),
        (columns.image, "--image-column", "binary (encoded image bytes)", _is_bytes),
        (columns.uri, "--uri-column", "strings (image references)", _is_string),
        (columns.boxes, "--boxes-column", "a list of [x0, y0, x1, y1] number lists per image", _is_boxes),
        (columns.labels, "--labels-column", "a list of strings per image", _is_labels),
    ]  # fmt: skip


def _file_fingerprint(entry: FileEntry, num_rows: int) -> str:
    return hashlib.sha256(f"{entry.size}\t{entry.version}\t{num_rows}".encode()).hexdigest()[:32]


def _list_parquet(
    files: list[FileEntry],
    root: str,
    columns: InputColumns,
    options: StorageOptions,
    need_boxes: bool,
    *,
    stat: bool = False,
    earlier: list[Shard] | None = None,
) -> DatasetInput:
    """One shard per file; the footers are read ``METADATA_THREADS`` at a time (thousands of S3 shards would
    otherwise cost thousands of serial round trips). A file listed with the same size and version as in
    ``earlier`` (the shards of the run being resumed) keeps its earlier shard without a footer read."""
    known = {shard.source: shard for shard in earlier or []}

    def shard(index: int, entry: FileEntry) -> Shard:
        before = known.get(entry.uri)
        unchanged = (
            not stat
            and before is not None
            and before.shard_id == _shard_id(index)
            and _file_fingerprint(entry, before.num_images) == before.fingerprint
        )
        if unchanged:
            return before
        return _parquet_shard(index, entry, columns, options, need_boxes, stat)

    with ThreadPoolExecutor(min(METADATA_THREADS, len(files))) as pool:
        shards = list(pool.map(lambda item: shard(*item), enumerate(files)))
    return DatasetInput("parquet", root, shards)


def _list_coco_here(
    uri: str, root: str, writer: _ListingWriter, options: StorageOptions, max_json_bytes: int
) -> DatasetInput:
    from hqlabel.platform.coco import read_coco

    data = storage.read_bytes(uri, options, max_bytes=max_json_bytes, option="--max-json-bytes")
    images, _ = read_coco(data, root)
    if not images:
        raise ValueError(f"COCO file {uri} lists no images")
    for im in images:
        writer.add(im.image_id, im.uri, boxes=im.boxes, labels=im.labels)
    return DatasetInput("coco", root, writer.close())


def _list_coco(
    uri: str, images_root: str | None, writer: _ListingWriter, options: StorageOptions, max_json_bytes: int
) -> DatasetInput:
    """A COCO file's listing. The JSON document is parsed whole (its annotations are grouped by image), so a
    large one is parsed in a short-lived child process: the parse's memory (several times the file's size)
    then never stays with the driver for the rest of the job."""
    root = images_root or uri.rsplit("/", 1)[0]
    fs, path = storage.resolve(uri, options)
    size = storage.with_retries(lambda: fs.get_file_info(path), uri).size or 0
    if size > max_json_bytes:  # before a child process is started for it
        raise storage.TooLargeError(
            f"COCO file {uri} is {size} bytes, over the cap of {max_json_bytes} bytes; raise "
            "--max-json-bytes to read it"
        )
    if size <= COCO_IN_PROCESS_BYTES:
        return _list_coco_here(uri, root, writer, options, max_json_bytes)
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_list_coco_here, uri, root, writer, options, max_json_bytes).result()


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
