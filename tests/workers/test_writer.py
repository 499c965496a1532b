"""The shard merge (``finalize_shard``) on parts written by ``write_parts``: repeated rows, output order and
counts (against the former whole-shard merge), incomplete and overfull shards, S3, and bounded memory."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from hqlabel.platform import storage
from hqlabel.platform.schema import RESULT_SCHEMA, results_to_tables
from hqlabel.platform.storage import StorageOptions
from hqlabel.workers.writer import ROW_KEYS, TABLES, finalize_shard, write_parts

pytestmark = pytest.mark.timeout(120)

SHARD = "00000"


def _result(
    row: int | None, image_id: str, instances: int = 3, blob: int = 64, error: str | None = None
) -> dict:
    """One ``RESULT_SCHEMA`` row; its masks' RLE counts are ``blob`` random (incompressible) bytes each, the
    same for the same (row, id), as a retried batch would produce them."""
    rng = np.random.default_rng(int(hashlib.sha1(f"{row}/{image_id}".encode()).hexdigest()[:8], 16))
    labeled = error is None
    return {
        "shard": SHARD,
        "row": row,
        "image_id": image_id,
        "height": 40 if error != "decode" else None,
        "width": 30 if error != "decode" else None,
        "instances": [
            {
                "instance_id": i,
                "label": ["cat", "dog"][i % 2],
                "score": float(rng.random()),
                "box": [0.0, 1.0, 20.0, 30.0],
                "mask": {"size": [40, 30], "counts": rng.bytes(blob)},
                "area": int(rng.integers(1, 1200)),
                "pred_iou": float(rng.random()),
            }
            for i in range(instances)
        ]
        if labeled
        else None,
        "error_stage": error,
        "error": None if labeled else f"{error} failed",
    }


def _batch(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=RESULT_SCHEMA)


def _old_unique_rows(table: pa.Table, keys: list[str]) -> pa.Table:
    """The former merge's dedupe, verbatim: numpy string keys over the whole table, first occurrence, then a
    stable sort by image id and ``keys``."""
    image_key = table["image_id"].to_numpy(zero_copy_only=False).astype(str)
    if "_row" in table.column_names:
        rows = table["_row"].to_pylist()
        image_key = np.array(
            [f"id:{i}" if r is None else f"row:{r}" for i, r in zip(image_key, rows, strict=True)], dtype=str
        )
        table = table.drop_columns(["_row"])
    joined = image_key
    for key in keys:
        joined = np.char.add(
            np.char.add(joined, "\x00"), table[key].to_numpy(zero_copy_only=False).astype(str)
        )
    first = np.unique(joined, return_index=True)[1] if table.num_rows else np.zeros(0, np.int64)
    order = [("image_id", "ascending")] + [(k, "ascending") for k in keys]
    return table.take(pa.array(np.sort(first), pa.int64())).sort_by(order)


def _old_outputs(batches: list[pa.Table]) -> dict[str, pa.Table]:
    """What the former ``finalize_shard`` wrote for these batches: their parts as ``write_parts`` used to
    write them (rows as they came, a retried batch replacing its own part), read whole in path order."""
    parts = {}
    for batch in batches:
        digest = hashlib.sha1("\n".join(batch["image_id"].to_pylist()).encode()).hexdigest()[:20]
        parts[digest] = results_to_tables(batch, with_row=True)
    ordered = [parts[digest] for digest in sorted(parts)]
    return {
        name: _old_unique_rows(pa.concat_tables([p[k] for p in ordered]), ROW_KEYS[name]).cast(schema)
        for k, (name, schema) in enumerate(TABLES.items())
    }


def _outputs(out: str, options: StorageOptions = StorageOptions()) -> dict[str, pa.Table]:
    return {name: storage.read_parquet(storage.join(out, name), options) for name in TABLES}


def _assert_same(new: dict[str, pa.Table], old: dict[str, pa.Table], marker: dict) -> None:
    for name in TABLES:
        assert new[name].schema == TABLES[name], name
        assert new[name].equals(old[name]), name  # same rows, same order
    errors = old["errors"]
    assert marker["images"] == old["images"].num_rows
    assert marker["instances"] == old["masks"].num_rows
    assert marker["errors"] == errors.num_rows
    assert marker["errors_by_stage"] == dict(Counter(errors["stage"].to_pylist()))


def _retried_shard(blob: int) -> tuple[list[pa.Table], int]:
    """Batches of one shard as a flaky job delivers them, and the shard's number of images.

    Ids interleave across batches; "a" is the id of two input rows (1 and 3) and "" of one; a batch is
    written twice (retried as it was), another overlaps two others (retried in a different batching), and a
    batch of rows without a known position repeats an id (told apart by id only: one image).
    """
    first = _batch([_result(0, "d", blob=blob), _result(1, "a", 5, blob), _result(2, "b", 0, blob),
                    _result(3, "a", 2, blob)])  # fmt: skip
    second = _batch([_result(4, "c", blob=blob), _result(5, "", 4, blob), _result(6, "e", error="decode"),
                     _result(7, "ab", error="label")])  # fmt: skip
    overlap = _batch([_result(r, i, n, blob) for r, i, n in [(2, "b", 0), (3, "a", 2), (4, "c", 3)]])
    unknown = _batch([_result(None, "f", 2, blob), _result(None, "f", 2, blob), _result(8, "0", 1, blob)])
    return [first, second, first, overlap, unknown], 10  # rows 0-8, and the two rows "f" as one image


@pytest.mark.parametrize("memory_budget", [64 << 20, 256 << 10], ids=["default", "tiny-budget"])
def test_merge_drops_repeated_rows_like_the_whole_shard_merge(tmp_path: Path, memory_budget: int):
    # 150 KB masks: parts of several row groups, read again and again under the tiny budget
    batches, images = _retried_shard(blob=150_000)
    out = str(tmp_path / "out")
    for batch in batches:
        write_parts(batch, out=out)
    marker = finalize_shard(out, SHARD, images, memory_budget=memory_budget)

    assert marker is not None
    _assert_same(_outputs(out), _old_outputs(batches), marker)
    assert marker["errors_by_stage"] == {"label": 1, "decode": 1}
    assert json.loads((tmp_path / "out" / "_done" / f"{SHARD}.json").read_text()) == marker
    assert not (tmp_path / "out" / "_tmp" / f"shard-{SHARD}").exists()
    leftovers = [p.name for name in TABLES for p in (tmp_path / "out" / name).iterdir()]
    assert leftovers == [f"part-{SHARD}.parquet"] * 3  # no temporary file left next to them


def _part_name(rows: list[int]) -> str:
    """The temporary part ``write_parts`` names after these row positions."""
    return hashlib.sha1("\n".join(map(str, rows)).encode()).hexdigest()[:20]


def test_an_image_written_by_two_attempts_takes_all_its_rows_from_one(tmp_path: Path):
    """A retried batch, batched otherwise, labels image "a" again with another instance count (Grounding
    DINO's boxes depend on the batch): the merge keeps one attempt's rows for it, never instances of both."""
    two, three = (
        _batch([_result(0, "a", 2), _result(1, "b", 1)]),
        _batch([_result(0, "a", 3), _result(2, "c")]),
    )
    if _part_name([0, 1]) > _part_name([0, 2]):  # the attempt with fewer instances is read first
        two, three = (
            _batch([_result(0, "a", 2), _result(2, "c")]),
            _batch([_result(0, "a", 3), _result(1, "b")]),
        )
    out = str(tmp_path / "out")
    write_parts(two, out=out)
    write_parts(three, out=out)
    marker = finalize_shard(out, SHARD, 3)

    outputs = _outputs(out)
    a = outputs["masks"].filter(pc.equal(outputs["masks"]["image_id"], "a"))
    image = outputs["images"].filter(pc.equal(outputs["images"]["image_id"], "a")).to_pylist()
    assert image[0]["num_instances"] == 2 == a.num_rows, "a's instances all come from the attempt it counts"
    assert a["instance_id"].to_pylist() == [0, 1]
    assert (
        marker["instances"]
        == outputs["masks"].num_rows
        == sum(outputs["images"]["num_instances"].to_pylist())
    )


def test_incomplete_shard_writes_nothing_and_an_overfull_one_fails(tmp_path: Path):
    batches, _ = _retried_shard(blob=16)
    out = tmp_path / "out"
    write_parts(batches[0], out=str(out))  # 4 images

    assert finalize_shard(str(out), SHARD, expected_images=5) is None
    assert sorted(p.name for p in out.iterdir()) == ["_tmp"]  # no output file, no marker
    with pytest.raises(RuntimeError, match="4 images, more than the 3"):
        finalize_shard(str(out), SHARD, expected_images=3)
    assert sorted(p.name for p in out.iterdir()) == ["_tmp"]
    assert finalize_shard(str(out), "00001", expected_images=1) is None  # nothing arrived yet


def test_merge_on_s3(s3_endpoint, s3_client, s3_bucket):
    options = StorageOptions(s3_endpoint=s3_endpoint)
    batches, images = _retried_shard(blob=2_000)
    out = f"s3://{s3_bucket}/labels"
    for batch in batches:
        write_parts(batch, out=out, options=options)
    marker = finalize_shard(out, SHARD, images, options)

    assert marker is not None
    _assert_same(_outputs(out, options), _old_outputs(batches), marker)
    listed = s3_client.list_objects_v2(Bucket=s3_bucket)["Contents"]
    keys = sorted(o["Key"] for o in listed if not o["Key"].endswith("/"))  # not pyarrow's folder markers
    assert keys == [f"labels/_done/{SHARD}.json"] + [
        f"labels/{name}/part-{SHARD}.parquet" for name in sorted(TABLES)
    ]


_MEASURE = """
import json, sys
import pyarrow as pa
import pyarrow.compute as pc
from hqlabel.workers.writer import finalize_shard
marker = finalize_shard(sys.argv[1], "00000", int(sys.argv[2]), memory_budget=int(sys.argv[3]))
print(json.dumps({"peak": pa.default_memory_pool().max_memory(), "instances": marker["instances"]}))
"""


def _finalize_peak(out: Path, images: int, memory_budget: int) -> tuple[int, int]:
    """Peak Arrow memory of ``finalize_shard`` in a fresh process (the pool's high-water mark is per process
    and never goes down), and the instances it wrote."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[2]), *sys.path])}
    done = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(out), str(images), str(memory_budget)],
        capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    return result["peak"], result["instances"]


def _big_shard(out: Path, parts: int, per_part: int = 8, instances: int = 4, blob: int = 32 << 10) -> int:
    """A shard of ``parts`` batches of ``per_part`` images with ``instances`` masks of ``blob`` bytes each
    (1 MiB of masks per part by default), ids random so that every part feeds every stretch of the sorted
    output; returns its number of images."""
    rng = np.random.default_rng(parts)
    ids = [rng.bytes(8).hex() for _ in range(parts * per_part)]
    for p in range(parts):
        rows = range(p * per_part, (p + 1) * per_part)
        write_parts(_batch([_result(r, ids[r], instances, blob) for r in rows]), out=str(out))
    return parts * per_part


def test_merge_memory_does_not_grow_with_the_shard(tmp_path: Path):
    budget = 4 << 20
    peaks = {}
    for parts in (6, 24):  # 6 MiB and 24 MiB of masks
        out = tmp_path / f"parts-{parts}"
        images = _big_shard(out, parts)
        peaks[parts], instances = _finalize_peak(out, images, budget)
        assert instances == images * 4
    print(f"finalize peak Arrow memory: {peaks} bytes (budget {budget})")
    # 4x the shard; merging the shard in memory takes 4x the memory too (26 MB -> 104 MB measured), and more
    # than the shard's masks
    assert peaks[24] < 1.5 * peaks[6]
    assert peaks[24] < 3 * budget  # 12 MiB, half the masks of the larger shard
