"""The instances of a labels folder as review items: ranked least trustworthy first, with their images.

Ranking. Each instance's trust is the smallest of the quality signals its row has, among ``SIGNALS``
(``stability``, ``hq_sam_iou``, ``box_iou``, ``pred_iou``, ``score``; all "higher is better", about [0, 1]):
one weak signal is enough to doubt a mask. A column the labels folder lacks (older outputs have no
``stability``, ``hq_sam_iou`` or ``box_iou``), or a null value, is skipped. Ties go to the lower mean of the
same signals, then to ``(image_id, instance_id)``, so the order is stable across restarts.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from hqlabel.platform import storage
from hqlabel.platform.images import DEFAULT_MAX_PIXELS, decode_image
from hqlabel.platform.labels import LabelsFolder
from hqlabel.platform.sources import files_by_shard, job_images
from hqlabel.platform.storage import StorageOptions

logger = logging.getLogger(__name__)

__all__ = ["SIGNALS", "ReviewItems"]

SIGNALS = ("stability", "hq_sam_iou", "box_iou", "pred_iou", "score")
_IMAGE_CACHE = 16  # decoded images kept (the current one, its neighbours, the prefetched next)


class _Keys(NamedTuple):
    """The rows to review of the concatenated masks tables, in key order ``(image_id, instance_id)``."""

    rows: np.ndarray  # their positions in the table
    shards: np.ndarray  # their shard's index
    ids: pa.Array  # their image ids (Arrow: no str per row)
    instances: np.ndarray  # their instance ids, int64
    first: np.ndarray  # whether each is its image's first
    left_out: int  # rows of repeated ids or keys


def _key_order(table: pa.Table, shard_rows: list[int]) -> _Keys:
    """The rows of ``table`` (the masks of shards 0, 1, ... concatenated, ``shard_rows`` each) to review, in
    key order. Masks of an image id found in an earlier shard, or of a key seen earlier in the same shard,
    are left out (an id the input repeats: its masks cannot be told apart)."""
    shard = np.repeat(np.arange(len(shard_rows)), shard_rows)
    if not table.num_rows:
        empty = np.zeros(0, np.int64)
        return _Keys(empty, empty, pa.array([], pa.string()), empty, np.zeros(0, bool), 0)
    keys = pa.table(
        {
            "image_id": table["image_id"],
            "shard": shard,
            "instance_id": table["instance_id"],
            "row": np.arange(table.num_rows),
        }
    )
    order = pc.sort_indices(keys, [(name, "ascending") for name in keys.column_names]).to_numpy()
    ids = table["image_id"].take(order).combine_chunks()
    new_image = _starts(ids)
    instances = table["instance_id"].take(order).to_numpy().astype(np.int64)
    shards = shard[order]
    first_shard = shards[np.maximum.accumulate(np.where(new_image, np.arange(len(order)), 0))]
    repeat_key = ~new_image & np.r_[False, instances[1:] == instances[:-1]]
    # an image's first sorted row is in its first shard and repeats no key: kept, and still its first
    keep = (shards == first_shard) & ~repeat_key
    return _Keys(
        order[keep], shards[keep], ids.filter(keep), instances[keep], new_image[keep], int((~keep).sum())
    )


def _starts(ids: pa.Array) -> np.ndarray:
    """Whether each of the sorted ``ids`` (not empty) differs from the one before it (the first: True)."""
    differ = pc.not_equal(ids.slice(1), ids.slice(0, len(ids) - 1)).to_numpy(zero_copy_only=False)
    return np.r_[True, differ]


def _trust_arrays(table: pa.Table, signals: list[str], order: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``trust`` of every row of ``table`` at ``order``, as two arrays (min, mean)."""
    columns = [
        table[s].take(order).to_numpy(zero_copy_only=False).astype(np.float64)
        for s in signals
        if s in table.column_names
    ]
    values = np.stack(columns) if columns else np.full((1, len(order)), np.nan)
    values[~np.isfinite(values)] = np.nan  # null (NaN after to_numpy) or non-finite: skipped
    present = np.isfinite(values)
    count = present.sum(0)
    low = np.where(present, values, np.inf).min(0)
    mean = np.where(present, values, 0.0).sum(0) / np.maximum(count, 1)
    return np.where(count > 0, low, 0.0), np.where(count > 0, mean, 0.0)


class ReviewItems:
    """Every instance of the labels folder ``labels``, ranked (see the module docstring), with lookups of an
    instance's full row (mask included) and of its decoded image.

    The masks tables are read once and held as Arrow (COCO RLE, compact: no Python object per row); the
    ranking, filters and lookups are arrays over the instances in key order (``(image_id, instance_id)``
    sorted), with one dict entry per image. Images are read from the job's input when asked (``images``:
    where it is now, if it moved) and the last few kept decoded.

    Raises:
        FileNotFoundError: not a labels folder, or its input is gone.
        ValueError: a labels folder without masks.
    """

    def __init__(self, labels: str, options: StorageOptions = StorageOptions(), images: str | None = None):
        self.folder = LabelsFolder(labels, options)
        self.options = options
        self.spec = self.folder.job.get("spec", {})
        self.models = self.folder.job.get("models", {})
        self.random_weights = bool(
            self.models.get("random_weights") or self.spec.get("labeler", {}).get("preset")
        )
        self.max_pixels = int(self.spec.get("max_pixels") or DEFAULT_MAX_PIXELS)
        self.reader = job_images(self.folder.uri, self.spec, images, options)
        mask_files = files_by_shard(self.folder.mask_files)
        if not mask_files:
            raise ValueError(
                f"{labels} has no masks (masks/part-*.parquet): nothing to review; pass the --out folder of "
                "a finished `hqlabel label` run with at least one instance"
            )
        shards = sorted(mask_files)
        tables = [storage.read_parquet(mask_files[shard], options) for shard in shards]
        self.signals: list[str] = [s for s in SIGNALS if any(s in t.column_names for t in tables)]
        self._table = pa.concat_tables(tables, promote_options="default")  # older parts lack some signals
        keys = _key_order(self._table, [t.num_rows for t in tables])
        self._order, self._ids, self._instances = keys.rows, keys.ids, keys.instances
        if keys.left_out:
            logger.warning(
                "left out %d mask(s) of image ids that occur more than once in %s", keys.left_out, labels
            )
        starts = np.flatnonzero(keys.first)
        stops = np.r_[starts[1:], len(self._ids)].astype(np.int64) if len(starts) else starts
        first = self._ids.take(starts).to_pylist()  # one entry per image
        self._images_at = {i: (int(a), int(b)) for i, a, b in zip(first, starts, stops, strict=True)}
        self._shard_of = {i: shards[int(keys.shards[a])] for i, a in zip(first, starts, strict=True)}
        self._trust, self._trust_mean = _trust_arrays(self._table, self.signals, self._order)
        self._score = self._table["score"].take(self._order).to_numpy(zero_copy_only=False).astype(np.float64)
        labels_column = pc.dictionary_encode(self._table["label"].take(self._order)).combine_chunks()
        self.classes: list[str] = list(self.spec.get("labeler", {}).get("classes") or [])
        found = labels_column.dictionary.to_pylist()  # in order of first appearance
        self.classes += [label for label in found if label not in self.classes]
        code = np.array([self.classes.index(label) for label in found], np.int32)
        self._label = code[labels_column.indices.to_numpy(zero_copy_only=False)]
        # least trustworthy first; ties: the lower mean, then the key (positions are in key order)
        positions = np.arange(len(self._order))
        self._ranked = np.lexsort((positions, self._trust_mean, self._trust))
        self._images: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._order)

    def position(self, image_id: str, instance_id: int) -> int | None:
        """The instance's position in key order, or None when the labels folder has no such instance."""
        span = self._images_at.get(image_id)
        if span is None:
            return None
        a, b = span
        k = a + int(np.searchsorted(self._instances[a:b], instance_id))
        return k if k < b and self._instances[k] == instance_id else None

    def __contains__(self, key: tuple[str, int]) -> bool:
        return self.position(*key) is not None

    def key(self, position: int) -> tuple[str, int]:
        """The ``(image_id, instance_id)`` at ``position`` (key order)."""
        return self._ids[position].as_py(), int(self._instances[position])

    def row(self, image_id: str, instance_id: int) -> dict[str, Any]:
        """The masks row of one instance (``mask`` COCO RLE, ``box`` XYXY original pixels, the signals,
        ``trust``). Raises KeyError when the labels folder has no such instance."""
        k = self.position(image_id, instance_id)
        if k is None:
            raise KeyError((image_id, instance_id))
        row = self._table.slice(int(self._order[k]), 1).to_pylist()[0]
        row["trust"], row["trust_mean"] = float(self._trust[k]), float(self._trust_mean[k])
        return row

    def select(
        self,
        label: str | None = None,
        min_score: float | None = None,
        max_score: float | None = None,
        *,
        exclude: Iterable[tuple[str, int]] = (),
    ) -> np.ndarray:
        """The positions (``key``) in ranked order, restricted to class ``label``, to detector scores in
        [min_score, max_score], and without the instances ``exclude`` names (unknown ones are ignored)."""
        keep = np.ones(len(self._order), bool)
        if label is not None:
            keep &= self._label == (self.classes.index(label) if label in self.classes else -1)
        if min_score is not None:
            keep &= self._score >= min_score
        if max_score is not None:
            keep &= self._score <= max_score
        for key in exclude:
            k = self.position(*key)
            if k is not None:
                keep[k] = False
        return self._ranked[keep[self._ranked]]

    def image(self, image_id: str) -> np.ndarray:
        """The H x W x 3 uint8 RGB image, from the job's input (the last ``_IMAGE_CACHE`` kept decoded).

        Raises:
            KeyError: no instance of this labels folder is on that image.
            ValueError: the image is gone, unreadable, or over the job's ``--max-pixels``.
        """
        with self._lock:
            if image_id in self._images:
                self._images.move_to_end(image_id)
                return self._images[image_id]
        shard = self._shard_of[image_id]
        found = None
        for found_id, data, problem in self.reader.read(shard, {image_id}):
            if found_id == image_id:
                if data is None:
                    raise ValueError(f"image {image_id!r}: {problem}")
                found = decode_image(data, max_pixels=self.max_pixels)
        if found is None:
            raise ValueError(f"image {image_id!r} is not in the job's input any more; pass --images")
        with self._lock:
            self._images[image_id] = found
            while len(self._images) > _IMAGE_CACHE:
                self._images.popitem(last=False)
        return found
