"""A labeling worker that outlives jobs (``hqlabel serve``): it loads its models once and labels the batches
of any job whose models are its own; the class list, prompt kind and detector thresholds come with each job.

``WarmLabeler`` is Ray-free (tests call it directly); ``hqlabel.jobs.service`` runs it as a named Ray actor.
"""

from __future__ import annotations

import os
import time

import pyarrow as pa

from hqlabel.platform.config import LabelerConfig, model_differences
from hqlabel.workers.faults import AttemptLog, Failpoints
from hqlabel.workers.labeler import LabelWorker, class_prompts, ray_node_id
from hqlabel.workers.tiling import Tiling

_LOADS = 0  # models loaded by this process (a warm actor's stays 1 across jobs; Ray restarts count again)


class WarmLabeler:
    """``LabelWorker`` with models loaded once, for the batches of many jobs.

    Args:
        config: the service's models (``MODEL_FIELDS``); its per-job fields are only defaults.
        num_threads: torch intra-op threads (``ResourcePlan.actor_threads``).
    """

    def __init__(self, config: LabelerConfig, num_threads: int | None = None) -> None:
        global _LOADS
        self.config = config
        self.worker = LabelWorker(config, num_threads)
        _LOADS += 1
        self.started = time.time()
        self.batches = 0
        self.first_batch: dict[str, float] = {}  # per job id: when its first batch arrived (time.time())

    def info(self) -> dict:
        """Process id, how many times this process loaded models, Ray node, start time, batches labeled, and
        the service's models (``LabelerConfig`` as JSON)."""
        return {
            "pid": os.getpid(),
            "loads": _LOADS,
            "node_id": ray_node_id(),
            "started": self.started,
            "batches": self.batches,
            "first_batch": dict(self.first_batch),
            "config": self.config.model_dump(mode="json"),
        }

    def label(
        self,
        batch: pa.Table,
        config: LabelerConfig,
        *,
        job: str = "",
        attempts: AttemptLog | None = None,
        failpoints: str | None = None,
    ) -> pa.Table:
        """``LabelWorker.__call__`` on ``batch`` (``DECODED_SCHEMA`` -> ``RESULT_SCHEMA``) with the job's
        classes, prompts and thresholds (``config``), its attempt records and fault points.

        Raises:
            ValueError: ``config``'s models differ from the service's (``model_differences``).
        """
        differ = model_differences(self.config, config)
        if differ:
            raise ValueError(f"the labeling service runs other models ({'; '.join(differ)})")
        self.first_batch.setdefault(job, time.time())
        worker = self.worker
        labeler = worker.labeler
        labeler.classes = list(config.classes)
        labeler.prompts = class_prompts(labeler.classes, config.synonyms)
        labeler.mask_nms = config.mask_nms
        labeler.tiling = Tiling.from_config(config)
        worker.given_boxes = config.prompts == "boxes"
        detector = worker.labeler.detector
        if detector is not None:
            detector.box_threshold = config.box_threshold
            detector.text_threshold = config.text_threshold
            detector.nms_threshold = config.nms_threshold
            detector.max_detections = config.max_detections
        worker.attempts = attempts
        worker.failpoints = Failpoints(failpoints)
        out = worker(batch)
        self.batches += 1
        return out
