"""In-memory labeling, no Ray: ``hqlabel.Labeler.from_pretrained(...)(images)`` -> ``LabelResult`` per image.

A thin layer over the labeling job's own Ray-free core (``hqlabel.workers.labeler.Labeler``): the same models
(``build_models``), the same downscale to ``max_side`` before the models (none for the images that a
``tile`` option tiles; masks and boxes come out at the image's own size), the same batches; so with the same
options and batch size an image gets the rows a labeling job writes for it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from hqlabel.api.interop import as_box_prompts
from hqlabel.api.results import LabelResult
from hqlabel.platform.config import DEFAULT_DETECTOR, DEFAULT_SEGMENTER, LabelerConfig
from hqlabel.platform.images import DEFAULT_MAX_PIXELS
from hqlabel.workers.tiling import working_image

if TYPE_CHECKING:
    from PIL import Image

    from hqlabel.workers.labeler import Labeler as CoreLabeler

__all__ = ["Labeler", "to_rgb"]

DEFAULT_MAX_SIDE = 1333  # hqlabel.workers.decode.DEFAULT_MAX_SIDE (imported lazily there: pyarrow)


def to_rgb(image: Any, *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """A PIL image or numpy array as H x W x 3 uint8 RGB, as a labeling job decodes a file: a PIL image is
    turned upright by its EXIF orientation, transparent pixels composited on white, any mode made RGB; an
    array must be H x W (grey) or H x W x 3 (RGB) uint8.

    Raises:
        TypeError: neither a PIL image nor a numpy array.
        ValueError: an array of another shape or dtype, or more than ``max_pixels`` pixels.
    """
    from PIL import Image, ImageOps

    if isinstance(image, Image.Image):
        from hqlabel.platform.images import _to_rgb_array

        array = _to_rgb_array(ImageOps.exif_transpose(image), source=image)
    elif isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise ValueError(
                f"image arrays must be uint8 RGB, got dtype {image.dtype}; convert with "
                "(image * 255).clip(0, 255).astype(np.uint8) for 0..1 floats"
            )
        if image.ndim == 2:
            image = np.repeat(image[:, :, None], 3, axis=2)
        if image.ndim != 3 or image.shape[2] != 3 or 0 in image.shape:
            raise ValueError(
                f"image arrays must be H x W x 3 RGB (or H x W grey), got shape {image.shape}; drop an "
                "alpha channel with image[..., :3]"
            )
        array = np.ascontiguousarray(image)
    else:
        raise TypeError(f"images must be PIL images or numpy arrays, got {type(image).__name__}")
    height, width = array.shape[:2]
    if max_pixels is not None and height * width > max_pixels:
        raise ValueError(
            f"image is {width} x {height} = {height * width} pixels, over max_pixels={max_pixels}; "
            "pass a larger max_pixels to Labeler.from_pretrained"
        )
    return array


class Labeler:
    """Detect ``classes`` in images (or take given boxes) and segment each with HQ-SAM, in this process.

    Build it with ``from_pretrained``; call it on one image or a list. Each image's encoder pass runs once,
    whatever the number of boxes.
    """

    def __init__(
        self,
        core: CoreLabeler,
        config: LabelerConfig,
        *,
        batch_size: int = 8,
        max_side: int = DEFAULT_MAX_SIDE,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if max_side < 64:
            raise ValueError(f"max_side must be >= 64, got {max_side}")
        self.core = core
        self.config = config
        self.batch_size = batch_size
        self.max_side = max_side
        self.max_pixels = max_pixels

    @classmethod
    def from_pretrained(
        cls,
        detector: str = DEFAULT_DETECTOR,
        segmenter: str = DEFAULT_SEGMENTER,
        *,
        classes: str | list[str] = "",
        preset: str | None = None,
        batch_size: int = 8,
        max_side: int = DEFAULT_MAX_SIDE,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        **options: Any,
    ) -> Labeler:
        """Load the models.

        Args:
            detector: Grounding DINO, MM-Grounding-DINO, OWLv2 or SAM 3 hub id or local directory (chosen by
                its config); under ``preset``, an architecture family: ``"grounding-dino"``,
                ``"mm-grounding-dino"``, ``"owlv2"`` or ``"sam3"``.
            segmenter: SAM-HQ / SAM hub id, local directory or original ``.pth`` checkpoint; under
                ``preset``, an architecture family: ``"sam-hq"``, ``"sam"`` or ``"sam-hq-light"``.
            classes: ``"cat, dog"`` or a list; with synonyms ``"person: man, woman; car: car"``, a mapping or
                a ``.yaml`` / ``.json`` file (``hqlabel.platform.ontology``); none: no detector is loaded,
                and every call needs ``boxes``.
            preset: ``"tiny-random"``: tiny randomly initialised models of the same architectures, offline
                (their boxes and masks are meaningless; for tests).
            batch_size: images per model call (the labeling job's ``batch_size``; Grounding DINO pads a
                batch to its largest image, which changes the others' boxes slightly).
            max_side / max_pixels: as the labeling job's ``--max-side`` / ``--max-pixels``.
            tile / tile_overlap / tile_full_image: tiled detection for small objects in large images, as
                the labeling job's ``--tile`` options (``hqlabel.workers.tiling``).
            options: other ``LabelerConfig`` fields: ``box_threshold``, ``text_threshold``,
                ``nms_threshold``, ``mask_nms``, ``hq_weights``, ``hq_token_only``, ``multimask``, ``device``,
                ``precision``, ``detector_revision``, ``segmenter_revision``, ...

        Raises:
            TypeError: an unknown option. ValueError: a bad value (``pydantic.ValidationError``).
        """
        from hqlabel.jobs.checks import check_hq_weights, hq_weights_pin, model_pins
        from hqlabel.workers.labeler import Labeler as CoreLabeler

        unknown = sorted(set(options) - set(LabelerConfig.model_fields))
        if unknown:
            raise TypeError(
                f"from_pretrained() got unknown option(s) {', '.join(map(repr, unknown))}; the options are "
                f"{', '.join(sorted(LabelerConfig.model_fields))}"
            )
        options.setdefault("prompts", "detector" if classes else "boxes")
        config = LabelerConfig(
            detector=detector, segmenter=segmenter, classes=classes, preset=preset, **options
        )
        check_hq_weights(config.hq_weights)
        hq = hq_weights_pin(config.hq_weights, config.hq_weights_revision)  # the file's digest, as a job's
        config = config.model_copy(update={"hq_weights_revision": hq})
        core = CoreLabeler.from_config(config)
        return cls(
            core,
            # which versions were loaded, as a job records them
            config if config.preset is not None else config.model_copy(update=model_pins(config)),
            batch_size=batch_size,
            max_side=max_side,
            max_pixels=max_pixels,
        )

    @property
    def classes(self) -> list[str]:
        """The class names the detector looks for (the ``labels`` of detected instances)."""
        return list(self.config.classes)

    def __call__(
        self,
        images: Image.Image | np.ndarray | Sequence[Image.Image | np.ndarray],
        *,
        boxes: Any = None,
        labels: list[str] | Sequence[list[str]] | None = None,
    ) -> LabelResult | list[LabelResult]:
        """Label one image or a list of images.

        Args:
            images: PIL images, or H x W x 3 uint8 RGB (or H x W grey) numpy arrays; one or a list.
            boxes: box prompts instead of the detector: for one image a ``supervision.Detections`` or an
                N x 4 XYXY pixel array; for a list, one of those per image. Each box gets score 1.0.
            labels: class names of ``boxes`` (per image for a list); default the Detections' class names,
                else ``"object"``.

        Returns:
            A ``LabelResult`` for one image, a list for a list (in order). Boxes and masks are at each
            image's own size.

        Raises:
            RuntimeError: no ``boxes`` and no detector (built without ``classes``).
            ValueError / TypeError: an image or box prompts that cannot be used, naming which.
        """
        single = not isinstance(images, (list, tuple))
        batch = [images] if single else list(images)
        prompts = None
        if boxes is not None:
            per_image = [boxes] if single else list(boxes)
            names = [labels] if single else list(labels or [None] * len(per_image))
            if len(per_image) != len(batch) or len(names) != len(batch):
                raise ValueError(
                    f"{len(batch)} images but box prompts (or labels) for {len(per_image)}; one per image"
                )
            prompts = [as_box_prompts(b, n, self.classes) for b, n in zip(per_image, names, strict=True)]
        elif self.core.detector is None:
            raise RuntimeError(
                "this Labeler was built without classes (no detector): pass boxes=, or build it with "
                "Labeler.from_pretrained(classes=...)"
            )
        results: list[LabelResult] = []
        for start in range(0, len(batch), self.batch_size):
            chunk = [
                to_rgb(image, max_pixels=self.max_pixels) for image in batch[start : start + self.batch_size]
            ]
            sizes = [image.shape[:2] for image in chunk]
            work = [working_image(image, self.max_side, self.config.tile) for image in chunk]
            given = None
            if prompts is not None:
                given = [(b.tolist(), n) for b, n in prompts[start : start + self.batch_size]]
            labeled = self.core.label(work, sizes, given)
            for instances, size in zip(labeled, sizes, strict=True):
                results.append(
                    LabelResult.from_instances(instances, size, classes=self.classes, max_pixels=None)
                )
        return results[0] if single else results
