"""Write step: per-image results -> ``masks/`` and ``errors/`` Parquet parts, and counts for progress."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from hqlabel.platform.schema import results_to_tables

STATS_SCHEMA = pa.schema([("images", pa.int64()), ("instances", pa.int64()), ("errors", pa.int64())])


def _write_atomic(table: pa.Table, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")  # readers skip dot-files, so a crash leaves no partial part
    pq.write_table(table, tmp, compression="zstd")
    os.replace(tmp, path)


def write_results(batch: pa.Table, *, out_dir: str) -> pa.Table:
    """Write one batch of ``RESULT_SCHEMA`` rows.

    File names derive from the batch's image ids, so a retried batch overwrites its own files instead of
    adding duplicates. Files are written under a temporary name and renamed into place.

    Returns:
        One ``STATS_SCHEMA`` row: images, instances and errors in this batch.
    """
    masks, errors = results_to_tables(batch)
    digest = hashlib.sha1("\n".join(batch["image_id"].to_pylist()).encode()).hexdigest()[:20]
    root = Path(out_dir)
    _write_atomic(masks, root / "masks" / f"part-{digest}.parquet")
    _write_atomic(errors, root / "errors" / f"part-{digest}.parquet")
    return pa.table(
        {"images": [batch.num_rows], "instances": [masks.num_rows], "errors": [errors.num_rows]},
        schema=STATS_SCHEMA,
    )
