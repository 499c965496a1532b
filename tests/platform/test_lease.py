"""``hqlabel.platform.lease``: one writer per output folder, on local folders and on S3 (a moto server on
loopback), by the same calls."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from hqlabel.platform import storage
from hqlabel.platform.lease import LEASE_NAME, LeaseHeldError, LeaseLostError, OutputLease
from hqlabel.platform.storage import StorageOptions

pytestmark = pytest.mark.timeout(120)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path) -> tuple[str, StorageOptions]:
    """``(output folder URI, options)``: a local folder that does not exist yet, or a prefix in a bucket of
    its own."""
    if request.param == "local":
        return str(tmp_path / "out"), StorageOptions()
    bucket = request.getfixturevalue("s3_bucket")
    return f"s3://{bucket}/out", StorageOptions(s3_endpoint=request.getfixturevalue("s3_endpoint"))


def _stored(out: str, options: StorageOptions) -> dict | None:
    uri = storage.join(out, LEASE_NAME)
    return json.loads(storage.read_bytes(uri, options)) if storage.exists(uri, options) else None


def _write_lease(out: str, options: StorageOptions, expires_in: float) -> dict:
    """Another run's lease, written by hand, expiring ``expires_in`` seconds from now (< 0: expired)."""
    now = datetime.now(timezone.utc)
    record = {
        "run_id": uuid.uuid4().hex,
        "host": "elsewhere",
        "pid": 4242,
        "command": "hqlabel label old",
        "acquired_at": (now - timedelta(hours=1)).isoformat(),
        "renewed_at": (now + timedelta(seconds=expires_in - 120)).isoformat(),
        "expires_at": (now + timedelta(seconds=expires_in)).isoformat(),
    }
    storage.write_bytes(storage.join(out, LEASE_NAME), json.dumps(record).encode(), options)
    return record


def _wait_for(condition, what: str, deadline_s: float = 60.0) -> None:
    end = time.monotonic() + deadline_s
    while not condition():
        if time.monotonic() > end:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.02)


def test_acquire_writes_the_record_and_release_deletes_it(root):
    out, options = root
    with OutputLease(out, options, ttl=60, what="hqlabel label") as lease:
        record = _stored(out, options)
        assert record == lease.record
        assert (record["run_id"], record["host"], record["pid"]) == (
            lease.run_id,
            socket.gethostname(),
            os.getpid(),
        )
        assert record["command"] == "hqlabel label"
        acquired, renewed, expires = (
            datetime.fromisoformat(record[k]) for k in ("acquired_at", "renewed_at", "expires_at")
        )
        assert acquired.tzinfo is not None and acquired <= renewed
        assert expires - renewed == timedelta(seconds=60)
        lease.check()
    assert _stored(out, options) is None
    with OutputLease(out, options):  # free again
        pass


def test_second_run_is_refused_with_the_holder_named(root):
    out, options = root
    with OutputLease(out, options, ttl=60, what="hqlabel label imgs --out x") as first:
        with pytest.raises(LeaseHeldError) as refused:
            OutputLease(out, options, what="hqlabel label other").acquire()
        message = str(refused.value)
        for part in (
            out,
            first.run_id,
            socket.gethostname(),
            f"pid {os.getpid()}",
            "hqlabel label imgs --out x",
        ):
            assert part in message
        assert first.record["renewed_at"] in message and first.record["expires_at"] in message
        assert "wait for it" in message and "--lease-ttl" in message and "\n" not in message
        assert _stored(out, options)["run_id"] == first.run_id  # the holder keeps it
        first.check()


def test_expired_lease_is_taken_over_with_a_warning(root, caplog):
    out, options = root
    old = _write_lease(out, options, expires_in=-1)
    with (
        caplog.at_level(logging.WARNING, logger="hqlabel.platform.lease"),
        OutputLease(out, options) as lease,
    ):
        assert _stored(out, options)["run_id"] == lease.run_id
    assert old["run_id"] in caplog.text and "elsewhere" in caplog.text
    assert _stored(out, options) is None


def test_live_lease_written_by_hand_is_respected(root):
    out, options = root
    other = _write_lease(out, options, expires_in=60)
    with pytest.raises(LeaseHeldError, match=other["run_id"]):
        OutputLease(out, options).acquire()
    assert _stored(out, options) == other


def test_two_concurrent_takeovers_of_one_stale_lease_one_wins(root):
    out, options = root
    _write_lease(out, options, expires_in=-1)
    leases = [OutputLease(out, options, ttl=60) for _ in range(2)]
    barrier = threading.Barrier(len(leases))
    outcomes: dict[int, str] = {}

    def take(i: int) -> None:
        barrier.wait()
        try:
            leases[i].acquire()
            outcomes[i] = "won"
        except LeaseHeldError as e:
            outcomes[i] = str(e)

    threads = [threading.Thread(target=take, args=(i,)) for i in range(len(leases))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    winners = [i for i, outcome in outcomes.items() if outcome == "won"]
    assert len(winners) == 1, outcomes
    winner, loser = leases[winners[0]], leases[1 - winners[0]]
    assert winner.run_id in outcomes[1 - winners[0]]  # the loser was refused by the winner's fresh lease
    assert _stored(out, options)["run_id"] == winner.run_id
    assert winner.renew() and not loser.renew()
    winner.release()
    assert _stored(out, options) is None
    if not storage.is_s3(out):  # no renamed stale leases or temporaries left behind
        assert os.listdir(storage.resolve(out)[1]) == []


def test_renew_extends_the_expiry(root):
    out, options = root
    with OutputLease(out, options, ttl=60) as lease:  # the thread's first renewal is 20 s away
        before = lease.record.copy()
        _wait_for(
            lambda: datetime.now(timezone.utc) > datetime.fromisoformat(before["renewed_at"]), "a clock tick"
        )
        assert lease.renew()
        after = _stored(out, options)
        assert after == lease.record and after["run_id"] == before["run_id"]
        assert after["acquired_at"] == before["acquired_at"]
        assert datetime.fromisoformat(after["expires_at"]) > datetime.fromisoformat(before["expires_at"])
        assert after["renewed_at"] > before["renewed_at"]


def test_renewal_thread_keeps_a_short_lease_alive(root):
    out, options = root
    with OutputLease(out, options, ttl=0.9) as lease:
        first = lease.record["expires_at"]
        _wait_for(lambda: _stored(out, options)["expires_at"] != first, "the renewal thread")
        _wait_for(
            lambda: (
                datetime.fromisoformat(_stored(out, options)["renewed_at"]) > datetime.fromisoformat(first)
            ),
            "a renewal past the first expiry",
        )
        lease.check()
    assert _stored(out, options) is None


@pytest.mark.parametrize("how", ["replaced", "deleted"])
def test_lost_lease_is_detected_and_not_released(root, how):
    out, options = root
    with pytest.raises(LeaseLostError, match="lost the lease"), OutputLease(out, options, ttl=60) as lease:
        if how == "replaced":  # a run that took it over after our renewals stalled
            other = _write_lease(out, options, expires_in=60)
        else:
            storage.delete(storage.join(out, LEASE_NAME), options)
        assert not lease.renew()
        with pytest.raises(LeaseLostError, match=lease.run_id):
            lease.check()  # the body stops before writing more; the block's end raises it again
    assert _stored(out, options) == (other if how == "replaced" else None)


def test_released_when_the_body_raises(root):
    out, options = root
    with pytest.raises(KeyError, match="boom"), OutputLease(out, options, ttl=60):
        raise KeyError("boom")
    assert _stored(out, options) is None


def test_bad_ttl_and_foreign_lease_file_are_refused(root):
    out, options = root
    with pytest.raises(ValueError, match="ttl 0"):
        OutputLease(out, options, ttl=0)
    storage.write_bytes(storage.join(out, LEASE_NAME), b"not json", options)
    with pytest.raises(ValueError, match="not a lease written by hqlabel"):
        OutputLease(out, options).acquire()


HOLDER = """
import sys
from hqlabel.platform.lease import OutputLease
from hqlabel.platform.storage import StorageOptions

lease = OutputLease(sys.argv[1], StorageOptions(sys.argv[2] or None), ttl=3, what="holder").acquire()
print(lease.run_id, flush=True)
sys.stdin.read()  # hold until killed
"""


def test_killed_holder_is_refused_then_taken_over_at_once_on_its_host(root, caplog):
    """A run on this host that died (SIGKILL: no release) leaves a lease that is stale at once: its process
    is gone. (A lease from another host waits for its expiry: ``test_live_lease_written_by_hand_...``.)"""
    out, options = root
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, out, options.s3_endpoint or ""],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        run_id = holder.stdout.readline().strip()
        assert run_id, "the holder process did not take the lease"
        with pytest.raises(LeaseHeldError, match=rf"{run_id}.*pid {holder.pid}, 'holder'"):
            OutputLease(out, options).acquire()
    finally:
        holder.kill()  # SIGKILL: no release
        holder.wait()
    assert _stored(out, options)["run_id"] == run_id

    lease = OutputLease(out, options, ttl=60)
    with caplog.at_level(logging.WARNING, logger="hqlabel.platform.lease"):
        lease.acquire()  # long before the holder's lease (ttl 3 s, renewed every second) expires
    assert run_id in caplog.text and "no longer running on this host" in caplog.text
    assert _stored(out, options)["run_id"] == lease.run_id
    lease.release()
    assert _stored(out, options) is None
