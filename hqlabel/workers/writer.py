"""Writing a job's results, one output shard per input shard, atomically, with a completion marker.

While a shard is in flight its batches land under ``OUT/_tmp/shard-ID/{masks,errors,images}/part-HASH``
(names derived from the batch's image ids, so a retried batch overwrites itself). When every image of the
shard has arrived, ``finalize_shard`` merges the parts, drops any row seen twice, writes
``OUT/{masks,errors,images}/part-ID.parquet`` (each atomically) and then the marker ``OUT/_done/ID.json``.
Readers of ``OUT/masks`` see only finished shards (names starting with ``_`` are skipped); a rerun skips
shards that have a marker and redoes the rest from scratch.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections import Counter
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from hqlabel.platform import storage
from hqlabel.platform.schema import ERRORS_SCHEMA, IMAGES_SCHEMA, MASKS_SCHEMA, results_to_tables
from hqlabel.platform.storage import StorageOptions

STATS_SCHEMA = pa.schema([("shard", pa.string()), ("images", pa.int64())])
TABLES = {"masks": MASKS_SCHEMA, "errors": ERRORS_SCHEMA, "images": IMAGES_SCHEMA}


def tmp_dir(out: str, shard: str) -> str:
    return storage.join(out, "_tmp", f"shard-{shard}")


def marker_uri(out: str, shard: str) -> str:
    return storage.join(out, "_done", f"{shard}.json")


def _write_part(table: pa.Table, uri: str, options: StorageOptions) -> None:
    """A temporary part, atomically and uncompressed: it is read back once by ``finalize_shard`` and deleted,
    so compressing it (and decompressing it there) would be wasted CPU; the final files are compressed."""
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="none")
    storage.write_bytes(uri, buf.getvalue(), options)


def write_parts(batch: pa.Table, *, out: str, options: StorageOptions = StorageOptions()) -> pa.Table:
    """Ray Data UDF: write one batch of ``RESULT_SCHEMA`` rows into their shards' temporary folders.

    Returns:
        ``STATS_SCHEMA`` rows: images written per shard.
    """
    stats = []
    for shard in pc.unique(batch["shard"]).to_pylist():
        rows = batch.filter(pc.equal(batch["shard"], shard))
        digest = hashlib.sha1("\n".join(rows["image_id"].to_pylist()).encode()).hexdigest()[:20]
        for name, table in zip(TABLES, results_to_tables(rows, with_row=True), strict=True):
            _write_part(table, storage.join(tmp_dir(out, shard), name, f"part-{digest}.parquet"), options)
        stats.append({"shard": shard, "images": rows.num_rows})
    return pa.Table.from_pylist(stats, schema=STATS_SCHEMA)


def _unique_rows(table: pa.Table, keys: list[str]) -> pa.Table:
    """First occurrence of each image (and ``keys`` within it), sorted by image id then ``keys``; parts of a
    retried batch may repeat rows. The bookkeeping column ``_row`` is dropped.

    Images are told apart by ``_row`` (their position in the shard) where known, else by image id, so two
    input rows with the same or a missing id stay two rows.
    """
    image_key = table["image_id"].to_numpy(zero_copy_only=False).astype(str)
    if "_row" in table.column_names:
        rows = table["_row"].to_pylist()
        image_key = np.array(
            [f"id:{i}" if r is None else f"row:{r}" for i, r in zip(image_key, rows, strict=True)], dtype=str
        )
        table = table.drop_columns(["_row"])
    joined = image_key
    for key in keys:
        joined = np.char.add(
            np.char.add(joined, "\x00"), table[key].to_numpy(zero_copy_only=False).astype(str)
        )
    first = np.unique(joined, return_index=True)[1] if table.num_rows else np.zeros(0, np.int64)
    order = [("image_id", "ascending")] + [(k, "ascending") for k in keys]
    return table.take(pa.array(np.sort(first), pa.int64())).sort_by(order)


def finalize_shard(
    out: str, shard: str, expected_images: int, options: StorageOptions = StorageOptions()
) -> dict | None:
    """Merge a shard's parts into its output files and write its marker, if all its images have arrived.

    Returns:
        The marker's content (counts), or None while images are still missing.
    """
    tmp = tmp_dir(out, shard)
    if not storage.exists(storage.join(tmp, "images"), options):
        return None
    images = _unique_rows(storage.read_parquet(storage.join(tmp, "images"), options), [])
    if images.num_rows < expected_images:
        return None
    if images.num_rows > expected_images:
        raise RuntimeError(
            f"shard {shard} has {images.num_rows} images, more than the {expected_images} it was "
            "listed with; the input changed during the job. Rerun with --overwrite"
        )
    tables = {
        "masks": _unique_rows(storage.read_parquet(storage.join(tmp, "masks"), options), ["instance_id"]),
        "errors": _unique_rows(storage.read_parquet(storage.join(tmp, "errors"), options), []),
        "images": images,
    }
    for name, table in tables.items():
        storage.write_parquet(
            table.cast(TABLES[name]), storage.join(out, name, f"part-{shard}.parquet"), options
        )
    marker = {
        "shard": shard,
        "images": images.num_rows,
        "instances": tables["masks"].num_rows,
        "errors": tables["errors"].num_rows,
        "errors_by_stage": dict(Counter(tables["errors"]["stage"].to_pylist())),
        "finished_at": datetime.now(timezone.utc).isoformat(),
    }
    storage.write_bytes(marker_uri(out, shard), json.dumps(marker, indent=2).encode(), options)
    storage.delete(tmp, options)
    return marker


def read_marker(out: str, shard: str, options: StorageOptions = StorageOptions()) -> dict | None:
    """A finished shard's marker, or None."""
    try:
        return json.loads(storage.read_bytes(marker_uri(out, shard), options))
    except FileNotFoundError:
        return None


def reset_shard(out: str, shard: str, options: StorageOptions = StorageOptions()) -> None:
    """Forget an unfinished shard's partial work (its temporary parts and any output file without marker)."""
    storage.delete(tmp_dir(out, shard), options)
    for name in TABLES:
        storage.delete(storage.join(out, name, f"part-{shard}.parquet"), options)
