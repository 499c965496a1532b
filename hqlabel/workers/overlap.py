"""CPU work beside the device: the labeling actor's mask encoding (RLE + area) runs in one worker thread while
the main thread queues the next chunk's or image's device work (upsample + threshold, the next encoder and
decoder passes), instead of waiting for each chunk's encoding in turn.

Results come back in submission order; an error raised in the thread is raised again by ``result`` (the
caller's row then fails as it would have inline); at most ``depth`` chunks wait, so the masks held on the
CPU stay within ``depth + 1`` chunks of the segmenter's resize budget.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from hqlabel.platform.rle import encode_masks, mask_area


def encode_with_areas(masks: np.ndarray) -> list[tuple[dict, int]]:
    """``encode_masks`` (N x H x W bool, any layout) with each mask's area: N ``(rle, area)`` pairs."""
    return [(rle, mask_area(rle)) for rle in encode_masks(masks)]


class BackgroundQueue:
    """One worker thread that runs submitted calls in order; ``submit`` waits while ``depth`` are pending.

    The thread starts on first use and is reused for the life of the object (one per labeling actor). A
    forked child (threads do not survive ``fork``) starts its own thread on its first ``submit``.
    """

    def __init__(self, depth: int = 2) -> None:
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self.depth = depth
        self._pool: ThreadPoolExecutor | None = None
        self._pid: int | None = None  # the process that started the thread
        self._pending: deque[Future] = deque()

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        """Queue ``fn(*args)``; its ``Future`` (``.result()`` returns its value or raises its error)."""
        if self._pool is None or self._pid != os.getpid():
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="hqlabel-encode")
            self._pid = os.getpid()
            self._pending = deque()  # a parent's futures never finish in a forked child
        while self._pending and (len(self._pending) >= self.depth or self._pending[0].done()):
            self._pending.popleft().exception()  # waits; the error stays with its future for the caller
        future = self._pool.submit(fn, *args)
        self._pending.append(future)
        return future
