"""Learning check for HQ-token training: does the recipe teach the HQ token fine structure?

A tiny SAM-HQ of the real architecture with random weights is saved as the frozen base (loaded back through
``from_pretrained``, as a real base would be). Its HQ modules are trained with ``hqlabel train``'s Ray Train
job on the synthetic fine-structure set (thin lines, rings with holes, lattices; one object per image, the
layout of DIS5K / ThinObject-5K), and ``hqlabel eval`` compares, on a separately generated validation set:
the frozen SAM, the untrained HQ token and the trained one (mIoU and boundary mIoU, GT-box prompts).

The base is random, so the absolute numbers say nothing about real HQ-SAM; what the check shows is that the
training loop, losses and prompts move the HQ token's masks toward the ground truth, measured by the same
evaluation code users run.

    python -m benchmarks.learning_check [--train-images 128] [--epochs 60] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from hqlabel.jobs.evaluate import run_eval
from hqlabel.jobs.train import run_train_job
from hqlabel.segmenters import tiny_random_sam_hq
from hqlabel.training.config import TrainConfig
from hqlabel.training.synthetic import write_fine_structure_dataset

BASE = dict(image_size=128, patch_size=4, decoder_hidden=32)  # a 32 x 32 embedding grid, 128 x 128 logits


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-images", type=int, default=128)
    parser.add_argument("--val-images", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--work", help="working folder (default: a temporary one)")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        train_data, val_data, base, run = (str(work / name) for name in ("train", "val", "base", "run"))
        write_fine_structure_dataset(train_data, args.train_images, 128, seed=args.seed, max_objects=1)
        write_fine_structure_dataset(val_data, args.val_images, 128, seed=args.seed + 1000, max_objects=1)
        tiny_random_sam_hq(seed=args.seed, **BASE).save_pretrained(base)

        config = TrainConfig(
            data=train_data,
            val_data=val_data,
            out=run,
            base=base,
            epochs=args.epochs,
            lr_drop_epoch=max(1, round(args.epochs * 10 / 12)),  # the paper's 10 of 12
            seed=args.seed,
        )
        start = time.perf_counter()
        summary = run_train_job(config, workers=args.workers, num_cpus=os.cpu_count())
        train_seconds = time.perf_counter() - start
        report = run_eval(val_data, base=base, weights=[run], device="cpu")

    history = summary["history"]
    result = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{os.cpu_count()} CPUs, " + ("CUDA" if torch.cuda.is_available() else "no GPU"),
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "base": {"kind": "tiny SAM-HQ, random weights", **BASE, "seed": args.seed},
        "data": {
            "generator": "hqlabel.training.synthetic fine-structure, max_objects=1",
            "train_images": args.train_images,
            "val_images": args.val_images,
        },
        "train": {
            **config.model_dump(
                include={"epochs", "lr", "lr_drop_epoch", "batch_size", "jitter", "num_points"}
            ),
            "workers": summary["workers"],
            "seconds": round(train_seconds, 1),
        },
        "history": history,
        "best_epoch": summary["best"]["epoch"],
        "eval": report["rows"],
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{result['date']}-learning-check.json"
    result["json"] = str(path)
    path.write_text(json.dumps(result, indent=2))
    print(report["table"], end="")
    untrained, best = history[0], summary["best"]
    print(
        f"validation mBIoU: untrained HQ token {100 * untrained['val_mbiou']:.2f}, "
        f"trained (epoch {best['epoch']}) {100 * best['val_mbiou']:.2f}; {train_seconds:.0f} s; -> {path}"
    )
    return result


if __name__ == "__main__":
    main()
