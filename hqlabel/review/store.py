"""The reviewers' decisions and corrected masks of a labels folder: ``LABELS/review/``, append-only Parquet.

Every write is one new file ``LABELS/review/part-<UTC time>-<random>.parquet`` (one row per event,
REVIEW_SCHEMA), written under a hidden temporary name and renamed into place (an S3 PUT is atomic by
itself): a reader sees a whole batch or nothing, no file is ever rewritten, and writers never share a file,
so any number of threads, servers or scripts can write at once without losing an event.

    image_id     string
    instance_id  int32
    action       string        accept | reject | relabel (decisions), fix (a corrected mask)
    label        string        relabel: the new class; else null
    mask         struct<size, counts>   fix: the corrected mask, COCO compressed RLE (original pixels)
    area         int64         fix: its pixels
    pred_iou     float32       fix: HQ-SAM's IoU prediction for it
    points       list<fixed_size_list<float32>[3]>   fix: the clicks (x, y, 1 positive | 0 negative), pixels
    reviewer     string
    time         timestamp[us, UTC]

State of an instance (``read_review``): its latest decision (accept, reject or relabel) wins, and separately
its latest fix; "latest" is by ``time``, then file name, then row. A fix does not change the decision: a
rejected instance stays rejected whatever its mask.
"""

from __future__ import annotations

import datetime
import threading
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from hqlabel.platform import storage
from hqlabel.platform.schema import RLE_TYPE
from hqlabel.platform.storage import StorageOptions

__all__ = ["ACTIONS", "DECISIONS", "REVIEW_SCHEMA", "ReviewState", "ReviewStore", "read_review"]

DECISIONS = ("accept", "reject", "relabel")
ACTIONS = (*DECISIONS, "fix")
POINT_TYPE = pa.list_(pa.float32(), 3)
REVIEW_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("instance_id", pa.int32(), nullable=False),
        pa.field("action", pa.string(), nullable=False),
        pa.field("label", pa.string()),
        pa.field("mask", RLE_TYPE),
        pa.field("area", pa.int64()),
        pa.field("pred_iou", pa.float32()),
        pa.field("points", pa.list_(POINT_TYPE)),
        pa.field("reviewer", pa.string(), nullable=False),
        pa.field("time", pa.timestamp("us", tz="UTC"), nullable=False),
    ]
)


@dataclass
class ReviewState:
    """What the reviewers said about one instance: the latest decision and the latest corrected mask.

    ``decision`` is "accept", "reject", "relabel" or None (not decided); ``label`` the new class of a
    relabel; ``mask`` the corrected COCO RLE (or None) with its ``area``, ``pred_iou`` and ``points``.
    """

    decision: str | None = None
    label: str | None = None
    reviewer: str | None = None
    time: datetime.datetime | None = None
    mask: dict[str, Any] | None = None
    area: int | None = None
    pred_iou: float | None = None
    points: list[list[float]] = field(default_factory=list)
    fixed_by: str | None = None
    fixed_time: datetime.datetime | None = None
    _decision_key: tuple = ()
    _fix_key: tuple = ()

    def apply(self, row: dict[str, Any], key: tuple) -> None:
        """Take event ``row`` (a REVIEW_SCHEMA row) if it is later than what this state holds (``key``:
        time, file name, row)."""
        if row["action"] == "fix":
            if key > self._fix_key:
                self._fix_key = key
                self.mask, self.area, self.pred_iou = row["mask"], row["area"], row["pred_iou"]
                self.points = [list(p) for p in row["points"] or []]
                self.fixed_by, self.fixed_time = row["reviewer"], row["time"]
        elif key > self._decision_key:
            self._decision_key = key
            self.decision, self.label = row["action"], row["label"]
            self.reviewer, self.time = row["reviewer"], row["time"]

    @property
    def corrected(self) -> bool:
        return self.mask is not None

    def to_json(self) -> dict[str, Any]:
        """The state as JSON-able values (times ISO 8601 UTC; no mask bytes)."""
        return {
            "decision": self.decision,
            "label": self.label,
            "reviewer": self.reviewer,
            "time": self.time.isoformat() if self.time else None,
            "corrected": self.corrected,
            "points": self.points,
            "fixed_by": self.fixed_by,
            "fixed_time": self.fixed_time.isoformat() if self.fixed_time else None,
        }


def utc_now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


class ReviewStore:
    """The ``review/`` folder of a labels folder: append event batches, and keep the state of every instance.

    Thread-safe. ``refresh`` reads the files other writers (other servers, scripts) added since the last
    call; this store's own writes are applied at once.
    """

    def __init__(self, uri: str, options: StorageOptions = StorageOptions()):
        self.uri = uri.rstrip("/") or uri
        self.options = options
        self.states: dict[tuple[str, int], ReviewState] = {}
        self._seen: set[str] = set()
        self._lock = threading.Lock()
        self.refresh()

    def refresh(self) -> None:
        """Apply the files written since the last look (by anyone)."""
        files = storage.list_files(self.uri, (".parquet",), self.options) if self._exists() else []
        new = [f for f in files if f not in self._seen]
        tables = [(f, storage.read_parquet(f, self.options)) for f in new]
        with self._lock:
            for uri, table in tables:
                if uri not in self._seen:
                    self._seen.add(uri)
                    self._apply(uri, table)

    def _exists(self) -> bool:
        return storage.exists(self.uri, self.options)

    def _apply(self, uri: str, table: pa.Table) -> None:
        name = uri.rsplit("/", 1)[-1]
        for k, row in enumerate(table.to_pylist()):
            key = (row["image_id"], int(row["instance_id"]))
            self.states.setdefault(key, ReviewState()).apply(row, (row["time"], name, k))

    def append(self, events: Iterable[dict[str, Any]]) -> str:
        """Write ``events`` (dicts with REVIEW_SCHEMA's fields; ``time`` defaults to now, missing optional
        fields to null) as one new file; returns its URI.

        Raises:
            ValueError: no events, or an action other than accept, reject, relabel, fix.
        """
        now = utc_now()
        rows = []
        for event in events:
            if event.get("action") not in ACTIONS:
                raise ValueError(f"action {event.get('action')!r} is not one of {', '.join(ACTIONS)}")
            rows.append(
                {name: event.get(name) for name in REVIEW_SCHEMA.names} | {"time": event.get("time") or now}
            )
        if not rows:
            raise ValueError("no review events to write")
        table = pa.Table.from_pylist(rows, schema=REVIEW_SCHEMA)
        stamp = now.strftime("%Y%m%dT%H%M%S%fZ")
        uri = storage.join(self.uri, f"part-{stamp}-{uuid.uuid4().hex[:12]}.parquet")
        storage.write_parquet(table, uri, self.options)
        with self._lock:
            if uri not in self._seen:  # a concurrent refresh may have applied it already
                self._seen.add(uri)
                self._apply(uri, table)
        return uri

    def snapshot(self) -> dict[tuple[str, int], ReviewState]:
        """A copy of the states, safe to iterate while other threads write."""
        with self._lock:
            return dict(self.states)

    def state(self, image_id: str, instance_id: int) -> ReviewState:
        with self._lock:
            return self.states.get((image_id, instance_id)) or ReviewState()


def read_review(uri: str, options: StorageOptions = StorageOptions()) -> dict[tuple[str, int], ReviewState]:
    """The state of every reviewed instance in the review folder ``uri``: ``{(image_id, instance_id):
    ReviewState}`` (latest decision and latest fix win, see the module docstring).

    Raises:
        FileNotFoundError: ``uri`` holds no review Parquet file.
    """
    if not storage.exists(uri, options) or not storage.list_files(uri, (".parquet",), options):
        raise FileNotFoundError(
            f"{uri} holds no review files (part-*.parquet); pass LABELS/review of a folder reviewed with "
            "`hqlabel review LABELS`"
        )
    return ReviewStore(uri, options).states
