"""Fault handling of the pipeline steps without Ray: which errors are retryable, and how the attempt record
ends a batch that keeps killing the process that labels it (real process deaths, in forked children)."""

from __future__ import annotations

import multiprocessing
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from conftest import encode, random_image

from hqlabel.platform.config import LabelerConfig
from hqlabel.platform.schema import DECODED_SCHEMA, SOURCE_SCHEMA
from hqlabel.platform.storage import StorageOptions
from hqlabel.workers import LabelWorker, decode_batch
from hqlabel.workers.faults import (
    BATCH_DEATHS,
    AttemptLog,
    Failpoints,
    is_device_error,
    is_transient_label_error,
    max_attempts,
)

pytestmark = [
    pytest.mark.timeout(180),
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and fork"),
]


def _source(rows: list[dict]) -> pa.Table:
    full = [{"shard": "00000", "row": i, "image": None, "uri": None, **r} for i, r in enumerate(rows)]
    return pa.Table.from_pylist(full, schema=SOURCE_SCHEMA)


def test_a_storage_error_after_its_retries_is_retryable_a_bad_image_is_not(tmp_path: Path):
    (tmp_path / "ok.png").write_bytes(encode(random_image(0)))
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    (tmp_path / "big.png").write_bytes(encode(random_image(1)))
    batch = _source(
        [
            {"image_id": "ok", "uri": str(tmp_path / "ok.png")},
            # The kernel answers EIO for this file (address 0 of the process is unmapped): an I/O error that
            # the storage layer retries (``with_retries``) and then gives up on, as on a failing disk.
            {"image_id": "eio", "uri": "/proc/self/mem"},
            {"image_id": "corrupt", "uri": str(tmp_path / "corrupt.png")},
            {"image_id": "missing", "uri": str(tmp_path / "missing.png")},
            {"image_id": "big", "uri": str(tmp_path / "big.png")},
        ]
    )
    out = decode_batch(batch, max_bytes=(tmp_path / "big.png").stat().st_size - 1)

    rows = {r["image_id"]: (r["error_stage"], r["retryable"]) for r in out.to_pylist()}
    assert rows == {
        "ok": (None, None),
        "eio": ("read", True),
        "corrupt": ("decode", False),
        "missing": ("read", False),
        "big": ("read", False),
    }
    assert "Errno 5" in out.to_pylist()[1]["error"]


def test_device_errors_and_memory_errors_are_transient_others_are_not():
    sticky = torch.AcceleratorError("CUDA error: an illegal memory access was encountered")
    assert is_device_error(sticky) and is_transient_label_error(sticky)
    assert is_device_error(RuntimeError("CUDA error: device-side assert triggered"))
    oom = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    assert not is_device_error(oom) and is_transient_label_error(oom)
    for deterministic in (ValueError("no boxes"), RuntimeError("shape mismatch"), KeyError("cat")):
        assert not is_device_error(deterministic) and not is_transient_label_error(deterministic)
    with pytest.raises(ValueError, match="HQLABEL_FAILPOINTS"):
        Failpoints("crash:x.png")


def _decoded(ids: list[str]) -> pa.Table:
    rows = []
    for k, image_id in enumerate(ids):
        image = random_image(k)
        h, w = image.shape[:2]
        rows.append(
            {
                "shard": "00000",
                "row": k,
                "image_id": image_id,
                "pixels": image.tobytes(),
                "height": h,
                "width": w,
                "orig_height": h,
                "orig_width": w,
            }
        )
    return pa.Table.from_pylist(rows, schema=DECODED_SCHEMA)


def _attempt(worker: LabelWorker, batch: pa.Table, conn) -> None:  # in a forked child
    conn.send(worker(batch))
    conn.close()


def test_a_batch_that_keeps_killing_its_process_ends_with_the_culprit_as_a_retryable_row(tmp_path: Path):
    """The worker process dies (SIGKILL, a fault point) whenever the models see image "c": after
    ``BATCH_DEATHS`` deaths of the whole batch, its images are labeled one at a time, "c" kills one more
    attempt, and the next one returns: "c" a retryable error row, the others labeled."""
    threads = torch.get_num_threads()
    try:
        config = LabelerConfig(classes="cat, dog", preset="tiny-random", box_threshold=0.3, device="cpu")
        worker = LabelWorker(
            config,
            num_threads=1,  # no OpenMP pool in the parent: forked children run torch safely
            attempts=AttemptLog(str(tmp_path / "attempts"), batch_size=4),
            failpoints="exit:c",
        )
        batch = _decoded(["a", "b", "c", "d"])
        alone = {i: worker.labeler.label([random_image(k)])[0] for k, i in enumerate("abcd")}
        context = multiprocessing.get_context("fork")
        exits = []
        result = None
        while result is None and len(exits) < max_attempts(4):
            receive, send = context.Pipe(duplex=False)
            child = context.Process(target=_attempt, args=(worker, batch, send))
            child.start()
            send.close()
            try:
                result = receive.recv() if receive.poll(120) else None
            except EOFError:  # the child died before it sent anything
                result = None
            child.join(60)
            exits.append(child.exitcode)
    finally:
        torch.set_num_threads(threads)

    assert exits == [-9] * (BATCH_DEATHS + 1) + [0], "two whole-batch deaths, one isolated, then done"
    rows = {r["image_id"]: r for r in result.to_pylist()}
    assert rows["c"]["error_stage"] == "label" and rows["c"]["retryable"] is True
    assert "died 1 time(s) labeling this image alone" in rows["c"]["error"]
    for image_id in "abd":
        assert rows[image_id]["error"] is None
        assert rows[image_id]["instances"] == alone[image_id], "labeled alone, as in isolation"
    assert not list((tmp_path / "attempts").glob("*")), "a finished attempt forgets its batch"


def test_an_attempt_record_on_s3_costs_three_requests_and_counts_deaths(s3_endpoint, s3_bucket):
    """Through a counting proxy: a batch's attempt costs a GET, a PUT and a DELETE; an attempt that never
    finished (its process died) is counted by the next one, and the image its record named is blamed."""
    from benchmarks.s3proxy import S3Proxy

    proxy = S3Proxy(s3_endpoint)
    try:
        log = AttemptLog(f"s3://{s3_bucket}/out/_tmp/attempts", 2, StorageOptions(proxy.endpoint), run="r1")
        attempt = log.start(["s/0", "s/1"])
        attempt.finish()
        assert [method for method, _ in proxy.requests] == ["GET", "PUT", "DELETE"]
        assert attempt.number == 1

        died = [log.start(["s/0", "s/1"]) for _ in range(BATCH_DEATHS)][-1]  # none finished: all died
        died.labeling("s/1")  # isolating: died labeling s/1 alone
        again = log.start(["s/0", "s/1"])
        assert (again.deaths, again.isolating, again.killed_by("s/1"), again.killed_by("s/0")) == (
            2,
            True,
            1,
            0,
        )
        other_run = AttemptLog(log.folder, 2, log.options, run="r2").start(["s/0", "s/1"])
        assert other_run.deaths == 0, "records of another run count nothing"
    finally:
        proxy.close()


def test_a_labeling_worker_outside_ray_reports_a_device_error_as_retryable_rows():
    config = LabelerConfig(classes="cat", preset="tiny-random", device="cpu")
    worker = LabelWorker(config, failpoints="device:b")
    rows = worker(_decoded(["a", "b"])).to_pylist()
    # Outside a Ray actor there is no actor to replace: the images fail, retryable (a sticky error stays).
    assert [(r["error_stage"], r["retryable"]) for r in rows] == [("label", True), ("label", True)]
    assert all("AcceleratorError: CUDA error" in r["error"] for r in rows)
    assert np.all([r["instances"] is None for r in rows])
