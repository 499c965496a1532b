"""HQLabel: text-prompted dataset labeling, Grounding DINO boxes -> HQ-SAM masks, distributed with Ray.

The Python API (every name is imported on first use, so ``import hqlabel`` loads neither torch nor Ray):

* jobs, as the command line runs them: ``label``, ``curate``, ``train``, ``evaluate``, ``export``
  (``hqlabel.jobs.functions``);
* in-memory labeling without Ray: ``Labeler.from_pretrained(...)(images)`` -> ``LabelResult``;
* reading a labels folder: ``read_labels`` (``(image_id, LabelResult)``), ``read_detections``
  (``(image_id, supervision.Detections)``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from hqlabel.api.labeler import Labeler
    from hqlabel.api.results import LabelResult, read_detections, read_labels
    from hqlabel.formats import ExportSummary
    from hqlabel.jobs.functions import curate, evaluate, export, label, train
    from hqlabel.jobs.label import LabelSummary

_MODULES = {
    "Labeler": "hqlabel.api.labeler",
    "LabelResult": "hqlabel.api.results",
    "read_labels": "hqlabel.api.results",
    "read_detections": "hqlabel.api.results",
    "label": "hqlabel.jobs.functions",
    "curate": "hqlabel.jobs.functions",
    "train": "hqlabel.jobs.functions",
    "evaluate": "hqlabel.jobs.functions",
    "export": "hqlabel.jobs.functions",
    "LabelSummary": "hqlabel.jobs.label",
    "ExportSummary": "hqlabel.formats",
}

__all__ = [
    "ExportSummary",
    "LabelResult",
    "LabelSummary",
    "Labeler",
    "__version__",
    "curate",
    "evaluate",
    "export",
    "label",
    "read_detections",
    "read_labels",
    "train",
]


def __getattr__(name: str) -> Any:
    if name not in _MODULES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_MODULES[name]), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
