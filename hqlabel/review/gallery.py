"""A browsable picture of a labeling job's output: overlay PNGs, contact sheets and a static HTML gallery.

``write_gallery(labels, out)`` reads the labels folder one shard at a time (its ``images/``, ``masks/`` and
``errors/`` files), finds each labeled image again through the job's input (``job.json`` ``spec.input``,
re-listed with the job's own columns and options), draws its masks, and writes into the local folder ``out``:

* ``overlays/<safe image id>.png``: coloured masks with outlines, boxes and "label score" captions, at the
  original size (longer side capped at ``max_side``);
* ``sheets/sheet-SHARD.png``: one contact sheet per shard, a grid of ``tile`` x ``tile`` thumbnails;
* ``index.html``: one self-contained page (no scripts, no external resources) with the job's classes and
  models, a warning banner when the models had random weights, every image with its instance count and
  labels (relative links to the overlays), and the failed images with stage and message.

Images are matched by ``image_id``: folder / COCO inputs through the re-listed rows' ``uri``, Parquet inputs
by reading the shard's source file (inline bytes or ``uri``) a row group at a time.
"""

from __future__ import annotations

import html
import io
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image, ImageDraw

from hqlabel.platform import storage
from hqlabel.platform.images import DEFAULT_MAX_PIXELS, decode_image
from hqlabel.platform.labels import LabelsFolder
from hqlabel.platform.rle import decode_mask
from hqlabel.platform.sources import files_by_shard, job_images
from hqlabel.platform.storage import StorageOptions
from hqlabel.review.fonts import draw_text
from hqlabel.review.render import overlay_masks

logger = logging.getLogger(__name__)

__all__ = ["GallerySummary", "write_gallery"]

_UNSAFE = re.compile(r"[^A-Za-z0-9._\-+=@,]+")
SHEET_COLUMNS = 8


@dataclass
class _Shown:
    """One image of the gallery."""

    image_id: str
    file: str  # overlay path relative to the gallery folder
    height: int
    width: int
    labels: list[str]


@dataclass
class GallerySummary:
    """What ``write_gallery`` wrote: overlay count, contact sheets, error rows listed, and the page."""

    out: str
    overlays: int = 0
    sheets: list[str] = field(default_factory=list)
    errors: int = 0
    index: str = ""

    def __str__(self) -> str:
        return (
            f"wrote {self.overlays} overlays, {len(self.sheets)} contact sheets and {self.index} "
            f"({self.errors} failed images listed)"
        )


def safe_name(image_id: str, taken: set[str]) -> str:
    """A flat file name for ``image_id`` (``sub/a.jpg`` -> ``sub__a.jpg``), unique within ``taken``."""
    base = _UNSAFE.sub("_", image_id.replace("\\", "/").replace("/", "__")).strip(".") or "image"
    name, k = base, 1
    while name in taken:
        name, k = f"{base}-{k}", k + 1
    taken.add(name)
    return name


def overlay_image(image: np.ndarray, instances: list[dict], max_side: int, max_pixels: int) -> Image.Image:
    """``instances`` (mask rows) drawn on ``image`` (H x W x 3 uint8), longer side <= ``max_side``.

    Masks are decoded one at a time as they are drawn (and downscaled at once), so one full-size mask is in
    memory, never all of an image's; a mask declaring more than ``max_pixels`` pixels is refused
    (ValueError) before it is decoded.
    """
    height, width = image.shape[:2]
    scale = min(1.0, max_side / max(height, width))
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    boxes = [tuple(float(v) * scale for v in row["box"]) for row in instances]

    def masks() -> Iterator[np.ndarray]:
        for row in instances:
            mask = decode_mask(row["mask"], max_pixels=max_pixels)
            if scale < 1.0:
                mask = np.asarray(Image.fromarray(mask).resize(size, Image.Resampling.NEAREST))
            yield mask
            del mask  # before the next one is decoded

    if scale < 1.0:
        image = np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR))
    captions = [f"{row['label']} {row['score']:.2f}" for row in instances]
    return overlay_masks(image, masks(), boxes=boxes, captions=captions)


def _plain(value: object) -> str:
    """A job.json value as text for people: strings bare, None "none", booleans "yes"/"no", a mapping as
    "key value, ..." (floats to 3 significant digits), a list comma-separated."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, dict):
        return ", ".join(f"{k} {_plain(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return ", ".join(_plain(v) for v in value)
    return str(value)


def _contact_sheet(thumbs: list[tuple[str, Image.Image]], tile: int) -> Image.Image:
    """A grid of ``tile`` x ``tile`` cells, each a thumbnail (aspect kept) over its image id."""
    columns = min(SHEET_COLUMNS, len(thumbs))
    rows = (len(thumbs) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * tile, rows * tile), (24, 24, 24))
    draw = ImageDraw.Draw(sheet)
    for k, (image_id, thumb) in enumerate(thumbs):
        x, y = (k % columns) * tile, (k // columns) * tile
        sheet.paste(thumb, (x + (tile - thumb.width) // 2, y + (tile - 14 - thumb.height) // 2))
        draw_text(draw, (x + 3, y + tile - 13), image_id[-(tile // 6) :], fill=(230, 230, 230))
    return sheet


def save_png(image: Image.Image, path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    with open(path, "wb") as f:
        f.write(buf.getvalue())


def write_gallery(
    labels: str,
    out: str,
    *,
    images: str | None = None,
    limit: int = 200,
    options: StorageOptions = StorageOptions(),
    tile: int = 256,
    max_side: int = 1024,
) -> GallerySummary:
    """Write overlays, per-shard contact sheets and ``index.html`` for the labels folder ``labels``.

    Args:
        labels: a labeling job's ``--out`` folder (local or ``s3://``).
        out: local folder to write the gallery into.
        images: the job's input, when it has moved since labeling (default: ``job.json`` ``spec.input``).
        limit: at most this many images get an overlay (shards are visited in order until it is reached).
        tile: contact-sheet cell size, pixels.
        max_side: overlays are downscaled so their longer side is at most this.

    An image's masks are decoded one at a time as they are drawn. Masks (their RLE ``size``, read from the
    labels folder: untrusted) and images over the job's ``--max-pixels`` are refused before decoding; such
    an image is listed with the failed ones (stage ``show``).

    Raises:
        ValueError: ``limit`` < 1; FileNotFoundError: not a labels folder, or its input is gone.
    """
    if limit < 1:
        raise ValueError(f"--limit must be >= 1, got {limit}")
    if storage.is_s3(out):
        raise ValueError(f"the gallery is written to a local folder; got {out}")
    folder = LabelsFolder(labels, options)
    job = folder.job
    spec = job.get("spec", {})
    reader = job_images(folder.uri, spec, images, options)
    max_pixels = spec.get("max_pixels", DEFAULT_MAX_PIXELS)
    mask_files = files_by_shard(folder.mask_files)
    error_uris = storage.list_files(storage.join(folder.uri, "errors"), (".parquet",), options)
    error_files = files_by_shard(error_uris)
    summary = GallerySummary(out=out, index=os.path.join(out, "index.html"))
    shown: list[tuple[str, list[_Shown]]] = []
    errors: list[dict] = []
    taken: set[str] = set()
    for shard, images_uri in sorted(files_by_shard(folder.image_files).items()):
        if summary.overlays >= limit:
            break
        table = storage.read_parquet(images_uri, options, columns=["image_id", "error_stage"])
        if shard in error_files:
            errors += storage.read_parquet(error_files[shard], options).to_pylist()
        ok = table.filter(pc.and_(pc.is_null(table["error_stage"]), pc.is_valid(table["image_id"])))
        wanted = list(dict.fromkeys(ok["image_id"].to_pylist()))[: limit - summary.overlays]
        instances: dict[str, list[dict]] = {image_id: [] for image_id in wanted}
        if shard in mask_files and wanted:
            masks = storage.read_parquet(mask_files[shard], options)
            masks = masks.filter(pc.is_in(masks["image_id"], value_set=pa.array(wanted, pa.string())))
            for row in masks.sort_by("instance_id").to_pylist():
                instances[row["image_id"]].append(row)
        entries: dict[str, _Shown] = {}
        thumbs: dict[str, Image.Image] = {}
        for image_id, data, problem in reader.read(shard, set(wanted)):
            try:
                if data is None:
                    raise ValueError(problem)
                image = decode_image(data, max_pixels=max_pixels)
                overlay = overlay_image(image, instances[image_id], max_side, max_pixels)
            except ValueError as e:  # gone, unreadable or changed since labeling: listed, not fatal
                errors.append({"image_id": image_id, "stage": "show", "error": str(e)})
                continue
            name = f"overlays/{safe_name(image_id, taken)}.png"
            save_png(overlay, os.path.join(out, name))
            labels_of = [row["label"] for row in instances[image_id]]
            entries[image_id] = _Shown(image_id, name, overlay.height, overlay.width, labels_of)
            overlay.thumbnail((tile, tile - 14))
            thumbs[image_id] = overlay
        ordered = [entries[i] for i in wanted if i in entries]
        if ordered:
            sheet = f"sheets/sheet-{_UNSAFE.sub('_', shard)}.png"
            save_png(
                _contact_sheet([(e.image_id, thumbs[e.image_id]) for e in ordered], tile), f"{out}/{sheet}"
            )
            summary.sheets.append(sheet)
            shown.append((shard, ordered))
        summary.overlays += len(ordered)
    summary.errors = len(errors)
    page = _index_html(folder, job, shown, summary.sheets, errors, limit)
    os.makedirs(out, exist_ok=True)
    with open(summary.index, "w", encoding="utf-8") as f:
        f.write(page)
    return summary


GALLERY_CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em; background: #fafafa; color: #222; }
.warning { background: #fff3cd; border: 2px solid #d39e00; padding: .8em 1em; font-weight: bold; }
.grid { display: flex; flex-wrap: wrap; gap: 12px; }
figure { margin: 0; width: 260px; background: #fff; border: 1px solid #ddd; padding: 6px; }
figure img { max-width: 100%; height: auto; display: block; }
figcaption { font-size: 12px; word-break: break-all; }
table { border-collapse: collapse; } td, th { border: 1px solid #ccc; padding: 2px 6px; font-size: 13px; }
"""


def _index_html(
    folder: LabelsFolder,
    job: dict[str, Any],
    shown: list[tuple[str, list[_Shown]]],
    sheets: list[str],
    errors: list[dict],
    limit: int,
) -> str:
    e = html.escape
    spec = job.get("spec", {})
    models = job.get("models", {})
    classes = spec.get("labeler", {}).get("classes") or []
    total = sum(len(entries) for _, entries in shown)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>hqlabel gallery: {e(folder.uri)}</title>",
        f"<style>{GALLERY_CSS}</style></head><body>",
        f"<h1>hqlabel gallery: {e(folder.uri)}</h1>",
    ]
    if models.get("random_weights"):
        parts.append(
            '<p class="warning" id="random-weights">Warning: this job ran with randomly initialised models '
            "(preset tiny-random). Its boxes and masks are meaningless; use it to test the pipeline only.</p>"
        )
    if job.get("shards", {}).get("incomplete") or "summary" not in job:
        parts.append(
            '<p class="warning">This labeling job has not finished; showing the shards done so far.</p>'
        )
    model_rows = "".join(f"<tr><th>{e(str(k))}</th><td>{e(_plain(v))}</td></tr>" for k, v in models.items())
    parts += [
        "<h2>Job</h2><table>",
        f"<tr><th>input</th><td>{e(str(spec.get('input')))}</td></tr>",
        f"<tr><th>classes</th><td>{e(', '.join(classes)) or '(none: given boxes)'}</td></tr>",
        model_rows,
        f"<tr><th>summary</th><td>{e(_plain(job.get('summary')))}</td></tr>",
        "</table>",
        f"<p>{total} images shown (limit {limit}).</p>",
    ]
    for (shard, entries), sheet in zip(shown, sheets, strict=True):
        parts.append(f'<h2>Shard {e(shard)} <a href="{e(sheet)}">contact sheet</a></h2><div class="grid">')
        for item in entries:
            counts = ", ".join(
                f"{e(label)} x{item.labels.count(label)}" for label in sorted(set(item.labels))
            )
            parts.append(
                f'<figure><a href="{e(item.file)}"><img src="{e(item.file)}" width="{item.width}" '
                f'height="{item.height}" alt="{e(item.image_id)}"></a>'
                f"<figcaption><b>{e(item.image_id)}</b><br>{len(item.labels)} instances"
                f"{': ' + counts if counts else ''}</figcaption></figure>"
            )
        parts.append("</div>")
    parts.append(f"<h2>Errors ({len(errors)})</h2>")
    if errors:
        parts.append("<table><tr><th>image</th><th>stage</th><th>message</th></tr>")
        parts += [
            f"<tr><td>{e(str(r['image_id']))}</td><td>{e(str(r['stage']))}</td><td>{e(str(r['error']))}</td></tr>"
            for r in errors
        ]
        parts.append("</table>")
    parts.append("</body></html>\n")
    return "\n".join(parts)
