"""The data the segmenter API passes around: image embeddings, prompts, and mask logits."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


@dataclass
class ImageEmbeddings:
    """Encoder outputs for a batch of B images.

    Attributes:
        image_embeddings: B x C x h x w (C = 256, h = w = 64 for the released models).
        intermediate_embeddings: per global-attention ViT block, B x h x w x D; HQ-SAM uses the first.
            Empty for plain SAM.
        original_sizes: per image (H, W) of the image that was embedded.
        reshaped_sizes: per image (H', W') after the longest-side resize, before padding.
        hq: whether these come from an HQ-SAM encoder (then the intermediate embeddings are required).
    """

    image_embeddings: torch.Tensor
    intermediate_embeddings: list[torch.Tensor]
    original_sizes: list[tuple[int, int]]
    reshaped_sizes: list[tuple[int, int]]
    hq: bool = True

    def __post_init__(self) -> None:
        if self.hq and not self.intermediate_embeddings:
            raise ValueError(
                "HQ-SAM needs the intermediate ViT embeddings next to the image embeddings; without them the "
                "HQ fusion branch is skipped. Build ImageEmbeddings with HQSamSegmenter.embed()"
            )
        batch = self.image_embeddings.shape[0]
        sizes = {len(self.original_sizes), len(self.reshaped_sizes)}
        sizes |= {e.shape[0] for e in self.intermediate_embeddings}
        if sizes != {batch}:
            raise ValueError(f"ImageEmbeddings parts disagree on the batch size: {sorted(sizes | {batch})}")

    def __len__(self) -> int:
        return self.image_embeddings.shape[0]

    def __getitem__(self, i: int) -> ImageEmbeddings:
        return ImageEmbeddings(
            self.image_embeddings[i : i + 1],
            [e[i : i + 1] for e in self.intermediate_embeddings],
            [self.original_sizes[i]],
            [self.reshaped_sizes[i]],
            self.hq,
        )


@dataclass
class Prompts:
    """Prompts for N objects of one image; each given field has N rows. Coordinates are pixels of the
    embedded image.

    Attributes:
        boxes: N x 4, XYXY.
        points: N x P x 2, XY.
        point_labels: N x P: 1 foreground, 0 background, -10 padding (ignored). Defaults to all 1.
        masks: N x h x w low-resolution mask logits from an earlier prediction (``MaskLogits.logits[:, k]``).
    """

    boxes: torch.Tensor | None = None
    points: torch.Tensor | None = None
    point_labels: torch.Tensor | None = None
    masks: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.boxes is None and self.points is None and self.masks is None:
            raise ValueError("Prompts needs boxes, points or masks")
        if self.boxes is not None:
            self.boxes = torch.as_tensor(self.boxes, dtype=torch.float32)
            if self.boxes.ndim != 2 or self.boxes.shape[-1] != 4:
                raise ValueError(f"boxes must be N x 4 XYXY, got shape {tuple(self.boxes.shape)}")
        if self.points is not None:
            self.points = torch.as_tensor(self.points, dtype=torch.float32)
            if self.points.ndim != 3 or self.points.shape[-1] != 2:
                raise ValueError(f"points must be N x P x 2, got shape {tuple(self.points.shape)}")
            if self.point_labels is None:
                self.point_labels = torch.ones(self.points.shape[:2], dtype=torch.int64)
            self.point_labels = torch.as_tensor(self.point_labels, dtype=torch.int64)
            if self.point_labels.shape != self.points.shape[:2]:
                raise ValueError(
                    f"point_labels must be N x P = {tuple(self.points.shape[:2])}, "
                    f"got {tuple(self.point_labels.shape)}"
                )
        elif self.point_labels is not None:
            raise ValueError("point_labels given without points")
        if self.masks is not None:
            self.masks = torch.as_tensor(self.masks, dtype=torch.float32)
            if self.masks.ndim != 3:
                raise ValueError(
                    f"masks must be N x h x w low-res logits, got shape {tuple(self.masks.shape)}"
                )
        counts = {len(t) for t in (self.boxes, self.points, self.masks) if t is not None}
        if len(counts) != 1:
            raise ValueError(f"boxes, points and masks must describe the same objects; got counts {counts}")

    def __len__(self) -> int:
        return next(len(t) for t in (self.boxes, self.points, self.masks) if t is not None)

    def slice(self, start: int, stop: int) -> Prompts:
        def cut(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[start:stop]

        return Prompts(cut(self.boxes), cut(self.points), cut(self.point_labels), cut(self.masks))


@dataclass
class MaskLogits:
    """Decoder output for the N prompts of one image.

    Attributes:
        logits: N x K x h x w low-resolution mask logits (h = w = 256 for the released models) in the padded
            square frame of the encoder input; K = 1, or 3 with ``multimask="all"``.
        iou_scores: N x K, the IoU head's prediction for each mask.
        original_size: (H, W) of the embedded image.
        reshaped_size: (H', W') of that image inside the padded frame.
        sam_logits: N x K x h x w, SAM's own logits for the same masks (without the HQ token's correction),
            from an HQ model's ``predict``; None for plain SAM (its masks are SAM's) and elsewhere.
    """

    logits: torch.Tensor
    iou_scores: torch.Tensor
    original_size: tuple[int, int]
    reshaped_size: tuple[int, int]
    sam_logits: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.logits.shape[0])


class EmbeddingsCache:
    """The image embeddings of the last ``capacity`` images, by a caller's key, so that another prompt on the
    same image costs one decoder call (click fixes, ``segment`` on the warm service). Not thread-safe: the
    caller holds its model's lock."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: OrderedDict[str, ImageEmbeddings] = OrderedDict()

    def get(self, key: str) -> ImageEmbeddings | None:
        """The embeddings kept under ``key`` (now the most recent), or None."""
        embeddings = self._items.get(key)
        if embeddings is not None:
            self._items.move_to_end(key)
        return embeddings

    def embed(self, segmenter: Any, image: np.ndarray, key: str | None) -> tuple[ImageEmbeddings, bool]:
        """``segmenter.embed([image])``, or the embeddings kept under ``key`` when they are of an image of
        the same size; kept (most recent last) unless ``key`` is None. Returns them and whether the encoder
        ran."""
        size = tuple(image.shape[:2])
        embeddings = None if key is None else self._items.get(key)
        encoded = embeddings is None or tuple(embeddings.original_sizes[0]) != size
        if encoded:
            embeddings = segmenter.embed([image])
        if key is not None:
            self._items[key] = embeddings
            self._items.move_to_end(key)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)
        return embeddings, encoded
