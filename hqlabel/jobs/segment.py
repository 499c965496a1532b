"""``hqlabel segment``: HQ-SAM masks for boxes / clicks on one image, written as PNGs for inspection."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from hqlabel.jobs.checks import check_device, check_hq_weights, check_pretrained
from hqlabel.jobs.label import RANDOM_WEIGHTS_WARNING
from hqlabel.jobs.spec import SegmentJobSpec
from hqlabel.platform.config import DEFAULT_SEGMENTER
from hqlabel.platform.images import decode_image
from hqlabel.review.render import overlay_masks
from hqlabel.segmenters import Prompts, build_segmenter
from hqlabel.workers.labeler import resolve_device


@dataclass
class SegmentResult:
    masks: list[Path]
    overlay: Path
    iou_scores: list[list[float]]  # per object, per mask (K)

    def __str__(self) -> str:
        scores = "; ".join(", ".join(f"{s:.3f}" for s in per) for per in self.iou_scores)
        return f"wrote {len(self.masks)} masks and {self.overlay} (predicted IoU: {scores})"


def build_prompts(spec: SegmentJobSpec) -> Prompts:
    """Boxes are one object each; clicks refine a single object (alone, or with exactly one box)."""
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
    boxes = torch.tensor(spec.boxes, dtype=torch.float32).reshape(-1, 4) if spec.boxes else None
    points = labels = None
    if spec.points:
        points = torch.tensor([[(x, y) for x, y, _ in spec.points]], dtype=torch.float32)
        labels = torch.tensor([[label for _, _, label in spec.points]])
    return Prompts(boxes=boxes, points=points, point_labels=labels)


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


def run_segment(spec: SegmentJobSpec) -> SegmentResult:
    """Segment the prompted objects of ``spec.image``; write ``STEM_mask_K[_J].png``, ``STEM_overlay.png``
    and ``STEM_masks.json`` (prompts, predicted IoU, model) to ``spec.out``.

    Everything is checked before a model is built: the image, the prompts (on the image), the device, the
    HQ weights and the segmenter's name.
    """
    path = Path(spec.image).expanduser().absolute()
    if not path.is_file():
        raise FileNotFoundError(f"image {spec.image!r} does not exist")
    spec = spec.model_copy(update={"image": str(path), "out": str(Path(spec.out).expanduser().absolute())})
    prompts = build_prompts(spec)
    check_device(spec.device, "auto", local=True)
    check_hq_weights(spec.hq_weights)
    if spec.preset is None and not Path(spec.segmenter).expanduser().is_file():  # a .pth has no config
        check_pretrained([(spec.segmenter, "segmenter", "--segmenter", DEFAULT_SEGMENTER)])
    image = read_image(path, spec)
    check_inside(spec, *image.shape[:2])
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
    (logits,) = segmenter.predict(segmenter.embed([image]), [prompts])
    masks = torch.cat(list(segmenter.iter_masks(logits))).cpu().numpy()  # N x K x H x W

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
    iou = logits.iou_scores.float().cpu().tolist()
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
    }
    (out / f"{stem}_masks.json").write_text(json.dumps(record, indent=2))
    return SegmentResult(written, overlay_path, iou)
