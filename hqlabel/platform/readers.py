"""Dataset readers: turn an input path into work items, and work items into rows of image bytes.

Listing happens once in the driver and is cheap (file names, Parquet footers); reading happens in tasks,
one Parquet row group (or one image file) at a time, so memory stays bounded whatever the dataset size.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from hqlabel.platform.images import list_image_files


@dataclass
class DatasetInput:
    """What a job reads.

    Attributes:
        kind: ``"folder"`` (items: ``image_id``, ``path``) or ``"parquet"`` (items: ``file``, ``row_group``).
        items: work items, in a stable order.
        num_images: total images (rows) the job will see.
    """

    kind: str
    items: list[dict]
    num_images: int


def list_input(path: str, *, id_column: str = "image_id", image_column: str = "image") -> DatasetInput:
    """Resolve a folder of images, a Parquet file, or a folder of Parquet shards (searched recursively).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: not an image folder or Parquet, no images, or the Parquet lacks the named columns.
    """
    source = Path(path).expanduser()
    if not source.exists():
        raise FileNotFoundError(f"input {path!r} does not exist; pass a folder of images or Parquet")
    if source.is_file() and source.suffix != ".parquet":
        raise ValueError(f"input file {source} is not Parquet; pass a folder of images or a .parquet file")
    parquet_files = [source] if source.is_file() else sorted(source.rglob("*.parquet"))
    if parquet_files:
        return _list_parquet(parquet_files, id_column, image_column)
    images = list_image_files(source)
    if not images:
        raise ValueError(f"no images (jpg, png, webp, ...) and no Parquet files found under {source}")
    root = source.resolve()
    items = [{"image_id": p.resolve().relative_to(root).as_posix(), "path": str(p.resolve())} for p in images]
    return DatasetInput("folder", items, len(items))


def _list_parquet(files: list[Path], id_column: str, image_column: str) -> DatasetInput:
    items, total = [], 0
    for file in files:
        meta = pq.read_metadata(file)
        missing = [c for c in (id_column, image_column) if c not in meta.schema.names]
        if missing:
            raise ValueError(
                f"Parquet input {file} has no column(s) {missing} (it has {meta.schema.names}); "
                "name the right ones with --id-column / --image-column"
            )
        for rg in range(meta.num_row_groups):
            items.append({"file": str(file.resolve()), "row_group": rg})
        total += meta.num_rows
    return DatasetInput("parquet", items, total)


def read_row_groups(items: pa.Table, *, id_column: str, image_column: str) -> pa.Table:
    """Read the Parquet row groups named by ``items`` (columns ``file``, ``row_group``).

    Returns:
        Rows with ``image_id`` (string) and ``image`` (binary), whatever the input column names.
    """
    tables = []
    for item in items.to_pylist():
        table = pq.ParquetFile(item["file"]).read_row_group(
            item["row_group"], columns=[id_column, image_column]
        )
        tables.append(
            pa.table(
                {
                    "image_id": table[id_column].cast(pa.string()),
                    "image": table[image_column].cast(pa.binary()),
                }
            )
        )
    if not tables:
        return pa.table({"image_id": pa.array([], pa.string()), "image": pa.array([], pa.binary())})
    return pa.concat_tables(tables)
