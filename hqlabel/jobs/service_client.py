"""The warm labeling service's segmenter for one image at a time: ``hqlabel segment --service`` and the review
app's click fixes (``hqlabel review --service``).

``SegmentService`` joins the service's cluster (``service.connect``), checks that the service's segmenter is
the caller's (``segmenter_differences``) and sends each request to one labeling actor
(``WarmLabeler.segment``), picked by the request's key: the same image goes to the same actor, which keeps
its embeddings (one encoder pass per image). Images are decoded by the caller; masks come back as COCO RLE.
"""

from __future__ import annotations

import hashlib
import zlib
from typing import Any

import numpy as np

from hqlabel.platform.config import SEGMENTER_FIELDS, LabelerConfig, segmenter_differences
from hqlabel.platform.rle import decode_mask, mask_area

__all__ = ["SegmentService", "ServiceFixer", "decode_result", "fix_prompts", "image_key"]


def image_key(image: np.ndarray) -> str:
    """Names decoded pixels for the service's embeddings cache: their size and a digest of them (the same
    pixels share embeddings, whoever sends them; ~40 ms for 12 megapixels)."""
    digest = hashlib.blake2b(np.ascontiguousarray(image).data, digest_size=16).hexdigest()
    return f"pixels:{image.shape[0]}x{image.shape[1]}:{digest}"


class SegmentService:
    """A client of the service's segmenter.

    Args:
        address: the service's cluster (``service.service_address``: this, else ``RAY_ADDRESS``, else the
            one ``serve start`` recorded).
        settings: the caller's segmenter settings (a ``LabelerConfig``, or a dict of some
            ``SEGMENTER_FIELDS``).
        instead: what the caller can do instead when the service's segmenter differs (for the error).

    Raises:
        ValueError: no service runs there, or its segmenter differs from ``settings`` (one line each).
    """

    def __init__(
        self,
        address: str | None,
        settings: LabelerConfig | dict[str, Any],
        *,
        instead: str = "run without --service",
    ) -> None:
        import ray

        from hqlabel.jobs.service import NO_SERVICE, connect, find_service

        self.address = connect(address)
        service = find_service()
        if service is None:
            raise ValueError(NO_SERVICE.format(where=f" at {self.address}"))
        description = ray.get(service.describe.remote())
        self.config = LabelerConfig.model_validate(description["config"])
        differ = segmenter_differences(self.config, settings)
        if differ:
            raise ValueError(
                f"the labeling service at {self.address} runs another segmenter ({'; '.join(differ)}); "
                f"{instead}, or restart the service with these settings (hqlabel serve stop, serve start)"
            )
        self.settings = settings
        self.workers = ray.get(service.workers.remote())

    def models(self) -> dict[str, Any]:
        """The service's segmenter settings (``SEGMENTER_FIELDS``) and device, JSON-ready."""
        config = self.config.model_dump(mode="json")
        return {name: config[name] for name in (*SEGMENTER_FIELDS, "device")}

    def segment(self, image: np.ndarray, prompts: dict[str, Any], key: str) -> dict[str, Any]:
        """``WarmLabeler.segment`` on the labeling actor that ``key`` picks (crc32 of the key). The prompts
        go first without the image: the image follows only when that actor does not keep the key's
        embeddings (the first request for an image, or after the actor's cache moved on), so another click
        on the same image sends no pixels.

        Args:
            image: H x W x 3 uint8 RGB.
            prompts: ``{"boxes": N x 4, "points": N x P x 2, "point_labels": N x P}`` nested lists (pixels).
            key: names the image for the actor's embeddings cache.

        Returns:
            ``WarmLabeler.segment``'s answer (masks as RLE, predicted IoU, size, whether it encoded).
        """
        import ray

        worker = self.workers[zlib.crc32(key.encode()) % len(self.workers)]
        result = ray.get(worker.segment.remote(None, prompts, self.settings, key=key))
        if result.get("need_image"):
            result = ray.get(worker.segment.remote(image, prompts, self.settings, key=key))
        return result


def decode_result(result: dict[str, Any]) -> tuple[np.ndarray, list[list[float]]]:
    """``WarmLabeler.segment``'s answer -> ``(N x K x H x W bool masks, N x K predicted IoU)``."""
    height, width = result["size"]
    masks = [[decode_mask(rle, max_pixels=None) for rle in per] for per in result["masks"]]
    k = len(masks[0]) if masks else 1
    stacked = np.array(masks, dtype=bool).reshape(len(masks), k, height, width)
    return stacked, result["iou"]


class ServiceFixer:
    """Click fixes on the service (``hqlabel review --service``): ``Fixer``'s interface, the service's model.

    Args:
        labeler: the job's labeler config (``job.json`` ``spec.labeler``); its segmenter settings must be the
            service's.
        address: the service's cluster (as ``SegmentService``).

    Raises:
        ValueError: no service runs, or its segmenter is not the job's.
    """

    def __init__(self, labeler: dict[str, Any], address: str | None = None) -> None:
        config = LabelerConfig(**labeler)
        settings = {name: getattr(config, name) for name in SEGMENTER_FIELDS}
        self.client = SegmentService(address, settings, instead="review without --service (a local model)")

    def fix(
        self,
        image_id: str,
        image: np.ndarray,
        box: list[float],
        points: list[tuple[float, float, int]],
    ) -> tuple[dict[str, Any], int, float]:
        """As ``Fixer.fix``: ``(mask as COCO RLE at H x W, its area, HQ-SAM's predicted IoU)`` of the object
        in ``box`` (XYXY pixels) given the clicks ``points`` ((x, y, label) pixels, 1 = object, 0 = not).
        The service keeps the image's embeddings under a digest of its pixels (``image_id`` is not needed:
        the same id may name other pixels in another job)."""
        result = self.client.segment(image, fix_prompts(box, points), key=image_key(image))
        rle = result["masks"][0][0]
        return rle, mask_area(rle), float(result["iou"][0][0])


def fix_prompts(box: list[float], points: list[tuple[float, float, int]]) -> dict[str, Any]:
    """A click fix's prompts (one object: its box and the clicks) as ``WarmLabeler.segment`` takes them."""
    prompts: dict[str, Any] = {"boxes": [[float(v) for v in box]]}
    if points:
        prompts["points"] = [[[float(x), float(y)] for x, y, _ in points]]
        prompts["point_labels"] = [[int(v) for _, _, v in points]]
    return prompts
