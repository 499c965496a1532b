"""``python -m benchmarks.gpu_sections``: the GPU measurements of the benchmark suite in one run, written to
JSON section by section (a run stopped by a time limit keeps what it finished; a section that fails is
recorded under ``errors`` and the run goes on). ``python -m benchmarks.gpu`` runs it as one of its steps.

    python -m benchmarks.gpu_sections --device cuda [--vit l] [--images 200] [--baseline-images 40]
        [--boxes 10] [--batch-size 8] [--compile] [--only SECTION ...] [--budget-s 420] --out FILE.json

Models: Grounding DINO at ``grounding-dino-tiny`` size (Swin-T + BERT-base) and SAM-HQ ViT-B/L/H, random
weights (timings only; boxes and masks mean nothing), saved and loaded back with ``from_pretrained`` as a job
loads them. Each image gets ``--boxes`` boxes: the detector keeps its best-scored ``--boxes`` queries
(thresholds 0, ``max_detections``), and the baseline lowers its post-processing threshold to just under its
k-th best query.

Sections (``--only``; all but ``ray`` by default):
- ``compute``: encoder FLOPs per image (counted), measured bf16 matmul rate, encoder images/s at batch 1,
  ``--batch-size`` and twice that under bf16 autocast, and the fraction of the limit reached.
- ``pipeline``: the labeling actor's code (``LabelWorker``, exactly what a Ray actor runs) fed by JPEG-decode
  threads (``decode_batch``, the read/decode tasks' code) and followed by a writer thread (``write_parts``,
  then ``finalize_shard``), so decode and writes overlap the GPU work as Ray's tasks do; GPU utilisation
  sampled through NVML meanwhile. No Ray.
- ``ray``: the real job (``run_label_job``: Ray Data, decode tasks, the labeling actor, write tasks, the
  driver's merge) in a local Ray session, cold and warm. Needs Ray.
- ``baseline``: the plain-transformers loop, fp32 (as written by a user), and the same under bf16 autocast.
- ``per_box``: encoder vs decoder seconds for 1, 10 and 100 boxes, encoder calls per image.
- ``variants``: the pipeline with the processors' CPU preprocessing (bf16, fp32) and with a fp32 detector.
- ``stages``: the same code path stage by stage with a synchronising timer (no overlap); the detector's
  preprocessing / forward / scoring + NMS split.
- ``compiled`` (with ``--compile``): the encoder under ``torch.compile``, then the pipeline with it; the
  detector alone (``detect`` images/s: eager, eager with ``--compile``'s fixed shapes, compiled), then the
  pipeline with both models compiled (``LabelerConfig.compile``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from benchmarks.stages import CLASSES, baseline_loop, cost_per_box, measure_stages, metric, source_table, sync

SECTIONS = ("compute", "pipeline", "ray", "baseline", "per_box", "variants", "stages", "compiled")


class GpuUtilSampler:
    """Mean GPU utilisation (NVML's "percent of time a kernel was running") sampled every ``interval`` s in
    a background thread; ``mean`` is None where NVML is missing (CPU runs)."""

    def __init__(self, device: torch.device, interval: float = 0.05) -> None:
        self.samples: list[int] = []
        self.interval = interval
        self._handle = None
        if device.type == "cuda":
            try:
                import pynvml

                pynvml.nvmlInit()
                self._handle = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
                self._nvml = pynvml
            except Exception:  # no NVML: utilisation is not reported
                self._handle = None
        self._stop = threading.Event()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(self._nvml.nvmlDeviceGetUtilizationRates(self._handle).gpu)
            self._stop.wait(self.interval)

    def __enter__(self) -> GpuUtilSampler:
        if self._handle is not None:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._handle is not None:
            self._stop.set()
            self._thread.join()

    @property
    def mean(self) -> float | None:
        return float(np.mean(self.samples)) if self.samples else None


def overlapped_pipeline(
    paths: list[Path], worker, *, batch_size: int, decode_threads: int, out_dir: Path
) -> dict:
    """``paths`` through decode threads -> ``worker`` (a ``LabelWorker``) -> a writer thread, then
    ``finalize_shard``; images/s, instances, GPU utilisation."""
    from hqlabel.workers.decode import decode_batch
    from hqlabel.workers.writer import finalize_shard, write_parts

    source = source_table(paths)
    device = worker.labeler.segmenter.device
    instances = 0
    with GpuUtilSampler(device) as util:
        sync(device)
        start = time.perf_counter()
        with ThreadPoolExecutor(decode_threads) as decode, ThreadPoolExecutor(1) as write:
            decoded = [
                decode.submit(decode_batch, source.slice(s, batch_size))
                for s in range(0, len(paths), batch_size)
            ]
            writes = []
            for batch in decoded:
                result = worker(batch.result())
                instances += sum(len(v or []) for v in result["instances"].to_pylist())
                writes.append(write.submit(write_parts, result, out=str(out_dir)))
            for w in writes:
                w.result()
        marker = finalize_shard(str(out_dir), "00000", len(paths))
        sync(device)
        seconds = time.perf_counter() - start
    if marker is None or marker["images"] != len(paths) or marker["errors"]:
        raise RuntimeError(f"the pipeline run did not write every image: {marker}")
    return {
        "images": metric(len(paths), "images"),
        "instances": metric(instances, "instances"),
        "seconds": metric(seconds, "s"),
        "images_per_s": metric(len(paths) / seconds, "images/s"),
        "gpu_util": metric(util.mean, "% (NVML, mean over the run)"),
        "batch_size": metric(batch_size, "images per actor batch"),
        "decode_threads": metric(decode_threads, "threads"),
    }


def ray_jobs(paths: list[Path], labeler, root: Path, batch_size: int) -> dict:
    """``run_label_job`` (the real job: Ray Data read -> decode tasks -> labeling actor -> write tasks ->
    driver merge) on a folder of ``paths``, in a local Ray session with this machine's CPUs and GPUs; the
    same job twice (cold: first of the session; warm: second), each starting its actor afresh."""
    import logging
    import shutil

    import ray

    from benchmarks.run import timed_job
    from hqlabel.jobs.spec import LabelJobSpec

    folder = root / "ray-input"
    folder.mkdir(exist_ok=True)
    for path in paths:
        shutil.copy(path, folder / path.name)
    start = time.perf_counter()
    ray.init(include_dashboard=False, logging_level=logging.WARNING, object_store_memory=4 * 2**30)
    out = {"ray_init_s": metric(time.perf_counter() - start, "s"), "ray": ray.__version__}
    try:
        for name in ("cold", "warm"):
            spec = LabelJobSpec(
                input=str(folder), out=str(root / f"ray-{name}"), labeler=labeler, batch_size=batch_size
            )
            out[name] = job = timed_job(spec)  # the job's seconds include its actor's start
            if job["images"]["value"] != len(paths) or job["errors"]["value"]:
                raise RuntimeError(f"the Ray job did not label every image: {job}")
    finally:
        ray.shutdown()
    out["images_per_s"] = out["warm"]["images_per_s"]
    return out


def detector_split(paths: list[Path], detector, batch_size: int) -> dict:
    """Seconds per image of the detector's parts on ``paths``: preprocessing (``_inputs``), the model's
    forward pass, and the whole ``detect`` (the difference is scoring, thresholds and NMS)."""
    from PIL import Image

    from benchmarks.stages import Timer

    images = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
    (text,) = detector.passes(CLASSES)  # one prompt: the benchmark's classes fit the text limit
    prompt = text.prompt
    timer = Timer(detector.device)
    detector.detect(images[:batch_size], CLASSES)  # warm-up
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            batch = images[start : start + batch_size]
            with timer("preprocess"):
                inputs = detector._inputs(batch, prompt)
            with timer("forward"), detector.autocast():
                detector.model(**inputs)
            with timer("detect"):
                detector.detect(batch, CLASSES)
    n = len(images)
    out = {f"{name}_s_per_image": metric(s / n, "s/image") for name, s in timer.seconds.items()}
    rest = timer.seconds["detect"] - timer.seconds["preprocess"] - timer.seconds["forward"]
    out["scores_nms_s_per_image"] = metric(rest / n, "s/image (detect - preprocess - forward)")
    return out


def detector_throughput(paths: list[Path], detector, batch_size: int, repeats: int = 2) -> dict:
    """``detector.detect`` alone on ``paths`` (decoded up front) in batches of ``batch_size``: the first pass
    timed apart (a compiled detector compiles there), then images/s of the best of ``repeats`` passes."""
    from PIL import Image

    images = [np.asarray(Image.open(p).convert("RGB")) for p in paths]

    def one_pass() -> float:
        start = time.perf_counter()
        for first in range(0, len(images), batch_size):
            detector.detect(images[first : first + batch_size], CLASSES)
        sync(detector.device)
        return time.perf_counter() - start

    first_s = one_pass()
    best = min(one_pass() for _ in range(repeats))
    return {
        "first_pass_s": metric(first_s, "s (a compiled detector compiles here)"),
        "images_per_s": metric(len(images) / best, "images/s"),
        "canvas": list(detector.canvas) if detector.fixed_shapes else None,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.gpu_sections", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N, or cpu (a smoke run)")
    parser.add_argument("--preset", choices=("real-size", "tiny-random"), default="real-size")
    parser.add_argument("--vit", choices=("b", "l", "h"), default="l", help="SAM-HQ encoder size (l)")
    parser.add_argument("--images", type=int, default=200, help="images per pipeline run (200)")
    parser.add_argument("--baseline-images", type=int, default=40, help="images of the baseline loop (40)")
    parser.add_argument("--variant-images", type=int, default=64, help="images per pipeline variant (64)")
    parser.add_argument("--boxes", type=int, default=10, help="boxes per image (10)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per actor batch (8)")
    parser.add_argument("--decode-threads", type=int, default=4, help="JPEG decode threads (4)")
    parser.add_argument(
        "--precision",
        choices=("auto", "fp32", "bf16"),
        default="auto",
        help="the pipeline and Ray job's precision (auto: bf16 on CUDA, fp32 on the CPU)",
    )
    parser.add_argument(
        "--compile", action="store_true", help="also time the torch.compile'd encoder and detector"
    )
    parser.add_argument(
        "--only",
        nargs="+",
        choices=SECTIONS,
        default=[s for s in SECTIONS if s != "ray"],
        help="sections to run (default: all but ray, which needs Ray and a local Ray session)",
    )
    parser.add_argument("--budget-s", type=float, default=420, help="skip later sections after this (420)")
    parser.add_argument("--out", type=Path, required=True, help="JSON file")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    from benchmarks.compute_limit import build_segmenter, encoder_flops, encoder_throughput, matmul_rate
    from benchmarks.models import real_size_grounding_dino
    from benchmarks.run import demo_images, machine_info, print_table
    from hqlabel.detectors.grounding_dino import GroundingDinoDetector, tiny_random_grounding_dino
    from hqlabel.platform.config import LabelerConfig
    from hqlabel.segmenters.hq_sam import HQSamSegmenter
    from hqlabel.workers.labeler import Labeler, LabelWorker

    args = parse_args(argv)
    started = time.perf_counter()
    device = torch.device(args.device)
    report: dict = {
        "machine": machine_info(str(device)),
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "note": "random-weight models: only the timings mean anything",
        "results": {},
    }
    results = report["results"]
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def save(section: str) -> None:
        results["elapsed_s"] = metric(time.perf_counter() - started, "s")
        args.out.write_text(json.dumps(report, indent=2))
        print(f"[{time.perf_counter() - started:6.1f} s] {section}: {json.dumps(results.get(section))}")

    def wanted(group: str, section: str | None = None) -> bool:
        """Whether to run ``section`` (default: ``group``): its group is in ``--only`` and the time budget is
        not spent (else it is recorded under ``skipped``)."""
        if group not in args.only:
            return False
        if time.perf_counter() - started < args.budget_s:
            return True
        results.setdefault("skipped", []).append(section or group)
        save("skipped")
        return False

    def detector(precision: str, preprocess: str = "auto", **kwargs) -> GroundingDinoDetector:
        return GroundingDinoDetector(
            det_model.model,
            det_model.processor,
            box_threshold=0.0,
            text_threshold=0.0,
            max_detections=args.boxes,
            device=device,
            precision=precision,
            preprocess=preprocess,
            **kwargs,
        )

    def segmenter(precision: str, preprocess: str = "auto", compile: bool = False) -> HQSamSegmenter:
        return HQSamSegmenter(
            seg_model.model,
            seg_model.processor,
            device=device,
            precision=precision,
            preprocess=preprocess,
            compile=compile,
        )

    @contextlib.contextmanager
    def recorded(section: str):
        """Run a section; an exception is recorded under ``errors`` and the run goes on."""
        try:
            yield
        except Exception as e:
            results.setdefault("errors", {})[section] = f"{type(e).__name__}: {e}"[:2000]
            traceback.print_exc()
            save("errors")

    with torch.device(device):  # random initialisation on the GPU: seconds instead of a minute on the CPU
        det_model = (
            real_size_grounding_dino(device)
            if args.preset == "real-size"
            else tiny_random_grounding_dino(device=device)
        )
        seg_model = build_segmenter(args.preset, vit=args.vit, device=str(device), precision="fp32")
    results["init_s"] = metric(time.perf_counter() - started, "s (random initialisation of both models)")
    precision, dtype = "bf16", torch.bfloat16
    with tempfile.TemporaryDirectory(prefix="hqlabel-gpu-") as tmp:
        root = Path(tmp)
        paths = demo_images(root, max(args.images, args.baseline_images, args.variant_images))
        run = dict(batch_size=args.batch_size, decode_threads=args.decode_threads)
        loop = dict(box_threshold=0.0, text_threshold=0.0, max_boxes=args.boxes)
        flops = rate = None
        det_dir, seg_dir = root / "detector", root / "segmenter"
        det_model.save_pretrained(det_dir)  # loaded back with from_pretrained, as a job loads them
        seg_model.save_pretrained(seg_dir)
        config = LabelerConfig(
            classes=CLASSES,
            detector=str(det_dir),
            segmenter=str(seg_dir),
            device=str(device),
            precision=args.precision,
            box_threshold=0.0,
            text_threshold=0.0,
            max_detections=args.boxes,
        )

        if wanted("compute") or (args.compile and "compiled" in args.only):
            with recorded("compute_limit"):  # the encoder against the compute limit
                seg = segmenter(precision)
                flops = encoder_flops(seg)
                rate = matmul_rate(device, dtype)
                limit = {
                    "encoder_gflops_per_image": metric(flops / 1e9, "GFLOP/image"),
                    "matmul_tflops_per_s": metric(rate / 1e12, f"TFLOP/s ({dtype}, measured)"),
                    "limit_images_per_s": metric(rate / flops, "images/s"),
                    "attention_implementation": seg.attention_implementation,
                }
                results["compute_limit"] = limit
                for batch in sorted({1, args.batch_size, 2 * args.batch_size}):
                    images_per_s, _ = encoder_throughput(seg, batch)
                    limit[f"batch_{batch}_images_per_s"] = metric(images_per_s, "images/s")
                    limit[f"batch_{batch}_fraction"] = metric(
                        images_per_s * flops / rate, "fraction of limit"
                    )
                save("compute_limit")

        worker = None
        if wanted("pipeline"):
            with recorded("pipeline"):  # the labeling actor's code, decode and write threads around it
                load_start = time.perf_counter()
                worker = LabelWorker(config)
                results["load_s"] = metric(
                    time.perf_counter() - load_start, "s (from_pretrained, both models)"
                )
                overlapped_pipeline(paths[: 2 * args.batch_size], worker, **run, out_dir=root / "warm")
                runs = [
                    overlapped_pipeline(paths[: args.images], worker, **run, out_dir=root / f"p{k}")
                    for k in range(2)
                ]
                results["pipeline"] = max(runs, key=lambda r: r["images_per_s"]["value"])
                results["pipeline"]["runs_images_per_s"] = [r["images_per_s"]["value"] for r in runs]
                results["pipeline"]["precision"] = worker.labeler.segmenter.precision
                results["pipeline"]["torch_preprocess"] = worker.labeler.segmenter.torch_preprocess
                save("pipeline")

        if wanted("ray"):
            with recorded("ray"):  # the real job: hqlabel's Ray Data pipeline on a local Ray with this GPU
                results["ray"] = ray_jobs(paths[: args.images], config, root, args.batch_size)
                save("ray")

        base_det, base_seg = detector("fp32", "processor"), segmenter("fp32", "processor")
        if wanted("baseline"):
            with recorded("baseline"):  # plain transformers, fp32 as written
                baseline_loop(paths[:2], base_det, base_seg, root / "b.parquet", **loop)  # warm-up
                results["baseline"] = baseline_loop(
                    paths[: args.baseline_images], base_det, base_seg, root / "b.parquet", **loop
                )
                save("baseline")
        if wanted("baseline", "baseline_bf16"):  # the best plain loop: bf16 autocast (CPU: avx512_bf16/AMX)
            with recorded("baseline_bf16"), torch.autocast(device.type, dtype):
                results["baseline_bf16"] = baseline_loop(
                    paths[: args.baseline_images], base_det, base_seg, root / "b.parquet", **loop
                )
                save("baseline_bf16")
        for name in ("pipeline", "ray"):  # every ratio against both loops: fp32 as written, and bf16
            for loop_name in ("baseline", "baseline_bf16"):
                if name in results and loop_name in results:
                    results[f"{name}_over_{loop_name}"] = metric(
                        results[name]["images_per_s"]["value"] / results[loop_name]["images_per_s"]["value"],
                        "ratio (images/s)",
                    )

        if wanted("per_box"):
            with recorded("per_box"):
                from PIL import Image

                image = np.asarray(Image.open(paths[0]).convert("RGB"))
                results["per_box"] = cost_per_box(image, segmenter(precision), repeats=5, threads=4)
                save("per_box")

        # Where the time goes: variants of the pipeline, then stage by stage.
        variants = {
            "bf16_processor": (precision, precision, "processor"),
            "fp32_processor": ("fp32", "fp32", "processor"),
            "fp32_detector": ("fp32", precision, "auto"),
        }
        for name, (det_prec, seg_prec, pre) in variants.items():
            if worker is None or not wanted("variants", f"pipeline_{name}"):
                continue
            with recorded(f"pipeline_{name}"):
                worker.labeler = Labeler(detector(det_prec, pre), segmenter(seg_prec, pre), CLASSES)
                results[f"pipeline_{name}"] = overlapped_pipeline(
                    paths[: args.variant_images], worker, **run, out_dir=root / f"v-{name}"
                )
                save(f"pipeline_{name}")
        if wanted("stages"):
            with recorded("stages"):
                det, seg = detector(precision), segmenter(precision)
                measure_stages(paths[: args.batch_size], det, seg, batch_size=args.batch_size, threads=4)
                results["stages"] = measure_stages(
                    paths[: args.variant_images], det, seg, batch_size=args.batch_size, threads=4
                )
                save("stages")
            with recorded("detector_split"):
                results["detector_split"] = detector_split(
                    paths[: args.variant_images], detector(precision), args.batch_size
                )
                save("detector_split")

        if args.compile and flops and wanted("compiled"):
            with recorded("compiled"):
                compiled = segmenter(precision, compile=True)  # compiles seg_model's encoder in place
                compile_start = time.perf_counter()
                images_per_s, times = encoder_throughput(compiled, args.batch_size, warmup=3)
                results["compiled"] = {
                    "first_batches_s": metric(
                        time.perf_counter() - compile_start - sum(times), "s (compiling)"
                    ),
                    f"batch_{args.batch_size}_images_per_s": metric(images_per_s, "images/s"),
                    f"batch_{args.batch_size}_fraction": metric(
                        images_per_s * flops / rate, "fraction of limit"
                    ),
                }
                save("compiled")
            if worker is not None and "compiled" in results and wanted("compiled", "pipeline_compiled"):
                with recorded("pipeline_compiled"):
                    worker.labeler = Labeler(detector(precision), compiled, CLASSES)
                    overlapped_pipeline(paths[: 2 * args.batch_size], worker, **run, out_dir=root / "cw")
                    results["pipeline_compiled"] = overlapped_pipeline(
                        paths[: args.images], worker, **run, out_dir=root / "c"
                    )
                    save("pipeline_compiled")
            if "compiled" in results and wanted("compiled", "detector_compiled"):
                with recorded("detector_compiled"):  # the detector alone: eager, fixed shapes, compiled
                    det_paths = paths[: args.variant_images]
                    out = results["detector_compiled"] = {}
                    for name, kwargs in [("eager", {}), ("fixed_shapes", dict(fixed_shapes=True))]:
                        out[name] = detector_throughput(
                            det_paths, detector(precision, **kwargs), args.batch_size
                        )
                    # compiles det_model.model in place: every detector built from here on is compiled
                    compiled_det = detector(precision, compile=True)
                    out["compiled"] = detector_throughput(det_paths, compiled_det, args.batch_size)
                    out["compiled_over_eager"] = metric(
                        out["compiled"]["images_per_s"]["value"] / out["eager"]["images_per_s"]["value"],
                        "ratio (images/s)",
                    )
                    save("detector_compiled")
                if "detector_compiled" in results and wanted("compiled", "pipeline_compiled_both"):
                    with recorded("pipeline_compiled_both"):  # LabelerConfig.compile: both models compiled
                        if worker is None:
                            worker = LabelWorker(config)
                        worker.labeler = Labeler(compiled_det, compiled, CLASSES)
                        overlapped_pipeline(paths[: 2 * args.batch_size], worker, **run, out_dir=root / "bw")
                        results["pipeline_compiled_both"] = overlapped_pipeline(
                            paths[: args.images], worker, **run, out_dir=root / "b"
                        )
                        save("pipeline_compiled_both")
    save("elapsed_s")
    print_table(results)
    return report


if __name__ == "__main__":
    main()
