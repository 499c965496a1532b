"""Shared fixtures: one Ray instance per test session (2 CPUs, like the CI machine), tiny generated images, a
local S3 server (moto) for the storage and job tests."""

from __future__ import annotations

import io
import logging
import os
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# Ray Train gives its worker group 60 s to start (import torch + transformers in each worker); a busy 2-core
# machine can need more. Set before the session's Ray starts: the Train controller inherits it.
os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "300")

# Dummy credentials for the local S3 server. Set at import, before the session's Ray starts: Ray workers
# inherit the environment of `ray.init`, and reach S3 through the same AWS credential chain as production.
for _key, _value in {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",  # never wait for an instance-metadata lookup
}.items():
    os.environ.setdefault(_key, _value)


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray with 2 CPUs for the whole session; jobs find it with ``ray.is_initialized()``."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_endpoint():
    """Endpoint URL (``http://127.0.0.1:PORT``) of a moto S3 server on loopback, for the whole session.

    Tests reach it through production code (``StorageOptions(s3_endpoint=...)``); boto3 only sets up buckets.
    """
    server_module = pytest.importorskip("moto.server", reason="S3 tests need moto[server] (the dev extra)")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    server = server_module.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture(scope="session")
def s3_client(s3_endpoint):
    """A boto3 S3 client of the test server (test setup and inspection only)."""
    boto3 = pytest.importorskip("boto3")
    return boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")


@pytest.fixture
def s3_bucket(s3_client) -> str:
    """A fresh, empty bucket of its own for each test."""
    name = f"hqlabel-{uuid.uuid4().hex[:16]}"
    s3_client.create_bucket(Bucket=name)
    return name


def random_image(seed: int, size: tuple[int, int] = (48, 64)) -> np.ndarray:
    """H x W x 3 uint8 image with some structure (a bright rectangle on noise)."""
    rng = np.random.default_rng(seed)
    h, w = size
    image = rng.integers(0, 80, size=(h, w, 3), dtype=np.uint8)
    y0, x0 = int(rng.integers(0, h // 2)), int(rng.integers(0, w // 2))
    image[y0 : y0 + h // 3, x0 : x0 + w // 3] = rng.integers(150, 256, size=3, dtype=np.uint8)
    return image


def encode(image: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """Five small images of different sizes and formats in a nested folder."""
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    sizes = [(48, 64), (64, 48), (40, 40), (30, 70), (52, 36)]
    for i, size in enumerate(sizes):
        folder = root / "sub" if i % 2 else root
        fmt, ext = [("PNG", "png"), ("JPEG", "jpg"), ("WEBP", "webp")][i % 3]
        (folder / f"img_{i}.{ext}").write_bytes(encode(random_image(i, size), fmt))
    return root


def upsample_calls():
    """A torch dispatch mode (use as ``with upsample_calls() as calls``) counting the bilinear resizes that
    reach ATen in ``calls.count`` (``iter_masks`` calls the op directly)."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    class UpsampleCalls(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten.upsample_bilinear2d.default:
                self.count += 1
            return func(*args, **(kwargs or {}))

    return UpsampleCalls()
