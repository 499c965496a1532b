"""A labeling worker that outlives jobs (``hqlabel serve``): it loads its models once and labels the batches
of any job whose models are its own; the class list, prompt kind and detector thresholds come with each job.
It also segments single images with given prompts (``hqlabel segment --service``, the review app's click
fixes) with the same segmenter, keeping the last few images' embeddings: one encoder pass per image, one
decoder call per request.

``WarmLabeler`` is Ray-free (tests call it directly); ``hqlabel.jobs.service`` runs it as a named Ray actor.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from hqlabel.platform.config import LabelerConfig, model_differences, segmenter_differences
from hqlabel.platform.rle import encode_masks
from hqlabel.workers.faults import AttemptLog, Failpoints
from hqlabel.workers.tiling import Tiling

if TYPE_CHECKING:
    from hqlabel.segmenters import Prompts

# The models' modules (torch, transformers) are imported where the models load, not with this module: a
# process that only holds the service's actor handles (a ``label --service`` driver, ``segment --service``)
# unpickles this class when it deserializes a handle, and so imports this module, never the models.

_LOADS = 0  # models loaded by this process (a warm actor's stays 1 across jobs; Ray restarts count again)
SEGMENT_CACHE = 8  # image embeddings a warm actor keeps for segment() (ViT-B: ~16 MB each)


class WarmLabeler:
    """``LabelWorker`` with models loaded once, for the batches of many jobs.

    Args:
        config: the service's models (``MODEL_FIELDS``); its per-job fields are only defaults.
        num_threads: torch intra-op threads (``ResourcePlan.actor_threads``).
    """

    def __init__(self, config: LabelerConfig, num_threads: int | None = None) -> None:
        from hqlabel.segmenters.structures import EmbeddingsCache
        from hqlabel.workers.labeler import LabelWorker

        global _LOADS
        self.config = config
        self.worker = LabelWorker(config, num_threads)
        _LOADS += 1
        self.started = time.time()
        self.batches = 0
        self.first_batch: dict[str, float] = {}  # per job id: when its first batch arrived (time.time())
        self.segments = 0  # segment() calls answered
        self.encodes = 0  # of which ran the image encoder (the others found the image's embeddings cached)
        self.images = 0  # of which came with the image (the others named a cached one by its key)
        self._embeddings = EmbeddingsCache(SEGMENT_CACHE)

    def info(self) -> dict:
        """Process id, how many times this process loaded models, Ray node, start time, batches labeled,
        ``segment`` calls (how many of them came with their image, and how many ran the image encoder), and
        the service's models (``LabelerConfig`` as JSON)."""
        from hqlabel.workers.labeler import ray_node_id

        return {
            "pid": os.getpid(),
            "loads": _LOADS,
            "node_id": ray_node_id(),
            "started": self.started,
            "batches": self.batches,
            "first_batch": dict(self.first_batch),
            "segments": self.segments,
            "encodes": self.encodes,
            "images": self.images,
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
        from hqlabel.workers.labeler import class_prompts

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

    def segment(
        self,
        image: np.ndarray | None,
        prompts: Prompts | dict[str, Any],
        settings: LabelerConfig | dict[str, Any],
        *,
        key: str | None = None,
    ) -> dict[str, Any]:
        """HQ-SAM on one image with given prompts, by the service's segmenter (loaded once; a service started
        with ``--prompts boxes`` has one too).

        Args:
            image: H x W x 3 uint8 RGB; None with a ``key`` whose embeddings this actor keeps (a client
                sends the image only when told ``need_image``: a click fix on a large image need not
                cross the network again).
            prompts: ``Prompts`` of N objects (pixels of ``image``), or its fields as nested lists
                (``{"boxes": N x 4 XYXY, "points": N x P x 2 XY, "point_labels": N x P}``, what a client
                without torch sends).
            settings: the caller's segmenter settings (a ``LabelerConfig``, or a dict of some
                ``SEGMENTER_FIELDS``), which must be the service's (``segmenter_differences``).
            key: names ``image`` for the embeddings cache (the last ``SEGMENT_CACHE`` images, checked
                against the image's size): another request with the same key costs one decoder call. None:
                the image is encoded and not kept.

        Returns:
            ``{"masks": N lists of K COCO RLE dicts (H x W, counts bytes), "iou": N x K predicted IoU,
            "size": [H, W], "encoded": whether the image encoder ran}``; K = 1 unless the segmenter's
            multimask mode gives 3. ``{"need_image": True}`` when ``image`` is None and ``key`` is not kept.

        Raises:
            ValueError: other segmenter settings than the service's, or a malformed image or prompts.
        """
        from hqlabel.segmenters import Prompts

        differ = segmenter_differences(self.config, settings)
        if differ:
            raise ValueError(
                f"the labeling service's segmenter differs from the one asked for ({'; '.join(differ)}); "
                "run without --service, or restart the service with these settings (hqlabel serve stop, "
                "serve start)"
            )
        if not isinstance(prompts, Prompts):
            prompts = Prompts(**prompts)
        segmenter = self.worker.labeler.segmenter
        if image is None:
            embeddings = None if key is None else self._embeddings.get(key)
            if embeddings is None:
                return {"need_image": True}
            encoded = False
        else:
            image = np.asarray(image)
            if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
                raise ValueError(f"image must be H x W x 3 uint8 RGB, got shape {image.shape} {image.dtype}")
            embeddings, encoded = self._embeddings.embed(segmenter, image, key)
            self.images += 1
        self.encodes += encoded
        (logits,) = segmenter.predict(embeddings, [prompts])
        masks: list[list[dict[str, Any]]] = []
        for chunk in segmenter.iter_masks(logits):  # n x K x H x W bool, column-major (what RLE reads)
            n, k = chunk.shape[:2]
            rles = encode_masks(chunk.flatten(0, 1).cpu().numpy())
            masks.extend(rles[i * k : (i + 1) * k] for i in range(n))
        self.segments += 1
        return {
            "masks": masks,
            "iou": logits.iou_scores.float().cpu().tolist(),
            "size": [int(v) for v in embeddings.original_sizes[0]],
            "encoded": encoded,
        }
