"""Untrusted image references stay inside their dataset.

A dataset's rows name the images they read: a Parquet ``uri`` column, a COCO ``file_name``, a folder's files
(symlinked folders followed). Those names come from whoever made the dataset, while the reads use the
cluster's credentials and ``curate`` copies what it read into its output; so a reference must stay inside
the dataset's root (the folder listed, the Parquet files' folder, the COCO images root) or under a prefix the
job's owner allowed (``--allow-prefix``). ``ReferencePolicy.check`` says which, before anything is read.

Normalisation: an ``s3://bucket/key`` URI by its key's ``/`` segments (``.`` and empty ones dropped, ``..``
removes the one before; none may climb above the bucket); a local path or ``file://`` URI made absolute and
normalised like ``os.path.abspath`` (``~`` expanded, as ``storage.resolve`` does). The result must be the root
or under it (``root + "/"``, so ``/data/setX`` is not under ``/data/set``), or under an allowed prefix. Local
paths are also compared by ``os.path.realpath``, so a symlink inside the root that leads out is refused (S3
has no symlinks). A symlink swapped in between the check and the read is not caught.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

from hqlabel.platform import storage

__all__ = ["ReferencePolicy", "RefusedReference", "normalise"]


class RefusedReference(ValueError):
    """An image reference that leaves its dataset (the message names it, the reason and the fix)."""


def _normalise_s3(uri: str) -> str:
    bucket, _, key = uri[len("s3://") :].partition("/")
    if not bucket or bucket in (".", ".."):
        raise RefusedReference(f"{uri!r} names no bucket; an S3 reference is s3://bucket/key")
    parts: list[str] = []
    for segment in key.split("/"):
        if segment in ("", "."):
            continue
        if segment == "..":
            if not parts:
                raise RefusedReference(f"{uri!r} climbs above its bucket with '..'")
            parts.pop()
        else:
            parts.append(segment)
    return f"s3://{bucket}/{'/'.join(parts)}" if parts else f"s3://{bucket}"


def normalise(uri: str) -> str:
    """``uri`` with its ``.`` and ``..`` segments resolved: ``s3://bucket[/key]`` for S3, an absolute local
    path for a local path or ``file://`` URI (relative ones against the working directory).

    Raises:
        RefusedReference: ``..`` climbs above the bucket, or the scheme is neither ``s3://`` nor ``file://``.
    """
    if storage.is_s3(uri):
        return _normalise_s3(uri)
    if "://" in uri and not uri.startswith("file://"):
        raise RefusedReference(f"{uri!r}: only s3://, file:// and local paths can be read")
    return os.path.normpath(storage.resolve(uri)[1])  # the path storage reads, with ``..`` resolved


def _under(uri: str, root: str) -> bool:
    return uri == root or uri.startswith(root if root.endswith("/") else f"{root}/")


@dataclass(frozen=True)
class ReferencePolicy:
    """Which image references a job may read: those under ``root`` (the dataset root) or under one of
    ``allowed`` (prefixes: local paths, ``file://`` or ``s3://`` URIs). Both are normalised when the policy
    is made (``normalise``: relative local paths against this process's working directory), so a policy
    made in the driver means the same in every worker.

    Raises:
        ValueError: the root or a prefix is empty, or not a local path, ``file://`` or ``s3://bucket`` URI.
    """

    root: str
    allowed: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for prefix in (self.root, *self.allowed):
            if not prefix:
                raise ValueError("empty dataset root or allowed prefix; give a folder, file:// or s3:// URI")
        object.__setattr__(self, "root", normalise(self.root))
        object.__setattr__(self, "allowed", tuple(normalise(prefix) for prefix in self.allowed))

    @functools.cached_property
    def _real_prefixes(self) -> tuple[str, ...]:
        """The local root and prefixes with their symlinks resolved (S3 has none)."""
        prefixes = (self.root, *self.allowed)
        return tuple(os.path.realpath(p) for p in prefixes if not storage.is_s3(p))

    def check(self, uri: str) -> str:
        """The normalised ``uri`` (``normalise``): read that, not ``uri``.

        Raises:
            RefusedReference: it is outside the root and the allowed prefixes, climbs out with ``..``, or
                leads out through a symlink; the message says which and how to allow it.
        """
        normal = normalise(uri)
        if not any(_under(normal, prefix) for prefix in (self.root, *self.allowed)):
            raise RefusedReference(
                f"{uri!r}{f' ({normal})' if normal != uri else ''} is outside the dataset root {self.root!r}"
                + (f" and the allowed prefixes {list(self.allowed)}" if self.allowed else "")
                + "; references must stay inside the dataset, or pass --allow-prefix to allow another place"
            )
        if not storage.is_s3(normal):
            real = os.path.realpath(normal)
            if not any(_under(real, prefix) for prefix in self._real_prefixes):
                raise RefusedReference(
                    f"{uri!r} leads outside the dataset root {self.root!r} through a symlink; references "
                    "must stay inside the dataset, or pass --allow-prefix to allow where it leads"
                )
        return normal
