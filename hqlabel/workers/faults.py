"""Faults of the labeling actor: which errors a retry may cure, how often a batch may kill its actor, and the
fault-injection points that tests use to make an actor crash for real.

Errors fall in two kinds. Deterministic ones (a corrupt or unsupported image, an image over a limit, a bad
prompt, a refused reference) would fail the same way again: they become error rows with ``retryable`` False.
Transient ones (storage that still failed after its retries, a CUDA runtime error, an actor process that
died: a native crash, the OOM killer) may not: they are retried a bounded number of times and then become
error rows with ``retryable`` True, which ``hqlabel label ... --retry-errors`` relabels.

Crashes are bounded by a per-batch attempt record (``AttemptLog``), because a process that dies cannot write
an error row, and Ray would otherwise restart the actor and retry the same batch forever:

1. Before labeling a batch, the actor reads the batch's record in ``OUT/_tmp/attempts/`` (keyed by the
   batch's ``(shard, row)`` positions, which a retry of the same Ray task shares, and by the job run) and
   writes it back with one more attempt; an attempt that finishes deletes it. Every earlier attempt that
   the record counts therefore died (Ray retries an actor's task only when the actor died under it).
2. After ``BATCH_DEATHS`` such deaths the batch is isolated: its images are labeled one at a time, and the
   record names the image being labeled before each one. An image named by a record when its attempt died
   has killed the actor alone; after ``IMAGE_DEATHS`` such deaths it becomes a retryable error row, unread
   by the models, and the others are labeled.
3. A batch therefore ends within ``max_attempts(batch_size)`` attempts however many of its images kill the
   actor; the last one allowed labels nothing more and gives the images still open retryable error rows
   (only reached when deaths happened outside the models). Ray's ``max_restarts`` (and ``max_task_retries``,
   the same: a task is retried only after its actor died) bound how often one actor is replaced over a
   whole job; beyond that the job stops.

A sticky device error (``is_device_error``: after one, every later CUDA call of the process fails) is not
an image's fault: the actor exits its process so that Ray replaces it with a fresh one (within
``max_restarts``), and the batch is retried there (counted by the same attempt record).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass, field

from hqlabel.platform import storage
from hqlabel.platform.storage import StorageOptions

logger = logging.getLogger(__name__)

BATCH_DEATHS = 2  # attempts of a whole batch that may die before its images are labeled one at a time
IMAGE_DEATHS = 1  # deaths while labeling one image alone before it becomes a retryable error row
ATTEMPTS = "attempts"  # OUT/_tmp/attempts/KEY.json: the attempt records of the batches in flight

# Text of errors that leave a CUDA (or other accelerator) context unusable for the rest of the process.
DEVICE_ERROR_TEXT = (
    "CUDA error",
    "CUBLAS_STATUS_",
    "CUDNN_STATUS_",
    "cuDNN error",
    "device-side assert",
    "illegal memory access",
    "unspecified launch failure",
)
FAILPOINTS_ENV = "HQLABEL_FAILPOINTS"


def max_attempts(batch_size: int) -> int:
    """The most attempts one batch of ``batch_size`` images takes, however many of them kill the actor:
    ``BATCH_DEATHS`` whole-batch attempts, ``IMAGE_DEATHS`` per image, and the one that finishes."""
    return BATCH_DEATHS + IMAGE_DEATHS * batch_size + 1


def is_device_error(error: BaseException) -> bool:
    """Whether ``error`` says the process's accelerator is broken (a sticky CUDA error): a
    ``torch.AcceleratorError`` (torch >= 2.8), or a ``RuntimeError`` with CUDA error text
    (``DEVICE_ERROR_TEXT``). Out-of-memory errors are not: the device works on once memory is freed."""
    torch = sys.modules.get("torch")
    accelerator_error = getattr(torch, "AcceleratorError", None) if torch is not None else None
    if accelerator_error is not None and isinstance(error, accelerator_error):
        return True
    return isinstance(error, RuntimeError) and any(text in str(error) for text in DEVICE_ERROR_TEXT)


def is_transient_label_error(error: BaseException) -> bool:
    """Whether an image that failed in the models with ``error`` may be labeled on a retry: a device error,
    or running out of (host or device) memory, which depends on what else ran at the time."""
    torch = sys.modules.get("torch")
    oom = getattr(torch, "OutOfMemoryError", None) if torch is not None else None
    return (
        is_device_error(error)
        or isinstance(error, MemoryError)
        or (oom is not None and isinstance(error, oom))
    )


def image_key(shard: str, row: int | None, image_id: str) -> str:
    """What names one image of a job in an attempt record: its shard and position (its id where the
    position is unknown)."""
    return f"{shard}/{row if row is not None else 'id:' + image_id}"


@dataclass
class BatchAttempt:
    """One attempt at labeling a batch, as its record (``AttemptLog.start``) has it.

    Attributes:
        number: 1 for the first attempt at this batch, 2 for the first retry, ...
        deaths: earlier attempts that died (all of them: an attempt that finishes deletes the record).
        image_deaths: per image key, the earlier attempts that died while labeling that image alone.
        limit: the attempt that labels nothing more (``max_attempts``).
        run: the job run the record belongs to (records of other runs are not counted).
    """

    uri: str
    options: StorageOptions
    number: int
    image_deaths: dict[str, int] = field(default_factory=dict)
    limit: int = 0
    run: str | None = None

    @property
    def deaths(self) -> int:
        return self.number - 1

    @property
    def isolating(self) -> bool:
        """Label the images one at a time: the whole batch killed the actor ``BATCH_DEATHS`` times."""
        return self.deaths >= BATCH_DEATHS

    @property
    def giving_up(self) -> bool:
        """The last attempt allowed: the images still open become retryable error rows, unlabeled."""
        return self.number >= self.limit

    def killed_by(self, key: str) -> int:
        """How many earlier attempts died labeling image ``key`` alone."""
        return self.image_deaths.get(key, 0)

    def labeling(self, key: str | None) -> None:
        """Record that image ``key`` is being labeled alone (None: the whole batch, or none): if this attempt
        dies now, the next one blames that image."""
        record = {"run": self.run, "attempts": self.number, "image": key, "image_deaths": self.image_deaths}
        storage.write_record(self.uri, json.dumps(record).encode(), self.options)

    def finish(self) -> None:
        """The attempt is over and its results go back to Ray: forget the batch. (Ray may run a finished
        batch again when a later batch of the same task kills the actor: it then starts afresh.)"""
        storage.delete_record(self.uri, self.options)


class AttemptLog:
    """The attempt records of a job's batches, in ``folder`` (``OUT/_tmp/attempts``): one small JSON object
    per batch in flight, read and written by the labeling actors (see the module docstring).

    Storage requests: a read, a write and a delete per batch (on S3 a GET, a ``PutObject`` and a
    ``DeleteObject``), and a write per image labeled alone after deaths.

    Args:
        batch_size: the job's batch size (it bounds the attempts of a batch: ``max_attempts``).
        run: the job run's id (its lease's): records left by another run (in ``OUT/_tmp`` after a crash of
            the whole job) count no deaths.
    """

    def __init__(
        self,
        folder: str,
        batch_size: int,
        options: StorageOptions = StorageOptions(),
        run: str | None = None,
    ) -> None:
        self.folder = folder
        self.limit = max_attempts(batch_size)
        self.options = options
        self.run = run

    def start(self, keys: list[str]) -> BatchAttempt:
        """Begin an attempt at the batch of images ``keys`` (``image_key``): read its record, blame the image
        an earlier attempt died on, and write the record back with this attempt counted."""
        digest = hashlib.sha1("\n".join(sorted(keys)).encode()).hexdigest()[:24]
        uri = storage.join(self.folder, f"{digest}.json")
        data = storage.read_record(uri, self.options)
        record = json.loads(data) if data is not None else {}
        if not record or record.get("run") != self.run:  # none, or another run's: no attempt of this run
            record = {"attempts": 0, "image": None, "image_deaths": {}}
        deaths = dict(record["image_deaths"])
        if record["image"] is not None:  # the last attempt died while labeling this image alone
            deaths[record["image"]] = deaths.get(record["image"], 0) + 1
        attempt = BatchAttempt(uri, self.options, record["attempts"] + 1, deaths, self.limit, self.run)
        if attempt.deaths:
            logger.warning(
                "batch %s: attempt %d; %d earlier attempt(s) died (a crashed or killed labeling actor)",
                digest,
                attempt.number,
                attempt.deaths,
            )
        attempt.labeling(None)
        return attempt


class Failpoints:
    """Fault injection, a test hook: make the labeling actor fail for real on chosen images.

    ``HQLABEL_FAILPOINTS`` in the environment of the command that starts a job (the driver hands it to the
    labeling actors) is a comma-separated list of ``ACTION:IMAGE_ID``; before the models see a batch that
    holds ``IMAGE_ID``:

    - ``exit``: the actor's process kills itself with SIGKILL, as the kernel's OOM killer or a native crash
      would end it (every time, in every actor).
    - ``device``: raise ``torch.AcceleratorError`` (a CUDA illegal memory access) in an actor that Ray has
      not restarted yet; from then on every call of that process raises it, as after a sticky CUDA error.
    - ``stall``: the actor sleeps ``STALL_SECONDS`` before labeling the batch, as a slow model or device
      would (every time): with one batch in flight per actor, the other actors take the next batches
      meanwhile (the multi-node test uses it to have every actor label).

    Unset or empty: no effect (one dictionary lookup per image).
    """

    ACTIONS = ("exit", "device", "stall")
    STALL_SECONDS = 10.0

    def __init__(self, spec: str | None) -> None:
        self.points: dict[str, str] = {}
        for item in filter(None, (part.strip() for part in (spec or "").split(","))):
            action, sep, image_id = item.partition(":")
            if not sep or action not in self.ACTIONS or not image_id:
                raise ValueError(
                    f"{FAILPOINTS_ENV}: {item!r} is not ACTION:IMAGE_ID with ACTION one of {self.ACTIONS}"
                )
            self.points[image_id] = action
        self.broken: BaseException | None = None

    def check(self, image_ids: list[str]) -> None:
        """Fail as configured if the batch ``image_ids`` holds a fault point (see the class docstring)."""
        if self.broken is not None:
            raise self.broken
        for image_id in image_ids:
            action = self.points.get(image_id)
            if action == "exit":
                logger.error("failpoint: killing this labeling actor on %s", image_id)
                os.kill(os.getpid(), signal.SIGKILL)
            elif action == "stall":
                logger.warning("failpoint: stalling %.0f s on %s", self.STALL_SECONDS, image_id)
                time.sleep(self.STALL_SECONDS)
            elif action == "device" and not _restarted_actor():
                self.broken = _device_error()
                raise self.broken


def in_ray_actor() -> bool:
    """Whether this code runs in a Ray actor (not in a driver, a task or outside Ray)."""
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None


def _restarted_actor() -> bool:
    """Whether this process is a Ray actor that Ray restarted after it died (False outside Ray)."""
    if not in_ray_actor():
        return False
    return bool(sys.modules["ray"].get_runtime_context().was_current_actor_reconstructed)


def _device_error() -> BaseException:
    import torch

    text = "CUDA error: an illegal memory access was encountered (failpoint)"
    error_type = getattr(torch, "AcceleratorError", None)
    return error_type(text) if error_type is not None else RuntimeError(text)
