"""Memory of ``hqlabel review``'s item index (``ReviewItems``) for a large labels folder.

A tiny-random labeling job of two images gives a real labels folder (job.json, images table, listing); its
masks table is then replaced by ``--images`` x ``--instances`` synthetic rows of the same schema whose masks
are ellipses at ``--size`` (real COCO RLE, a few KB each, as at real image sizes). Each implementation is
built in a fresh process and its peak resident memory growth measured (``/proc/self/clear_refs`` resets the
high-water mark first). ``--baseline FILE`` adds the same measurement for another ``items.py`` (e.g. the
earlier one, ``git show COMMIT:hqlabel/review/items.py > old_items.py``).

    python -m benchmarks.review_memory --images 10000 --instances 10 --out benchmarks/results/X.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

MEASURE = r"""
import importlib.util, json, sys, time

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024

module_file, labels = sys.argv[1:3]
if module_file == "-":
    from hqlabel.review.items import ReviewItems
else:
    spec = importlib.util.spec_from_file_location("items_under_test", module_file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    ReviewItems = module.ReviewItems
import pyarrow, numpy  # noqa: imported before the baseline, as ReviewItems imports them
open("/proc/self/clear_refs", "w").write("5")
before = status("VmRSS")
start = time.perf_counter()
items = ReviewItems(labels)
seconds = time.perf_counter() - start
print(json.dumps({"instances": len(items), "peak_growth": status("VmHWM") - before,
                  "resident_growth": status("VmRSS") - before, "seconds": seconds}))
"""


def make_labels(root: Path, images: int, instances: int, size: tuple[int, int], shards: int) -> Path:
    """A labels folder with ``images`` x ``instances`` synthetic masks rows (see the module docstring)."""
    from hqlabel.jobs.label import run_label_job
    from hqlabel.jobs.spec import LabelJobSpec
    from hqlabel.platform.config import LabelerConfig
    from hqlabel.platform.demo import make_demo_images
    from hqlabel.platform.rle import encode_mask

    make_demo_images(root / "images", 2, size=(64, 64))
    labeler = LabelerConfig(classes=["circle", "square"], preset="tiny-random", box_threshold=0.0)
    spec = LabelJobSpec(input=str(root / "images"), out=str(root / "labels"), labeler=labeler)
    run_label_job(spec, progress=False, warn=False)
    masks = root / "labels" / "masks"
    template = pq.read_table(next(masks.glob("*.parquet")))
    for f in masks.glob("*.parquet"):
        f.unlink()
    row = template.slice(0, 1).to_pylist()[0]
    h, w = size
    yy, xx = np.mgrid[:h, :w]
    rng = np.random.default_rng(0)
    shapes = []
    for _ in range(64):  # distinct masks, reused
        cy, cx, ry, rx = rng.uniform(0.2, 0.8) * h, rng.uniform(0.2, 0.8) * w, h / 6, w / 8
        shapes.append(encode_mask(((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1))
    per_shard = -(-images // shards)
    for s in range(shards):
        rows = []
        for i in range(s * per_shard, min(images, (s + 1) * per_shard)):
            for k in range(instances):
                signal = float(rng.uniform(0.5, 1.0))
                rows.append(
                    row
                    | {
                        "image_id": f"images/{i:08d}.jpg",
                        "instance_id": k,
                        "label": ("circle", "square")[k % 2],
                        "score": signal,
                        "pred_iou": signal,
                        "mask": shapes[(i + k) % len(shapes)],
                    }
                )
        pq.write_table(pa.Table.from_pylist(rows, template.schema), masks / f"part-{s:05d}.parquet")
    return root / "labels"


def measure(module_file: str, labels: Path) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", MEASURE, module_file, str(labels)], capture_output=True, text=True, check=False
    )
    if done.returncode:
        raise RuntimeError(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--instances", type=int, default=10)
    parser.add_argument("--size", default="768x1024", help="mask H x W")
    parser.add_argument("--shards", type=int, default=10)
    parser.add_argument("--baseline", help="another items.py to measure the same way")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    size = tuple(int(v) for v in args.size.split("x"))
    with tempfile.TemporaryDirectory() as tmp:
        labels = make_labels(Path(tmp), args.images, args.instances, size, args.shards)
        table = pq.read_table(labels / "masks")
        result = {
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
            "instances": table.num_rows,
            "masks_table_bytes_in_memory": table.nbytes,
            "mask_size": list(size),
            "current": measure("-", labels),
        }
        if args.baseline:
            result["baseline"] = measure(args.baseline, labels)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
