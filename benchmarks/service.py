"""``python -m benchmarks.service``: jobs on the warm labeling service (``hqlabel serve``) against the plain
loop; prints a table and writes JSON. Random-weight models: only the timings mean anything.

    python -m benchmarks.service [--images 200] [--repeats 3] [--num-cpus 2] [--device cpu]
        [--out benchmarks/results/NAME.json]

Measured, medians of ``--repeats`` runs:
- ``baseline``: the plain-transformers loop (``benchmarks.stages.baseline_loop``), same images and models;
  ``baseline_bf16``: the same under bf16 autocast (ratios are given against both, and against the faster).
- ``service_cli``: ``hqlabel label --service`` as a new process (imports, Ray connection, job), whose driver
  runs in the service's job runner (``hqlabel.jobs.service_runner``); measured first, right after ``serve
  start``: Ray keeps about one idle worker per CPU in all, so the jobs of another driver (the rows below)
  would displace the runner's idle task workers and its next job would start new ones.
- ``service_first``: the first job of a driver on the warm service (the driver's Ray task workers start).
- ``service``: the following jobs of that driver on the warm service.
``start_s``: from the job's call (or the process start) to the first batch reaching the warm actor, by the
actor's clock (same machine).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.models import build_models
from benchmarks.run import demo_images, machine_info
from benchmarks.stages import CLASSES, baseline_loop


def _first_batch(before: dict) -> float:
    """The time.time() at which the new job's first batch reached a warm actor (the entry not in
    ``before``)."""
    from hqlabel.jobs.service import service_status

    firsts = {}
    for info in service_status()["workers"]:
        firsts.update({k: v for k, v in info["first_batch"].items() if k not in before})
    return min(firsts.values())


def _known() -> dict:
    from hqlabel.jobs.service import service_status

    return {k: v for info in service_status()["workers"] for k, v in info["first_batch"].items()}


def _job(images: Path, out: Path, device: str, service: bool) -> dict:
    from hqlabel.jobs.label import run_label_job
    from hqlabel.jobs.spec import LabelJobSpec
    from hqlabel.platform.config import LabelerConfig

    spec = LabelJobSpec(
        input=str(images),
        out=str(out),
        labeler=LabelerConfig(classes=CLASSES, preset="tiny-random", device=device),
        overwrite=True,
        service=service,
    )
    before = _known() if service else {}
    t0 = time.time()
    start = time.perf_counter()
    summary = run_label_job(spec, progress=False)
    seconds = time.perf_counter() - start
    row = {"seconds": seconds, "images_per_s": summary.images / seconds, "instances": summary.instances}
    if service:
        row["start_s"] = _first_batch(before) - t0
    return row


def _cli_job(images: Path, out: Path, device: str) -> dict:
    before = _known()
    t0 = time.time()
    cmd = [sys.executable, "-m", "hqlabel", "label", str(images), "--classes", ", ".join(CLASSES)]
    cmd += ["--out", str(out), "--preset", "tiny-random", "--device", device, "--service", "--overwrite"]
    subprocess.run([*cmd, "--no-progress"], check=True, capture_output=True)
    seconds = time.time() - t0
    return {"seconds": seconds, "images_per_s": 0.0, "start_s": _first_batch(before) - t0}


def _median(rows: list[dict]) -> dict:
    keys = rows[0].keys()
    return {k: statistics.median(r[k] for r in rows) for k in keys} | {"runs": rows}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.service", description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--num-cpus", type=int, default=2, help="CPUs of the service's local head (2)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)

    from hqlabel.jobs.service import SERVICE_CLASSES, start_service, stop_service
    from hqlabel.platform.config import LabelerConfig

    root = Path(tempfile.mkdtemp(prefix="hqlabel-bench-service-"))
    os.environ["HQLABEL_SERVICE_FILE"] = str(root / "service.json")
    paths = demo_images(root, args.images)
    images = paths[0].parent
    results: dict = {"machine": machine_info(args.device), "images": args.images, "repeats": args.repeats}

    detector, segmenter = build_models("tiny-random", args.device)
    out = root / "baseline.parquet"
    for name, precision in (("baseline", None), ("baseline_bf16", torch.bfloat16)):
        loops = []  # the loop as written (fp32), and under bf16 autocast (the best plain loop on a GPU)
        for _ in range(args.repeats):
            with torch.autocast(torch.device(args.device).type, precision, enabled=precision is not None):
                loops.append(baseline_loop(paths, detector, segmenter, out))
        rows = [{k: loop[k]["value"] for k in ("seconds", "images_per_s")} for loop in loops]
        results[name] = _median(rows)
    del detector, segmenter

    config = LabelerConfig(classes=SERVICE_CLASSES, preset="tiny-random", device=args.device)
    start = time.perf_counter()
    start_service(config, num_cpus=args.num_cpus)
    results["service_start_s"] = time.perf_counter() - start
    try:
        results["service_cli"] = _median(
            [_cli_job(images, root / f"cli{k}", args.device) for k in range(args.repeats)]
        )
        results["service_first"] = _job(images, root / "first", args.device, True)
        results["service"] = _median(
            [_job(images, root / f"svc{k}", args.device, True) for k in range(args.repeats)]
        )
    finally:
        stop_service()
    for loop in ("baseline", "baseline_bf16"):
        base = results[loop]["images_per_s"]
        results[f"service_over_{loop}"] = results["service"]["images_per_s"] / base
        results[f"service_first_over_{loop}"] = results["service_first"]["images_per_s"] / base
    for name in ("baseline", "baseline_bf16", "service_first", "service", "service_cli"):
        row = results[name]
        start_s = f", labeling after {row['start_s']:.2f} s" if "start_s" in row else ""
        print(f"{name:14s} {row['seconds']:7.2f} s  {row['images_per_s']:6.1f} images/s{start_s}")
    best = max(results["baseline"]["images_per_s"], results["baseline_bf16"]["images_per_s"])
    results["service_over_best_loop"] = results["service"]["images_per_s"] / best
    print(f"service / best plain loop: {results['service_over_best_loop']:.2f}x (goal 1.5x)")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
