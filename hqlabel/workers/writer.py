"""Writing a job's results, one output shard per input shard, atomically, with a completion marker.

While a shard is in flight its batches land under ``OUT/_tmp/shard-ID/{masks,errors,images}/part-HASH``
(names derived from the batch's row positions in the shard, so a retried batch overwrites itself), each
sorted by image id and split into row groups of about ``PART_ROW_GROUP_BYTES``. When every image of the
shard has arrived, ``finalize_shard`` merges the parts, drops any row seen twice (an image written by two
attempts of a retried batch takes all its rows from the one part that is read first, never a mix), writes
``OUT/{masks,errors,images}/part-ID.parquet`` (each atomically, sorted by image id) and then the marker
``OUT/_done/ID.json``. Readers of ``OUT/masks`` see only finished shards (names starting with ``_`` are
skipped); a rerun skips shards that have a marker and redoes the rest from scratch.

The merge streams: it reads the key columns of all parts first, decides which rows to keep and in which
order, then copies the rows over a few row groups at a time, so its memory does not grow with the shard.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import socket
from collections import Counter, OrderedDict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from hqlabel.platform import storage
from hqlabel.platform.schema import ERRORS_SCHEMA, IMAGES_SCHEMA, MASKS_SCHEMA, conform, results_to_tables
from hqlabel.platform.sources import files_by_shard
from hqlabel.platform.storage import StorageOptions

STATS_SCHEMA = pa.schema([("shard", pa.string()), ("node_id", pa.string()), ("images", pa.int64())])
TABLES = {"masks": MASKS_SCHEMA, "errors": ERRORS_SCHEMA, "images": IMAGES_SCHEMA}
# What tells two rows of one image apart, per table (images are told apart by ``_row``, else by image id).
ROW_KEYS = {"masks": ["instance_id"], "errors": [], "images": []}
RETRYABLE = "_retryable"  # ``_merge``'s count of retryable error rows (beside the counts per stage)
PART_ROW_GROUP_BYTES = 1 << 20  # row groups of a temporary part: the unit ``finalize_shard`` reads
FINALIZE_MEMORY_BYTES = 64 << 20  # about the most row data ``finalize_shard`` holds at once, per table


def tmp_dir(out: str, shard: str) -> str:
    return storage.join(out, "_tmp", f"shard-{shard}")


def marker_uri(out: str, shard: str) -> str:
    return storage.join(out, "_done", f"{shard}.json")


def _write_part(table: pa.Table, uri: str, keys: list[str], options: StorageOptions) -> None:
    """A temporary part, atomically and uncompressed: it is read back once by ``finalize_shard`` and deleted,
    so compressing it (and decompressing it there) would be wasted CPU; the final files are compressed.

    Rows are sorted (stably) by image id then ``keys``, the output order, so that ``finalize_shard`` reads
    each part front to back, one row group of about ``PART_ROW_GROUP_BYTES`` at a time.
    """
    table = table.sort_by([("image_id", "ascending")] + [(k, "ascending") for k in keys])
    rows_per_group = max(1, table.num_rows * PART_ROW_GROUP_BYTES // max(table.nbytes, 1))
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="none", row_group_size=rows_per_group)
    storage.write_bytes(uri, buf.getvalue(), options)


def write_parts(batch: pa.Table, *, out: str, options: StorageOptions = StorageOptions()) -> pa.Table:
    """Ray Data UDF: write one batch of ``RESULT_SCHEMA`` rows into their shards' temporary folders.

    Returns:
        ``STATS_SCHEMA`` rows: images written per shard and per Ray node that labeled them (``node_id``).
    """
    stats = []
    for shard in pc.unique(batch["shard"]).to_pylist():
        rows = batch.filter(pc.equal(batch["shard"], shard))
        # Named by the rows' positions in the shard (unique, unlike ids, which may repeat or be blank), so a
        # retried batch overwrites its own earlier part and no other batch's.
        positions = rows["row"].to_pylist() if "row" in rows.column_names else [None]
        key = positions if None not in positions else rows["image_id"].to_pylist()
        digest = hashlib.sha1("\n".join(map(str, key)).encode()).hexdigest()[:20]
        for name, table in zip(TABLES, results_to_tables(rows, with_row=True), strict=True):
            uri = storage.join(tmp_dir(out, shard), name, f"part-{digest}.parquet")
            _write_part(table, uri, ROW_KEYS[name], options)
        for node_id, images in Counter(rows["node_id"].to_pylist()).items():
            stats.append({"shard": shard, "node_id": node_id, "images": images})
    return pa.Table.from_pylist(stats, schema=STATS_SCHEMA)


class _Parts:
    """The temporary parts of one table of a shard (``*.parquet`` under ``uri``, in path order).

    Raises:
        FileNotFoundError: there are none.
    """

    def __init__(self, uri: str, options: StorageOptions):
        self.fs, _ = storage.resolve(uri, options)
        self.paths = [storage.resolve(f, options)[1] for f in storage.list_files(uri, (".parquet",), options)]
        if not self.paths:
            raise FileNotFoundError(f"no Parquet files under {uri}")
        self.metadata: list[pq.FileMetaData] = []
        self.pre_buffer = not isinstance(self.fs, pafs.LocalFileSystem)  # fewer, larger S3 requests

    def read_keys(self, keys: list[str]) -> pa.Table:
        """The key columns of every part: ``image_id``, ``_row`` (null where unknown), ``keys``, and where
        each row is: ``_part`` (index into ``paths``) and ``_index`` (row within the part)."""
        tables = []
        self.metadata = []
        for p, path in enumerate(self.paths):

            def read(path: str = path) -> tuple[pa.Table, pq.FileMetaData]:
                with self.fs.open_input_file(path) as f:
                    part = pq.ParquetFile(f, pre_buffer=self.pre_buffer)
                    has_row = "_row" in part.schema_arrow.names
                    return part.read(["image_id", *keys] + ["_row"] * has_row), part.metadata

            table, metadata = storage.with_retries(read, f"reading {path}")
            self.metadata.append(metadata)
            if "_row" not in table.column_names:
                table = table.append_column("_row", pa.nulls(table.num_rows, pa.int64()))
            n = table.num_rows
            tables.append(
                table.select(["image_id", "_row", *keys])
                .append_column("_part", pa.array(np.full(n, p, np.int32)))
                .append_column("_index", pa.array(np.arange(n, dtype=np.int64)))
            )
        return pa.concat_tables(tables)

    def read_row_group(self, part: int, group: int) -> pa.Table:
        """One row group of one part (after ``read_keys``), without the bookkeeping column ``_row``."""
        path, metadata = self.paths[part], self.metadata[part]
        columns = [name for name in metadata.schema.to_arrow_schema().names if name != "_row"]

        def read() -> pa.Table:
            with self.fs.open_input_file(path) as f:
                return pq.ParquetFile(f, metadata=metadata, pre_buffer=self.pre_buffer).read_row_group(
                    group, columns=columns
                )

        return storage.with_retries(read, f"reading {path}")


def _image_keys(table: pa.Table) -> pa.Array:
    """What tells the images of a shard apart, per row of a ``read_keys`` table: ``r:POSITION`` where the
    row's position in the shard is known, else ``i:IMAGE_ID``."""
    by_row = pc.binary_join_element_wise("r:", pc.cast(table["_row"], pa.string()), "")
    by_id = pc.binary_join_element_wise("i:", table["image_id"], "")
    return pc.if_else(pc.is_null(table["_row"]), by_id, by_row).combine_chunks()


def _owned_rows(keys_table: pa.Table, parts: _Parts, owners: pa.Table) -> pa.Table:
    """The rows of ``keys_table`` (``parts.read_keys``) from the part that ``owners`` chose for their image
    (``_key`` -> ``_owner``, a part's file name): a retried batch may have written an image into more than
    one part, maybe with other instances, and its rows are all taken from one attempt, never mixed.
    Rows carried over from a finished output (``_row`` < 0, see ``carry_over``) are kept as they are."""
    names = pa.array([path.rsplit("/", 1)[-1] for path in parts.paths], pa.string())
    n = keys_table.num_rows
    table = keys_table.append_column("_key", _image_keys(keys_table))
    table = table.append_column("_name", pc.take(names, keys_table["_part"]))
    table = table.append_column("_seq", pa.array(np.arange(n, dtype=np.int64)))
    joined = table.join(owners, keys="_key", join_type="left outer").sort_by("_seq")
    carried = pc.fill_null(pc.less(joined["_row"], 0), False)
    keep = pc.or_(carried, pc.fill_null(pc.equal(joined["_name"], joined["_owner"]), False))
    return joined.filter(keep).select(keys_table.column_names)


def _owners(images: pa.Table, parts: _Parts) -> pa.Table:
    """``_key`` (``_image_keys``) -> ``_owner``: the file name of the part each kept image row comes from."""
    names = pa.array([path.rsplit("/", 1)[-1] for path in parts.paths], pa.string())
    return pa.table({"_key": _image_keys(images), "_owner": pc.take(names, images["_part"])})


def _unique_rows(keys_table: pa.Table, keys: list[str]) -> pa.Table:
    """The rows of ``_Parts.read_keys`` to keep, in output order: the first occurrence of each image (and of
    ``keys`` within it), sorted by image id then ``keys``, ties in first-occurrence order; parts of a retried
    batch may repeat rows.

    Images are told apart by ``_row`` (their position in the shard) where known, else by image id, so two
    input rows with the same or a missing id stay two rows.
    """
    position = pa.array(np.arange(keys_table.num_rows, dtype=np.int64))
    by_id = pc.if_else(pc.is_null(keys_table["_row"]), keys_table["image_id"], pa.scalar(None, pa.string()))
    groups = pa.table({"_row": keys_table["_row"], "_id": by_id, **{k: keys_table[k] for k in keys}})
    groups = groups.append_column("_pos", position)
    first = groups.group_by(["_row", "_id", *keys], use_threads=False).aggregate([("_pos", "min")])
    kept = keys_table.append_column("_pos", position).take(first["_pos_min"])
    order = [("image_id", "ascending")] + [(k, "ascending") for k in keys] + [("_pos", "ascending")]
    return kept.sort_by(order)


def _runs(metadata: list[pq.FileMetaData], kept: pa.Table) -> list[tuple[int, int, int, int]]:
    """The rows ``kept`` (``_part``, ``_index`` from ``_unique_rows``), in order, as runs of consecutive rows
    of one row group: ``(part, row group within the part, first row within the row group, rows)``."""
    sizes = [[md.row_group(g).num_rows for g in range(md.num_row_groups)] for md in metadata]
    group_part = np.array([p for p, groups in enumerate(sizes) for _ in groups], np.int64)
    group_local = np.array([g for groups in sizes for g in range(len(groups))], np.int64)
    part_start = np.concatenate([[0], np.cumsum([sum(groups) for groups in sizes])]).astype(np.int64)
    group_start = np.concatenate([np.cumsum([0, *groups[:-1]]) for groups in sizes if groups] or [[]])
    group_start = part_start[group_part] + group_start.astype(np.int64)  # of each group, shard-wide

    row = part_start[kept["_part"].to_numpy()] + kept["_index"].to_numpy()
    group = np.searchsorted(group_start, row, side="right") - 1  # an empty group shares its next one's start
    offset = row - group_start[group]
    breaks = (group[1:] != group[:-1]) | (offset[1:] != offset[:-1] + 1)
    start = np.flatnonzero(np.concatenate([[True], breaks]))
    length = np.diff(np.append(start, len(row)))
    first = group[start]
    columns = (group_part[first], group_local[first], offset[start], length)
    return list(zip(*(c.tolist() for c in columns), strict=True))


def _rows_in_order(parts: _Parts, kept: pa.Table, budget: int) -> Iterator[pa.Table]:
    """The rows ``kept`` (from ``_unique_rows``) in its order, as tables of about ``budget / 4`` bytes.

    Row groups are read when first needed and dropped after their last use; at most about ``budget / 2``
    bytes of them are held (least recently used ones are dropped beyond that, and read again if needed,
    which only happens for shards far larger than the default budget whose ids interleave across parts).
    """
    if not kept.num_rows:
        return
    runs = _runs(parts.metadata, kept)
    last_use = {(p, g): r for r, (p, g, _, _) in enumerate(runs)}
    cache: OrderedDict[tuple[int, int], pa.Table] = OrderedDict()
    held = loose = pending_bytes = 0  # bytes: cached groups, dropped groups still referenced by pending
    pinned: set[tuple[int, int]] = set()  # groups that pending slices reference
    pending: list[pa.Table] = []
    for r, (p, g, offset, length) in enumerate(runs):
        table = cache.get((p, g))
        if table is None:
            table = cache[p, g] = parts.read_row_group(p, g)
            held += table.nbytes
        cache.move_to_end((p, g))
        piece = table.slice(offset, length)
        pending.append(piece)
        pinned.add((p, g))
        pending_bytes += piece.nbytes
        if last_use[p, g] == r:
            held -= cache.pop((p, g)).nbytes
            loose += table.nbytes
        while held > budget // 2 and len(cache) > 1:
            dropped, old = cache.popitem(last=False)
            held -= old.nbytes
            loose += old.nbytes if dropped in pinned else 0
        if pending_bytes >= budget // 4 or loose >= budget // 4:
            yield pa.concat_tables(pending, promote_options="default")
            pending, pinned, pending_bytes, loose = [], set(), 0, 0
    if pending:
        yield pa.concat_tables(pending, promote_options="default")


def _merge(
    parts: _Parts, kept: pa.Table, uri: str, schema: pa.Schema, options: StorageOptions, budget: int
) -> Counter:
    """Write the rows ``kept`` of ``parts`` to one Parquet file at ``uri`` in ``schema``, atomically.

    Returns:
        Rows written per ``stage`` and, under ``RETRYABLE``, how many are retryable (for the errors table;
        empty for tables without those columns).
    """

    def write() -> Counter:
        stages: Counter = Counter()
        with storage.parquet_writer(uri, schema, options) as writer:
            for chunk in _rows_in_order(parts, kept, budget):
                writer.write_table(conform(chunk, schema), row_group_size=chunk.num_rows)
                if "stage" in chunk.column_names:
                    stages.update(chunk["stage"].to_pylist())
                    stages[RETRYABLE] += int(pc.sum(chunk["retryable"]).as_py() or 0)
                del chunk  # its row groups go before the next chunk's are read
        return stages

    return storage.with_retries(write, f"writing {uri}")  # nothing is left behind by a failed try


def finalize_shard(
    out: str,
    shard: str,
    expected_images: int,
    options: StorageOptions = StorageOptions(),
    *,
    memory_budget: int = FINALIZE_MEMORY_BYTES,
) -> dict | None:
    """Merge a shard's parts into its output files and write its marker, if all its images have arrived.

    Args:
        memory_budget: about the most bytes of row data held at once (row groups read plus rows waiting to
            be written); the key columns of the shard come on top (a few dozen bytes per row).

    Returns:
        The marker's content (counts), or None while images are still missing (then nothing is written).

    Raises:
        RuntimeError: the shard has more images than ``expected_images``.
    """
    tmp = tmp_dir(out, shard)
    if not storage.exists(storage.join(tmp, "images"), options):
        return None
    image_parts = _Parts(storage.join(tmp, "images"), options)
    images = _unique_rows(image_parts.read_keys([]), [])
    if images.num_rows < expected_images:
        return None
    if images.num_rows > expected_images:
        raise RuntimeError(
            f"shard {shard} has {images.num_rows} images, more than the {expected_images} it was "
            "listed with; the input changed during the job. Rerun with --overwrite"
        )
    counts = {"images": images.num_rows}
    owners = _owners(images, image_parts)
    errors_by_stage: Counter = Counter()
    for name, schema in TABLES.items():
        if name == "images":
            parts, kept = image_parts, images
        else:
            parts = _Parts(storage.join(tmp, name), options)
            owned = _owned_rows(parts.read_keys(ROW_KEYS[name]), parts, owners)
            kept = _unique_rows(owned, ROW_KEYS[name])
        uri = storage.join(out, name, f"part-{shard}.parquet")
        stages = _merge(parts, kept, uri, schema, options, memory_budget)
        counts[name] = kept.num_rows
        if name == "errors":
            errors_by_stage = stages
    retryable = errors_by_stage.pop(RETRYABLE, 0)
    marker = {
        "shard": shard,
        "images": counts["images"],
        "instances": counts["masks"],
        "errors": counts["errors"],
        "errors_by_stage": dict(errors_by_stage),
        "retryable_errors": retryable,
        "finished_at": datetime.now(timezone.utc).isoformat(),
        "merged_by": {"host": socket.gethostname(), "pid": os.getpid()},  # which process merged it
    }
    storage.write_bytes(marker_uri(out, shard), json.dumps(marker, indent=2).encode(), options)
    storage.delete(tmp, options)
    return marker


CARRIED_PART = "part-carried.parquet"  # a finished shard's rows that ``--retry-errors`` keeps


def retryable_error_ids(out: str, shard: str, options: StorageOptions = StorageOptions()) -> set[str]:
    """The image ids of a finished shard's retryable error rows (none in outputs written before the
    ``retryable`` column existed)."""
    uri = storage.join(out, "errors", f"part-{shard}.parquet")
    fs, path = storage.resolve(uri, options)

    def read() -> pa.Table | None:
        with fs.open_input_file(path) as f:
            errors = pq.ParquetFile(f)
            if "retryable" not in errors.schema_arrow.names:
                return None
            return errors.read(columns=["image_id", "retryable"])

    table = storage.with_retries(read, f"reading {uri}")
    if table is None:
        return set()
    return set(table.filter(pc.fill_null(table["retryable"], False))["image_id"].to_pylist())


def carry_over(out: str, shard: str, replaced: set[str], options: StorageOptions = StorageOptions()) -> int:
    """Start a finished shard over for ``--retry-errors``: its output rows, except those of the images
    ``replaced`` (which are labeled again), become a temporary part ``CARRIED_PART`` of each table, and its
    marker is deleted; ``finalize_shard`` then merges them with the new rows, as for any shard.

    The carried rows get ``_row`` -1, -2, ...: unique, so that none is dropped as a repeat (a finished output
    holds each row once, and ids may repeat within a shard), and apart from the new rows' positions (>= 0).
    The parts are written before the marker goes, so a crash in between leaves the shard finished as it
    was; after it, the shard is unfinished and a rerun redoes it whole.

    Returns:
        How many images are carried over (the shard's images minus those to relabel).
    """
    tmp = tmp_dir(out, shard)
    storage.delete(tmp, options)  # what an earlier, interrupted retry left
    carried = 0
    for name, schema in TABLES.items():
        table = storage.read_parquet(storage.join(out, name, f"part-{shard}.parquet"), options)
        if name == "errors" and "retryable" not in table.column_names:  # written before the column existed
            table = table.append_column("retryable", pa.array([False] * table.num_rows, pa.bool_()))
        table = table.filter(pc.invert(pc.is_in(table["image_id"], pa.array(sorted(replaced), pa.string()))))
        table = conform(table, schema)  # an output written before the quality signals lacks them
        table = table.append_column("_row", pa.array(-np.arange(1, table.num_rows + 1), pa.int64()))
        _write_part(table, storage.join(tmp, name, CARRIED_PART), ROW_KEYS[name], options)
        if name == "images":
            carried = table.num_rows
    storage.delete(marker_uri(out, shard), options)
    return carried


BOOKKEEPING_THREADS = 32  # concurrent per-shard storage requests (marker reads, resets) at job start and end


def done_shards(out: str, options: StorageOptions = StorageOptions()) -> set[str]:
    """The ids of the shards of ``out`` that have a completion marker: one listing, whatever their number."""
    markers = storage.list_files(storage.join(out, "_done"), (".json",), options)
    return {uri.rsplit("/", 1)[-1][: -len(".json")] for uri in markers}


def read_markers(out: str, shards: list[str], options: StorageOptions = StorageOptions()) -> dict[str, dict]:
    """The markers of ``shards`` (those that have one), read ``BOOKKEEPING_THREADS`` at a time."""
    if not shards:
        return {}
    with ThreadPoolExecutor(min(BOOKKEEPING_THREADS, len(shards))) as pool:
        markers = pool.map(lambda shard: read_marker(out, shard, options), shards)
        return {shard: m for shard, m in zip(shards, markers, strict=True) if m is not None}


def reset_shards(out: str, shards: list[str], options: StorageOptions = StorageOptions()) -> int:
    """Forget the partial work of the unfinished ``shards`` (temporary parts, output files without a marker):
    one listing of ``_tmp`` and of each output table finds the leftovers, which are deleted
    ``BOOKKEEPING_THREADS`` at a time.

    Returns:
        How many leftovers (temporary folders, output files) were deleted.
    """
    wanted = set(shards)
    fs, tmp = storage.resolve(storage.join(out, "_tmp"), options)
    leftovers = [
        storage.join(out, "_tmp", info.base_name)
        for info in fs.get_file_info(pafs.FileSelector(tmp, allow_not_found=True))
        if info.base_name.startswith("shard-") and info.base_name[len("shard-") :] in wanted
    ]
    for name in TABLES:
        parts = files_by_shard(storage.list_files(storage.join(out, name), (".parquet",), options))
        leftovers += [uri for shard, uri in parts.items() if shard in wanted]
    if leftovers:
        with ThreadPoolExecutor(min(BOOKKEEPING_THREADS, len(leftovers))) as pool:
            list(pool.map(lambda uri: storage.delete(uri, options), leftovers))
    return len(leftovers)


def read_marker(out: str, shard: str, options: StorageOptions = StorageOptions()) -> dict | None:
    """A finished shard's marker, or None."""
    try:
        return json.loads(storage.read_bytes(marker_uri(out, shard), options))
    except FileNotFoundError:
        return None
