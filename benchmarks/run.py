"""``python -m benchmarks.run``: HQLabel throughput, stage costs, cost per box and scaling; prints a table and
writes JSON. Random-weight models: only the timings mean anything, never the boxes or masks.

    python -m benchmarks.run [--images 200] [--preset tiny-random|real-size] [--device cpu|cuda]
        [--out benchmarks/results/NAME.json] [--only e2e baseline stages per_box scaling] [--quick]
        [--repeats 3]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import platform
import statistics
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from benchmarks.models import PRESETS, build_models, save_models
from benchmarks.stages import CLASSES, baseline_loop, cost_per_box, mask_parity, measure_stages, metric

SECTIONS = ("stages", "per_box", "baseline", "e2e", "scaling")


class RssSampler:
    """Peak summed RSS and PSS (bytes) of this process and all its descendants (Ray's raylet and workers of a
    local session), sampled every ``interval`` seconds in a background thread.

    RSS counts a shared page once per process that maps it (Ray's object store is shared memory, mapped by
    every worker that touches a block), so summed RSS overstates what a session uses; PSS (Linux) splits
    each shared page between the processes that map it, so the sum counts it once.
    """

    def __init__(self, interval: float = 0.2) -> None:
        importlib.import_module("ray")  # puts Ray's bundled psutil on the path
        import psutil

        self.process = psutil.Process()
        self.interval = interval
        self.peak = 0
        self.peak_pss = 0
        self._stop = threading.Event()

    def sample_both(self) -> tuple[int, int]:
        """(summed RSS, summed PSS); PSS is 0 where the OS does not report it."""
        import psutil

        rss = pss = 0
        for proc in [self.process, *self.process.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):  # a worker that exited between listing and reading
                info = proc.memory_full_info()
                rss += info.rss
                pss += getattr(info, "pss", 0)
        return rss, pss

    def _run(self) -> None:
        while not self._stop.is_set():
            rss, pss = self.sample_both()
            self.peak, self.peak_pss = max(self.peak, rss), max(self.peak_pss, pss)
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def machine_info(device: str) -> dict:
    import pyarrow
    import torch
    import transformers

    try:
        import ray
    except ImportError:  # the Ray-free GPU runs (benchmarks.gpu) may go without it
        ray = None

    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cpu_count": os.cpu_count(),
        "memory_gib": round(mem / 2**30, 1),
        "device": device,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "ray": ray and ray.__version__,
        "pyarrow": pyarrow.__version__,
        "platform": platform.platform(),
    }


def demo_images(root: Path, n: int) -> list[Path]:
    from hqlabel.platform.demo import make_demo_images

    folder = root / f"images-{n}"
    if not folder.exists():
        make_demo_images(folder, n, size=(480, 640))
    return sorted(folder.glob("*.jpg"))


def label_spec(images: Path, out: Path, args, models: tuple[str, str] | None, num_workers: int | None = None):
    from hqlabel.jobs.spec import LabelJobSpec
    from hqlabel.platform.config import LabelerConfig

    labeler = {"classes": CLASSES, "device": args.device}
    if models is None:
        labeler["preset"] = "tiny-random"
    else:
        labeler.update(detector=models[0], segmenter=models[1])
    return LabelJobSpec(
        input=str(images),
        out=str(out),
        labeler=LabelerConfig(**labeler),
        overwrite=True,
        num_workers=num_workers,
    )


def timed_job(spec) -> dict:
    from hqlabel.jobs.label import run_label_job

    start = time.perf_counter()
    summary = run_label_job(spec, progress=False)
    seconds = time.perf_counter() - start
    return {
        "images": metric(summary.images, "images"),
        "instances": metric(summary.instances, "instances"),
        "errors": metric(summary.errors, "error rows"),
        "seconds": metric(seconds, "s"),
        "images_per_s": metric(summary.images / seconds, "images/s"),
    }


def start_ray(num_cpus: int) -> float:
    import logging

    import ray

    if ray.is_initialized():
        ray.shutdown()
    start = time.perf_counter()
    ray.init(num_cpus=num_cpus, include_dashboard=False, logging_level=logging.WARNING)
    return time.perf_counter() - start


def median_of(runs: list[dict]) -> dict:
    """The median of each metric over repeated runs, plus every run's seconds."""
    out = {
        key: metric(statistics.median(run[key]["value"] for run in runs), runs[0][key]["unit"])
        for key in runs[0]
    }
    out["runs_seconds"] = [run["seconds"]["value"] for run in runs]
    out["repeats"] = metric(len(runs), "runs (median)")
    return out


def run_e2e(root: Path, args, models) -> dict:
    """The real pipeline on a local Ray (2 CPUs), ``args.repeats`` times: a fresh Ray session, then the same
    job cold (first of the session) and warm (second); medians over the repeats."""
    images = demo_images(root, args.images)[0].parent
    inits, cold, warm = [], [], []
    for k in range(args.repeats):
        inits.append(start_ray(2))
        cold.append(timed_job(label_spec(images, root / f"out-cold-{k}", args, models)))
        warm.append(timed_job(label_spec(images, root / f"out-warm-{k}", args, models)))
    return {
        "ray_init_s": metric(statistics.median(inits), "s (median)"),
        "cold": median_of(cold),
        "warm": median_of(warm),
    }


def run_scaling(root: Path, args, models) -> dict:
    """Peak RSS (driver + Ray) for two dataset sizes, each in a fresh Ray session; throughput with 1 vs 2
    labeling actors."""
    import ray

    from hqlabel.jobs.resources import plan_resources

    out: dict = {}
    for n in args.scaling_images:
        images = demo_images(root, n)[0].parent
        start_ray(2)  # each size from a fresh session: no workers left over from the other job
        with RssSampler() as sampler:
            idle, idle_pss = sampler.sample_both()
            job = timed_job(label_spec(images, root / f"out-scale-{n}", args, models))
        job["idle_rss"] = metric(idle / 2**20, "MiB (before the job)")
        job["peak_rss"] = metric(sampler.peak / 2**20, "MiB (driver + Ray processes)")
        job["idle_pss"] = metric(idle_pss / 2**20, "MiB (before the job)")
        job["peak_pss"] = metric(sampler.peak_pss / 2**20, "MiB (driver + Ray processes, PSS)")
        out[f"images_{n}"] = job
    sizes = [f"images_{n}" for n in args.scaling_images]
    if len(sizes) == 2:
        small, large = (out[size] for size in sizes)
        out["peak_rss_ratio"] = metric(
            large["peak_rss"]["value"] / small["peak_rss"]["value"], "ratio (large / small)"
        )
        if small["peak_pss"]["value"] > 0:
            out["peak_pss_ratio"] = metric(
                large["peak_pss"]["value"] / small["peak_pss"]["value"], "ratio (large / small)"
            )
        out["job_growth_ratio"] = metric(
            (large["peak_rss"]["value"] - large["idle_rss"]["value"])
            / (small["peak_rss"]["value"] - small["idle_rss"]["value"]),
            "ratio of peak - idle (large / small)",
        )
    plan2 = plan_resources(2, 0, num_workers=2)
    out["plan_2_cpus_2_workers"] = {
        "num_actors": metric(plan2.num_actors, "actors"),
        "actor_threads": metric(plan2.actor_threads, "torch threads"),
        "note": (
            "the resource plan keeps one CPU for I/O tasks, so 2 CPUs give 1 actor whatever --num-workers "
            "asks; that actor runs 2 torch threads (it also uses the I/O CPU)"
        ),
    }
    images = demo_images(root, args.images)[0].parent
    start_ray(3)  # oversubscribed on purpose: 2 actors of 1 CPU each plus 1 CPU for the tasks
    for workers in (1, 2):
        plan = plan_resources(ray.cluster_resources()["CPU"], 0, num_workers=workers)
        job = timed_job(label_spec(images, root / f"out-actors-{workers}", args, models, workers))
        job["num_actors"] = metric(plan.num_actors, "actors")
        out[f"ray_3_cpus_actors_{workers}"] = job
    ray.shutdown()
    return out


def median_stages(paths, detector, segmenter, threads: int, repeats: int) -> dict:
    """``measure_stages`` ``repeats`` times; the run with the median total (its stages add up)."""
    runs = sorted(
        (measure_stages(paths, detector, segmenter, threads=threads) for _ in range(repeats)),
        key=lambda run: run["total"]["value"],
    )
    out = runs[len(runs) // 2]
    out["runs_total_s"] = [run["total"]["value"] for run in runs]
    return out


def flatten(results: dict, prefix: str = "") -> list[tuple[str, float, str]]:
    rows = []
    for key, value in results.items():
        name = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict) and "value" in value and "unit" in value:
            rows.append((name, value["value"], value["unit"]))
        elif isinstance(value, dict):
            rows += flatten(value, name)
    return rows


def print_table(results: dict) -> None:
    rows = flatten(results)
    width = max(len(name) for name, _, _ in rows)
    for name, value, unit in rows:
        text = f"{value:.4g}" if isinstance(value, float) else str(value)
        print(f"{name:<{width}}  {text:>10}  {unit}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=200, help="images for the e2e, stage and actor runs")
    parser.add_argument("--baseline-images", type=int, default=None, help="images for the baseline loop")
    parser.add_argument("--preset", choices=PRESETS, default="tiny-random")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--out", type=Path, default=None, help="JSON file (default benchmarks/results/...)")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--quick", action="store_true", help="40 images, no 2,000-image scaling run")
    parser.add_argument("--vit-b", action="store_true", help="also time a real ViT-B encoder per box (slow)")
    parser.add_argument(
        "--repeats", type=int, default=3, help="runs of the stages, baseline and e2e jobs (medians reported)"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.images = min(args.images, 40)
        args.repeats = 1
    args.baseline_images = args.baseline_images or args.images
    args.scaling_images = [args.images] if args.quick else [args.images, 10 * args.images]
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    report: dict = {
        "machine": machine_info(args.device),
        "config": {"images": args.images, "preset": args.preset, "device": args.device, "only": args.only},
        "note": "random-weight models: boxes and masks are meaningless, only the timings are reported",
        "results": {},
    }
    results = report["results"]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="hqlabel-bench-") as tmp:
        root = Path(tmp)
        detector, segmenter = build_models(args.preset, args.device)
        paths = demo_images(root, args.images)
        if "stages" in args.only:
            from hqlabel.jobs.resources import plan_resources

            threads = plan_resources(2, 0).actor_threads  # the model actor's threads in the e2e runs
            measure_stages(paths[:8], detector, segmenter)  # warm-up
            results["stages"] = median_stages(paths, detector, segmenter, threads, args.repeats)
            if threads != 1:
                results["stages_1_thread"] = median_stages(paths, detector, segmenter, 1, args.repeats)
            results["mask_parity"] = mask_parity(paths, detector, segmenter)
        if "per_box" in args.only:
            from PIL import Image

            image = np.asarray(Image.open(paths[0]).convert("RGB"))
            results["per_box"] = {"tiny": cost_per_box(image, segmenter)}
            if args.preset == "tiny-random" and not args.quick:
                from hqlabel.segmenters.hq_sam import tiny_random_sam_hq

                real_decoder = tiny_random_sam_hq(image_size=1024, patch_size=16, decoder_hidden=256)
                results["per_box"]["real_size_decoder"] = cost_per_box(image, real_decoder)
            if args.vit_b or args.preset == "real-size":
                from benchmarks.models import real_size_sam_hq

                vit_b = segmenter if args.preset == "real-size" else real_size_sam_hq(args.device)
                results["per_box"]["vit_b"] = cost_per_box(image, vit_b, repeats=2)
        if "baseline" in args.only:
            results["baseline"] = median_of(
                [
                    baseline_loop(
                        paths[: args.baseline_images], detector, segmenter, root / "baseline.parquet"
                    )
                    for _ in range(args.repeats)
                ]
            )
        models = None if args.preset == "tiny-random" else save_models(args.preset, root / "models")
        if "e2e" in args.only:
            results["e2e"] = run_e2e(root, args, models)
        if "e2e" in results and "baseline" in results:
            results["pipeline_over_baseline"] = metric(
                results["e2e"]["warm"]["images_per_s"]["value"]
                / results["baseline"]["images_per_s"]["value"],
                "ratio (warm pipeline / baseline loop, images/s)",
            )
            results["pipeline_cold_over_baseline"] = metric(
                results["e2e"]["cold"]["images_per_s"]["value"]
                / results["baseline"]["images_per_s"]["value"],
                "ratio (cold pipeline / baseline loop, images/s)",
            )
        if "scaling" in args.only:
            results["scaling"] = run_scaling(root, args, models)
    results["benchmark_runtime"] = metric(time.perf_counter() - started, "s")
    print_table(results)
    out = args.out or Path("benchmarks/results") / f"{args.preset}-{args.device.replace(':', '')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
