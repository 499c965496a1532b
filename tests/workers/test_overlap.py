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
