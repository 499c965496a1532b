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
from typing import Any

import numpy as np

from hqlabel.platform import storage
from hqlabel.platform.images import DEFAULT_MAX_PIXELS, decode_image
from hqlabel.platform.labels import LabelsFolder
from hqlabel.platform.sources import files_by_shard, job_images
from hqlabel.platform.storage import StorageOptions

logger = logging.getLogger(__name__)

__all__ = ["SIGNALS", "ReviewItems", "trust"]

SIGNALS = ("stability", "hq_sam_iou", "box_iou", "pred_iou", "score")
_IMAGE_CACHE = 16  # decoded images kept (the current one, its neighbours, the prefetched next)


def trust(row: dict[str, Any]) -> tuple[float, float]:
    """``(min, mean)`` of the quality signals ``row`` has (see the module docstring); (0, 0) for none."""
    values = [float(row[s]) for s in SIGNALS if row.get(s) is not None and np.isfinite(row[s])]
    if not values:
        return 0.0, 0.0
    return min(values), sum(values) / len(values)


class ReviewItems:
    """Every instance of the labels folder ``labels``, ranked (see the module docstring), with lookups of an
    instance's full row (mask included) and of its decoded image.

    The masks tables are read once and held in memory (COCO RLE, compact); images are read from the job's
    input when asked (``images``: where it is now, if it moved) and the last few kept decoded.

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
        self.signals: list[str] = []
        self._rows: dict[tuple[str, int], dict[str, Any]] = {}
        self._shard_of: dict[str, str] = {}
        repeated = 0
        for shard in sorted(mask_files):
            table = storage.read_parquet(mask_files[shard], options)
            self.signals += [s for s in SIGNALS if s in table.column_names and s not in self.signals]
            for row in table.to_pylist():
                key = (row["image_id"], int(row["instance_id"]))
                if self._shard_of.setdefault(row["image_id"], shard) != shard or key in self._rows:
                    repeated += 1  # an image id the input repeats: its masks cannot be told apart
                    continue
                row["trust"], row["trust_mean"] = trust(row)
                self._rows[key] = row
        if repeated:
            logger.warning(
                "left out %d mask(s) of image ids that occur more than once in %s", repeated, labels
            )
        self.ranked: list[tuple[str, int]] = sorted(
            self._rows, key=lambda k: (self._rows[k]["trust"], self._rows[k]["trust_mean"], k)
        )
        self.classes: list[str] = list(self.spec.get("labeler", {}).get("classes") or [])
        for row in self._rows.values():
            if row["label"] not in self.classes:
                self.classes.append(row["label"])
        self._images: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.ranked)

    def __contains__(self, key: tuple[str, int]) -> bool:
        return key in self._rows

    def row(self, image_id: str, instance_id: int) -> dict[str, Any]:
        """The masks row of one instance (``mask`` COCO RLE, ``box`` XYXY original pixels, the signals,
        ``trust``). Raises KeyError when the labels folder has no such instance."""
        return self._rows[(image_id, instance_id)]

    def select(
        self, label: str | None = None, min_score: float | None = None, max_score: float | None = None
    ) -> list[tuple[str, int]]:
        """The ranked keys, restricted to class ``label`` and to detector scores in [min_score, max_score]."""
        keys = []
        for key in self.ranked:
            row = self._rows[key]
            if label is not None and row["label"] != label:
                continue
            if min_score is not None and row["score"] < min_score:
                continue
            if max_score is not None and row["score"] > max_score:
                continue
            keys.append(key)
        return keys

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
