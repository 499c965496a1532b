"""A labeling job's input, found again after the job: re-list it from ``job.json`` and read image bytes by id.

``hqlabel show`` (overlays) and ``hqlabel curate`` (instance datasets with their images) need the original
encoded images of a labels folder, which stores only masks. ``list_job_source`` re-lists the job's input with
the job's own columns and options; ``ImageSource`` reads images by ``image_id`` one output shard at a time:
folder / COCO inputs through the re-listed rows' ``uri``, Parquet inputs by reading the shard's source file
(inline bytes or ``uri``) a row group at a time.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from hqlabel.platform import storage
from hqlabel.platform.readers import DatasetInput, InputColumns, list_input, read_parquet_shards
from hqlabel.platform.storage import StorageOptions

__all__ = ["ImageSource", "files_by_shard", "job_columns", "list_job_source"]

_PART = re.compile(r"part-(.+)\.parquet$")


def files_by_shard(files: list[str]) -> dict[str, str]:
    """``{shard id: uri}`` of a labels folder's ``part-SHARD.parquet`` files (other names are left out)."""
    found = {}
    for uri in files:
        match = _PART.search(uri.rsplit("/", 1)[-1])
        if match:
            found[match.group(1)] = uri
    return found


def job_columns(spec: dict[str, Any]) -> InputColumns:
    """The Parquet column names a labeling job's ``spec`` (``job.json`` ``spec``) used."""
    return InputColumns(
        id=spec.get("id_column", "image_id"),
        image=spec.get("image_column", "image"),
        uri=spec.get("uri_column", "uri"),
        boxes=spec.get("boxes_column", "boxes"),
        labels=spec.get("labels_column", "labels"),
    )


def list_job_source(spec: dict[str, Any], images: str | None, options: StorageOptions) -> DatasetInput:
    """The job's input, re-listed with the job's columns and options (``images`` replaces ``spec.input``).

    Raises:
        ValueError: the spec names no input and ``images`` is None.
        FileNotFoundError: the input is gone (the message suggests ``--images``).
    """
    uri = images or spec.get("input")
    if not uri:
        raise ValueError("job.json names no input (spec.input); pass the images with --images")
    try:
        return list_input(
            uri,
            columns=job_columns(spec),
            options=options,
            shard_size=spec.get("shard_size", 1000),
            coco_images=spec.get("coco_images"),
        )
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{e} (the labeling job's input); pass the images with --images") from e


class ImageSource:
    """Encoded image bytes by ``image_id``, shard by shard, from a re-listed job input."""

    def __init__(self, source: DatasetInput, options: StorageOptions, columns: InputColumns):
        self.source, self.options, self.columns = source, options, columns
        self.uris: dict[str, str] = {}
        if source.kind != "parquet":  # rows listed up front: every image's uri, whatever its shard now
            for shard in source.shards:
                for row in shard.rows:
                    self.uris.setdefault(row["image_id"], row["uri"])
        self.parquet = {shard.shard_id: shard.source for shard in source.shards}

    def read(self, shard: str, wanted: set[str]) -> Iterator[tuple[str, bytes | None, str]]:
        """``(image_id, bytes or None, problem)`` for each id of ``wanted`` (once each).

        ``shard`` is the labels folder's shard id (``part-SHARD.parquet``); it selects the Parquet source
        file to scan and is ignored for folder / COCO inputs. ``problem`` is ``""`` when bytes were found.
        """
        if self.source.kind != "parquet":
            for image_id in sorted(wanted):
                uri = self.uris.get(image_id)
                if uri is None:
                    yield image_id, None, "not found in the job's input any more"
                    continue
                yield image_id, *self._bytes(uri)
            return
        left = set(wanted)
        if shard in self.parquet:
            batch = pa.table({"shard": [shard], "source": [self.parquet[shard]]})
            tables = read_parquet_shards(
                batch, root=self.source.root, columns=self.columns, options=self.options
            )
            for table in tables:
                keep = table.filter(
                    pc.is_in(table["image_id"], value_set=pa.array(sorted(left), pa.string()))
                )
                for row in keep.select(["image_id", "image", "uri"]).to_pylist():
                    if row["image_id"] not in left:
                        continue
                    left.discard(row["image_id"])
                    if row["image"] is not None:
                        yield row["image_id"], row["image"], ""
                    elif row["uri"] is not None:
                        yield row["image_id"], *self._bytes(row["uri"])
                    else:
                        yield row["image_id"], None, "the input row has neither image bytes nor a uri"
                if not left:
                    return
        for image_id in sorted(left):
            yield image_id, None, f"not found in the input's shard {shard}"

    def _bytes(self, uri: str) -> tuple[bytes | None, str]:
        try:
            return storage.read_bytes(uri, self.options), ""
        except OSError as e:
            return None, f"cannot read {uri}: {e}"
