"""What a relabel changed: two labels versions of the same input compared mask by mask.

``compare_labels(old, new, out)`` pairs the masks of the two labels folders by ``(image_id, instance_id)``
(the detector and its thresholds are the same in both, so the same boxes get the same ids; a pair whose class
differs counts as one removed and one added mask), computes the IoU between the two versions of each mask,
and writes into ``out``:

* ``report.json``: per class the masks of each version, how many are paired, how many changed (IoU < 1),
  the mean and lowest IoU of the pairs and a histogram; totals; the validation mIoU / mBIoU before and after
  (the gate's); the images with the largest changes;
* ``report.md``: the same as tables;
* ``gallery/index.html`` + ``gallery/overlays/*.png``: those images drawn old | new with the overlay code of
  ``hqlabel show`` (``review.gallery``), each mask's IoU under it.

The images are read through the old labels folder's input listing, as ``hqlabel show`` does.
"""

from __future__ import annotations

import html
import json
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from hqlabel.platform.rle import decode_mask

__all__ = ["compare_labels"]

BINS = ((1.0, "unchanged"), (0.9, ">=0.9"), (0.75, ">=0.75"), (0.5, ">=0.5"), (0.0, "<0.5"))
_COLUMNS = ["image_id", "instance_id", "label", "score", "box", "mask"]


def _masks(folder: Path) -> dict[str, dict[tuple[str, int], dict]]:
    """shard -> {(image_id, instance_id): mask row} of a labels folder."""
    shards: dict[str, dict[tuple[str, int], dict]] = {}
    for file in sorted((folder / "masks").glob("part-*.parquet")):
        rows = pq.read_table(file, columns=_COLUMNS).to_pylist()
        shards[file.stem.removeprefix("part-")] = {(r["image_id"], int(r["instance_id"])): r for r in rows}
    return shards


def _iou(a: dict, b: dict) -> float:
    """IoU of two RLE masks (1.0 when both are empty)."""
    x, y = decode_mask(a["mask"]), decode_mask(b["mask"])
    if x.shape != y.shape:
        return 0.0
    union = np.logical_or(x, y).sum()
    return 1.0 if union == 0 else float(np.logical_and(x, y).sum() / union)


def _bin(iou: float) -> str:
    return next(name for low, name in BINS if iou >= low)


def compare_labels(
    old: str,
    new: str,
    out: str,
    *,
    validation: dict[str, Any] | None = None,
    limit: int = 12,
    random_weights: bool = False,
) -> dict[str, Any]:
    """Compare the labels folders ``old`` and ``new``; write ``report.json``, ``report.md`` and the gallery
    of the ``limit`` images that changed most into the local folder ``out``. Returns the report."""
    old_path, new_path, out_path = Path(old), Path(new), Path(out)
    old_masks, new_masks = _masks(old_path), _masks(new_path)
    per_class: dict[str, dict[str, Any]] = defaultdict(
        lambda: {"old": 0, "new": 0, "paired": 0, "changed": 0, "added": 0, "removed": 0, "ious": []}
    )
    images: dict[tuple[str, str], dict[str, Any]] = {}
    for shard in sorted(set(old_masks) | set(new_masks)):
        before, after = old_masks.get(shard, {}), new_masks.get(shard, {})
        for key in sorted(set(before) | set(after)):
            a, b = before.get(key), after.get(key)
            entry = images.setdefault(
                (shard, key[0]), {"shard": shard, "image_id": key[0], "change": 0.0, "pairs": []}
            )
            if a is not None:
                per_class[a["label"]]["old"] += 1
            if b is not None:
                per_class[b["label"]]["new"] += 1
            if a is not None and b is not None and a["label"] == b["label"]:
                iou = _iou(a, b)
                stats = per_class[a["label"]]
                stats["paired"] += 1
                stats["changed"] += iou < 1.0
                stats["ious"].append(iou)
                entry["change"] += 1.0 - iou
                entry["pairs"].append({"instance_id": key[1], "label": a["label"], "iou": iou})
                continue
            if a is not None:
                per_class[a["label"]]["removed"] += 1
            if b is not None:
                per_class[b["label"]]["added"] += 1
            entry["change"] += 1.0
            entry["pairs"].append({"instance_id": key[1], "label": (a or b)["label"], "iou": None})
    classes = {}
    for name, stats in sorted(per_class.items()):
        ious = stats.pop("ious")
        histogram = {label: 0 for _, label in BINS}
        for iou in ious:
            histogram[_bin(iou)] += 1
        classes[name] = {
            **stats,
            "mean_iou": float(np.mean(ious)) if ious else None,
            "min_iou": float(np.min(ious)) if ious else None,
            "iou_histogram": histogram,
        }
    totals = {
        k: sum(c[k] for c in classes.values())
        for k in ("old", "new", "paired", "changed", "added", "removed")
    }
    largest = sorted(
        (e for e in images.values() if e["change"] > 0), key=lambda e: (-e["change"], e["image_id"])
    )
    largest = largest[:limit]
    report: dict[str, Any] = {
        "old": str(old_path),
        "new": str(new_path),
        "old_weights_version": _weights_version(old_path),
        "new_weights_version": _weights_version(new_path),
        "random_weights": random_weights,
        "per_class": classes,
        "totals": totals,
        "validation": _validation(validation),
        "largest_changes": largest,
    }
    out_path.mkdir(parents=True, exist_ok=True)
    report["gallery"] = _gallery(
        old_path, new_path, out_path / "gallery", largest, old_masks, new_masks, report
    )
    (out_path / "report.json").write_text(json.dumps(report, indent=2))
    (out_path / "report.md").write_text(_markdown(report))
    return report


def _weights_version(folder: Path) -> str | None:
    file = folder / "weights_version.json"
    return json.loads(file.read_text()).get("weights_version") if file.is_file() else None


def _validation(validation: dict[str, Any] | None) -> dict[str, Any] | None:
    if validation is None:
        return None
    before, after = validation["before"], validation["after"]
    delta = {m: 100 * (after[m] - before[m]) for m in ("miou", "mbiou")}
    return {**validation, "delta_points": delta}


def _markdown(report: dict[str, Any]) -> str:
    lines = [f"# Relabel comparison: {report['old_weights_version']} -> {report['new_weights_version']}", ""]
    if report["random_weights"]:
        lines += ["**Random weights (preset tiny-random): these numbers mean nothing.**", ""]
    lines += [f"Old labels: `{report['old']}`  ", f"New labels: `{report['new']}`", ""]
    val = report["validation"]
    if val is not None:
        lines += [
            "## Validation (the gate's)",
            "",
            "| | mIoU % | mBIoU % |",
            "|---|---:|---:|",
            f"| before | {100 * val['before']['miou']:.2f} | {100 * val['before']['mbiou']:.2f} |",
            f"| after | {100 * val['after']['miou']:.2f} | {100 * val['after']['mbiou']:.2f} |",
            f"| delta (points) | {val['delta_points']['miou']:+.2f} | {val['delta_points']['mbiou']:+.2f} |",
            "",
        ]
    lines += [
        "## Masks per class",
        "",
        "| class | old | new | paired | changed | added | removed | mean IoU | min IoU |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, c in report["per_class"].items():
        mean = "-" if c["mean_iou"] is None else f"{c['mean_iou']:.3f}"
        low = "-" if c["min_iou"] is None else f"{c['min_iou']:.3f}"
        lines.append(
            f"| {name} | {c['old']} | {c['new']} | {c['paired']} | {c['changed']} | {c['added']} | "
            f"{c['removed']} | {mean} | {low} |"
        )
    t = report["totals"]
    lines += [
        "| **all** | "
        + " | ".join(str(t[k]) for k in ("old", "new", "paired", "changed", "added", "removed"))
        + " | | |",
        "",
        f"Largest changes: [gallery/index.html](gallery/index.html) ({len(report['largest_changes'])} "
        "images).",
        "",
    ]
    return "\n".join(lines)


def _gallery(
    old: Path,
    new: Path,
    out: Path,
    largest: list[dict[str, Any]],
    old_masks: dict[str, dict],
    new_masks: dict[str, dict],
    report: dict[str, Any],
) -> str:
    """Old | new overlays of the ``largest`` changes (``review.gallery``'s drawing), and ``index.html``."""
    from PIL import Image

    from hqlabel.platform.images import decode_image
    from hqlabel.platform.labels import LabelsFolder
    from hqlabel.platform.sources import job_images
    from hqlabel.review.gallery import GALLERY_CSS, overlay_image, safe_name, save_png

    folder = LabelsFolder(str(old))
    reader = job_images(folder.uri, folder.job.get("spec", {}), None, folder.options)
    taken: set[str] = set()
    figures = []
    by_shard: dict[str, list[dict]] = defaultdict(list)
    for entry in largest:
        by_shard[entry["shard"]].append(entry)
    drawn: dict[tuple[str, str], str] = {}
    for shard, entries in by_shard.items():
        wanted = {e["image_id"] for e in entries}
        for image_id, data, _problem in reader.read(shard, wanted):
            if data is None:
                continue
            image = decode_image(data, max_pixels=folder.max_pixels)
            sides = []
            for masks in (old_masks.get(shard, {}), new_masks.get(shard, {})):
                rows = [r for (i, _), r in sorted(masks.items()) if i == image_id]
                sides.append(overlay_image(image, rows, 512, folder.max_pixels))
            pair = Image.new(
                "RGB", (sides[0].width + sides[1].width + 8, max(s.height for s in sides)), (255,) * 3
            )
            pair.paste(sides[0], (0, 0))
            pair.paste(sides[1], (sides[0].width + 8, 0))
            name = f"overlays/{safe_name(image_id, taken)}.png"
            save_png(pair, os.path.join(out, name))
            drawn[(shard, image_id)] = name
    e = html.escape
    for entry in largest:
        name = drawn.get((entry["shard"], entry["image_id"]))
        pairs = ", ".join(
            f"#{p['instance_id']} {e(p['label'])} IoU "
            + ("new/gone" if p["iou"] is None else format(p["iou"], ".3f"))
            for p in entry["pairs"]
        )
        image = f'<img src="{e(name)}" alt="{e(entry["image_id"])}">' if name else "(image unavailable)"
        figures.append(
            f'<figure style="width:auto">{image}<figcaption><b>{e(entry["image_id"])}</b> '
            f"(shard {e(entry['shard'])})"
            f", change {entry['change']:.3f}: {pairs}</figcaption></figure>"
        )
    warning = (
        '<p class="warning" id="random-weights">Warning: random weights (preset tiny-random); these changes '
        "mean nothing about real models.</p>"
        if report["random_weights"]
        else ""
    )
    page = "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8">',
            f"<title>hqlabel relabel: largest changes</title><style>{GALLERY_CSS}</style></head><body>",
            f"<h1>Largest changes: {e(str(report['old_weights_version']))} (left) -> "
            f"{e(str(report['new_weights_version']))} (right)</h1>",
            warning,
            f"<p>{e(report['old'])} -> {e(report['new'])}; change = sum over the image's masks of 1 - IoU "
            "(a mask only in one version counts 1).</p>",
            '<div class="grid">',
            *figures,
            "</div></body></html>\n",
        ]
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / "index.html").write_text(page)
    return str(out / "index.html")
