"""``hqlabel.platform.storage`` on local folders and on S3 (a moto server on loopback), by the same calls."""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pytest

from hqlabel.platform import storage
from hqlabel.platform.storage import StorageOptions

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path) -> tuple[str, StorageOptions]:
    """``(base URI, options)``: an empty local folder, or an empty prefix in a bucket of its own."""
    if request.param == "local":
        return str(tmp_path / "root"), StorageOptions()
    bucket = request.getfixturevalue("s3_bucket")
    return f"s3://{bucket}/root", StorageOptions(s3_endpoint=request.getfixturevalue("s3_endpoint"))


def _table(n: int, start: int = 0) -> pa.Table:
    return pa.table(
        {"id": pa.array(range(start, start + n), pa.int64()), "name": [f"r{i}" for i in range(n)]}
    )


def test_bytes_round_trip_and_overwrite(root):
    base, options = root
    uri = storage.join(base, "a", "b", "blob.bin")
    storage.write_bytes(uri, b"first", options)
    storage.write_bytes(uri, b"\x00second\xff", options)
    assert storage.read_bytes(uri, options) == b"\x00second\xff"


def test_a_missing_bucket_is_a_missing_file_not_a_transient_error(s3_endpoint):
    """A read from a bucket that does not exist fails at once as FileNotFoundError (an error row that
    ``--retry-errors`` leaves alone), not as a transient error retried with backoff."""
    options = StorageOptions(s3_endpoint=s3_endpoint)
    with pytest.raises(FileNotFoundError, match="there is no bucket 'hqlabel-no-such-bucket'") as info:
        storage.read_bytes("s3://hqlabel-no-such-bucket/a.png", options)
    assert not storage.is_transient(info.value)


def test_parquet_round_trip_file_and_folder(root):
    base, options = root
    folder = storage.join(base, "tables")
    storage.write_parquet(_table(2, start=10), storage.join(folder, "part-1.parquet"), options)
    storage.write_parquet(_table(3), storage.join(folder, "part-0.parquet"), options)
    storage.write_parquet(_table(5, start=99), storage.join(folder, "_tmp", "part-9.parquet"), options)

    assert storage.read_parquet(storage.join(folder, "part-1.parquet"), options).equals(_table(2, start=10))
    whole = storage.read_parquet(folder, options, columns=["id"])
    assert whole["id"].to_pylist() == [0, 1, 2, 10, 11]  # sorted by name, `_tmp` skipped, columns chosen


def test_list_files_filters_skips_and_sorts(root):
    base, options = root
    for name in [
        "b.png",
        "a.JPG",
        "sub/deeper/c.png",
        "notes.txt",
        "_tmp/d.png",
        ".hidden.png",
        "sub/_e.png",
    ]:
        storage.write_bytes(storage.join(base, name), b"x", options)
    found = storage.list_files(base, (".png", ".jpg"), options)
    prefix = base if storage.is_s3(base) else storage.resolve(base)[1]
    assert found == [storage.join(prefix, n) for n in ["a.JPG", "b.png", "sub/deeper/c.png"]]
    assert storage.list_files(storage.join(base, "nothing-here"), (".png",), options) == []


def test_exists_is_dir_and_delete(root):
    base, options = root
    folder = storage.join(base, "folder")
    one, two = storage.join(folder, "one.bin"), storage.join(folder, "sub", "two.bin")
    storage.write_bytes(one, b"1", options)
    storage.write_bytes(two, b"2", options)
    assert (storage.exists(one, options), storage.is_dir(one, options)) == (True, False)
    assert (storage.exists(folder, options), storage.is_dir(folder, options)) == (True, True)

    storage.delete(one, options)
    assert not storage.exists(one, options) and storage.exists(two, options)
    storage.delete(folder, options)
    assert not storage.exists(two, options) and not storage.exists(folder, options)
    storage.delete(folder, options)  # already gone: nothing to do


def test_missing_file_is_file_not_found(root):
    base, options = root
    with pytest.raises(FileNotFoundError, match=r"missing\.bin"):
        storage.read_bytes(storage.join(base, "missing.bin"), options)
    with pytest.raises(FileNotFoundError, match="missing-folder"):
        storage.read_parquet(storage.join(base, "missing-folder"), options)


def test_reading_a_folder_as_bytes_is_an_error(root):
    base, options = root
    storage.write_bytes(storage.join(base, "folder", "x.bin"), b"x", options)
    with pytest.raises(IsADirectoryError):
        storage.read_bytes(storage.join(base, "folder"), options)


def test_read_bytes_refuses_a_file_over_the_cap_by_its_stated_size(root):
    base, options = root
    uri = storage.join(base, "blob.bin")
    storage.write_bytes(uri, b"x" * 1000, options)
    with pytest.raises(
        storage.TooLargeError, match=r"is 1000 bytes, over the cap of 999 bytes; raise --max-bytes"
    ):
        storage.read_bytes(uri, options, max_bytes=999)
    assert issubclass(storage.TooLargeError, ValueError)
    assert storage.read_bytes(uri, options, max_bytes=1000) == b"x" * 1000  # at the cap: read
    assert storage.read_bytes(uri, options, max_bytes=10**9) == b"x" * 1000
    with pytest.raises(ValueError, match="max_bytes must be >= 0"):
        storage.read_bytes(uri, options, max_bytes=-1)


def test_read_bytes_refuses_a_huge_file_without_reading_it(tmp_path: Path):
    """A sparse 1 TiB file is refused by its stated size, before a byte is read (the message names that
    size; the guard on the read itself would say "holds more than")."""
    path = tmp_path / "huge.bin"
    with open(path, "wb") as f:
        f.truncate(2**40)
    with pytest.raises(
        storage.TooLargeError, match=rf"huge\.bin is {2**40} bytes, over the cap of 1024 bytes"
    ):
        storage.read_bytes(str(path), max_bytes=1024)


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc")
def test_read_bytes_stops_at_the_cap_when_a_file_holds_more_than_it_states():
    """/proc files state a size of 0 bytes: the read itself must stop one byte past the cap."""
    uri = "/proc/self/status"
    assert pafs.LocalFileSystem().get_file_info(uri).size == 0
    with pytest.raises(
        storage.TooLargeError, match=r"holds more than the cap of 10 bytes \(it stated 0 bytes\)"
    ):
        storage.read_bytes(uri, max_bytes=10)
    data = storage.read_bytes(uri, max_bytes=2**20)
    assert data.startswith(b"Name:") and len(data) > 10


def test_join():
    assert storage.join("s3://bucket/data/", "a", "/b/", "c.png") == "s3://bucket/data/a/b/c.png"
    assert storage.join("/", "tmp", "x") == "/tmp/x"
    assert storage.join("/") == "/"
    assert storage.join("relative/dir", "x") == "relative/dir/x"
    assert storage.join("file:///", "x", "y.png") == "file:///x/y.png"


def test_resolve_local_file_uri_and_s3(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fs, path = storage.resolve("some/dir")
    assert isinstance(fs, pafs.LocalFileSystem) and path == str(tmp_path / "some" / "dir")
    assert storage.resolve(f"file://{tmp_path}/x.png")[1] == f"{tmp_path}/x.png"

    fs, path = storage.resolve("s3://bucket/key/prefix/", StorageOptions(s3_endpoint="http://127.0.0.1:9"))
    assert isinstance(fs, pafs.S3FileSystem) and path == "bucket/key/prefix"


@pytest.mark.parametrize("uri", ["s3://", "s3:///", "s3:////"])
def test_s3_uri_without_bucket_is_rejected(uri):
    with pytest.raises(ValueError, match="s3://bucket"):
        storage.resolve(uri)


def test_endpoint_without_scheme_is_rejected():
    with pytest.raises(ValueError, match="scheme"):
        storage.resolve("s3://bucket/key", StorageOptions(s3_endpoint="127.0.0.1:9000"))


def test_local_write_is_atomic_and_leaves_no_temporary_file(tmp_path):
    target = tmp_path / "out" / "data.parquet"
    storage.write_parquet(_table(3), str(target))
    storage.write_parquet(_table(4), str(target))  # replaces the first, by rename
    assert os.listdir(target.parent) == ["data.parquet"]
    assert storage.read_parquet(str(target)).num_rows == 4


class _Flaky:
    """Fails with ``error`` ``failures`` times, then returns 42."""

    def __init__(self, error: OSError, failures: int):
        self.error, self.failures, self.calls = error, failures, 0

    def __call__(self) -> int:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error
        return 42


@pytest.fixture
def sleeps(monkeypatch) -> list[float]:
    """The backoff delays ``with_retries`` asked for (without waiting)."""
    delays: list[float] = []
    monkeypatch.setattr(storage.time, "sleep", delays.append)
    return delays


def test_with_retries_retries_a_transient_error(sleeps):
    flaky = _Flaky(OSError("connection reset by peer"), failures=2)
    assert storage.with_retries(flaky, "reading x") == 42
    assert (flaky.calls, sleeps) == (3, [0.25, 0.5])


def test_with_retries_gives_up_after_the_last_attempt(sleeps):
    flaky = _Flaky(OSError("503 slow down"), failures=10)
    with pytest.raises(OSError, match="slow down"):
        storage.with_retries(flaky, "reading x", retries=3)
    assert flaky.calls == 3


@pytest.mark.parametrize("error", [FileNotFoundError("gone"), PermissionError("denied")])
def test_with_retries_does_not_retry_a_missing_or_forbidden_file(sleeps, error):
    flaky = _Flaky(error, failures=1)
    with pytest.raises(type(error)):
        storage.with_retries(flaky, "reading x")
    assert (flaky.calls, sleeps) == (1, [])


def test_with_retries_lets_other_errors_through(sleeps):
    flaky = _Flaky(ValueError("bad value"), failures=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        storage.with_retries(flaky, "reading x")
    assert flaky.calls == 1


def test_file_uris_reach_local_files(tmp_path: Path):
    storage.write_bytes(f"file://{tmp_path}/x.bin", b"x")
    assert (tmp_path / "x.bin").read_bytes() == b"x"
    assert storage.read_bytes(f"file://{tmp_path}/x.bin") == b"x"


def test_an_s3_read_is_one_request(s3_endpoint, s3_client, s3_bucket):
    """``read_bytes`` on S3 is one GET (size cap included), counted at a proxy in front of the server; a
    missing object is ``FileNotFoundError``."""
    from benchmarks.s3proxy import S3Proxy

    s3_client.put_object(Bucket=s3_bucket, Key="a/image.png", Body=b"x" * 100)
    proxy = S3Proxy(s3_endpoint)
    try:
        options = StorageOptions(s3_endpoint=proxy.endpoint)
        assert storage.read_bytes(f"s3://{s3_bucket}/a/image.png", options, max_bytes=100) == b"x" * 100
        assert proxy.requests == [("GET", f"/{s3_bucket}/a/image.png")]
        with pytest.raises(FileNotFoundError):
            storage.read_bytes(f"s3://{s3_bucket}/a/missing.png", options)
    finally:
        proxy.close()
