"""Listing an input into per-shard listing files (``list_input``) and the streaming walk under it
(``storage.walk``): the same order as a sorted listing, bounded memory, fingerprints that see changes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from hqlabel.platform import storage
from hqlabel.platform.readers import LISTING_SCHEMA, list_input
from hqlabel.platform.storage import StorageOptions

pytestmark = pytest.mark.timeout(120)

TRICKY = ["a.png", "a/x.png", "a-b/y.png", "ab.png", "b/c/d.jpg", "b/c.png", "z.PNG", "é.png", "_skip/q.png",
          "a/.hidden.png", "notes.txt"]  # fmt: skip


def _touch(root: Path, names: list[str]) -> None:
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(name.encode())


def test_local_walk_is_the_sorted_listing(tmp_path):
    _touch(tmp_path / "in", TRICKY)
    walked = [e.uri for e in storage.walk(str(tmp_path / "in"), (".png", ".jpg"))]
    assert walked == storage.list_files(str(tmp_path / "in"), (".png", ".jpg"))
    assert [Path(u).relative_to(tmp_path / "in").as_posix() for u in walked] == [
        "a-b/y.png", "a.png", "a/x.png", "ab.png", "b/c.png", "b/c/d.jpg", "z.PNG", "é.png"
    ]  # fmt: skip
    entry = next(storage.walk(str(tmp_path / "in"), (".png",)))
    assert entry.size == len(b"a-b/y.png") and entry.version == str(os.stat(entry.uri).st_mtime_ns)


def test_local_walk_survives_a_symlink_loop(tmp_path):
    _touch(tmp_path / "in", ["a/x.png"])
    (tmp_path / "in" / "a" / "loop").symlink_to(tmp_path / "in")
    assert [Path(e.uri).name for e in storage.walk(str(tmp_path / "in"), (".png",))] == ["x.png"]


def test_s3_walk_pages_through_keys_in_order(s3_client, s3_bucket, s3_endpoint):
    """More keys than one page (1,000): every one comes, in the sorted order, with its size and ETag."""
    names = [f"img/{i:05d}.png" for i in range(1005)] + ["img/_tmp/x.png", "img/.h.png", "img/a.txt"]
    for name in names:
        s3_client.put_object(Bucket=s3_bucket, Key=name, Body=b"x" * (len(name) % 7))
    options = StorageOptions(s3_endpoint=s3_endpoint)
    walked = list(storage.walk(f"s3://{s3_bucket}/img", (".png",), options))
    assert [e.uri for e in walked] == storage.list_files(f"s3://{s3_bucket}/img", (".png",), options)
    assert len(walked) == 1005
    head = s3_client.head_object(Bucket=s3_bucket, Key="img/00003.png")
    assert walked[3].size == head["ContentLength"] and walked[3].version == head["ETag"].strip('"')


def test_folder_listing_files_hold_the_rows_and_shards_hold_none(tmp_path):
    _touch(tmp_path / "in", [f"s{i % 3}/{i:03d}.png" for i in range(25)])
    listing = tmp_path / "out" / "_listing"
    source = list_input(str(tmp_path / "in"), listing=str(listing), shard_size=10)
    assert [(s.shard_id, s.num_images) for s in source.shards] == [("00000", 10), ("00001", 10), ("00002", 5)]
    ids = []
    for shard in source.shards:
        assert not hasattr(shard, "rows")  # the driver keeps no row per image
        table = pq.read_table(shard.source)
        assert table.schema.equals(LISTING_SCHEMA)
        ids += table["image_id"].to_pylist()
    assert ids == sorted(ids) and len(set(ids)) == 25
    again = list_input(str(tmp_path / "in"), listing=str(listing), write_listing=False, shard_size=10)
    assert again.manifest() == source.manifest()


def test_fingerprints_change_with_a_replaced_or_renamed_image(tmp_path):
    _touch(tmp_path / "in", [f"{i:02d}.png" for i in range(6)])
    listing = str(tmp_path / "listing")

    def fingerprints() -> list[str]:
        source = list_input(str(tmp_path / "in"), listing=listing, write_listing=False, shard_size=2)
        return [s.fingerprint for s in source.shards]

    before = fingerprints()
    (tmp_path / "in" / "03.png").write_bytes(b"another image, another size")
    replaced = fingerprints()
    assert [a == b for a, b in zip(before, replaced, strict=True)] == [True, False, True]
    (tmp_path / "in" / "04.png").rename(tmp_path / "in" / "04b.png")  # same count, other name
    assert [a == b for a, b in zip(replaced, fingerprints(), strict=True)] == [True, True, False]


PEAK = """
import pathlib, sys, tempfile, tracemalloc
from hqlabel.platform.readers import list_input
warm = pathlib.Path(tempfile.mkdtemp())
(warm / "a.png").touch()
list_input(str(warm), listing=str(warm / "listing"), shard_size=250)  # first-use imports and caches
tracemalloc.start()
list_input(sys.argv[1], listing=sys.argv[2], shard_size=250)
print(tracemalloc.get_traced_memory()[1])
"""


def _listing_peak(root: Path, n: int, tmp_path: Path) -> int:
    folder = root / f"flat-{n}"
    folder.mkdir(parents=True)
    for i in range(n):
        (folder / f"image-{i:07d}.png").touch()
    listing = tmp_path / f"listing-{n}"
    result = subprocess.run(
        [sys.executable, "-c", PEAK, str(folder), str(listing)], capture_output=True, text=True, check=True
    )
    assert len(list(listing.iterdir())) == -(-n // 250)
    return int(result.stdout)


def test_listing_memory_does_not_grow_with_the_images(tmp_path):
    """Python-side peak while listing a flat folder of 4,000 and of 16,000 files into shards of 250: the
    same within 1.5x (a row per image held, as before listings, grows 4x). The folder's sorted names are
    an Arrow array (not traced here): about 20 bytes a name."""
    small = _listing_peak(tmp_path / "in", 4000, tmp_path)
    large = _listing_peak(tmp_path / "in", 16000, tmp_path)
    assert large < 1.5 * small, (small, large)
