"""One way to reach files, local or on S3: URIs in, ``pyarrow.fs`` underneath.

A location is a local path, a ``file://`` URI or an ``s3://bucket/key`` URI. S3 credentials come from the
standard AWS chain (environment, ``~/.aws`` profile, instance metadata) and are never printed or written;
``StorageOptions`` carries only the endpoint (S3-compatible stores, a local test server) and the region.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

logger = logging.getLogger(__name__)

DEFAULT_MAX_JSON_BYTES = 2 << 30
"""Default cap on a JSON document read whole (``--max-json-bytes``: a COCO input, ground truth, a decisions
file): parsing takes several times its size in memory."""

RETRIES = 4  # attempts for a transient S3 failure (pyarrow's AWS client retries inside each attempt too)


@dataclass(frozen=True)
class StorageOptions:
    """How to reach S3.

    Attributes:
        s3_endpoint: endpoint URL of an S3-compatible store, e.g. ``http://127.0.0.1:9000``; None for AWS.
        s3_region: region; defaults to ``AWS_REGION`` / ``AWS_DEFAULT_REGION``, then ``us-east-1``.
    """

    s3_endpoint: str | None = None
    s3_region: str | None = None


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def _region(options: StorageOptions) -> str:
    return (
        options.s3_region
        or os.environ.get("AWS_REGION")
        or os.environ.get("AWS_DEFAULT_REGION")
        or "us-east-1"
    )


@functools.lru_cache(maxsize=8)
def _s3(options: StorageOptions) -> pafs.S3FileSystem:
    kwargs: dict = {
        "region": _region(options),
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=5),
    }
    if options.s3_endpoint:
        scheme, sep, host = options.s3_endpoint.partition("://")
        if not sep:
            raise ValueError(f"--s3-endpoint {options.s3_endpoint!r} needs a scheme, e.g. http://host:port")
        kwargs.update(endpoint_override=host.rstrip("/"), scheme=scheme)
    return pafs.S3FileSystem(**kwargs)


def resolve(uri: str, options: StorageOptions = StorageOptions()) -> tuple[pafs.FileSystem, str]:
    """``(filesystem, path within it)`` for a local path, ``file://`` or ``s3://`` URI."""
    if is_s3(uri):
        path = uri[len("s3://") :].strip("/")
        if not path:
            raise ValueError(f"{uri!r} names no bucket; use s3://bucket/prefix")
        return _s3(options), path
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    return pafs.LocalFileSystem(), str(Path(uri).expanduser().absolute())


def join(base: str, *parts: str) -> str:
    """Join path parts onto a local path or URI with ``/`` (a root such as ``/`` or ``file:///`` keeps its
    slashes)."""
    out = base
    for part in parts:
        part = part.strip("/")
        out = f"{out}{part}" if out.endswith("/") else f"{out}/{part}"
    return out


def is_transient(error: BaseException) -> bool:
    """Whether a storage error may go away when the request is repeated: any ``OSError`` but a missing file,
    a folder where a file was expected (or the reverse) and a refused permission. ``TooLargeError`` is a
    ``ValueError``, never transient."""
    return isinstance(error, OSError) and not isinstance(
        error, (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)
    )


def with_retries(fn, what: str, retries: int = RETRIES):
    """Call ``fn()``; retry transient ``OSError``s (not missing files) with exponential backoff."""
    for attempt in range(retries):
        try:
            return fn()
        except OSError as e:
            if not is_transient(e) or attempt == retries - 1:
                raise
            delay = 0.25 * 2**attempt
            logger.warning("%s failed (%s); retrying in %.2f s", what, e, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


class TooLargeError(ValueError):
    """A file or object is larger than the byte cap it was read with (``read_bytes(max_bytes=...)``)."""


def read_bytes(
    uri: str,
    options: StorageOptions = StorageOptions(),
    *,
    max_bytes: int | None = None,
    option: str = "--max-bytes",
) -> bytes:
    """The whole object / file at ``uri``.

    Args:
        max_bytes: refuse a file larger than this many bytes. Its stated size (a local ``stat``, an S3
            ``HEAD``) is checked before a byte is read, and the read stops after ``max_bytes + 1`` bytes,
            since a file can grow in between (and some, such as ``/proc`` files, state no size). None: no cap.
        option: the command-line option that raises the cap, named in the error.

    Raises:
        FileNotFoundError: it does not exist.
        TooLargeError: it is larger than ``max_bytes`` (the message names both and ``option``).
        ValueError: ``max_bytes`` is negative.
    """
    if max_bytes is not None and max_bytes < 0:
        raise ValueError(f"max_bytes must be >= 0 (or None: no cap), got {max_bytes}")
    if is_s3(uri):
        return with_retries(lambda: _get_object(uri, options, max_bytes, option), f"reading {uri}")
    fs, path = resolve(uri, options)

    def read() -> bytes:
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            raise FileNotFoundError(f"{uri} does not exist")
        if info.type != pafs.FileType.File:
            raise IsADirectoryError(f"{uri} is not a file")
        if max_bytes is None:
            with fs.open_input_stream(path) as f:
                return f.read()
        size = info.size or 0
        if size > max_bytes:
            raise TooLargeError(
                f"{uri} is {size} bytes, over the cap of {max_bytes} bytes; raise {option} to read it"
            )
        with fs.open_input_stream(path) as f:
            data = f.read(size + 1)  # one byte more than stated: has it grown?
            if len(data) > size:
                data += f.read(max_bytes + 1 - len(data))
        if len(data) > max_bytes:
            raise TooLargeError(
                f"{uri} holds more than the cap of {max_bytes} bytes (it stated {size} bytes); "
                f"raise {option} to read it"
            )
        return data

    return with_retries(read, f"reading {uri}")


def read_record(uri: str, options: StorageOptions = StorageOptions()) -> bytes | None:
    """A small bookkeeping file or object (a few hundred bytes of JSON), or None when there is none: on S3 one
    GET (``read_bytes`` asks again whether a missing key is a prefix, a listing more)."""
    if not is_s3(uri):
        try:
            return read_bytes(uri, options)
        except FileNotFoundError:
            return None
    try:
        return with_retries(
            lambda: _get_object(uri, options, None, "--max-bytes", check_dir=False), f"reading {uri}"
        )
    except FileNotFoundError:
        return None


def write_record(uri: str, data: bytes, options: StorageOptions = StorageOptions()) -> None:
    """``write_bytes`` for a small bookkeeping object: on S3 one ``PutObject`` (atomic by itself), where
    pyarrow's output streams take three requests (a multipart upload)."""
    if not is_s3(uri):
        write_bytes(uri, data, options)
        return
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, _, key = uri[len("s3://") :].partition("/")

    def put() -> None:
        try:
            _s3_client(options).put_object(Bucket=bucket, Key=key, Body=data)
        except ClientError as e:
            code = str(e.response.get("Error", {}).get("Code", ""))
            if code in ("AccessDenied", "403"):
                raise PermissionError(f"{uri}: access denied") from None
            raise OSError(f"{uri}: {code or e}") from None
        except BotoCoreError as e:
            raise OSError(f"{uri}: {e}") from None

    with_retries(put, f"writing {uri}")


def delete_record(uri: str, options: StorageOptions = StorageOptions()) -> None:
    """Delete a small bookkeeping file or object if it exists: on S3 one ``DeleteObject`` (``delete`` first
    asks what ``uri`` is)."""
    if not is_s3(uri):
        with contextlib.suppress(FileNotFoundError):
            os.remove(resolve(uri, options)[1])
        return
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, _, key = uri[len("s3://") :].partition("/")

    def remove() -> None:
        try:
            _s3_client(options).delete_object(Bucket=bucket, Key=key)  # no error when it is not there
        except ClientError as e:
            raise OSError(f"{uri}: {e.response.get('Error', {}).get('Code', '') or e}") from None
        except BotoCoreError as e:
            raise OSError(f"{uri}: {e}") from None

    with_retries(remove, f"deleting {uri}")


def _get_object(
    uri: str, options: StorageOptions, max_bytes: int | None, option: str, *, check_dir: bool = True
) -> bytes:
    """``read_bytes`` on S3 in one GET (pyarrow's streams send two HEADs first): the size comes with the
    answer's headers, so an object over ``max_bytes`` is refused before its body is read. Errors become the
    ``OSError`` kinds ``with_retries`` understands (the client has retried transient ones already)."""
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, _, key = uri[len("s3://") :].partition("/")
    try:
        answer = _s3_client(options).get_object(Bucket=bucket, Key=key)
    except ClientError as e:
        code = str(e.response.get("Error", {}).get("Code", ""))
        if code in ("NoSuchKey", "404", "NotFound"):
            if check_dir and is_dir(
                uri, options
            ):  # a prefix with objects under it (only asked on this error path)
                raise IsADirectoryError(f"{uri} is not a file") from None
            raise FileNotFoundError(f"{uri} does not exist") from None
        if code == "NoSuchBucket":  # no retry can find it: not transient
            raise FileNotFoundError(f"{uri}: there is no bucket {bucket!r}") from None
        if code in ("AccessDenied", "403"):
            raise PermissionError(f"{uri}: access denied") from None
        raise OSError(f"{uri}: {code or e}") from None
    except BotoCoreError as e:
        raise OSError(f"{uri}: {e}") from None
    body = answer["Body"]
    try:
        size = int(answer.get("ContentLength") or 0)
        if max_bytes is not None and size > max_bytes:
            raise TooLargeError(
                f"{uri} is {size} bytes, over the cap of {max_bytes} bytes; raise {option} to read it"
            )
        data = body.read() if max_bytes is None else body.read(max_bytes + 1)
    except BotoCoreError as e:
        raise OSError(f"{uri}: {e}") from None
    finally:
        body.close()
    if max_bytes is not None and len(data) > max_bytes:
        raise TooLargeError(
            f"{uri} holds more than the cap of {max_bytes} bytes (it stated {size} bytes); "
            f"raise {option} to read it"
        )
    return data


def _temporary_path(path: str) -> str:
    """A hidden name beside ``path`` for writing before it appears (``list_files`` skips hidden names)."""
    parent, name = path.rsplit("/", 1)
    return f"{parent}/.{name}.{uuid.uuid4().hex[:8]}.tmp"


def write_bytes(uri: str, data: bytes, options: StorageOptions = StorageOptions()) -> None:
    """Write ``data`` to ``uri`` atomically: readers see the old object or the whole new one, never a part.

    Local files go to a temporary name in the same folder and are renamed; an S3 PUT is atomic by itself.
    """
    fs, path = resolve(uri, options)
    parent = path.rsplit("/", 1)[0]
    if isinstance(fs, pafs.LocalFileSystem):
        fs.create_dir(parent, recursive=True)
        tmp = _temporary_path(path)
        with fs.open_output_stream(tmp) as f:
            f.write(data)
        os.replace(tmp, path)
        return

    def put() -> None:
        with fs.open_output_stream(path) as f:
            f.write(data)

    with_retries(put, f"writing {uri}")


def write_parquet(table: pa.Table, uri: str, options: StorageOptions = StorageOptions()) -> None:
    """Write ``table`` as one Parquet file at ``uri``, atomically (see ``write_bytes``)."""
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    write_bytes(uri, buf.getvalue(), options)


@contextlib.contextmanager
def parquet_writer(
    uri: str, schema: pa.Schema, options: StorageOptions = StorageOptions(), *, compression: str = "zstd"
) -> Iterator[pq.ParquetWriter]:
    """A ``pq.ParquetWriter`` for one Parquet file at ``uri``, for files too large to build in memory first.

    The file appears atomically when the ``with`` block ends without an error, and not at all if it raises:
    it is written to a hidden temporary name in the same folder (``list_files`` skips it), then renamed
    locally, or moved on S3 (a server-side copy, atomic for the target, then a delete of the temporary).
    """
    fs, path = resolve(uri, options)
    tmp = _temporary_path(path)
    local = isinstance(fs, pafs.LocalFileSystem)
    if local:
        fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    try:
        with (
            fs.open_output_stream(tmp) as sink,
            pq.ParquetWriter(sink, schema, compression=compression) as writer,
        ):
            yield writer
        if local:
            os.replace(tmp, path)
        else:
            with_retries(lambda: fs.move(tmp, path), f"writing {uri}")
    except BaseException:
        with contextlib.suppress(OSError):
            fs.delete_file(tmp)
        raise


def read_parquet(uri: str, options: StorageOptions = StorageOptions(), columns=None) -> pa.Table:
    """One Parquet file, or all ``*.parquet`` under a folder (sorted; hidden and ``_`` names skipped)."""
    fs, path = resolve(uri, options)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"{uri} does not exist")
    files = [uri] if info.type == pafs.FileType.File else list_files(uri, (".parquet",), options)
    tables = [pq.read_table(resolve(f, options)[1], filesystem=fs, columns=columns) for f in files]
    if not tables:
        raise FileNotFoundError(f"no Parquet files under {uri}")
    return pa.concat_tables(tables)


def exists(uri: str, options: StorageOptions = StorageOptions()) -> bool:
    fs, path = resolve(uri, options)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def is_dir(uri: str, options: StorageOptions = StorageOptions()) -> bool:
    fs, path = resolve(uri, options)
    return fs.get_file_info(path).type == pafs.FileType.Directory


class FileEntry(NamedTuple):
    """A file found by ``walk``: its URI, size in bytes, and a version (local: modification time in ns; S3:
    the ETag), which changes when the content is replaced."""

    uri: str
    size: int
    version: str


@functools.lru_cache(maxsize=8)
def _s3_client(options: StorageOptions) -> Any:
    """A boto3 S3 client (for paginated listings, which ``pyarrow.fs`` cannot stream), same credentials chain,
    endpoint and region as ``_s3``."""
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=options.s3_endpoint,
        region_name=_region(options),
        config=Config(retries={"max_attempts": RETRIES + 1, "mode": "standard"}),
    )


_SORTED_CHUNK = 4096  # names gathered as Python strings before they become an Arrow chunk


def _under(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix if prefix.endswith("/") else f"{prefix}/")


def _sorted_names(path: str, suffixes: tuple[str, ...], inside: tuple[str, ...]) -> pa.Array:
    """The wanted entries of one local directory, sorted as their full paths sort: files by name, folders as
    ``name/`` (so ``a.png`` < ``a/x.png``, as a global sort of paths has it). Held as an Arrow string array:
    a flat folder of a million names costs tens of MB, not the hundreds Python strings and lists would.
    A symlink (to a file or a folder) whose target is not under one of ``inside`` (real paths) is skipped
    with a warning: its target is outside the dataset."""
    chunks, names = [], []
    with os.scandir(path) as entries:
        for entry in entries:
            name = entry.name
            if name.startswith((".", "_")):
                continue
            try:
                name.encode()
            except UnicodeEncodeError:
                logger.warning("skipping %s/%r: its name is not valid UTF-8", path, name)
                continue
            if entry.is_symlink() and not any(_under(os.path.realpath(entry.path), p) for p in inside):
                logger.warning(
                    "skipping %s: a symlink leading outside the dataset root (pass --allow-prefix with "
                    "where it leads to include it)",
                    entry.path,
                )
                continue
            if entry.is_dir():
                names.append(name + "/")
            elif name.lower().endswith(suffixes) and entry.is_file():
                names.append(name)
            if len(names) == _SORTED_CHUNK:
                chunks.append(pa.array(names, pa.string()))
                names = []
    chunks.append(pa.array(names, pa.string()))
    array = pa.chunked_array(chunks, pa.string())
    return array.take(pc.sort_indices(array)).combine_chunks()


def _walk_local(
    path: str, suffixes: tuple[str, ...], seen: set[tuple[int, int]], inside: tuple[str, ...]
) -> Iterator[FileEntry]:
    status = os.stat(path)
    if (status.st_dev, status.st_ino) in seen:  # a symlinked folder that loops back
        return
    seen.add((status.st_dev, status.st_ino))
    names = _sorted_names(path, suffixes, inside)
    for start in range(0, len(names), 4096):
        for name in names.slice(start, 4096).to_pylist():
            full = f"{path.rstrip('/')}/{name.rstrip('/')}"
            if name.endswith("/"):
                yield from _walk_local(full, suffixes, seen, inside)
                continue
            try:
                status = os.stat(full)
            except FileNotFoundError:  # removed while listing
                continue
            yield FileEntry(full, status.st_size, str(status.st_mtime_ns))


def _walk_s3(uri: str, suffixes: tuple[str, ...], options: StorageOptions) -> Iterator[FileEntry]:
    bucket, _, prefix = uri[len("s3://") :].strip("/").partition("/")
    prefix = f"{prefix}/" if prefix else ""
    pages = _s3_client(options).get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    for page in pages:  # keys come in UTF-8 byte order, which is the order of sorted() on the paths
        for item in page.get("Contents", []):
            key = item["Key"]
            relative = key[len(prefix) :]
            if not key.lower().endswith(suffixes) or any(
                p.startswith((".", "_")) for p in relative.split("/")
            ):
                continue
            yield FileEntry(f"s3://{bucket}/{key}", int(item["Size"]), item.get("ETag", "").strip('"'))


def walk(
    uri: str,
    suffixes: tuple[str, ...],
    options: StorageOptions = StorageOptions(),
    *,
    allow: tuple[str, ...] = (),
) -> Iterator[FileEntry]:
    """Stream the files under ``uri`` (recursive) whose lower-cased name ends in one of ``suffixes``, sorted
    by path (names and folders starting with ``.`` or ``_`` skipped), without holding the listing: S3 one
    page of 1,000 keys at a time, local folders a directory at a time.

    Local symlinks are followed only while they stay inside ``uri`` (after resolving it) or under one of
    ``allow`` (local folders; the job's ``--allow-prefix``): a symlinked file or folder leading elsewhere is
    skipped at listing, with a warning naming it, so a folder input never lists (or later reads) what lies
    outside it. S3 has no symlinks."""
    if is_s3(uri):
        yield from _walk_s3(uri, suffixes, options)
        return
    _, path = resolve(uri, options)
    if os.path.isdir(path):
        local = [resolve(prefix)[1] for prefix in allow if not is_s3(prefix)]
        inside = tuple(os.path.realpath(p) for p in (path, *local))
        yield from _walk_local(path, suffixes, set(), inside)


def list_files(uri: str, suffixes: tuple[str, ...], options: StorageOptions = StorageOptions()) -> list[str]:
    """Files under ``uri`` (recursive) whose lower-cased name ends in one of ``suffixes``, as URIs sorted by
    path; names (and folders) starting with ``.`` or ``_`` are skipped. ``walk``, held as a list."""
    return [entry.uri for entry in walk(uri, suffixes, options)]


def delete(uri: str, options: StorageOptions = StorageOptions()) -> None:
    """Remove a file or a whole folder if it exists."""
    fs, path = resolve(uri, options)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.Directory:
        fs.delete_dir(path)
    elif info.type == pafs.FileType.File:
        fs.delete_file(path)


def absolute(uri: str | None) -> str | None:
    """A local path (or ``file://`` URI) as an absolute path, as outputs record it (so that it means the same
    from any directory); other URIs (``s3://``) and None as given."""
    if uri is None or ("://" in uri and not uri.startswith("file://")):
        return uri
    return str(Path(uri.removeprefix("file://")).expanduser().absolute())
