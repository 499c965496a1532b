"""Loading models from a Hugging Face hub id or a local directory, with errors a user can act on."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


class ModelLoadError(OSError):
    """A model could not be loaded; the message says which one and how to point at a local copy."""


def load_pretrained(loader: Callable[[str], T], name: str, *, what: str, option: str) -> T:
    """Call ``loader(name)`` (a ``from_pretrained``), turning hub/offline failures into ``ModelLoadError``.

    Args:
        loader: e.g. ``SamHQModel.from_pretrained``.
        name: hub id (``org/model``) or local directory.
        what: the model's role for the message ("detector", "segmenter").
        option: the CLI option that selects it ("--detector").
    """
    local = Path(name).expanduser()
    try:
        return loader(str(local) if local.is_dir() else name)
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
            f"cannot load the {what} {name!r}: {hint}. ({type(e).__name__}: {first_line})"
        ) from e
