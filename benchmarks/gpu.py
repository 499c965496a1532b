"""``python -m benchmarks.gpu --out DIR``: every open GPU measurement in one command, sized for about 10
minutes of one GPU; one JSON per step in DIR and ``DIR/summary.json`` (ratios, what ran, what was skipped).

    python -m benchmarks.gpu --out benchmarks/results/DATE-gpu-all [--budget-s 570]
    python -m benchmarks.gpu --out /tmp/gpu-smoke --smoke      # the CPU dry path, tiny sizes

Steps, in order of priority (each a subprocess with a timeout; a later one is skipped when the budget is
spent, and recorded so):

1. ``steady``: labeling through Ray at steady state on the warm service (``hqlabel serve``; a local Ray
   session with this machine's CPUs and GPU, one labeling actor): SAM-HQ ViT-L + Grounding DINO Swin-T (the
   ``grounding-dino-tiny`` architecture), 10 boxes per image, ``--images-l`` generated 640 x 480 JPEGs (200
   distinct ones, hard-linked under more names: each is still read and decoded), then ViT-B and ViT-H rows
   on fewer images. Start-up (building and saving the models, the service's actor loading them, the job's
   first batch) is reported apart from the steady rate (images after the first batch / seconds after it).
2. ``kernels``: ``benchmarks.gpu_sections --vit l --compile --only compute baseline compiled``: the plain
   loops (fp32 as written, and under bf16 autocast) that the steady rate is compared with, the compiled
   encoder's fraction of the measured bf16 matmul limit, and the compiled detector.
3. ``train-vit-b`` / ``train-vit-l``: ``benchmarks.train --only throughput --device cuda --model vit-b``
   (and ``vit-l``).

Every model has **random weights of the real architectures** (nothing can be downloaded on the GPU machine):
the timings mean something, the boxes and masks nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

BOXES = 10


def _link_images(paths: list[Path], folder: Path, n: int) -> Path:
    """``n`` image files in ``folder``: hard links (else copies) cycling through ``paths``."""
    import shutil

    folder.mkdir(parents=True, exist_ok=True)
    for k in range(n):
        target = folder / f"{k:06d}{paths[k % len(paths)].suffix}"
        try:
            os.link(paths[k % len(paths)], target)
        except OSError:
            shutil.copy(paths[k % len(paths)], target)
    return folder


def steady(args: argparse.Namespace) -> dict:
    """Step 1 (in this process): per ViT size, a warm service and one job of its image count on it."""
    import logging
    import tempfile

    import ray
    import torch

    from benchmarks.compute_limit import build_segmenter
    from benchmarks.models import real_size_grounding_dino
    from benchmarks.run import demo_images, machine_info
    from benchmarks.service import _first_batch, _known
    from benchmarks.stages import CLASSES
    from hqlabel.jobs.label import run_label_job
    from hqlabel.jobs.service import SERVICE_CLASSES, start_service, stop_service
    from hqlabel.jobs.spec import LabelJobSpec
    from hqlabel.platform.config import LabelerConfig

    root = Path(tempfile.mkdtemp(prefix="hqlabel-gpu-steady-"))
    os.environ["HQLABEL_SERVICE_FILE"] = str(root / "service.json")
    report: dict = {"machine": machine_info(args.device), "boxes_per_image": BOXES, "rows": {}}
    paths = demo_images(root, 200 if not args.smoke else 8)
    ray.init(include_dashboard=False, logging_level=logging.WARNING, object_store_memory=4 * 2**30)
    address = ray.get_runtime_context().gcs_address
    sizes = [("l", args.images_l), ("b", args.images_b), ("h", args.images_h)]
    device = torch.device(args.device)
    detector_dir = root / "detector"
    for vit, count in [(vit, count) for vit, count in sizes if count > 0]:
        row: dict = {"images": count}
        started = time.perf_counter()
        if args.smoke:
            models = {"preset": "tiny-random"}
        else:
            seg_dir = root / f"segmenter-{vit}"
            with torch.device(device):
                if not detector_dir.exists():
                    real_size_grounding_dino(device).save_pretrained(detector_dir)
                build_segmenter("real-size", vit=vit, device=str(device)).save_pretrained(seg_dir)
            torch.cuda.empty_cache() if device.type == "cuda" else None
            models = {"detector": str(detector_dir), "segmenter": str(seg_dir)}
        row["build_and_save_s"] = time.perf_counter() - started
        start = time.perf_counter()
        start_service(LabelerConfig(classes=SERVICE_CLASSES, device=args.device, **models), address=address)
        row["service_start_s"] = time.perf_counter() - start
        try:
            spec = LabelJobSpec(
                input=str(_link_images(paths, root / f"images-{vit}", count)),
                out=str(root / f"out-{vit}"),
                labeler=LabelerConfig(
                    classes=CLASSES,
                    device=args.device,
                    box_threshold=0.0,
                    text_threshold=0.0,
                    max_detections=BOXES,
                    **models,
                ),
                batch_size=args.batch_size,
                service=True,
            )
            before = _known()
            t0 = time.time()
            start = time.perf_counter()
            summary = run_label_job(spec, progress=False)
            seconds = time.perf_counter() - start
            first = _first_batch(before) - t0
            row.update(
                job_s=seconds,
                first_batch_s=first,
                images_labeled=summary.images,
                instances=summary.instances,
                errors=summary.errors,
                images_per_s_whole_job=summary.images / seconds,
                images_per_s_steady=(summary.images - args.batch_size) / max(seconds - first, 1e-9),
            )
        finally:
            stop_service(address)
        report["rows"][f"vit-{vit}"] = row
        print(f"steady vit-{vit}: {json.dumps(row)}", flush=True)
        args.out.write_text(json.dumps(report, indent=2))
    ray.shutdown()
    return report


def _steps(args: argparse.Namespace, out: Path) -> list[tuple[str, list[str], float]]:
    py = [sys.executable, "-m"]
    me = [*py, "benchmarks.gpu", "--step", "steady", "--out", str(out / "steady.json")]
    me += ["--device", args.device, "--batch-size", str(args.batch_size)]
    if args.smoke:
        me += ["--smoke", "--images-l", "16", "--images-b", "8", "--images-h", "0"]
        kernels = [*py, "benchmarks.gpu_sections", "--device", "cpu", "--preset", "tiny-random"]
        kernels += ["--images", "8", "--baseline-images", "4", "--only", "compute", "baseline"]
        train = "tiny"
    else:
        me += ["--images-l", str(args.images_l), "--images-b", str(args.images_b)]
        me += ["--images-h", str(args.images_h)]
        kernels = [*py, "benchmarks.gpu_sections", "--device", args.device, "--vit", "l", "--compile"]
        kernels += ["--baseline-images", "24", "--only", "compute", "baseline", "compiled"]
        kernels += ["--budget-s", "150"]
        train = None
    kernels += ["--out", str(out / "kernels-vit-l.json")]
    steps = [("steady", me, 330.0), ("kernels", kernels, 200.0)]
    for model in ("vit-b", "vit-l") if train is None else (train,):
        cmd = [*py, "benchmarks.train", "--only", "throughput", "--device", "cpu" if args.smoke else "cuda"]
        cmd += ["--model", model, "--out", str(out / f"train-{model}.json")]
        steps.append((f"train-{model}", cmd, 150.0))
    return steps


def _value(doc: dict, *keys: str) -> float | None:
    for key in keys:
        if not isinstance(doc, dict) or key not in doc:
            return None
        doc = doc[key]
    return doc["value"] if isinstance(doc, dict) and "value" in doc else doc


def summarise(out: Path, ran: dict) -> dict:
    """``summary.json``: what each step did, the steady ViT-L rate over both plain loops, and the compiled
    encoder's fraction of the bf16 limit."""

    def load(name: str) -> dict:
        path = out / name
        return json.loads(path.read_text()) if path.exists() else {}

    steady_doc, kernels = load("steady.json"), load("kernels-vit-l.json").get("results", {})
    rate = _value(steady_doc, "rows", "vit-l", "images_per_s_steady")
    summary = {"steps": ran, "note": "random weights of the real architectures: timings only"}
    for name in ("baseline", "baseline_bf16"):
        base = _value(kernels, name, "images_per_s")
        summary[f"steady_vit_l_over_{name}"] = rate / base if rate and base else None
    summary["compiled_encoder_fraction_of_bf16_limit"] = _value(kernels, "compiled", "batch_8_fraction")
    summary["eager_encoder_fraction_of_bf16_limit"] = _value(kernels, "compute_limit", "batch_8_fraction")
    summary["steady"] = steady_doc.get("rows")
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--out", type=Path, required=True, help="folder of the JSON results (a file for --step)"
    )
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--smoke", action="store_true", help="tiny models on the CPU, few images")
    parser.add_argument("--budget-s", type=float, default=570, help="skip steps once this is spent (570)")
    parser.add_argument("--images-l", type=int, default=5000, help="steady state, ViT-L images (5000)")
    parser.add_argument("--images-b", type=int, default=1000, help="steady state, ViT-B images (1000)")
    parser.add_argument("--images-h", type=int, default=500, help="steady state, ViT-H images (500)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--step", choices=("steady",), help=argparse.SUPPRESS)  # a step's own process
    args = parser.parse_args(argv)
    if args.smoke:
        args.device, args.budget_s = "cpu", max(args.budget_s, 3600.0)
    if args.step == "steady":
        return steady(args)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    ran: dict = {}
    for name, cmd, limit in _steps(args, args.out):
        limit *= 4 if args.smoke else 1  # the CPU is slow, and its timings do not matter
        left = args.budget_s - (time.monotonic() - started)
        if left < 30:
            ran[name] = {"skipped": f"budget spent ({args.budget_s:g} s)"}
            continue
        t0 = time.monotonic()
        try:
            done = subprocess.run(cmd, timeout=min(limit, left), capture_output=True, text=True)
            ran[name] = {"rc": done.returncode, "stderr_tail": done.stderr[-1500:]}
        except subprocess.TimeoutExpired:
            ran[name] = {"rc": None, "timed_out": True}
        ran[name].update(seconds=time.monotonic() - t0, cmd=" ".join(cmd[2:]))
        print(f"{name}: {ran[name]['rc']} in {ran[name]['seconds']:.0f} s", flush=True)
        summarise(args.out, ran)
    summary = summarise(args.out, ran)
    print(json.dumps({k: v for k, v in summary.items() if k != "steps"}, indent=2))
    return summary


if __name__ == "__main__":
    main()
