"""The read side of a labeling job's output folder (``OUT`` of ``hqlabel label``), local or ``s3://``:
``job.json``, the ``images/`` table and the ``masks/`` table, streamed one shard file and one record batch
at a time. Exports (``hqlabel.formats``), curation, the gallery and the Python API read labels through it.

RLE read back from a labels folder is untrusted: ``LabelsFolder.decode_mask`` refuses a mask declaring more
pixels than the job's ``--max-pixels`` (ValueError) before decoding it.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from hqlabel.platform import storage
from hqlabel.platform.images import DEFAULT_MAX_PIXELS
from hqlabel.platform.rle import decode_mask
from hqlabel.platform.storage import StorageOptions

logger = logging.getLogger(__name__)

__all__ = ["MASK_COLUMNS", "LabelsFolder"]

MASK_COLUMNS = ["image_id", "instance_id", "label", "score", "box", "mask", "area", "pred_iou"]
DEFAULT_BATCH_ROWS = 1024  # masks per record batch (RLE bytes only, nothing decoded)


class LabelsFolder:
    """Read side of a labeling job's output folder (``OUT`` of ``hqlabel label``), local or ``s3://``.

    Raises:
        FileNotFoundError: ``uri`` holds no ``job.json`` or no ``images/`` table.
        ValueError: ``job.json`` is not valid JSON.
    """

    def __init__(self, uri: str, options: StorageOptions = StorageOptions()):
        self.uri = uri.rstrip("/") or uri
        self.options = options
        try:
            raw = storage.read_bytes(storage.join(self.uri, "job.json"), options)
        except (FileNotFoundError, IsADirectoryError) as e:
            raise FileNotFoundError(
                f"{uri} is not a labels folder (no job.json); pass the --out folder of an `hqlabel label` run"
            ) from e
        try:
            self.job: dict[str, Any] = json.loads(raw)
        except json.JSONDecodeError as e:
            raise ValueError(f"{uri}/job.json is not valid JSON ({e}); is this a labels folder?") from e
        self.image_files = storage.list_files(storage.join(self.uri, "images"), (".parquet",), options)
        if not self.image_files:
            raise FileNotFoundError(
                f"{uri} is not a labels folder (no images/part-*.parquet); "
                "has its labeling job finished a shard?"
            )
        self.mask_files = storage.list_files(storage.join(self.uri, "masks"), (".parquet",), options)
        # No labeled image (so no mask) is larger than the job's --max-pixels.
        self.max_pixels = int(self.job.get("spec", {}).get("max_pixels") or DEFAULT_MAX_PIXELS)
        incomplete = self.job.get("shards", {}).get("incomplete")
        if incomplete or "summary" not in self.job:
            logger.warning("the labeling job in %s has not finished; exporting the shards done so far", uri)

    @contextlib.contextmanager
    def _parquet(self, uri: str) -> Iterator[pq.ParquetFile]:
        """One Parquet file, open for reading (metadata only until columns are read); closed on exit."""
        fs, path = storage.resolve(uri, self.options)
        with fs.open_input_file(path) as f:
            yield pq.ParquetFile(f)

    def decode_mask(self, row: dict[str, Any]) -> np.ndarray:
        """The H x W bool mask of one masks-table row (``image_id``, ``mask``; ``instance_id`` if read).

        Raises:
            ValueError: its RLE is malformed or declares more than ``max_pixels`` pixels (refused before
                decoding); the message names the image.
        """
        try:
            return decode_mask(row["mask"], max_pixels=self.max_pixels)
        except ValueError as e:
            instance = f"instance {row['instance_id']} of " if "instance_id" in row else ""
            raise ValueError(f"{self.uri}/masks: {instance}image {row['image_id']!r}: {e}") from e

    def images(self) -> tuple[pa.Table, int, int]:
        """The exportable images and what was left out, as ``(table, failed, repeated)``.

        ``table``: ``image_id``, ``height``, ``width`` of every labeled image, sorted by ``image_id``.
        ``failed``: images whose processing failed (``error_stage`` set, or no size). ``repeated``: images
        whose ``image_id`` occurs more than once in the job (the input repeated it): their masks cannot be
        told apart by id, so all rows with that id are left out, with a warning.
        """
        tables = []
        for uri in self.image_files:
            with self._parquet(uri) as parquet:
                tables.append(parquet.read(columns=["image_id", "height", "width", "error_stage"]))
        images = pa.concat_tables(tables)
        ok = pc.and_(
            pc.and_(pc.is_null(images["error_stage"]), pc.is_valid(images["height"])),
            pc.is_valid(images["image_id"]),
        )
        labeled = images.filter(ok).select(["image_id", "height", "width"])
        num_labeled = len(labeled)
        counts = pc.value_counts(images["image_id"].drop_null())
        repeated = pc.filter(counts.field("values"), pc.greater(counts.field("counts"), 1))
        if len(repeated):
            shown = ", ".join(repr(v) for v in repeated.to_pylist()[:5])
            logger.warning(
                "%d image ids occur more than once (%s); their images are left out", len(repeated), shown
            )
            labeled = labeled.filter(pc.invert(pc.is_in(labeled["image_id"], value_set=repeated)))
        return labeled.sort_by("image_id"), len(images) - num_labeled, num_labeled - len(labeled)

    def categories(self) -> list[str]:
        """Class names in export order: the job's class list, then other labels found in the masks, sorted."""
        classes = list(self.job.get("spec", {}).get("labeler", {}).get("classes") or [])
        seen: set[str] = set()
        for batch in self.batches(["label"], batch_rows=65536):
            seen.update(pc.unique(batch.column("label")).to_pylist())
        extra = sorted(seen - set(classes))
        if classes and extra:
            logger.warning("labels %s are not in the job's class list; appended as extra categories", extra)
        return classes + extra

    def batches(
        self, columns: list[str] = MASK_COLUMNS, batch_rows: int = DEFAULT_BATCH_ROWS
    ) -> Iterator[pa.RecordBatch]:
        """Record batches of the masks table, one shard file at a time (never the whole table)."""
        for uri in self.mask_files:
            with self._parquet(uri) as parquet:
                yield from parquet.iter_batches(batch_size=batch_rows, columns=columns)
