"""``BackgroundQueue``: the labeling actor's encoding thread keeps order, bounds what waits, passes errors."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from hqlabel.platform.rle import encode_masks, mask_area
from hqlabel.workers.overlap import BackgroundQueue, encode_with_areas


def test_results_in_order_and_errors_reach_the_caller():
    queue = BackgroundQueue(depth=2)
    futures = [queue.submit(lambda k: k * k, k) for k in range(20)]
    failing = queue.submit(lambda: 1 / 0)
    after = queue.submit(lambda: "after")
    assert [f.result() for f in futures] == [k * k for k in range(20)]
    with pytest.raises(ZeroDivisionError):
        failing.result()
    assert after.result() == "after"  # a failed call does not stop the thread


def test_submit_waits_while_depth_calls_are_pending():
    queue = BackgroundQueue(depth=2)
    release = threading.Event()
    first = queue.submit(release.wait)
    queue.submit(lambda: None)
    submitted = threading.Event()
    threading.Thread(target=lambda: (queue.submit(lambda: None), submitted.set()), daemon=True).start()
    assert not submitted.wait(0.5)  # the third waits for the first to finish
    release.set()
    assert submitted.wait(10) and first.result() is True


def test_encode_with_areas_matches_encode_masks():
    rng = np.random.default_rng(0)
    masks = rng.random((3, 17, 23)) > 0.5
    assert encode_with_areas(masks) == [(rle, mask_area(rle)) for rle in encode_masks(masks)]


def _submit_in_child(queue: BackgroundQueue, out) -> None:
    out.send(queue.submit(lambda: "child").result())


def test_a_forked_child_gets_its_own_thread():
    """Threads do not survive ``fork``: a child that inherits a started queue (a test forking after a batch,
    a forked Ray worker) must not wait on the parent's thread."""
    import multiprocessing

    queue = BackgroundQueue()
    assert queue.submit(lambda: "parent").result() == "parent"  # the parent's thread is started
    ctx = multiprocessing.get_context("fork")
    receive, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_submit_in_child, args=(queue, send))
    child.start()
    child.join(60)
    if child.is_alive():
        child.kill()
        child.join()
    assert child.exitcode == 0
    assert receive.recv() == "child"
    assert queue.submit(lambda: "again").result() == "again"
