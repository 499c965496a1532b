"""One writer per output folder: a lease object ``OUT/_lease.json`` that a run takes, renews and releases.

The lease is JSON: ``{"run_id": uuid hex, "host", "pid", "command", "acquired_at", "renewed_at",
"expires_at"}``, times as UTC ISO 8601. Every step is atomic on the storage itself, so two runs on different
machines never both hold it:

- take: local, a hard link of a complete temporary file to ``_lease.json`` (an exclusive create: it fails
  if the name exists, and readers never see a half-written lease); S3, ``PutObject`` with
  ``If-None-Match: *``.
- take over an expired lease (its run died): local, a rename of the stale file to a unique name (one rename
  wins; a run that finds it renamed a fresh lease instead puts it back) then the exclusive create; S3, a
  ``PutObject`` with ``If-Match`` on the stale lease's ETag.
- renew (a daemon thread, every ``ttl / 3``) and release: only while the lease is still the one this run
  wrote (local: read, compare, replace; S3: ``If-Match`` on the ETag of its last write).

Expiry is judged by each host's clock; hosts whose clocks differ by ``d`` shorten the lease by ``d``. A lease
whose run was on this host (same host name) and whose process no longer exists is stale at once: a run that
crashed is resumed without waiting for its lease to expire.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
import threading
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Any

from hqlabel.platform import storage
from hqlabel.platform.storage import StorageOptions

logger = logging.getLogger(__name__)

LEASE_NAME = "_lease.json"
DEFAULT_TTL = 120.0  # seconds a lease lives without renewal; renewed every ttl / 3


class LeaseError(RuntimeError):
    """The output folder's lease is held by another run, or was lost to one."""


class LeaseHeldError(LeaseError):
    """Another live run holds the lease of the output folder."""


class LeaseLostError(LeaseError):
    """This run held the lease, but another run has taken it over (this run's renewals stopped in time)."""


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _iso(t: datetime) -> str:
    return t.isoformat(timespec="microseconds")


def _holder_is_dead(record: dict) -> bool:
    """The lease's run was on this host and its process is gone (it died without releasing the lease): the
    lease is stale before it expires. Another host's run can only be judged by expiry."""
    if record.get("host") != socket.gethostname() or not isinstance(record.get("pid"), int):
        return False
    if record["pid"] == os.getpid():
        return False
    try:
        os.kill(record["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def _describe(record: dict) -> str:
    return (
        f"run {record.get('run_id')} on host {record.get('host')} (pid {record.get('pid')}, "
        f"{record.get('command')!r})"
    )


class _LocalLease:
    """``_lease.json`` in a local folder; versions are the MD5 of the file's bytes."""

    def __init__(self, folder: str) -> None:
        self.path = os.path.join(folder, LEASE_NAME)
        self.folder = folder

    def read(self) -> tuple[bytes, str] | None:
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None
        return data, hashlib.md5(data).hexdigest()

    def _temporary(self, body: bytes) -> str:
        tmp = os.path.join(self.folder, f"{LEASE_NAME}.{uuid.uuid4().hex}.tmp")
        with open(tmp, "wb") as f:
            f.write(body)
            f.flush()
            os.fsync(f.fileno())
        return tmp

    def create(self, body: bytes) -> str | None:
        os.makedirs(self.folder, exist_ok=True)
        tmp = self._temporary(body)
        try:
            os.link(tmp, self.path)  # fails with FileExistsError if the lease exists (O_EXCL semantics)
        except FileExistsError:
            return None
        finally:
            os.unlink(tmp)
        return hashlib.md5(body).hexdigest()

    def take_over(self, version: str, body: bytes) -> str | None:
        current = self.read()
        if current is None or current[1] != version:
            return None
        stale = os.path.join(self.folder, f"{LEASE_NAME}.{uuid.uuid4().hex}.stale")
        try:
            os.rename(self.path, stale)  # of two runs renaming one file, one finds it gone
        except FileNotFoundError:
            return None
        with open(stale, "rb") as f:
            renamed = hashlib.md5(f.read()).hexdigest()
        if renamed != version:  # another run took over first and this rename moved its fresh lease: put back
            with contextlib.suppress(FileExistsError):
                os.link(stale, self.path)
            os.unlink(stale)
            return None
        os.unlink(stale)
        return self.create(body)

    def replace(self, version: str, body: bytes) -> str | None:
        current = self.read()
        if current is None or current[1] != version:
            return None
        os.replace(self._temporary(body), self.path)
        return hashlib.md5(body).hexdigest()

    def delete(self, version: str) -> None:
        current = self.read()
        if current is not None and current[1] == version:
            os.unlink(self.path)


class _S3Lease:
    """``_lease.json`` under an S3 prefix, written by conditional requests; versions are ETags."""

    def __init__(self, uri: str, options: StorageOptions) -> None:
        self.uri = uri
        self.bucket, _, self.key = uri[len("s3://") :].partition("/")
        self.client = storage._s3_client(options)

    def _call(self, method: str, **kwargs: Any) -> dict | None:
        """The response of ``client.<method>``, or None when a condition failed or the object is missing.

        Raises:
            OSError: any other failure (after botocore's retries).
        """
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return getattr(self.client, method)(Bucket=self.bucket, Key=self.key, **kwargs)
        except ClientError as e:
            code = e.response.get("Error", {}).get("Code", "")
            if code in ("PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey", "404", "412", "409"):
                return None
            raise OSError(f"{method} {self.uri} failed: {e}") from e
        except BotoCoreError as e:
            raise OSError(f"{method} {self.uri} failed: {e}") from e

    def read(self) -> tuple[bytes, str] | None:
        from botocore.exceptions import BotoCoreError

        response = self._call("get_object")
        if response is None:
            return None
        try:
            return response["Body"].read(), response["ETag"]
        except BotoCoreError as e:
            raise OSError(f"reading {self.uri} failed: {e}") from e

    def create(self, body: bytes) -> str | None:
        response = self._call("put_object", Body=body, IfNoneMatch="*")
        return None if response is None else response["ETag"]

    def replace(self, version: str, body: bytes) -> str | None:
        response = self._call("put_object", Body=body, IfMatch=version)
        return None if response is None else response["ETag"]

    take_over = replace

    def delete(self, version: str) -> None:
        self._call("delete_object", IfMatch=version)


class OutputLease:
    """A context manager that holds ``OUT/_lease.json`` while a job writes into ``OUT``.

    ``with OutputLease(out, options, ttl=120, what="hqlabel label") as lease:`` takes the lease (or raises
    ``LeaseHeldError`` naming the run that holds it), renews it in a daemon thread every ``ttl / 3`` seconds,
    and releases it when the block ends, also when it raises. A lease that expired (its run died) is taken
    over with a warning. Long jobs call ``lease.check()`` before writing, which raises ``LeaseLostError`` once
    another run has taken the lease; a block that ends normally after losing it raises that too.

    Args:
        out: the output folder, local path, ``file://`` or ``s3://`` URI.
        options: how to reach S3.
        ttl: seconds the lease stays valid without a renewal (> 0).
        what: the command recorded in the lease, shown to runs that are refused.
    """

    def __init__(
        self,
        out: str,
        options: StorageOptions = StorageOptions(),
        *,
        ttl: float = DEFAULT_TTL,
        what: str = "hqlabel",
    ) -> None:
        if not ttl > 0:
            raise ValueError(f"lease ttl {ttl!r} must be a positive number of seconds, e.g. {DEFAULT_TTL:g}")
        self.out, self.ttl, self.what = out, float(ttl), what
        self.run_id = uuid.uuid4().hex
        self.uri = storage.join(out, LEASE_NAME)
        self._store = (
            _S3Lease(self.uri, options) if storage.is_s3(out) else _LocalLease(storage.resolve(out)[1])
        )
        self.record: dict[str, Any] = {}
        self._version: str | None = None
        self._lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # one renewal or release at a time

    def _write(self, write: Callable[..., str | None], version: str | None = None) -> str | None:
        """``write([version,] body)`` of the lease renewed from now; ``self.record`` follows on success."""
        now = _now()
        record = {
            **self.record,
            "renewed_at": _iso(now),
            "expires_at": _iso(now + timedelta(seconds=self.ttl)),
        }
        body = json.dumps(record).encode()
        new = write(body) if version is None else write(version, body)
        if new is not None:
            self.record, self._version = record, new
        return new

    def _current(self) -> tuple[dict, str] | None:
        found = self._store.read()
        if found is None:
            return None
        try:
            record = json.loads(found[0])
            datetime.fromisoformat(record["expires_at"])
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(
                f"{self.uri} is not a lease written by hqlabel ({e}); delete it if no run is writing to "
                f"{self.out}"
            ) from e
        return record, found[1]

    def acquire(self) -> OutputLease:
        """Take the lease (taking over an expired one) and start renewing it.

        Raises:
            LeaseHeldError: another run holds a lease that has not expired.
        """
        now = _now()
        self.record = {
            "run_id": self.run_id,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "command": self.what,
            "acquired_at": _iso(now),
        }
        for _ in range(8):  # each pass ends or sees another run change the lease
            if self._write(self._store.create) is not None:
                break
            current = self._current()
            if current is None:  # released between our create and read
                continue
            record, version = current
            if record.get("run_id") == self.run_id:  # our own create, retried after a lost response
                self.record, self._version = record, version
                break
            dead = _holder_is_dead(record)
            if not dead and _now() <= datetime.fromisoformat(record["expires_at"]):
                raise LeaseHeldError(
                    f"{self.out} is in use by {_describe(record)}, last renewed {record.get('renewed_at')}, "
                    f"expires {record['expires_at']}; wait for it to finish, or if it died, rerun after "
                    f"{record['expires_at']} (and pass a smaller --lease-ttl to make a dead run's lease "
                    "expire sooner next time)"
                )
            if self._write(self._store.take_over, version) is not None:
                logger.warning(
                    "took over the lease of %s from %s, which %s",
                    self.out, _describe(record),
                    "is no longer running on this host" if dead else f"expired {record['expires_at']}",
                )  # fmt: skip
                break
        else:
            raise LeaseHeldError(f"{self.out}: the lease kept changing while taking it; rerun the command")
        self._stop.clear()
        self._thread = threading.Thread(target=self._renew_loop, name="hqlabel-lease", daemon=True)
        self._thread.start()
        return self

    def renew(self) -> bool:
        """Extend the lease by ``ttl`` from now, if this run still holds it (the renewal thread's step).

        Returns:
            False once the lease is lost (``check()`` then raises); True otherwise, also after a failed
            request while the lease has not expired yet (the next renewal tries again).
        """
        with self._lock:
            return self._renew()

    def _renew(self) -> bool:
        if self._lost or self._version is None:
            return False
        expires = datetime.fromisoformat(self.record["expires_at"])
        try:
            version = self._write(self._store.replace, self._version)
            if version is None:
                current = self._current()
                if current is not None and current[0].get("run_id") == self.run_id:  # our write, retried
                    version = self._write(self._store.replace, current[1])
        except (OSError, ValueError) as e:
            if _now() <= expires:
                logger.warning("renewing the lease of %s failed (%s); retrying", self.out, e)
                return True
            self._lose(f"its renewal failed until it expired at {_iso(expires)} ({e})")
            return False
        if version is None:
            self._lose("another run replaced or removed it")
            return False
        return True

    def _lose(self, why: str) -> None:
        self._lost = (
            f"run {self.run_id} lost the lease of {self.out}: {why}; stop writing and rerun to resume"
        )
        logger.error("%s", self._lost)

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl / 3) and self.renew():
            pass

    @property
    def lost(self) -> bool:
        return self._lost is not None

    def check(self) -> None:
        """Raises ``LeaseLostError`` once another run has taken the lease (call before writing more)."""
        if self._lost:
            raise LeaseLostError(self._lost)

    def release(self) -> None:
        """Stop renewing and delete the lease if this run still holds it."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        with self._lock:
            if self._version is not None and not self._lost:
                self._store.delete(self._version)
            self._version = None

    def __enter__(self) -> OutputLease:
        return self.acquire()

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self.release()
        except OSError as e:  # the job's own outcome matters more; the lease expires by itself
            logger.warning(
                "could not release the lease of %s (%s); it expires after %g s", self.out, e, self.ttl
            )
        if exc_type is None:
            self.check()
