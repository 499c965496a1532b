"""Helpers of the tests of hqlabel/review/: a labelled folder made with the tiny random models, a copy of
it, a review server in a thread, a JSON API client.

Test modules here import it as ``reviewing`` (pytest puts this folder on ``sys.path``), not as
``tests.review.reviewing``: an installed package named ``tests`` (label_studio_converter ships one) would
shadow this repository's ``tests`` namespace."""

from __future__ import annotations

import contextlib
import json
import shutil
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from conftest import encode, random_image

from hqlabel.jobs.label import run_label_job
from hqlabel.jobs.spec import LabelJobSpec
from hqlabel.platform.config import LabelerConfig
from hqlabel.review.server import ReviewApp, make_server, serve_in_thread

SIZES = {"a.png": (48, 64), "b.png": (64, 48), "sub/c.png": (40, 40), "sub/d.png": (30, 70)}


def make_labels(root: Path, classes: tuple[str, ...] = ("cat",)) -> Path:
    """Label 4 generated images (and a broken one) in 2 shards with the tiny random models; returns the labels
    folder."""
    images = root / "images"
    for k, (name, size) in enumerate(SIZES.items()):
        (images / name).parent.mkdir(parents=True, exist_ok=True)
        (images / name).write_bytes(encode(random_image(k, size)))
    (images / "broken.png").write_bytes(encode(random_image(9))[:100])  # a decode error row
    labeler = LabelerConfig(classes=list(classes), preset="tiny-random", box_threshold=0.3)
    spec = LabelJobSpec(
        input=str(images), out=str(root / "labels"), labeler=labeler, shard_size=3, batch_size=2
    )
    run_label_job(spec, progress=False)
    return root / "labels"


def copy_labels(labels: Path, to: Path) -> Path:
    """A fresh copy of a labels folder (no review/ yet); its job.json still points at the same images."""
    shutil.copytree(labels, to, ignore=shutil.ignore_patterns("review"))
    return to


@contextlib.contextmanager
def running(app: ReviewApp) -> Iterator[str]:
    """Serve ``app`` on a free loopback port in a thread; yields its base URL."""
    server = make_server(app, "127.0.0.1", 0)
    serve_in_thread(server)
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def api(base: str, path: str, body: Any = None, *, raw: bytes | None = None) -> tuple[int, Any]:
    """``GET base+path`` (or ``POST`` ``body`` as JSON / ``raw`` bytes): ``(status, decoded JSON)``."""
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    request = urllib.request.Request(base + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())
