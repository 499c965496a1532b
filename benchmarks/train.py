"""``python -m benchmarks.train``: HQ-token training throughput and a training worker's memory.

Two sections, random weights (only speed and memory mean anything):

- ``throughput``: training samples (images) per second per worker, for 1 and 2 workers
  (``--workers 1 2``). The recipe runs as Ray Train's CPU workers run it (``run_training`` under a gloo
  process group, DDP), started with ``torch.multiprocessing`` so that Ray's start-up stays out of the figure;
  each worker gets ``cpu_count // workers`` torch threads. The figure is an epoch after the first (the
  second of 2): images per worker / seconds between the two epochs' reports, which includes that epoch's
  validation (on ``--val-images`` images) and rank 0's checkpoint. ``--model`` picks the base: ``tiny``
  (the tiny random preset's model) or a random-weight SAM-HQ ``vit-b`` / ``vit-l`` at full size (1024 x 1024
  input); it is written with ``save_pretrained`` to a local folder that the run loads as its ``base``, the
  path a real base takes. ``--device cuda`` trains one worker on the GPU (one GPU cannot host two NCCL
  ranks) and adds the GPU's mean utilisation over the measured epoch and the peak allocated memory.
- ``memory``: the peak RSS of one training process (``run_training`` in a fresh process, ``VmHWM``) on
  datasets of ``--memory-images`` N and 4N random-noise ``--memory-side``-pixel BMP images, one mask each,
  1 epoch. With ``--code DIR`` it measures another checkout (an older commit, for a before/after).

    python -m benchmarks.train [--only throughput memory] [--workers 1 2] [--code DIR]
        [--device cpu|cuda] [--model tiny|vit-b|vit-l] [--out benchmarks/results/NAME.json]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

SECTIONS = ("throughput", "memory")
DEVICES = ("cpu", "cuda")
MODELS = ("tiny", "vit-b", "vit-l")


def write_noise_dataset(out: str, images: int, side: int, *, seed: int = 0) -> str:
    """An instance dataset of ``images`` random-noise ``side`` x ``side`` BMP images (uncompressed: the
    bytes are the pixels, 3 * side**2 bytes an image, and they decode fast), one rectangle mask each."""
    from PIL import Image

    from hqlabel.platform.instances import ImageInstances, Instance, write_instances
    from hqlabel.platform.rle import encode_mask

    rng = np.random.default_rng(seed)
    mask = np.zeros((side, side), dtype=bool)
    mask[side // 4 : side // 2, side // 8 : side - side // 8] = True
    rle = encode_mask(mask)

    def rows():
        for k in range(images):
            buffer = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buffer, "BMP")
            yield ImageInstances(f"noise-{k:06d}", buffer.getvalue(), side, side, [Instance(0, "bar", rle)])

    write_instances(rows(), out, kind="benchmark", source="noise")
    return out


MEMORY_CHILD = """
import json, re, sys
from pathlib import Path
from hqlabel.training.config import TrainConfig
from hqlabel.training.recipe import run_training

run_training(TrainConfig(**json.loads(sys.argv[1])))
# VmHWM: this process's own peak. (ru_maxrss would report the parent's RSS when that was larger: Linux keeps
# the high-water mark across the exec of a vfork'ed child.)
peak = int(re.search(r"VmHWM:\\s+(\\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024
print("RESULT " + json.dumps({"peak_rss": peak}))
"""


def training_peak_rss(config: dict, *, code: Path | None = None) -> int:
    """Peak RSS in bytes of a fresh process that runs ``run_training(TrainConfig(**config))`` (the
    checkout at ``code``, default this one)."""
    code = code or Path.cwd()
    proc = subprocess.run(
        [sys.executable, "-c", MEMORY_CHILD, json.dumps(config)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(code)},
        cwd=code,  # a -c script imports from its working directory first
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"training child failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return int(json.loads(lines[-1][len("RESULT ") :])["peak_rss"])


def memory_config(data: str, val: str, out: str) -> dict:
    """The memory run: 1 epoch, batch 4, tiny random base; fields every version of TrainConfig has."""
    return dict(
        data=data, val_data=val, out=out, preset="tiny-random", epochs=1, batch_size=4, num_points=256
    )


def run_memory(images: int, side: int, work: Path, code: Path | None) -> dict:
    val = write_noise_dataset(str(work / "val"), 2, 64, seed=99)
    results = {}
    for n in (images, 4 * images):
        data = write_noise_dataset(str(work / f"data-{n}"), n, side, seed=n)
        start = time.perf_counter()
        peak = training_peak_rss(memory_config(data, val, str(work / f"run-{n}")), code=code)
        results[f"images_{n}"] = {
            "dataset_image_bytes": {"value": n * 3 * side * side, "unit": "bytes"},
            "peak_rss": {"value": peak, "unit": "bytes"},
            "wall_s": {"value": round(time.perf_counter() - start, 1), "unit": "s"},
        }
    small, large = (results[f"images_{n}"]["peak_rss"]["value"] for n in (images, 4 * images))
    results["ratio_4x"] = {"value": round(large / small, 3), "unit": "x"}
    return results


def save_random_base(model: str, directory: Path) -> str:
    """Write a random-weight SAM-HQ of size ``model`` (``MODELS``) to ``directory`` with ``save_pretrained``
    and return it, a local folder that ``TrainConfig.base`` loads as it loads a downloaded model."""
    from benchmarks.compute_limit import build_segmenter

    if model not in MODELS:
        raise ValueError(f"unknown --model {model!r}; choose one of {MODELS}")
    if model == "tiny":
        segmenter = build_segmenter("tiny-random")
    else:
        segmenter = build_segmenter("real-size", vit=model.removeprefix("vit-"))
    segmenter.save_pretrained(directory)
    return str(directory)


def _gpu_utilisation() -> float | None:
    """The GPU's busy percentage now (NVML through torch, else ``nvidia-smi``); None when neither answers."""
    import torch

    try:
        return float(torch.cuda.utilization())
    except Exception:  # no pynvml / amdsmi, or NVML failed (its own error types): ask nvidia-smi
        pass
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-i", "0"],
            capture_output=True, text=True, timeout=5, check=True,
        )  # fmt: skip
        return float(out.stdout.split()[0])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


class UtilisationSampler(threading.Thread):
    """Samples ``(perf_counter, busy %)`` of the GPU every ``interval`` seconds until ``stop``."""

    def __init__(self, interval: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.interval, self.samples = interval, []
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            value = _gpu_utilisation()
            if value is not None:
                self.samples.append((time.perf_counter(), value))
            self._stop_event.wait(self.interval)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


def _throughput_worker(rank: int, workers: int, store: str, config: dict, times: str, device: str) -> None:
    import torch
    import torch.distributed as dist

    from hqlabel.training.config import TrainConfig
    from hqlabel.training.recipe import run_training

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))
    if workers > 1:
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=workers)
    stamps: list[float] = []
    sampler = UtilisationSampler() if device == "cuda" else None
    if sampler:
        sampler.start()
    try:
        run_training(
            TrainConfig(**config),
            rank=rank,
            world_size=workers,
            device="cuda:0" if device == "cuda" else "cpu",
            report=lambda _: stamps.append(time.perf_counter()),
        )
    finally:
        if sampler:
            sampler.stop()
        if workers > 1:
            dist.destroy_process_group()
    record: dict = {"stamps": stamps}
    if sampler:
        during = [value for t, value in sampler.samples if stamps[0] <= t <= stamps[1]]
        record["gpu_utilisation"] = sum(during) / len(during) if during else None
        record["gpu_samples"] = len(during)
        record["peak_memory_allocated"] = torch.cuda.max_memory_allocated()
    Path(times, f"{rank}.json").write_text(json.dumps(record))


def run_throughput(
    worker_counts: list[int],
    images: int,
    val_images: int,
    work: Path,
    *,
    device: str = "cpu",
    model: str = "tiny",
) -> dict:
    import torch.multiprocessing as mp

    from hqlabel.training import checkpoint
    from hqlabel.training.synthetic import write_fine_structure_dataset

    data, val = str(work / "synthetic"), str(work / "synthetic-val")
    write_fine_structure_dataset(data, images, size=256, seed=1)
    write_fine_structure_dataset(val, val_images, size=256, seed=2)
    base = save_random_base(model, work / f"sam-hq-{model}")
    results = {}
    for workers in worker_counts:
        run = work / f"throughput-{workers}"
        times = run / "times"
        times.mkdir(parents=True)
        config = dict(
            data=data, val_data=val, out=str(run / "out"), base=base, epochs=2, batch_size=4,
            num_points=256, device=device,
        )  # fmt: skip
        mp.spawn(
            _throughput_worker,
            args=(workers, str(run / "store"), config, str(times), device),
            nprocs=workers,
            join=True,
        )
        records = [json.loads((times / f"{r}.json").read_text()) for r in range(workers)]
        epoch_s = max(r["stamps"][1] - r["stamps"][0] for r in records)
        per_worker = checkpoint.world_layout(workers, 4, images)["images_per_worker"]
        result = results[f"workers_{workers}"] = {
            "images_per_worker_per_epoch": {"value": per_worker, "unit": "images"},
            "epoch_s": {"value": round(epoch_s, 2), "unit": "s"},
            "samples_per_s_per_worker": {"value": round(per_worker / epoch_s, 2), "unit": "images/s"},
            "samples_per_s_total": {"value": round(workers * per_worker / epoch_s, 2), "unit": "images/s"},
        }
        if device == "cuda":  # one worker (main refuses more)
            utilisation = records[0]["gpu_utilisation"]
            result["gpu_utilisation_mean"] = {
                "value": None if utilisation is None else round(utilisation, 1), "unit": "%",
            }  # fmt: skip
            result["gpu_utilisation_samples"] = {"value": records[0]["gpu_samples"], "unit": "samples"}
            result["peak_memory_allocated"] = {"value": records[0]["peak_memory_allocated"], "unit": "bytes"}
    return results


def main(argv: list[str] | None = None) -> dict:
    from benchmarks.run import machine_info

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument(
        "--workers", type=int, nargs="+", help="throughput: worker counts (default: 1 2; on cuda: 1)"
    )
    parser.add_argument("--device", choices=DEVICES, default="cpu", help="throughput: where workers train")
    parser.add_argument(
        "--model", choices=MODELS, default="tiny", help="throughput: random-weight SAM-HQ base to train"
    )
    parser.add_argument("--images", type=int, default=64, help="throughput: 256 px training images")
    parser.add_argument("--val-images", type=int, default=4, help="throughput: validation images")
    parser.add_argument("--memory-images", type=int, default=24, help="memory: N (and 4N) images")
    parser.add_argument("--memory-side", type=int, default=1024, help="memory: image side in pixels")
    parser.add_argument("--code", type=Path, help="memory: another HQLabel checkout to measure")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if args.workers is None:
        args.workers = [1] if args.device == "cuda" else [1, 2]
    if args.device == "cuda" and args.workers != [1]:
        parser.error(
            f"--device cuda trains one worker on one GPU (one GPU cannot host two NCCL ranks), got --workers "
            f"{' '.join(map(str, args.workers))}; pass --workers 1"
        )
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            parser.error(
                "--device cuda: torch sees no CUDA GPU here; run on a GPU machine or use --device cpu"
            )
    report: dict = {"machine": machine_info(args.device), "results": {}}
    with tempfile.TemporaryDirectory(prefix="hqlabel-train-bench-") as tmp:
        if "throughput" in args.only:
            report["model"] = args.model
            report["results"]["throughput"] = run_throughput(
                args.workers, args.images, args.val_images, Path(tmp), device=args.device, model=args.model
            )
        if "memory" in args.only:
            code = args.code.resolve() if args.code else None
            report["code"] = str(code or Path.cwd())
            report["results"]["memory"] = run_memory(args.memory_images, args.memory_side, Path(tmp), code)
    text = json.dumps(report, indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)
    return report


if __name__ == "__main__":
    main()
