"""``python -m benchmarks.train``: HQ-token training throughput and a training worker's memory.

Two sections, with the tiny random preset on CPU (random weights: only speed and memory mean anything):

- ``throughput``: training samples (images) per second per worker, for 1 and 2 workers
  (``--workers 1 2``). The recipe runs as Ray Train's CPU workers run it (``run_training`` under a gloo
  process group, DDP), started with ``torch.multiprocessing`` so that Ray's start-up stays out of the figure;
  each worker gets ``cpu_count // workers`` torch threads. The figure is an epoch after the first (the
  second of 2): images per worker / seconds between the two epochs' reports, which includes that epoch's
  validation (on ``--val-images`` images) and rank 0's checkpoint.
- ``memory``: the peak RSS of one training process (``run_training`` in a fresh process, ``VmHWM``) on
  datasets of ``--memory-images`` N and 4N random-noise ``--memory-side``-pixel BMP images, one mask each,
  1 epoch. With ``--code DIR`` it measures another checkout (an older commit, for a before/after).

    python -m benchmarks.train [--only throughput memory] [--workers 1 2] [--code DIR]
        [--out benchmarks/results/NAME.json]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SECTIONS = ("throughput", "memory")


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


def _throughput_worker(rank: int, workers: int, store: str, config: dict, times: str) -> None:
    import torch
    import torch.distributed as dist

    from hqlabel.training.config import TrainConfig
    from hqlabel.training.recipe import run_training

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))
    if workers > 1:
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=workers)
    stamps: list[float] = []
    try:
        run_training(
            TrainConfig(**config),
            rank=rank,
            world_size=workers,
            device="cpu",
            report=lambda _: stamps.append(time.perf_counter()),
        )
    finally:
        if workers > 1:
            dist.destroy_process_group()
    Path(times, f"{rank}.json").write_text(json.dumps(stamps))


def run_throughput(worker_counts: list[int], images: int, val_images: int, work: Path) -> dict:
    import torch.multiprocessing as mp

    from hqlabel.training import checkpoint
    from hqlabel.training.synthetic import write_fine_structure_dataset

    data, val = str(work / "synthetic"), str(work / "synthetic-val")
    write_fine_structure_dataset(data, images, size=256, seed=1)
    write_fine_structure_dataset(val, val_images, size=256, seed=2)
    results = {}
    for workers in worker_counts:
        run = work / f"throughput-{workers}"
        times = run / "times"
        times.mkdir(parents=True)
        config = dict(
            data=data, val_data=val, out=str(run / "out"), preset="tiny-random", epochs=2, batch_size=4,
            num_points=256,
        )  # fmt: skip
        mp.spawn(
            _throughput_worker,
            args=(workers, str(run / "store"), config, str(times)),
            nprocs=workers,
            join=True,
        )
        stamps = [json.loads((times / f"{r}.json").read_text()) for r in range(workers)]
        epoch_s = max(s[1] - s[0] for s in stamps)
        per_worker = checkpoint.world_layout(workers, 4, images)["images_per_worker"]
        results[f"workers_{workers}"] = {
            "images_per_worker_per_epoch": {"value": per_worker, "unit": "images"},
            "epoch_s": {"value": round(epoch_s, 2), "unit": "s"},
            "samples_per_s_per_worker": {"value": round(per_worker / epoch_s, 2), "unit": "images/s"},
            "samples_per_s_total": {"value": round(workers * per_worker / epoch_s, 2), "unit": "images/s"},
        }
    return results


def main(argv: list[str] | None = None) -> dict:
    from benchmarks.run import machine_info

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="throughput: worker counts")
    parser.add_argument("--images", type=int, default=64, help="throughput: 256 px training images")
    parser.add_argument("--val-images", type=int, default=4, help="throughput: validation images")
    parser.add_argument("--memory-images", type=int, default=24, help="memory: N (and 4N) images")
    parser.add_argument("--memory-side", type=int, default=1024, help="memory: image side in pixels")
    parser.add_argument("--code", type=Path, help="memory: another HQLabel checkout to measure")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    report: dict = {"machine": machine_info("cpu"), "results": {}}
    with tempfile.TemporaryDirectory(prefix="hqlabel-train-bench-") as tmp:
        if "throughput" in args.only:
            report["results"]["throughput"] = run_throughput(
                args.workers, args.images, args.val_images, Path(tmp)
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
