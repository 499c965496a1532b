"""A whole labeling job against an S3 endpoint that fails a share of its requests (transient ``503 SlowDown``
answers from ``benchmarks.s3proxy.S3Proxy`` in front of the moto server): listing, reads, part writes, merges,
markers, the lease and ``job.json`` all go through it, and the output must equal a fault-free run's.

``batch_size=1``, so an image's result does not depend on which images share its batch (as in
``test_faults.py``).
"""

from __future__ import annotations

import pyarrow as pa
import pytest
from conftest import encode, random_image

from benchmarks.s3proxy import S3Proxy
from hqlabel.jobs.label import run_label_job
from hqlabel.jobs.spec import LabelJobSpec
from hqlabel.platform import storage
from hqlabel.platform.config import LabelerConfig
from hqlabel.platform.storage import StorageOptions

pytestmark = pytest.mark.timeout(300)

FAIL_SHARE = 0.1


def _tables(out: str, options: StorageOptions) -> dict[str, list[dict]]:
    """The job's three tables as rows, in a canonical order (independent of shards and arrival order)."""
    keys = {"masks": ["image_id", "instance_id"], "errors": ["image_id"], "images": ["image_id"]}
    found = {}
    for name, by in keys.items():
        table: pa.Table = storage.read_parquet(storage.join(out, name), options)
        found[name] = table.sort_by([(k, "ascending") for k in by]).to_pylist()
    return found


def test_job_through_an_endpoint_failing_a_tenth_of_requests_equals_a_fault_free_run(
    ray_session, s3_endpoint, s3_client, s3_bucket
):
    for k in range(6):
        body = encode(random_image(40 + k, (36 + 2 * k, 48)), "PNG" if k % 2 else "JPEG")
        s3_client.put_object(Bucket=s3_bucket, Key=f"dataset/{k:02d}.{'png' if k % 2 else 'jpg'}", Body=body)
    s3_client.put_object(Bucket=s3_bucket, Key="dataset/broken.png", Body=b"not an image")  # an error row too
    labeler = LabelerConfig(classes="cat, dog", preset="tiny-random", box_threshold=0.3)

    def run(out: str, endpoint: str):
        spec = LabelJobSpec(
            input=f"s3://{s3_bucket}/dataset",
            out=f"s3://{s3_bucket}/{out}",
            labeler=labeler,
            s3_endpoint=endpoint,
            shard_size=3,
            batch_size=1,
        )
        return run_label_job(spec, progress=False)

    clean = run("clean", s3_endpoint)
    proxy = S3Proxy(s3_endpoint)
    try:
        proxy.fail_share(FAIL_SHARE, seed=1)
        faulty = run("faulty", proxy.endpoint)
    finally:
        proxy.close()
    options = StorageOptions(s3_endpoint=s3_endpoint)
    expected = _tables(f"s3://{s3_bucket}/clean", options)
    assert proxy.failed > 0, "the proxy failed no request: the test tested nothing"
    assert (faulty.images, faulty.instances, faulty.errors) == (clean.images, clean.instances, clean.errors)
    assert _tables(f"s3://{s3_bucket}/faulty", options) == expected
    assert len(expected["images"]) == 7 and [e["image_id"] for e in expected["errors"]] == ["broken.png"]
