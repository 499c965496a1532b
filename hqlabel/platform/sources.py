"""A labeling job's input, found again after the job, and image bytes read from it by id.

``hqlabel show`` (overlays) and ``hqlabel curate`` (instance datasets with their images) need the original
encoded images of a labels folder, which stores only masks. ``job_images`` finds the job's input as the job
listed it (``OUT/_manifest.json``: one entry per shard, pointing at the dataset's Parquet file or at the
shard's listing file under ``OUT/_listing``), so nothing is listed again and no per-image table is built. A
moved folder or COCO input is read at the same relative paths under its new root; a moved Parquet input, or
a labels folder from a version without listings, is listed again into a temporary folder. ``ImageSource``
reads the images of one output shard at a time from its source, a Parquet row group at a time.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import weakref
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from hqlabel.platform import storage
from hqlabel.platform.images import DEFAULT_MAX_BYTES
from hqlabel.platform.readers import DatasetInput, InputColumns, list_input, read_parquet_shards
from hqlabel.platform.references import ReferencePolicy, RefusedReference
from hqlabel.platform.storage import StorageOptions, TooLargeError

__all__ = ["ImageSource", "files_by_shard", "job_columns", "job_images", "list_job_source"]

_PART = re.compile(r"part-(.+)\.parquet$")


def files_by_shard(files: list[str]) -> dict[str, str]:
    """``{shard id: uri}`` of a labels folder's ``part-SHARD.parquet`` files (other names are left out)."""
    found = {}
    for uri in files:
        match = _PART.search(uri.rsplit("/", 1)[-1])
        if match:
            found[match.group(1)] = uri
    return found


def job_columns(spec: dict[str, Any]) -> InputColumns:
    """The Parquet column names a labeling job's ``spec`` (``job.json`` ``spec``) used."""
    return InputColumns(
        id=spec.get("id_column", "image_id"),
        image=spec.get("image_column", "image"),
        uri=spec.get("uri_column", "uri"),
        boxes=spec.get("boxes_column", "boxes"),
        labels=spec.get("labels_column", "labels"),
    )


def job_images(labels: str, spec: dict[str, Any], images: str | None, options: StorageOptions) -> ImageSource:
    """The images of the labeling job in ``labels`` (``spec`` is its ``job.json`` spec).

    The job's own listing is used when it recorded one (``_manifest.json``). ``images`` says where the input
    is now, if it has moved: a folder or COCO input keeps its listing, each image looked up at the same
    relative path (its id) under the new root; a Parquet input is listed again there (one entry per file).
    A labels folder from a version without listings is listed again too. References are read only inside
    the input's root or under the job's ``allow_prefix`` (``ReferencePolicy``), and image files up to the
    job's ``max_bytes``, as the job read them.

    Raises:
        ValueError: the spec names no input and ``images`` is None.
        FileNotFoundError: the input is gone (the message suggests ``--images``).
    """
    columns = job_columns(spec)
    allow = tuple(spec.get("allow_prefix") or ())
    max_bytes = spec.get("max_bytes", DEFAULT_MAX_BYTES)
    try:
        manifest = json.loads(storage.read_bytes(storage.join(labels, "_manifest.json"), options))
        source = DatasetInput.from_manifest(manifest)
    except (FileNotFoundError, ValueError, KeyError):
        source = None  # no usable manifest: list the input again
    if source is not None and images is None:
        return ImageSource(source, options, columns, allow=allow, max_bytes=max_bytes)
    if source is not None and source.kind != "parquet":
        assert images is not None
        if not storage.exists(images, options):
            raise FileNotFoundError(f"--images {images!r} does not exist")
        images = images if storage.is_s3(images) else storage.resolve(images, options)[1]
        if source.kind == "coco":
            root = spec.get("coco_images") or images.rsplit("/", 1)[0]
        else:
            root = images.rstrip("/")
        return ImageSource(source, options, columns, root=root, allow=allow, max_bytes=max_bytes)
    source = list_job_source(spec, images, options)
    return ImageSource(source, options, columns, allow=allow, max_bytes=max_bytes)


def list_job_source(spec: dict[str, Any], images: str | None, options: StorageOptions) -> DatasetInput:
    """The job's input, listed again with the job's columns and options (``images`` replaces
    ``spec.input``); the listing files go to a temporary folder removed with the returned object.

    Raises:
        ValueError: the spec names no input and ``images`` is None.
        FileNotFoundError: the input is gone (the message suggests ``--images``).
    """
    uri = images or spec.get("input")
    if not uri:
        raise ValueError("job.json names no input (spec.input); pass the images with --images")
    folder = tempfile.mkdtemp(prefix="hqlabel-listing-")
    try:
        source = list_input(
            uri,
            listing=folder,
            columns=job_columns(spec),
            options=options,
            shard_size=spec.get("shard_size", 1000),
            coco_images=spec.get("coco_images"),
            allow=tuple(spec.get("allow_prefix") or ()),
            max_json_bytes=spec.get("max_json_bytes", storage.DEFAULT_MAX_JSON_BYTES),
        )
    except FileNotFoundError as e:
        shutil.rmtree(folder, ignore_errors=True)
        raise FileNotFoundError(f"{e} (the labeling job's input); pass the images with --images") from e
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    weakref.finalize(source, shutil.rmtree, folder, True)
    return source


class ImageSource:
    """Encoded image bytes by ``image_id``, one shard at a time, from a job's input (``job_images``).

    ``root``: a folder or COCO input that has moved there; each image is read from ``root/image_id``.
    ``allow``: the job's ``allow_prefix``: references are read only under the input's root (``root`` when
    given) or these prefixes (``ReferencePolicy``); others are refused, unread.
    ``max_bytes``: the job's ``--max-bytes``: a larger image file is refused, unread (None: no cap).
    """

    def __init__(
        self,
        source: DatasetInput,
        options: StorageOptions,
        columns: InputColumns,
        root: str | None = None,
        allow: tuple[str, ...] = (),
        max_bytes: int | None = DEFAULT_MAX_BYTES,
    ):
        self.source, self.options, self.root, self.max_bytes = source, options, root, max_bytes
        self.references = ReferencePolicy(root or source.root, allow)
        self.columns = source.columns_override or columns
        self.sources = {shard.shard_id: shard.source for shard in source.shards}

    def read(self, shard: str, wanted: set[str]) -> Iterator[tuple[str, bytes | None, str]]:
        """``(image_id, bytes or None, problem)`` for each id of ``wanted`` (once each), from the input's
        shard ``shard`` (the labels folder's ``part-SHARD.parquet``), read a row group at a time.
        ``problem`` is ``""`` when bytes were found."""
        left = set(wanted)
        if shard in self.sources:
            batch = pa.table({"shard": [shard], "source": [self.sources[shard]]})
            tables = read_parquet_shards(
                batch, root=self.source.root, columns=self.columns, options=self.options
            )
            for table in tables:
                keep = table.filter(
                    pc.is_in(table["image_id"], value_set=pa.array(sorted(left), pa.string()))
                )
                for row in keep.select(["image_id", "image", "uri"]).to_pylist():
                    if row["image_id"] not in left:
                        continue
                    left.discard(row["image_id"])
                    if row["image"] is not None:
                        yield row["image_id"], row["image"], ""
                    elif self.root is not None:
                        yield row["image_id"], *self._bytes(storage.join(self.root, row["image_id"]))
                    elif row["uri"] is not None:
                        yield row["image_id"], *self._bytes(row["uri"])
                    else:
                        yield row["image_id"], None, "the input row has neither image bytes nor a uri"
                if not left:
                    return
        for image_id in sorted(left):
            yield image_id, None, f"not found in the input's shard {shard}"

    def _bytes(self, uri: str) -> tuple[bytes | None, str]:
        try:
            return storage.read_bytes(self.references.check(uri), self.options, max_bytes=self.max_bytes), ""
        except RefusedReference as e:
            return None, f"refused: {e}"
        except TooLargeError as e:
            return None, str(e)
        except FileNotFoundError:
            return None, f"not found in the job's input: {uri}"
        except OSError as e:
            return None, f"cannot read {uri}: {e}"
