"""Pipeline steps and the thin worker classes that hold models.

Everything here is Ray-free: Ray Data runs these callables in tasks and actor pools (``hqlabel.jobs``
decides placement and resources), and tests call them directly.

The names below are imported on first use: a read/decode/write task process (which imports this package
to find ``decode_batch`` or ``write_parts``) then never imports torch and transformers; only the model
actor does. That saves seconds of CPU per fresh worker process at the start of a job on a small machine.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hqlabel.workers.decode import decode_batch
    from hqlabel.workers.labeler import Labeler, LabelWorker
    from hqlabel.workers.writer import finalize_shard, write_parts

_MODULES = {
    "decode_batch": "hqlabel.workers.decode",
    "Labeler": "hqlabel.workers.labeler",
    "LabelWorker": "hqlabel.workers.labeler",
    "finalize_shard": "hqlabel.workers.writer",
    "write_parts": "hqlabel.workers.writer",
}

__all__ = ["LabelWorker", "Labeler", "decode_batch", "finalize_shard", "write_parts"]


def __getattr__(name: str) -> Any:
    if name not in _MODULES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_MODULES[name]), name)
