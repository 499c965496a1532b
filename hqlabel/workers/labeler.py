"""Detector boxes -> HQ-SAM masks -> RLE instance rows. ``Labeler`` is the Ray-free core; ``LabelWorker`` is
the callable class that Ray Data instantiates once per actor (it loads the models in ``__init__``)."""

from __future__ import annotations

import logging
import os
import sys

import numpy as np
import pyarrow as pa
import torch

from hqlabel.detectors import Detector, TransformersDetector, build_detector
from hqlabel.platform.config import LabelerConfig
from hqlabel.platform.rle import encode_masks
from hqlabel.platform.schema import RESULT_SCHEMA
from hqlabel.segmenters import HQSamSegmenter, build_segmenter
from hqlabel.segmenters.hq_sam import RESIZE_BUDGET_BYTES
from hqlabel.workers.faults import (
    IMAGE_DEATHS,
    AttemptLog,
    BatchAttempt,
    Failpoints,
    image_key,
    in_ray_actor,
    is_device_error,
    is_transient_label_error,
)
from hqlabel.workers.overlap import BackgroundQueue, encode_with_areas
from hqlabel.workers.quality import dedupe_instances, mask_box_iou
from hqlabel.workers.tiling import Tiling, detect_tiled

logger = logging.getLogger(__name__)

DEVICE_ERROR_EXIT_CODE = 70  # the labeling actor's process ends with it after a sticky device error


def class_prompts(classes: list[str], synonyms: dict[str, list[str]] | None) -> list[list[str]]:
    """Per class, what the detector is prompted with: its synonyms (``LabelerConfig.synonyms``), or its
    name."""
    return [list((synonyms or {}).get(c, [c])) for c in classes]


def resolve_device(device: str) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; anything else as given (validated)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but CUDA is not available here; use --device cpu")
    return resolved


def build_models(
    config: LabelerConfig,
) -> tuple[TransformersDetector | None, HQSamSegmenter]:
    """The detector and segmenter that ``config`` names (``preset`` overrides the model ids); no detector
    when the prompts are given boxes."""
    detector = None
    if config.prompts != "boxes":
        detector = build_detector(
            config.detector,
            preset=config.preset,
            revision=config.detector_revision,
            box_threshold=config.box_threshold,
            text_threshold=config.text_threshold,
            nms_threshold=config.nms_threshold,
            max_detections=config.max_detections,
            device=resolve_device(config.device),
            precision=config.precision,
            compile=config.compile,
            preprocess=config.preprocess,
        )
    return detector, config_segmenter(config)


def config_segmenter(config: LabelerConfig) -> HQSamSegmenter:
    """The segmenter that ``config`` names (``preset`` overrides the model id), with its HQ weights,
    revision, decoding settings, device, precision, compile and preprocessing."""
    return build_segmenter(
        config.segmenter,
        preset=config.preset,
        hq_weights=config.hq_weights,
        revision=config.segmenter_revision,
        hq_token_only=config.hq_token_only,
        mask_threshold=config.mask_threshold,
        chunk_size=config.decoder_chunk_size,
        multimask=config.multimask,
        device=resolve_device(config.device),
        precision=config.precision,
        compile=config.compile,
        preprocess=config.preprocess,
    )


class Labeler:
    """Labels images: detect ``classes`` (or take given boxes), then one HQ-SAM mask per box, with one
    encoder pass per image.

    Masks are upsampled to the output size and encoded a chunk at a time, as many prompts per chunk as
    ``resize_budget`` bytes of float32 working memory allow, in strips when one mask alone is larger
    (``HQSamSegmenter.iter_masks``); the budget changes the memory, never the masks.
    """

    def __init__(
        self,
        detector: Detector | None,
        segmenter: HQSamSegmenter,
        classes: list[str],
        *,
        resize_budget: int = RESIZE_BUDGET_BYTES,
        tiling: Tiling | None = None,
        synonyms: dict[str, list[str]] | None = None,
        mask_nms: float | None = None,
    ) -> None:
        self.detector = detector
        self.segmenter = segmenter
        self.classes = list(classes)
        self.resize_budget = resize_budget
        self.tiling = tiling  # detect on tiles of images over tiling.size (hqlabel.workers.tiling)
        self.encoder = BackgroundQueue()  # RLE + areas in a thread while the device works on (overlap.py)
        # what the detector is prompted with: per class, its synonyms (``LabelerConfig.synonyms``) or its name
        self.prompts = class_prompts(self.classes, synonyms)
        self.mask_nms = mask_nms

    @classmethod
    def from_config(cls, config: LabelerConfig) -> Labeler:
        detector, segmenter = build_models(config)
        return cls(
            detector,
            segmenter,
            config.classes,
            tiling=Tiling.from_config(config),
            synonyms=config.synonyms,
            mask_nms=config.mask_nms,
        )

    def _detect(
        self, images: list[np.ndarray]
    ) -> list[tuple[torch.Tensor, torch.Tensor, list[str], torch.Tensor | None]]:
        if self.detector is None:
            raise RuntimeError("this Labeler has no detector (prompts='boxes'); pass the boxes to label()")
        detections = (
            self.detector.detect(images, self.prompts)
            if self.tiling is None
            else detect_tiled(self.detector, images, self.prompts, self.tiling)
        )
        return [(d.boxes, d.scores, [self.classes[int(k)] for k in d.labels], d.masks) for d in detections]

    def label(
        self,
        images: list[np.ndarray],
        output_sizes: list[tuple[int, int]] | None = None,
        boxes: list[tuple[list, list[str]]] | None = None,
    ) -> list[list[dict]]:
        """Label a batch of images.

        Args:
            images: H x W x 3 uint8 RGB (working resolution).
            output_sizes: per image, the (H, W) that boxes and masks are reported in (the original
                resolution when ``images`` are downscaled copies); defaults to each image's own size.
            boxes: per image, given prompts ``(N x 4 XYXY boxes in output-size pixels, N labels)``: the
                detector is skipped and each box gets score 1.0.

        Returns:
            Per image, its instances as dicts with the fields of ``INSTANCE_TYPE`` (``instance_id`` 0..n-1,
            by decreasing detector score; ``mask`` COCO RLE at the output size; ``sam3_mask`` the SAM 3
            detector's own mask, RLE at the output size, or None for other detectors and given boxes; the
            quality signals of ``hqlabel.workers.quality``), without the duplicates that ``mask_nms`` removes.
        """
        output_sizes = output_sizes or [image.shape[:2] for image in images]
        scales = [
            torch.tensor([out_w / w, out_h / h] * 2)
            for (h, w), (out_h, out_w) in zip((im.shape[:2] for im in images), output_sizes, strict=True)
        ]
        if boxes is None:
            prompts = self._detect(images)
        else:
            prompts = [
                (
                    torch.as_tensor(b, dtype=torch.float32).reshape(-1, 4) / scale,
                    torch.ones(len(b)),
                    list(names),
                    None,
                )
                for (b, names), scale in zip(boxes, scales, strict=True)
            ]
        todo = [i for i, (b, *_) in enumerate(prompts) if len(b)]
        results: list[list[dict]] = [[] for _ in images]
        if not todo:
            return results
        embeddings = self.segmenter.embed([images[i] for i in todo])
        logits = self.segmenter.predict_boxes(embeddings, [prompts[i][0] for i in todo])
        encoding = []  # per image: its chunks' encodings (futures, in order) and IoU scores
        for i, mask_logits in zip(todo, logits, strict=True):
            signals = self.segmenter.quality_signals(mask_logits)  # filled while the chunks are made
            chunks = self.segmenter.iter_masks(
                mask_logits, output_sizes[i], budget_bytes=self.resize_budget, signals=signals
            )
            futures = [self.encoder.submit(encode_with_areas, chunk[:, 0].cpu().numpy()) for chunk in chunks]
            encoding.append((i, futures, mask_logits.iou_scores[:, 0].float().cpu().tolist(), signals))
        for i, futures, iou, signals in encoding:
            work_boxes, scores, names, detector_masks = prompts[i]
            out_boxes = work_boxes * scales[i]
            encoded = [pair for future in futures for pair in future.result()]
            rles = [rle for rle, _ in encoded]
            stability, hq_sam_iou = (t[:, 0].cpu().tolist() for t in signals.result())
            box_iou = mask_box_iou(rles, out_boxes.numpy())
            sam3 = (
                [None] * len(encoded)
                if detector_masks is None
                else self._detector_rles(detector_masks, output_sizes[i])
            )
            for k, (rle, area) in enumerate(encoded):
                results[i].append(
                    {
                        "instance_id": k,
                        "label": names[k],
                        "score": float(scores[k]),
                        "box": [float(v) for v in out_boxes[k]],
                        "mask": rle,
                        "area": area,
                        "pred_iou": iou[k],
                        "sam3_mask": sam3[k],
                        "stability": stability[k],
                        "hq_sam_iou": hq_sam_iou[k],
                        "box_iou": box_iou[k],
                    }
                )
            results[i] = dedupe_instances(results[i], self.mask_nms)
        return results

    def _detector_rles(self, probs: torch.Tensor, size: tuple[int, int]) -> list[dict]:
        """The detector's own masks (N x m x m probabilities, SAM 3) as RLE at ``size``, a few at a time."""
        from hqlabel.detectors.sam3 import masks_at

        per_mask = 4 * size[0] * size[1]  # float32 while resized
        step = max(1, self.resize_budget // max(per_mask, 1))
        return [
            rle
            for start in range(0, len(probs), step)
            for rle in encode_masks(masks_at(probs[start : start + step], size).numpy())
        ]


def ray_node_id() -> str | None:
    """Hex id of the Ray node this process runs on, or None outside Ray.

    Never imports Ray: a process that runs Ray work has it imported and initialised already, and the worker
    classes also run without Ray (tests, benchmarks).
    """
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return None
    return ray.get_runtime_context().get_node_id()


class LabelWorker:
    """Ray Data actor UDF: ``DECODED_SCHEMA`` batch in, ``RESULT_SCHEMA`` batch out (one row per image).

    Rows that arrive with an error pass through. If labeling a batch raises, each image is retried alone so
    that only the image at fault becomes an error row (stage ``"label"``; ``retryable`` when a retry may
    cure it: ``faults.is_transient_label_error``). A sticky device error ends the actor's process instead,
    so that Ray replaces it and retries the batch. With ``attempts``, every batch is labeled under an
    attempt record that bounds how often it may kill the actor (``hqlabel.workers.faults``). Every row names
    the Ray node that labeled it (``node_id``), so that a job can tell where it ran.

    Args:
        attempts: the job's attempt records (``OUT/_tmp/attempts``); None: no bound on crashes (tests,
            benchmarks, anything outside a job).
        failpoints: fault injection for tests (``faults.Failpoints``, the value of ``HQLABEL_FAILPOINTS``).
    """

    def __init__(
        self,
        config: LabelerConfig,
        num_threads: int | None = None,
        *,
        attempts: AttemptLog | None = None,
        failpoints: str | None = None,
    ) -> None:
        if num_threads:
            torch.set_num_threads(num_threads)
        self.labeler = Labeler.from_config(config)
        self.given_boxes = config.prompts == "boxes"
        self.node_id = ray_node_id()
        self.attempts = attempts
        self.failpoints = Failpoints(failpoints)

    def _label(self, ids: list[str], images, sizes, given) -> list[list[dict]]:
        try:
            self.failpoints.check(ids)
            return self.labeler.label(images, sizes, given)
        except Exception as e:
            if is_device_error(e):
                self._replace_actor(e)  # in a Ray actor; elsewhere the error goes to the caller
                raise
            raise

    def _replace_actor(self, error: BaseException) -> None:
        """End this process after a sticky device error: Ray sees the actor die, starts a fresh one (within
        the job's ``max_restarts``) and retries the batch there. Exiting by hand (``ray.actor.exit_actor``)
        would tell Ray not to restart it. Outside a Ray actor (a test, a benchmark) this returns and the
        caller gets the error."""
        if not in_ray_actor():
            return
        logger.error(
            "the device of this labeling actor is broken (%s); exiting so that Ray replaces it", error
        )
        for handler in logging.getLogger().handlers:
            handler.flush()
        sys.stderr.flush()
        os._exit(DEVICE_ERROR_EXIT_CODE)

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        out = [
            {
                "shard": r["shard"],
                "row": r["row"],
                "image_id": r["image_id"],
                "height": r["orig_height"],
                "width": r["orig_width"],
                "instances": None,
                "error_stage": r["error_stage"],
                "error": r["error"],
                "retryable": r.get("retryable"),
                "node_id": self.node_id,
            }
            for r in rows
        ]
        if self.given_boxes:
            for r, o in zip(rows, out, strict=True):
                if r["error"] is None and r["boxes"] is None:
                    o.update(
                        error_stage="read", error="ValueError: no boxes for --prompts boxes", retryable=False
                    )
        todo = [i for i, o in enumerate(out) if o["error"] is None]
        if not todo:
            return pa.Table.from_pylist(out, schema=RESULT_SCHEMA)
        keys = [image_key(rows[i]["shard"], rows[i]["row"], rows[i]["image_id"]) for i in todo]
        ids = [rows[i]["image_id"] for i in todo]
        images = [
            np.frombuffer(rows[i]["pixels"], np.uint8).reshape(rows[i]["height"], rows[i]["width"], 3)
            for i in todo
        ]
        sizes = [(rows[i]["orig_height"], rows[i]["orig_width"]) for i in todo]
        given = None
        if self.given_boxes:  # boxes from the dataset; unlabeled ones are called "object"
            given = [
                (rows[i]["boxes"], rows[i]["labels"] or ["object"] * len(rows[i]["boxes"])) for i in todo
            ]
        attempt = None if self.attempts is None else self.attempts.start(keys)
        labeled = None
        if attempt is None or not attempt.isolating:
            try:
                labeled = self._label(ids, images, sizes, given)
            except Exception:  # isolate the image at fault; each failure is recorded as an error row below
                logger.warning("labeling a batch of %d images failed; retrying them one by one", len(todo))
        if labeled is None:
            labeled = [
                self._label_alone(
                    out[i], attempt, key, image_id, image, size, None if given is None else given[k]
                )
                for k, (i, key, image_id, image, size) in enumerate(
                    zip(todo, keys, ids, images, sizes, strict=True)
                )
            ]
        if attempt is not None:
            attempt.finish()
        for i, instances in zip(todo, labeled, strict=True):
            if instances is not None:
                out[i]["instances"] = instances
        return pa.Table.from_pylist(out, schema=RESULT_SCHEMA)

    def _label_alone(
        self, out: dict, attempt: BatchAttempt | None, key: str, image_id: str, image, size, given
    ) -> list[dict] | None:
        """Label one image of a batch on its own: its instances, or None with the error recorded in ``out``.

        Under an isolating ``attempt`` the record names the image first, and an image that already killed
        the actor ``IMAGE_DEATHS`` times is not labeled again; on the last attempt allowed none is."""
        if attempt is not None and attempt.isolating:
            died = attempt.killed_by(key)
            if died >= IMAGE_DEATHS or attempt.giving_up:
                why = (
                    f"the labeling actor died {died} time(s) labeling this image alone"
                    if died
                    else f"the labeling actor died {attempt.deaths} times on this image's batch"
                )
                out.update(
                    error_stage="label",
                    error=f"ActorDiedError: {why} (a native crash or out of memory)",
                    retryable=True,
                )
                return None
            attempt.labeling(key)
        try:
            return self._label([image_id], [image], [size], None if given is None else [given])[0]
        except Exception as e:
            logger.warning("labeling %s failed: %s", image_id, e)
            out.update(
                error_stage="label", error=f"{type(e).__name__}: {e}", retryable=is_transient_label_error(e)
            )
            return None
