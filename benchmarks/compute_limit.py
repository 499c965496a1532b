"""The SAM-HQ image encoder against the compute limit of the device.

The limit: images/s that the device could reach if every FLOP of the encoder ran at the rate of a large square
matmul in the same dtype, i.e. ``matmul rate / encoder FLOPs per image``; the fraction reached is the measured
images/s over that. Random weights (speed does not depend on them).

    python -m benchmarks.compute_limit --preset real-size --vit b --device cuda --precision bf16 \\
        --batch-size 8 [--compile] [--out benchmarks/results/NAME.json]

FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` (one multiply-add = 2 FLOPs; matmuls,
convolutions and attention; elementwise ops, norms and softmax are not counted).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from hqlabel.platform.config import PRECISIONS, resolve_precision
from hqlabel.segmenters.hq_sam import HQSamSegmenter, tiny_random_sam_hq

PRESETS = ("tiny-random", "real-size")
# Released SAM / SAM-HQ image encoders: hidden size, depth, heads, global-attention blocks.
VITS = {
    "b": (768, 12, 12, [2, 5, 8, 11]),
    "l": (1024, 24, 16, [5, 11, 17, 23]),
    "h": (1280, 32, 16, [7, 15, 23, 31]),
}


def _cpu_sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


# PyTorch's FLOP counter knows the CUDA attention kernels but not the CPU flash kernel that SDPA uses there.
_CUSTOM_FLOPS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flop}


def build_segmenter(
    preset: str, *, vit: str = "b", device: str = "cpu", precision: str = "fp32", compile: bool = False
) -> HQSamSegmenter:
    """A random-weight SAM-HQ: ``tiny-random`` (the test preset, 128 x 128 input) or ``real-size`` ViT-B/L/H
    (1024 x 1024 input, 256-wide decoder; ViT-B is ``benchmarks.models.real_size_sam_hq``)."""
    kwargs = dict(device=device, precision=precision, compile=compile)
    if preset == "tiny-random":
        return tiny_random_sam_hq(**kwargs)
    if preset != "real-size":
        raise ValueError(f"unknown preset {preset!r}; choose one of {PRESETS}")
    if vit not in VITS:
        raise ValueError(f"unknown ViT size {vit!r}; choose one of {sorted(VITS)}")
    if vit == "b":
        from benchmarks.models import real_size_sam_hq

        base = real_size_sam_hq("cpu")
        return HQSamSegmenter(base.model, base.processor, **kwargs)
    from transformers import SamHQConfig, SamHQModel, SamHQProcessor
    from transformers.models.sam.image_processing_pil_sam import SamImageProcessorPil

    hidden, depth, heads, global_attn = VITS[vit]
    config = SamHQConfig(
        vision_config=dict(
            hidden_size=hidden,
            num_hidden_layers=depth,
            num_attention_heads=heads,
            global_attn_indexes=global_attn,
        ),
        mask_decoder_config=dict(vit_dim=hidden),
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = SamHQModel(config)
    return HQSamSegmenter(model, SamHQProcessor(image_processor=SamImageProcessorPil()), **kwargs)


def _input_size(segmenter: HQSamSegmenter) -> int:
    return int(segmenter.model.config.vision_config.image_size)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def encoder_flops(segmenter: HQSamSegmenter) -> float:
    """FLOPs of one image through the vision encoder (neck included) at its input size, S x S.

    Counted eagerly in float32 (a compiled encoder runs uncompiled here; the count does not depend on the
    dtype).
    """
    size = _input_size(segmenter)
    pixel_values = torch.randn(1, 3, size, size, device=segmenter.device, dtype=segmenter.model.dtype)
    counter = FlopCounterMode(display=False, custom_mapping=_CUSTOM_FLOPS)
    with torch.inference_mode(), torch.compiler.set_stance("force_eager"), counter:
        segmenter.model.get_image_embeddings(pixel_values)
    return float(counter.get_total_flops())


def matmul_rate(
    device: str | torch.device, dtype: torch.dtype, size: int | None = None, repeats: int = 5
) -> float:
    """Measured FLOP/s of size x size matmuls in ``dtype`` (2 size^3 FLOPs each): 2 warm-up rounds, then the
    median of ``repeats`` rounds (20 matmuls per round on CUDA, one on the CPU). ``size`` defaults to 4096
    on CUDA and 1024 on the CPU."""
    device = torch.device(device)
    size = size or (4096 if device.type == "cuda" else 1024)
    per_round = 20 if device.type == "cuda" else 1
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    times = []
    with torch.inference_mode():
        for i in range(2 + repeats):
            _sync(device)
            start = time.perf_counter()
            for _ in range(per_round):
                torch.mm(a, b)
            _sync(device)
            if i >= 2:
                times.append(time.perf_counter() - start)
    return 2.0 * size**3 * per_round / statistics.median(times)


def encoder_throughput(
    segmenter: HQSamSegmenter, batch_size: int, repeats: int = 5, warmup: int = 2
) -> tuple[float, list[float]]:
    """Images/s of the vision encoder on batches of ``batch_size`` random S x S images at the segmenter's
    precision (``segmenter.encode``: autocast, float32 outputs; no preprocessing): the median of ``repeats``
    timed batches after ``warmup`` untimed ones (a compiled encoder compiles in the first). Returns
    ``(images/s, seconds of each timed batch)``."""
    size = _input_size(segmenter)
    pixel_values = torch.randn(batch_size, 3, size, size, device=segmenter.device)
    times = []
    for i in range(warmup + repeats):
        _sync(segmenter.device)
        start = time.perf_counter()
        segmenter.encode(pixel_values)
        _sync(segmenter.device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return batch_size / statistics.median(times), times


def measure(
    preset: str = "tiny-random",
    *,
    vit: str = "b",
    device: str = "cpu",
    precision: str = "bf16",
    batch_size: int = 8,
    compile: bool = False,
    repeats: int = 5,
    matmul_size: int | None = None,
) -> dict:
    """Everything ``main`` reports, as a JSON-ready dict (units in the key names)."""
    segmenter = build_segmenter(preset, vit=vit, device=device, precision=precision, compile=compile)
    dtype = segmenter.autocast_dtype or torch.float32
    flops = encoder_flops(segmenter)
    rate = matmul_rate(segmenter.device, dtype, matmul_size, repeats)
    images_per_s, times = encoder_throughput(segmenter, batch_size, repeats, warmup=3 if compile else 2)
    dev = segmenter.device
    return {
        "preset": preset,
        "vit": vit if preset == "real-size" else None,
        "input_size_px": _input_size(segmenter),
        "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor(),
        "precision": precision,
        "compute_dtype": str(dtype).removeprefix("torch."),
        "compile": compile,
        "attention_implementation": segmenter.attention_implementation,
        "batch_size": batch_size,
        "repeats": repeats,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "encoder_gflops_per_image": flops / 1e9,
        "matmul_tflops_per_s": rate / 1e12,
        "encoder_images_per_s": images_per_s,
        "encoder_batch_seconds": times,
        "limit_images_per_s": rate / flops,
        "fraction_of_limit": images_per_s * flops / rate,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.compute_limit", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--preset", choices=PRESETS, default="tiny-random")
    parser.add_argument("--vit", choices=sorted(VITS), default="b", help="real-size encoder (default b)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    parser.add_argument("--precision", choices=PRECISIONS, default="bf16", help="autocast dtype (bf16)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per encoder call (8)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the encoder")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds, median reported (5)")
    parser.add_argument("--matmul-size", type=int, help="square matmul side (4096 on CUDA, 1024 on CPU)")
    parser.add_argument("--out", type=Path, help="JSON file (default: print only)")
    args = parser.parse_args(argv)
    if args.batch_size < 1 or args.repeats < 1:
        parser.error("--batch-size and --repeats must be >= 1")
    try:
        resolve_precision(args.precision, args.device)
        result = measure(
            args.preset,
            vit=args.vit,
            device=args.device,
            precision=args.precision,
            batch_size=args.batch_size,
            compile=args.compile,
            repeats=args.repeats,
            matmul_size=args.matmul_size,
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        f"{result['preset']} ({result['device']}, {result['compute_dtype']}, attention "
        f"{result['attention_implementation']}, compile {result['compile']}): "
        f"encoder {result['encoder_gflops_per_image']:.2f} GFLOP/image, "
        f"matmul {result['matmul_tflops_per_s']:.3f} TFLOP/s, "
        f"{result['encoder_images_per_s']:.2f} images/s at batch {result['batch_size']} "
        f"= {result['fraction_of_limit']:.1%} of the limit ({result['limit_images_per_s']:.2f} images/s)"
    )
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
