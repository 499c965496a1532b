"""What every export format shares: the summary it returns, the atomic single-file output, the per-image
file names of the folder formats (yolo-seg, masks-png) and their ``image_files.csv`` map.

File names are the image ids' own (any script, spaces: ``my phöto 猫 1.png`` -> ``labels/my phöto 猫 1.txt``),
as YOLO pairs images and labels by stem; only a part that cannot be a file name changes (``..``, control
characters, over 255 bytes). ``OUT/image_files.csv`` maps every exported ``image_id`` to its path, and a
warning says when a name changed.
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import os
import re
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import PurePosixPath

import numpy as np
import pyarrow.fs as pafs

from hqlabel.platform import storage
from hqlabel.platform.storage import StorageOptions

logger = logging.getLogger(__name__)

DECODE_BATCH_ROWS = 64  # masks per record batch where every mask is decoded to H x W


@dataclass
class ExportSummary:
    """What an export wrote.

    Attributes:
        format: a name of ``hqlabel.formats.FORMATS``.
        out: the file (coco, label-studio) or folder written.
        images: images exported (labeled ones, with or without instances).
        instances: instances exported.
        skipped_images: images left out because their processing failed (listed in ``errors/``).
        repeated_images: labeled images left out because their ``image_id`` occurs more than once.
        dropped_parts: yolo-seg only: mask parts below ``min_part_area`` or with fewer than 3 contour points.
        config: label-studio only: the labeling config XML written next to the tasks.
    """

    format: str
    out: str
    images: int = 0
    instances: int = 0
    skipped_images: int = 0
    repeated_images: int = 0
    dropped_parts: int = 0
    config: str | None = None

    def __str__(self) -> str:
        text = f"exported {self.images} images, {self.instances} instances as {self.format} to {self.out}"
        if self.skipped_images:
            text += f" ({self.skipped_images} failed images left out; see errors/)"
        if self.repeated_images:
            text += f" ({self.repeated_images} images with a repeated image_id left out)"
        if self.dropped_parts:
            text += f"; {self.dropped_parts} tiny mask parts dropped"
        if self.config:
            text += f"; labeling config: {self.config}"
        return text


def f32(value: float) -> float:
    """A float32 as the shortest Python float that reads back as the same float32 (0.9, not 0.899999976)."""
    return float(str(np.float32(value)))


def open_output(uri: str, options: StorageOptions) -> tuple[str, Callable[[], None]]:
    """``(tmp, publish)``: a local file path to stream ``uri``'s content into, and the function that puts it
    at ``uri`` when it is complete (the caller removes ``tmp`` if anything fails).

    Local: a temporary file next to ``uri``, renamed over it. S3: a local temporary file, copied up at the end
    (an S3 object appears whole or not at all).
    """
    fs, path = storage.resolve(uri, options)
    if isinstance(fs, pafs.LocalFileSystem):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{uuid.uuid4().hex[:8]}.tmp")

        def publish() -> None:
            os.replace(tmp, path)

    else:
        handle, tmp = tempfile.mkstemp(suffix=".json")
        os.close(handle)

        def publish() -> None:
            storage.with_retries(
                lambda: pafs.copy_files(
                    tmp, path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs
                ),
                f"uploading {uri}",
            )

    return tmp, publish


_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")  # characters no file name should hold
MAX_NAME_BYTES = 255  # the longest file name most file systems take (ext4, APFS, NTFS in UTF-16 units)
FILE_MAP = "image_files.csv"  # image_id -> the path written for it, in every yolo-seg / masks-png export


def usable_name(part: str) -> str:
    """A path part as a file name: itself unless it holds control characters (each run becomes ``_``), is
    ``..`` (``_``), or is longer than ``MAX_NAME_BYTES`` in UTF-8 (a prefix plus a hash of the whole)."""
    part = "_" if part == ".." else _CONTROL.sub("_", part)
    if len(part.encode()) <= MAX_NAME_BYTES:
        return part
    digest = hashlib.sha1(part.encode()).hexdigest()[:12]
    return part.encode()[: MAX_NAME_BYTES - 13].decode(errors="ignore") + "~" + digest


def stem_path(image_id: str) -> str:
    """``image_id`` as a relative POSIX path without its extension: ``sub/my phöto 猫 1.png`` ->
    ``sub/my phöto 猫 1``. The image's own names are kept (any script, spaces): YOLO pairs an image with its
    label file by that stem. Only what cannot be a file name changes: ``\\`` separates folders like ``/``,
    empty and ``.`` parts are dropped, and ``usable_name`` applies to each part.
    """
    parts = [p for p in image_id.replace("\\", "/").split("/") if p not in ("", ".")]
    parts = [usable_name(p) for p in parts] or ["_"]
    last = PurePosixPath(parts[-1])
    parts[-1] = last.stem if last.suffix and last.stem else last.name
    return "/".join(parts)


def own_stem(image_id: str) -> str:
    """``image_id`` without its extension, as a POSIX path: what ``stem_path`` gives when no part changes."""
    path = PurePosixPath(image_id.replace("\\", "/").lstrip("/"))
    return path.with_suffix("").as_posix() if path.suffix and path.stem else path.as_posix()


def unique_stems(image_ids: list[str]) -> dict[str, str]:
    """``image_id -> stem path``; raises ValueError when two ids map to the same path."""
    stems: dict[str, str] = {}
    owners: dict[str, str] = {}
    for image_id in image_ids:
        stem = stem_path(image_id)
        if stem in owners:
            raise ValueError(
                f"image ids {owners[stem]!r} and {image_id!r} both export to {stem!r}; "
                "image ids must differ by more than their extension"
            )
        owners[stem] = image_id
        stems[image_id] = stem
    return stems


def write_file_map(out: str, paths: dict[str, str], options: StorageOptions) -> None:
    """``OUT/image_files.csv``: ``image_id,path`` per exported image (``path`` relative to ``OUT``), in
    ``image_id`` order; warns when a name had to change (then the images need that name too for YOLO)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["image_id", "path"])
    writer.writerows(sorted(paths.items()))
    storage.write_bytes(storage.join(out, FILE_MAP), buf.getvalue().encode(), options)
    changed = [i for i in paths if stem_path(i) != own_stem(i)]
    if changed:
        logger.warning(
            "%d image id(s) cannot be used as file names as they are (e.g. %r -> %r); %s maps each image "
            "id to the file written for it",
            len(changed),
            changed[0],
            stem_path(changed[0]),
            storage.join(out, FILE_MAP),
        )
