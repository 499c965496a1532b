"""The labeling job reading from and writing to S3 (a moto server on loopback) on the session's 2-CPU Ray."""

from __future__ import annotations

import io
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import encode, random_image

from hqlabel.jobs.cli import main
from hqlabel.jobs.label import run_label_job
from hqlabel.jobs.spec import LabelJobSpec
from hqlabel.platform import storage
from hqlabel.platform.config import LabelerConfig
from hqlabel.platform.readers import InputColumns, list_input, read_parquet_shards
from hqlabel.platform.references import ReferencePolicy
from hqlabel.platform.rle import decode_mask
from hqlabel.platform.storage import StorageOptions
from hqlabel.workers.decode import decode_batch

pytestmark = pytest.mark.timeout(240)

SIZES = {  # image id -> (height, width)
    "inline-0": (48, 64),
    "inline-1": (40, 40),
    "relative-0": (64, 48),
    "relative-1": (30, 70),
    "absolute-0": (52, 36),
}
MISSING_KEY = "elsewhere/missing.png"


def _parquet_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def _image(image_id: str, fmt: str = "PNG") -> bytes:
    return encode(random_image(sorted(SIZES).index(image_id), SIZES[image_id]), fmt)


@pytest.fixture
def s3_dataset(s3_client, s3_bucket) -> str:
    """``s3://BUCKET/dataset``: 3 Parquet shards, one with inline bytes, two referencing image objects
    (relative to the dataset, absolute ``s3://``, and one that does not exist)."""
    put = s3_client.put_object
    shards = {
        "part-0.parquet": pa.table(
            {"image_id": ["inline-0", "inline-1"], "image": [_image("inline-0"), _image("inline-1", "JPEG")]}
        ),
        "part-1.parquet": pa.table(
            {"image_id": ["relative-0", "relative-1"], "uri": ["images/r0.png", "images/sub/r1.jpg"]}
        ),
        "part-2.parquet": pa.table(
            {
                "image_id": ["absolute-0", "missing"],
                "uri": [f"s3://{s3_bucket}/elsewhere/a0.png", f"s3://{s3_bucket}/{MISSING_KEY}"],
            }
        ),
    }
    for name, table in shards.items():
        put(Bucket=s3_bucket, Key=f"dataset/{name}", Body=_parquet_bytes(table))
    put(Bucket=s3_bucket, Key="dataset/images/r0.png", Body=_image("relative-0"))
    put(Bucket=s3_bucket, Key="dataset/images/sub/r1.jpg", Body=_image("relative-1", "JPEG"))
    put(Bucket=s3_bucket, Key="elsewhere/a0.png", Body=_image("absolute-0"))
    return f"s3://{s3_bucket}/dataset"


def test_s3_parquet_dataset_to_s3_output(ray_session, s3_endpoint, s3_client, s3_bucket, s3_dataset, capsys):
    out = f"s3://{s3_bucket}/labels"
    spec = LabelJobSpec(
        input=s3_dataset,
        out=out,
        labeler=LabelerConfig(classes=["cat", "dog"], preset="tiny-random", box_threshold=0.3),
        s3_endpoint=s3_endpoint,
        batch_size=2,
        allow_prefix=[f"s3://{s3_bucket}/elsewhere"],  # part-2's absolute references are outside the dataset
    )
    summary = run_label_job(spec, progress=False)
    options = StorageOptions(s3_endpoint=s3_endpoint)

    listing = s3_client.list_objects_v2(Bucket=s3_bucket, Prefix="labels/")["Contents"]
    keys = {o["Key"] for o in listing if not o["Key"].endswith("/")}  # not pyarrow's empty folder markers
    shard_ids = ["00000", "00001", "00002"]
    expected = {"labels/job.json", "labels/_manifest.json"}
    expected |= {f"labels/{t}/part-{s}.parquet" for t in ("masks", "errors", "images") for s in shard_ids}
    expected |= {f"labels/_done/{s}.json" for s in shard_ids}
    assert keys == expected, "one output file per table and input shard, a marker each, no leftovers"

    images = storage.read_parquet(storage.join(out, "images"), options)
    assert sorted(images["image_id"].to_pylist()) == sorted([*SIZES, "missing"])
    sizes = {r["image_id"]: (r["height"], r["width"]) for r in images.to_pylist() if r["error_stage"] is None}
    assert sizes == SIZES

    masks = storage.read_parquet(storage.join(out, "masks"), options)
    assert masks.num_rows == summary.instances > 0
    for row in masks.to_pylist():
        assert decode_mask(row["mask"]).shape == SIZES[row["image_id"]]

    errors = storage.read_parquet(storage.join(out, "errors"), options).to_pylist()
    assert [(e["image_id"], e["stage"]) for e in errors] == [("missing", "read")]
    assert MISSING_KEY in errors[0]["error"]

    markers = [
        json.loads(storage.read_bytes(storage.join(out, "_done", f"{s}.json"), options)) for s in shard_ids
    ]
    assert [m["images"] for m in markers] == [2, 2, 2]
    assert markers[2]["errors_by_stage"] == {"read": 1}

    secret = os.environ["AWS_SECRET_ACCESS_KEY"]
    for key in sorted(k for k in keys if k.endswith(".json")):
        text = s3_client.get_object(Bucket=s3_bucket, Key=key)["Body"].read().decode()
        assert secret not in text, f"{key} holds the S3 secret"
    job = json.loads(storage.read_bytes(storage.join(out, "job.json"), options))
    assert job["spec"]["s3_endpoint"] == s3_endpoint and job["summary"]["images"] == 6

    capsys.readouterr()
    assert main(["status", out, "--s3-endpoint", s3_endpoint]) == 0
    status = capsys.readouterr().out
    assert "3/3 done" in status and "6/6 done: 5 labeled, 1 failed" in status and "read 1" in status

    again = run_label_job(spec, progress=False)  # every shard has its marker: nothing to redo
    assert (again.images_this_run, again.instances) == (0, summary.instances)


def test_s3_reference_outside_the_dataset_is_refused_unread(s3_endpoint, s3_bucket, s3_dataset):
    """Without ``--allow-prefix``, part-2's ``s3://BUCKET/elsewhere/...`` objects are not read."""
    options = StorageOptions(s3_endpoint=s3_endpoint)
    source = list_input(s3_dataset, listing=f"{s3_dataset}/_listing", options=options)
    batch = pa.table({"shard": ["00002"], "source": [source.shards[2].source]})
    (rows,) = read_parquet_shards(batch, root=source.root, columns=InputColumns(), options=options)
    decoded = decode_batch(rows, options=options, references=ReferencePolicy(source.root))
    assert [(e or "").split(" is outside")[0] for e in decoded["error"].to_pylist()] == [
        f"RefusedReference: 's3://{s3_bucket}/elsewhere/a0.png'",
        f"RefusedReference: 's3://{s3_bucket}/{MISSING_KEY}'",
    ]


def test_s3_image_folder_to_local_output(ray_session, s3_endpoint, s3_client, s3_bucket, tmp_path):
    """A folder of image objects: ids are keys relative to it; folder markers and other files are skipped."""
    objects = {"photos/a.png": (48, 64), "photos/sub/b.jpg": (40, 40), "photos/sub/deeper/c.webp": (30, 70)}
    for i, (key, size) in enumerate(objects.items()):
        fmt = {"png": "PNG", "jpg": "JPEG", "webp": "WEBP"}[key.rsplit(".", 1)[1]]
        s3_client.put_object(Bucket=s3_bucket, Key=key, Body=encode(random_image(i, size), fmt))
    s3_client.put_object(Bucket=s3_bucket, Key="photos/sub/", Body=b"")  # a console-made folder marker
    s3_client.put_object(Bucket=s3_bucket, Key="photos/readme.txt", Body=b"not an image")
    spec = LabelJobSpec(
        input=f"s3://{s3_bucket}/photos/",
        out=str(tmp_path / "labels"),
        labeler=LabelerConfig(classes=["cat"], preset="tiny-random", box_threshold=0.3),
        s3_endpoint=s3_endpoint,
        batch_size=3,
    )
    run_label_job(spec, progress=False)
    images = pq.read_table(tmp_path / "labels" / "images").to_pylist()
    got = {r["image_id"]: (r["height"], r["width"], r["error_stage"]) for r in images}
    assert got == {key.removeprefix("photos/"): (*size, None) for key, size in objects.items()}
