"""Light HQ-SAM (TinyViT encoder) vs HQ-SAM ViT-B: segmenter speed at the real sizes, random weights.

Both models have the released architectures (``sam_hq_vit_tiny.pth``: TinyViT 64/128/160/320, depths
2/2/6/2; ``sam-hq-vit-base``: ViT-B/16), 1024 px input, a 256-wide HQ decoder, and random weights, so only
the timings mean anything. Per model, on one 640 x 480 image (median of ``--repeats`` runs after a warm-up):
``embed`` (preprocess + encoder), ``predict_boxes`` for ``--boxes`` boxes, and images/s for both together
(the labeling job's segmenter cost per image at that many boxes, upsampling and RLE aside), as wall-clock
time and as CPU time of this process (which other processes' load on a shared machine does not inflate).

    python -m benchmarks.light --out benchmarks/results/DATE-cpu-2core-light-hq-sam.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.models import real_size_sam_hq
from benchmarks.stages import _median_seconds, metric
from hqlabel.segmenters.hq_sam import HQSamSegmenter

MODELS = ("light", "vit-b")


def real_size_light_sam_hq(device: str | torch.device = "cpu", seed: int = 0) -> HQSamSegmenter:
    """Light HQ-SAM at the released size (``build_sam_vit_t``), random weights."""
    from transformers import SamHQProcessor
    from transformers.models.sam.image_processing_pil_sam import SamImageProcessorPil

    from hqlabel.segmenters.light_hq_sam import LightSamHQModel, light_sam_hq_config
    from hqlabel.segmenters.tiny_vit import TinyViTConfig

    config = light_sam_hq_config(TinyViTConfig(), prompt_encoder={}, mask_decoder={})
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LightSamHQModel(config)
    return HQSamSegmenter(model, SamHQProcessor(image_processor=SamImageProcessorPil()), device=device)


def measure(segmenter: HQSamSegmenter, boxes: int, repeats: int) -> dict:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)
    xy = rng.uniform(0, 1, size=(boxes, 2, 2)) * np.array([640, 480])
    prompts = torch.as_tensor(np.concatenate([xy.min(1), xy.max(1) + 1], 1), dtype=torch.float32)
    embeddings = segmenter.embed([image])  # warm-up
    segmenter.predict_boxes(embeddings, [prompts])
    encoder = _median_seconds(lambda: segmenter.embed([image]), repeats, segmenter.device)
    decoder = _median_seconds(
        lambda: segmenter.predict_boxes(embeddings, [prompts]), repeats, segmenter.device
    )
    cpu_encoder = _median_cpu_seconds(lambda: segmenter.embed([image]), repeats)
    cpu_decoder = _median_cpu_seconds(lambda: segmenter.predict_boxes(embeddings, [prompts]), repeats)
    vision = segmenter.model.vision_encoder
    return {
        "encoder_parameters": metric(sum(p.numel() for p in vision.parameters()), "parameters"),
        "model_parameters": metric(sum(p.numel() for p in segmenter.model.parameters()), "parameters"),
        "encoder_s": metric(encoder, "s/image (preprocess + encoder)"),
        "decoder_s": metric(decoder, f"s ({boxes} boxes)"),
        "images_per_s": metric(1 / (encoder + decoder), f"images/s (embed + {boxes} boxes)"),
        "encoder_images_per_s": metric(1 / encoder, "images/s (embed only)"),
        "encoder_cpu_s": metric(cpu_encoder, "CPU s/image (process time, all threads)"),
        "decoder_cpu_s": metric(cpu_decoder, f"CPU s ({boxes} boxes; process time)"),
        "images_per_cpu_s": metric(
            1 / (cpu_encoder + cpu_decoder), f"images per CPU second (+ {boxes} boxes)"
        ),
    }


def _median_cpu_seconds(fn, repeats: int) -> float:
    """Median CPU time (this process, all threads) of ``fn``: on a shared machine, unlike wall-clock time,
    it does not grow with other processes' load (at 1 thread it approximates the wall time on a quiet
    core)."""
    times = []
    for _ in range(repeats):
        start = time.process_time()
        fn()
        times.append(time.process_time() - start)
    return float(np.median(times))


def main(argv: list[str] | None = None) -> dict:
    from benchmarks.run import machine_info

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--boxes", type=int, default=10, help="boxes per image for the decoder")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (median)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    report: dict = {
        "machine": machine_info("cpu"),
        "random_weights": True,
        "settings": {
            "image": "640 x 480 RGB (1024 px model input)",
            "boxes": args.boxes,
            "repeats": args.repeats,
            "torch_threads": args.threads,
        },
        "results": {},
    }
    builders = {"light": real_size_light_sam_hq, "vit-b": real_size_sam_hq}
    load = {"start": os.getloadavg()[0]}  # the 1-minute load average: other processes on the cores
    for name in args.models:
        report["results"][name] = measure(builders[name](), args.boxes, args.repeats)
        load[f"after_{name}"] = os.getloadavg()[0]
    report["machine"]["load_average_1min"] = load
    if {"light", "vit-b"} <= set(report["results"]):
        light, vit_b = report["results"]["light"], report["results"]["vit-b"]
        report["results"]["speedup_light_over_vit_b"] = {
            "encoder": metric(vit_b["encoder_s"]["value"] / light["encoder_s"]["value"], "x"),
            "images_per_s": metric(light["images_per_s"]["value"] / vit_b["images_per_s"]["value"], "x"),
            "encoder_cpu": metric(vit_b["encoder_cpu_s"]["value"] / light["encoder_cpu_s"]["value"], "x"),
            "images_per_cpu_s": metric(
                light["images_per_cpu_s"]["value"] / vit_b["images_per_cpu_s"]["value"], "x"
            ),
        }
    text = json.dumps(report, indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)
    return report


if __name__ == "__main__":
    main()
