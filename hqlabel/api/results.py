"""Per-image labeling results in memory (``LabelResult``) and the streaming reader of a labels folder
(``read_labels``).

A result holds its masks as COCO RLE, as the labels folder stores them; ``LabelResult.masks`` decodes them to
an N x H x W bool array on first access (about H * W bytes per instance), so reading a large folder costs the
RLE bytes only until masks are asked for.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from hqlabel.platform.images import DEFAULT_MAX_PIXELS
from hqlabel.platform.rle import decode_mask
from hqlabel.platform.schema import SIGNAL_NAMES
from hqlabel.platform.storage import StorageOptions

if TYPE_CHECKING:
    import supervision

logger = logging.getLogger(__name__)

__all__ = ["LabelResult", "read_detections", "read_labels"]

READ_BATCH_ROWS = 256  # masks-table rows per record batch while reading a labels folder (RLE only)


@dataclass(eq=False)
class LabelResult:
    """The instances of one image, ordered by ``instance_id`` (0..N-1; by decreasing detector score).

    Attributes:
        height, width: the image's size in pixels, what boxes and masks refer to.
        boxes: N x 4 float32, XYXY pixels.
        labels: N class names.
        scores: N float32 detector confidences (1.0 for given box prompts).
        pred_iou: N float32, SAM's IoU-head prediction for SAM's own mask (not the HQ-corrected one).
        areas: N int64, mask pixels.
        rles: N COCO compressed RLE dicts ``{"size": [H, W], "counts": bytes}``.
        image_id: the image's id in a labels folder (``read_labels``); None for in-memory images.
        classes: the class list that ``class_ids`` index (the labeler's or the job's, then other labels).
        max_pixels: ``masks`` refuses an RLE declaring more pixels (read from files: the job's
            ``--max-pixels``); None: no cap.
        sam3_rles: per instance, the SAM 3 detector's own mask as RLE (``--detector sam3``), else None; an
            empty list: none at all (other detectors, outputs written before the ``sam3_mask`` column).
        stability, hq_sam_iou, box_iou: N float32 quality signals (``hqlabel.platform.schema``); NaN where
            the output predates them. None: not given (a result built by hand).
    """

    height: int
    width: int
    boxes: np.ndarray
    labels: list[str]
    scores: np.ndarray
    pred_iou: np.ndarray
    areas: np.ndarray
    rles: list[dict[str, Any]]
    image_id: str | None = None
    classes: list[str] = field(default_factory=list)
    max_pixels: int | None = DEFAULT_MAX_PIXELS
    sam3_rles: list[dict[str, Any] | None] = field(default_factory=list, repr=False)
    stability: np.ndarray | None = None
    hq_sam_iou: np.ndarray | None = None
    box_iou: np.ndarray | None = None
    _masks: np.ndarray | None = field(default=None, init=False, repr=False)

    @classmethod
    def from_instances(
        cls,
        instances: list[dict[str, Any]],
        size: tuple[int, int],
        *,
        image_id: str | None = None,
        classes: list[str] | None = None,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
    ) -> LabelResult:
        """A result from instance dicts (``INSTANCE_TYPE`` fields: ``label``, ``score``, ``box``, ``mask``,
        ``area``, ``pred_iou``) in ``instance_id`` order; ``size``: the image's (H, W)."""
        return cls(
            height=int(size[0]),
            width=int(size[1]),
            boxes=np.asarray([r["box"] for r in instances], np.float32).reshape(-1, 4),
            labels=[r["label"] for r in instances],
            scores=np.asarray([r["score"] for r in instances], np.float32),
            pred_iou=np.asarray([r["pred_iou"] for r in instances], np.float32),
            areas=np.asarray([r["area"] for r in instances], np.int64),
            rles=[
                {"size": [int(v) for v in r["mask"]["size"]], "counts": r["mask"]["counts"]}
                for r in instances
            ],
            image_id=image_id,
            classes=list(classes or []),
            max_pixels=max_pixels,
            sam3_rles=[_plain_rle(r.get("sam3_mask")) for r in instances],
            **{name: _signal(instances, name) for name in SIGNAL_NAMES},
        )

    def __len__(self) -> int:
        return len(self.labels)

    def __repr__(self) -> str:
        counts: dict[str, int] = {}
        for name in self.labels:
            counts[name] = counts.get(name, 0) + 1
        shown = ", ".join(f"{name} {n}" for name, n in counts.items())
        return (
            f"LabelResult(image_id={self.image_id!r}, {self.height} x {self.width}, {len(self)} instances"
            + (f": {shown})" if shown else ")")
        )

    @property
    def masks(self) -> np.ndarray:
        """N x H x W bool, decoded from ``rles`` on first access and kept.

        Raises:
            ValueError: an RLE is malformed, or declares more than ``max_pixels`` pixels (untrusted files).
        """
        if self._masks is None:
            decoded = [decode_mask(rle, max_pixels=self.max_pixels) for rle in self.rles]
            self._masks = np.stack(decoded) if decoded else np.zeros((0, self.height, self.width), dtype=bool)
        return self._masks

    @property
    def class_ids(self) -> np.ndarray:
        """N int64: each label's index in ``classes``; a label not in it gets the next free index (after
        ``classes``, in order of first appearance), so equal labels always share an id."""
        names = list(self.classes)
        for name in self.labels:
            if name not in names:
                names.append(name)
        index = {name: i for i, name in enumerate(names)}
        return np.asarray([index[name] for name in self.labels], np.int64)

    def rows(self) -> list[dict[str, Any]]:
        """The instances as masks-table rows (``MASKS_SCHEMA``: ``image_id``, ``instance_id``, ``label``,
        ``score``, ``box``, ``mask``, ``area``, ``pred_iou``, ``sam3_mask`` and the quality signals, None
        where unknown), as a labeling job writes them."""
        return [
            {
                "image_id": self.image_id,
                "instance_id": k,
                "label": self.labels[k],
                "score": float(self.scores[k]),
                "box": [float(v) for v in self.boxes[k]],
                "mask": _plain_rle(self.rles[k]),
                "area": int(self.areas[k]),
                "pred_iou": float(self.pred_iou[k]),
                "sam3_mask": self.sam3_rles[k] if self.sam3_rles else None,
                **{name: _signal_value(getattr(self, name), k) for name in SIGNAL_NAMES},
            }
            for k in range(len(self))
        ]

    def to_supervision(self) -> supervision.Detections:
        """A ``supervision.Detections``: ``xyxy`` (N x 4 float32), ``mask`` (N x H x W bool), ``confidence``
        (the detector scores), ``class_id`` (``class_ids``), ``data["class_name"]`` (the labels, a str array)
        and ``data["pred_iou"]``. Needs the ``supervision`` extra (``pip install hqlabel[supervision]``)."""
        from hqlabel.api.interop import to_detections

        return to_detections(self)


def _plain_rle(rle: dict[str, Any] | None) -> dict[str, Any] | None:
    """An RLE as the masks table holds it (``size`` a list of ints, ``counts`` bytes); None stays None."""
    if rle is None:
        return None
    return {"size": [int(v) for v in rle["size"]], "counts": bytes(rle["counts"])}


def _signal(instances: list[dict[str, Any]], name: str) -> np.ndarray:
    """N float32 values of a quality-signal column; NaN where the row lacks it (an older output)."""
    values = [r.get(name) for r in instances]
    return np.asarray([np.nan if v is None else v for v in values], np.float32)


def _signal_value(values: np.ndarray | None, k: int) -> float | None:
    if values is None or np.isnan(values[k]):
        return None
    return float(values[k])


def _labeled_images(folder: Any, uri: str) -> Iterator[tuple[str, int, int]]:
    """``(image_id, height, width)`` of the labeled images of one ``images/part-*.parquet``, in its (image id)
    order; failed images are left out, and so are ids that repeat within the shard (their masks cannot be
    told apart), with a warning."""
    with folder._parquet(uri) as parquet:
        table = parquet.read(columns=["image_id", "height", "width", "error_stage"])
    rows = [r for r in table.to_pylist() if r["error_stage"] is None and r["height"] is not None]
    ids = [r["image_id"] for r in rows]
    repeated = {i for i in ids if ids.count(i) > 1} if len(set(ids)) < len(ids) else set()
    if repeated:
        logger.warning("%s: image ids %s occur more than once; left out", uri, sorted(repeated)[:5])
    for r in rows:
        if r["image_id"] not in repeated:
            yield r["image_id"], r["height"], r["width"]


def read_labels(
    path: str,
    *,
    s3_endpoint: str | None = None,
    s3_region: str | None = None,
) -> Iterator[tuple[str, LabelResult]]:
    """Yield ``(image_id, LabelResult)`` for every labeled image of a labels folder (a labeling job's
    ``out``, local or ``s3://``), images without instances included, failed images (``errors/``) left out.

    Streams: one shard at a time, its small images table read whole and its masks read a record batch of
    ``READ_BATCH_ROWS`` rows at a time (RLE bytes, nothing decoded), so memory holds one image's instances
    plus one batch. Shards in file order, images in ``image_id`` order within a shard.

    Raises:
        FileNotFoundError: ``path`` is not a labels folder (no ``job.json`` or no ``images/``).
    """
    from hqlabel.platform.labels import LabelsFolder
    from hqlabel.platform.sources import files_by_shard

    folder = LabelsFolder(path, StorageOptions(s3_endpoint, s3_region))
    classes = list(folder.job.get("spec", {}).get("labeler", {}).get("classes") or [])
    masks_by_shard = files_by_shard(folder.mask_files)
    for shard, images_uri in sorted(files_by_shard(folder.image_files).items()):
        pending = _instances_by_image(folder, masks_by_shard.get(shard))
        current = next(pending, None)
        for image_id, height, width in _labeled_images(folder, images_uri):
            while current is not None and current[0] < image_id:  # masks of an image left out above
                current = next(pending, None)
            instances = []
            if current is not None and current[0] == image_id:
                instances = current[1]
                current = next(pending, None)
            yield (
                image_id,
                LabelResult.from_instances(
                    instances,
                    (height, width),
                    image_id=image_id,
                    classes=classes,
                    max_pixels=folder.max_pixels,
                ),
            )


def _instances_by_image(folder: Any, uri: str | None) -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """``(image_id, instance rows sorted by instance_id)`` of one masks file, grouping its consecutive rows
    (the file is sorted by image id), a record batch at a time."""
    if uri is None:
        return
    current: str | None = None
    rows: list[dict[str, Any]] = []
    with folder._parquet(uri) as parquet:
        for batch in parquet.iter_batches(batch_size=READ_BATCH_ROWS):
            for row in batch.to_pylist():
                if row["image_id"] != current:
                    if current is not None:
                        yield current, sorted(rows, key=lambda r: r["instance_id"])
                    current, rows = row["image_id"], []
                rows.append(row)
    if current is not None:
        yield current, sorted(rows, key=lambda r: r["instance_id"])


def read_detections(
    path: str,
    *,
    s3_endpoint: str | None = None,
    s3_region: str | None = None,
) -> Iterator[tuple[str, supervision.Detections]]:
    """``read_labels`` as ``(image_id, supervision.Detections)`` pairs (``LabelResult.to_supervision``);
    masks are decoded one image at a time. Needs the ``supervision`` extra."""
    for image_id, result in read_labels(path, s3_endpoint=s3_endpoint, s3_region=s3_region):
        yield image_id, result.to_supervision()
