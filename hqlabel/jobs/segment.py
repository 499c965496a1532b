"""``hqlabel segment``: HQ-SAM masks for boxes / clicks on one image, written as PNGs for inspection.

With ``--service`` the warm labeling service's segmenter makes them (``hqlabel.jobs.service_client``): this
process reads, checks and decodes the image as without it, sends the prompts and writes the same files; it
loads no model (nor torch or transformers).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from hqlabel.jobs.checks import check_device, check_hq_weights, check_pretrained, hq_weights_pin
from hqlabel.jobs.label import RANDOM_WEIGHTS_WARNING
from hqlabel.jobs.spec import SegmentJobSpec
from hqlabel.platform.config import DEFAULT_SEGMENTER
from hqlabel.platform.images import decode_image
from hqlabel.review.render import overlay_masks

if TYPE_CHECKING:  # torch and the segmenters (transformers) load only for a local model, not with --service
    from hqlabel.segmenters import HQSamSegmenter, Prompts


@dataclass
class SegmentResult:
    masks: list[Path]
    overlay: Path
    iou_scores: list[list[float]]  # per object, per mask (K)

    def __str__(self) -> str:
        scores = "; ".join(", ".join(f"{s:.3f}" for s in per) for per in self.iou_scores)
        return f"wrote {len(self.masks)} masks and {self.overlay} (predicted IoU: {scores})"


def build_segmenter(name_or_path: str, **kwargs) -> HQSamSegmenter:
    """``hqlabel.segmenters.build_segmenter``, imported when a local model is built."""
    from hqlabel.segmenters import build_segmenter as build

    return build(name_or_path, **kwargs)


def build_prompts(spec: SegmentJobSpec) -> Prompts:
    """The checked prompts (``prompt_fields``) as ``Prompts``."""
    from hqlabel.segmenters import Prompts

    return Prompts(**prompt_fields(spec))


def prompt_fields(spec: SegmentJobSpec) -> dict[str, Any]:
    """``Prompts``' fields as nested lists (``boxes`` N x 4, ``points`` 1 x P x 2, ``point_labels`` 1 x P):
    boxes are one object each; clicks refine a single object (alone, or with exactly one box).

    Raises:
        ValueError: no prompt, points with several boxes, an empty box, a point label not 0 or 1.
    """
    if not spec.boxes and not spec.points:
        raise ValueError("give at least one --box x0,y0,x1,y1 or --point x,y[,label]")
    if spec.points and len(spec.boxes) > 1:
        raise ValueError(
            f"--point clicks refine one object, but {len(spec.boxes)} boxes were given; "
            "combine points with at most one --box"
        )
    for x0, y0, x1, y1 in spec.boxes:
        if x1 <= x0 or y1 <= y0:
            raise ValueError(
                f"box {x0:g},{y0:g},{x1:g},{y1:g} is empty; boxes are x0,y0,x1,y1 with x1>x0, y1>y0"
            )
    if any(label not in (0, 1) for _, _, label in spec.points):
        raise ValueError("point labels are 1 (foreground) or 0 (background)")
    fields: dict[str, Any] = {}
    if spec.boxes:
        fields["boxes"] = [[float(v) for v in box] for box in spec.boxes]
    if spec.points:
        fields["points"] = [[[float(x), float(y)] for x, y, _ in spec.points]]
        fields["point_labels"] = [[int(label) for _, _, label in spec.points]]
    return fields


def check_inside(spec: SegmentJobSpec, height: int, width: int) -> None:
    """Every box and click lies on the image (pixels of the image as decoded: upright after EXIF rotation).

    Raises:
        ValueError: the first prompt outside ``0..width`` x ``0..height``, with the image's size.
    """
    size = f"the {width} x {height} image (x 0..{width}, y 0..{height}; pixels, upright after EXIF rotation)"
    for x0, y0, x1, y1 in spec.boxes:
        if x0 < 0 or y0 < 0 or x1 > width or y1 > height:
            raise ValueError(f"--box {x0:g},{y0:g},{x1:g},{y1:g} is outside {size}")
    for x, y, _ in spec.points:
        if not (0 <= x <= width and 0 <= y <= height):
            raise ValueError(f"--point {x:g},{y:g} is outside {size}")


def read_image(path: Path, spec: SegmentJobSpec) -> np.ndarray:
    """``path`` decoded under the same limits as ``hqlabel label`` (``--max-bytes``, ``--max-pixels``: the
    only pixel limit; Pillow's own is lifted to it, as in labeling jobs)."""
    size = path.stat().st_size
    if size > spec.max_bytes:
        raise ValueError(
            f"image {str(path)!r} is {size} bytes, over --max-bytes {spec.max_bytes}; raise --max-bytes to "
            "accept it"
        )
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and spec.max_pixels > limit:
        Image.MAX_IMAGE_PIXELS = spec.max_pixels
    try:
        return decode_image(path.read_bytes(), max_pixels=spec.max_pixels)
    finally:
        Image.MAX_IMAGE_PIXELS = limit


def segmenter_settings(spec: SegmentJobSpec) -> dict[str, Any]:
    """The segmenter settings ``segment`` chooses (``SEGMENTER_FIELDS``; the mask threshold is the
    default's): what ``--service`` compares with the service's."""
    return {
        "segmenter": spec.segmenter,
        "preset": spec.preset,
        "hq_weights": spec.hq_weights,
        "hq_weights_revision": hq_weights_pin(spec.hq_weights, None),
        "hq_token_only": spec.hq_token_only,
        "multimask": spec.multimask,
        "mask_threshold": 0.0,
    }


def run_segment(spec: SegmentJobSpec) -> SegmentResult:
    """Segment the prompted objects of ``spec.image``; write ``STEM_mask_K[_J].png``, ``STEM_overlay.png``
    and ``STEM_masks.json`` (prompts, predicted IoU, model; with ``--service``, the service's address and
    segmenter) to ``spec.out``.

    Everything is checked before a model is built or the service is asked: the image, the prompts (on the
    image), and for a local model the device, the HQ weights and the segmenter's name (with ``--service``,
    the service compares the segmenter settings with its own and refuses other ones).
    """
    path = Path(spec.image).expanduser().absolute()
    if not path.is_file():
        raise FileNotFoundError(f"image {spec.image!r} does not exist")
    spec = spec.model_copy(update={"image": str(path), "out": str(Path(spec.out).expanduser().absolute())})
    fields = prompt_fields(spec)
    if spec.ray_address is not None and not spec.service:
        raise ValueError("--address names the labeling service's cluster: add --service, or drop --address")
    check_hq_weights(spec.hq_weights)  # with --service too: the service's weights must be this file's
    if spec.service:
        if spec.device != "auto":
            raise ValueError(
                f"--device {spec.device} places a local model; with --service the service's actors run on "
                "their own device (serve start --device): drop --device or --service"
            )
    else:
        check_device(spec.device, "auto", local=True)
        if spec.preset is None and not Path(spec.segmenter).expanduser().is_file():  # a .pth has no config
            check_pretrained([(spec.segmenter, "segmenter", "--segmenter", DEFAULT_SEGMENTER)])
    image = read_image(path, spec)
    check_inside(spec, *image.shape[:2])
    service = None
    if spec.service:
        from hqlabel.jobs.service_client import SegmentService, decode_result, image_key

        client = SegmentService(
            spec.ray_address, segmenter_settings(spec), instead="segment without --service (a local model)"
        )
        if spec.preset == "tiny-random":
            print(RANDOM_WEIGHTS_WARNING, file=sys.stderr)
        masks, iou = decode_result(client.segment(image, fields, key=image_key(image)))
        service = {"address": client.address, "models": client.models()}
    else:
        masks, iou = _segment_locally(spec, image, fields)
    return write_outputs(spec, path, image, masks, iou, service)


def _segment_locally(
    spec: SegmentJobSpec, image: np.ndarray, fields: dict[str, Any]
) -> tuple[np.ndarray, list[list[float]]]:
    """Build the segmenter here: ``(N x K x H x W bool masks, N x K predicted IoU)``."""
    import torch

    from hqlabel.segmenters import Prompts
    from hqlabel.workers.labeler import resolve_device

    if spec.preset == "tiny-random":
        print(RANDOM_WEIGHTS_WARNING, file=sys.stderr)
    segmenter = build_segmenter(
        spec.segmenter,
        preset=spec.preset,
        hq_weights=spec.hq_weights,
        hq_token_only=spec.hq_token_only,
        multimask=spec.multimask,
        device=resolve_device(spec.device),
    )
    (logits,) = segmenter.predict(segmenter.embed([image]), [Prompts(**fields)])
    masks = torch.cat(list(segmenter.iter_masks(logits))).cpu().numpy()  # N x K x H x W
    return masks, logits.iou_scores.float().cpu().tolist()


def write_outputs(
    spec: SegmentJobSpec,
    path: Path,
    image: np.ndarray,
    masks: np.ndarray,
    iou: list[list[float]],
    service: dict[str, Any] | None = None,
) -> SegmentResult:
    """The mask PNGs, the overlay and masks.json of ``masks`` (N x K x H x W bool) and ``iou`` (N x K);
    ``service``: the service that made them (``address``, ``models``), recorded in masks.json."""
    out = Path(spec.out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    stem = path.stem
    written = []
    for k in range(masks.shape[0]):
        for j in range(masks.shape[1]):
            suffix = f"{k}" if masks.shape[1] == 1 else f"{k}_{j}"
            target = out / f"{stem}_mask_{suffix}.png"
            Image.fromarray(masks[k, j].astype(np.uint8) * 255).save(target)
            written.append(target)
    overlay = overlay_masks(
        image,
        [masks[k, 0] for k in range(masks.shape[0])],
        boxes=list(spec.boxes),
        captions=[f"IoU {per[0]:.2f}" for per in iou][: len(spec.boxes)],
        points=list(spec.points),
    )
    overlay_path = out / f"{stem}_overlay.png"
    overlay.save(overlay_path)
    record = {
        "image": str(path),
        "spec": spec.model_dump(mode="json"),
        "random_weights": spec.preset == "tiny-random",
        "masks": [p.name for p in written],
        "pred_iou": iou,
        "service": service,
    }
    (out / f"{stem}_masks.json").write_text(json.dumps(record, indent=2))
    return SegmentResult(written, overlay_path, iou)
