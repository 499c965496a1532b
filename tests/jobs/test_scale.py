"""What a large job needs from the driver: shard bookkeeping in a constant number of storage requests
(counted at an S3 proxy in front of the test server), merges in Ray tasks rather than in the driver, and a
resumed run that refuses an input whose shards changed, naming them."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from benchmarks.s3proxy import S3Proxy
from hqlabel.jobs.label import prepare_output, run_label_job
from hqlabel.jobs.spec import LabelJobSpec
from hqlabel.platform import storage
from hqlabel.platform.config import LabelerConfig

pytestmark = pytest.mark.timeout(240)

LABELER = LabelerConfig(classes="cat", preset="tiny-random")


@pytest.fixture
def proxy(s3_endpoint):
    proxy = S3Proxy(s3_endpoint)
    yield proxy
    proxy.close()


def _folder(root: Path, n: int) -> Path:
    root.mkdir(parents=True)
    for i in range(n):
        (root / f"{i:04d}.png").write_bytes(b"not decoded by prepare_output")
    return root


def _start(spec: LabelJobSpec) -> list[str]:
    """``prepare_output`` as ``run_label_job`` runs it, then the ``job.json`` the job writes next."""
    _, pending = prepare_output(spec)
    storage.write_bytes(
        storage.join(spec.out, "job.json"),
        json.dumps({"spec": spec.model_dump(mode="json")}).encode(),
        spec.storage,
    )
    return [shard.shard_id for shard in pending]


def _bookkeeping(proxy: S3Proxy, spec: LabelJobSpec, bucket: str, done: list[str], leftovers: list[str]):
    """Requests to the output (listing files aside) of a fresh start, and of a resume after ``done`` shards
    finished and ``leftovers`` left temporary parts."""
    out = f"/{bucket}/out"
    proxy.reset()
    pending = _start(spec)
    fresh = proxy.count(out) - proxy.count(f"{out}/_listing")
    for shard in done:
        storage.write_bytes(storage.join(spec.out, "_done", f"{shard}.json"), b"{}", spec.storage)
    for shard in leftovers:
        part = storage.join(spec.out, "_tmp", f"shard-{shard}", "masks", "part-x.parquet")
        storage.write_bytes(part, b"left by a crash", spec.storage)
    proxy.reset()
    _, resumed = prepare_output(spec)
    assert [s.shard_id for s in resumed] == [s for s in pending if s not in done]
    for shard in leftovers:  # reset: the crashed shard's parts are gone
        assert not storage.exists(storage.join(spec.out, "_tmp", f"shard-{shard}"), spec.storage)
    return fresh, proxy.count(out) - proxy.count(f"{out}/_listing")


def test_job_start_requests_do_not_grow_with_the_shards(proxy, s3_client, tmp_path):
    """10 and 40 shards: the same number of requests to start and to resume (one listing of ``_done``, no
    per-shard marker reads or resets; one delete per leftover)."""
    counts = []
    for n in (10, 40):
        bucket = f"scale-{n}"
        s3_client.create_bucket(Bucket=bucket)
        folder = _folder(tmp_path / f"in-{n}", n)
        spec = LabelJobSpec(
            input=str(folder),
            out=f"s3://{bucket}/out",
            labeler=LABELER,
            shard_size=1,
            s3_endpoint=proxy.endpoint,
        )
        counts.append(_bookkeeping(proxy, spec, bucket, done=["00000", "00002"], leftovers=["00001"]))
    assert counts[0] == counts[1], counts


def test_merges_run_in_ray_tasks_not_in_the_driver(ray_session, image_folder, tmp_path):
    out = tmp_path / "out"
    summary = run_label_job(
        LabelJobSpec(input=str(image_folder), out=str(out), labeler=LABELER, shard_size=2), progress=False
    )
    markers = [json.loads(p.read_text()) for p in sorted((out / "_done").iterdir())]
    assert len(markers) == 3 and sum(m["images"] for m in markers) == summary.images == 5
    assert all(m["merged_by"]["pid"] != os.getpid() for m in markers)


def test_resume_refuses_changed_shards_and_names_them(tmp_path):
    folder = _folder(tmp_path / "in", 6)
    spec = LabelJobSpec(input=str(folder), out=str(tmp_path / "out"), labeler=LABELER, shard_size=2)
    assert _start(spec) == ["00000", "00001", "00002"]
    assert [s.shard_id for s in prepare_output(spec)[1]] == ["00000", "00001", "00002"]  # unchanged
    (folder / "0003.png").write_bytes(b"replaced by another image")
    with pytest.raises(ValueError, match=r"shard\(s\) 00001 differ.*--overwrite"):
        prepare_output(spec)
    (folder / "0003.png").unlink()
    (folder / "0007.png").write_bytes(b"moved")
    with pytest.raises(ValueError, match=r"shard\(s\) 00001, 00002 differ"):
        prepare_output(spec)
    # the earlier run's listings are kept as they were (a refused resume writes nothing)
    listed = storage.read_parquet(str(tmp_path / "out" / "_listing"))["image_id"].to_pylist()
    assert listed == [f"{i:04d}.png" for i in range(6)]
    assert len(prepare_output(spec.model_copy(update={"overwrite": True}))[1]) == 3


def test_another_batch_size_is_another_run(tmp_path):
    folder = _folder(tmp_path / "in", 2)
    spec = LabelJobSpec(input=str(folder), out=str(tmp_path / "out"), labeler=LABELER)
    _start(spec)
    with pytest.raises(ValueError, match=r"different settings \(batch_size: 8 -> 4\)"):
        prepare_output(spec.model_copy(update={"batch_size": 4}))


def test_resume_reads_no_parquet_footer_of_an_unchanged_dataset(proxy, s3_client, s3_bucket):
    """A resumed job on a sharded Parquet dataset lists it (size and ETag of each file) and opens only the
    files that changed; a replaced file is opened again, and refused as a changed shard."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    def put(i: int, ids: list[str]) -> None:
        buf = io.BytesIO()
        pq.write_table(pa.table({"image_id": ids, "image": [b""] * len(ids)}), buf)
        s3_client.put_object(Bucket=s3_bucket, Key=f"data/part-{i}.parquet", Body=buf.getvalue())

    for i in range(5):
        put(i, [f"{i}-a", f"{i}-b"])
    spec = LabelJobSpec(
        input=f"s3://{s3_bucket}/data",
        out=f"s3://{s3_bucket}/out",
        labeler=LABELER,
        s3_endpoint=proxy.endpoint,
    )
    _start(spec)
    proxy.reset()
    assert len(prepare_output(spec)[1]) == 5
    assert proxy.count(f"/{s3_bucket}/data/") == 0  # no HEAD or GET of a dataset file
    put(3, ["3-a", "3-b", "3-c"])
    proxy.reset()
    with pytest.raises(ValueError, match=r"shard\(s\) 00003 differ"):
        prepare_output(spec)
    assert {path for _, path in proxy.requests if path.startswith(f"/{s3_bucket}/data/")} == {
        f"/{s3_bucket}/data/part-3.parquet"
    }
