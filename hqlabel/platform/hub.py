"""Loading models from a Hugging Face hub id or a local directory, with errors a user can act on, and pinning
them: ``model_revision`` says which version of a model a job uses (a hub commit hash, or a fingerprint of a
local directory's or checkpoint file's files), so that a resumed job loads the same one."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


class ModelLoadError(OSError):
    """A model could not be loaded; the message says which one and how to point at a local copy."""


LOCAL_PREFIX = "files:"  # a local model's "revision": a fingerprint of its files, not a hub revision


def is_hub_revision(revision: str | None) -> bool:
    """Whether ``revision`` is one to pass to the hub (not None, not a local fingerprint)."""
    return revision is not None and not revision.startswith(LOCAL_PREFIX)


def load_pretrained(
    loader: Callable[..., T], name: str, *, what: str, option: str, revision: str | None = None
) -> T:
    """Call ``loader(name)`` (a ``from_pretrained``), turning hub/offline failures into ``ModelLoadError``.

    Args:
        loader: e.g. ``SamHQModel.from_pretrained``.
        name: hub id (``org/model``) or local directory.
        what: the model's role for the message ("detector", "segmenter").
        option: the CLI option that selects it ("--detector").
        revision: a hub commit hash (or branch, tag) passed on as ``revision=`` for a hub id; ignored for a
            local directory, and so is a local fingerprint (``model_revision``).
    """
    local = Path(name).expanduser()
    kwargs = {"revision": revision} if is_hub_revision(revision) and not local.is_dir() else {}
    try:
        return loader(str(local) if local.is_dir() else name, **kwargs)
    except (OSError, ValueError) as e:
        if local.exists() and not local.is_dir():
            hint = (
                f"{name} is a file; pass `{option} DIR` with the directory that holds config.json and weights"
            )
        elif local.is_dir():
            hint = (
                f"the directory {name} does not hold a complete model (config.json + weights); fix `{option}`"
            )
        elif name.startswith(("/", "./", "../", "~")):
            hint = f"the path {name} does not exist; pass `{option}` an existing model directory or a hub id"
        else:
            hint = (
                f"{name!r} is not a local directory and could not be fetched from the Hugging Face hub "
                "(offline, or not in the cache). On a machine with internet run "
                f"`hf download {name} --local-dir DIR`, copy DIR here and pass `{option} DIR`; "
                "or use `--preset tiny-random` for an offline smoke run with random weights"
            )
        first_line = (str(e).strip().splitlines() or [""])[0]
        raise ModelLoadError(
            f"cannot load the {what} {name!r}{f' at revision {revision}' if kwargs else ''}: {hint}. "
            f"({type(e).__name__}: {first_line})"
        ) from e


def _files_fingerprint(path: Path) -> str:
    """``files:`` + a digest of the relative names, sizes and modification times of the files at ``path`` (a
    file, or a directory's files, recursively; hidden ones left out), which changes when one is replaced."""
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        relative = file.relative_to(path).as_posix() if file != path else file.name
        if any(part.startswith(".") for part in Path(relative).parts):
            continue
        status = file.stat()
        digest.update(f"{relative}\t{status.st_size}\t{status.st_mtime_ns}\n".encode())
    return LOCAL_PREFIX + digest.hexdigest()[:32]


def model_revision(name: str, revision: str | None = None, *, what: str, option: str) -> str:
    """The version of the model ``name`` a job uses, to record and to load again on resume.

    A hub id: the commit hash that ``revision`` (None: the default branch) points to in the local Hugging Face
    cache (``HF_HUB_CACHE``), where loading it (``load_pretrained``, online or offline) has put it; a commit
    hash comes back as is once its snapshot is in the cache. A local directory or checkpoint file has no hub
    revision: ``files:`` and a fingerprint of its files' names, sizes and modification times.

    Raises:
        ModelLoadError: a hub id with no snapshot for ``revision`` in the cache (load it first).
    """
    local = Path(name).expanduser()
    if local.exists():
        return _files_fingerprint(local)
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(name, "config.json", revision=revision)
    if not isinstance(found, (str, os.PathLike)):
        raise ModelLoadError(
            f"cannot pin the {what} {name!r}{f' at revision {revision}' if revision else ''}: no snapshot of "
            f"it in the Hugging Face cache (HF_HUB_CACHE); load it once online, or pass `{option} DIR`"
        )
    return Path(found).parent.name  # HF_HUB_CACHE/models--org--name/snapshots/COMMIT/config.json
