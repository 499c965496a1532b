"""Command-line arguments that several ``hqlabel`` commands share."""

from __future__ import annotations

import argparse

from hqlabel.platform.config import DEFAULT_DETECTOR, DEFAULT_SEGMENTER, PRECISIONS, PRESETS
from hqlabel.platform.storage import DEFAULT_MAX_JSON_BYTES, StorageOptions


def add_storage_args(parser: argparse.ArgumentParser) -> None:
    """``--s3-endpoint`` and ``--s3-region``, for commands that read or write ``s3://`` paths."""
    parser.add_argument(
        "--s3-endpoint", help="S3-compatible endpoint URL (credentials: the AWS environment or profile)"
    )
    parser.add_argument("--s3-region", help="S3 region (default: AWS_REGION, then us-east-1)")


def storage_options(args: argparse.Namespace) -> StorageOptions:
    """The ``StorageOptions`` of ``add_storage_args``' arguments."""
    return StorageOptions(args.s3_endpoint, args.s3_region)


def resource_amount(text: str) -> tuple[str, float]:
    """``NAME=AMOUNT`` (``--actor-resource`` / ``--worker-resource``) -> ``(NAME, AMOUNT)``; AMOUNT defaults
    to 1."""
    name, sep, amount = text.partition("=")
    try:
        value = float(amount) if sep else 1.0
    except ValueError:
        value = -1.0
    if not name or value <= 0:
        raise argparse.ArgumentTypeError(f"expected NAME=AMOUNT with AMOUNT > 0 (e.g. a100=1), got {text!r}")
    return name, value


def add_json_cap_arg(parser: argparse.ArgumentParser, what: str) -> None:
    """``--max-json-bytes``: the cap on a JSON document read whole (``what`` names it in the help)."""
    parser.add_argument(
        "--max-json-bytes",
        type=int,
        default=DEFAULT_MAX_JSON_BYTES,
        help=f"refuse {what} larger than this many bytes before reading it (default {DEFAULT_MAX_JSON_BYTES}"
        ", 2 GiB: parsing takes several times its size in memory)",
    )


# The LabelerConfig fields that add_model_args sets (the models and how they run).
MODEL_OPTIONS = (
    "detector", "segmenter", "detector_revision", "segmenter_revision", "hq_weights", "preset",
    "hq_token_only", "multimask", "device", "precision", "compile", "preprocess",
)  # fmt: skip


def add_model_args(p: argparse.ArgumentParser) -> None:
    """The model options of ``label`` and ``serve start``: detector, segmenter, their revisions, HQ weights,
    preset, HQ-token / multimask, device, precision, compile, preprocess."""
    p.add_argument(
        "--detector",
        default=DEFAULT_DETECTOR,
        help="detector hub id or local dir: Grounding DINO (default), MM-Grounding-DINO, OWLv2 or SAM 3, "
        "e.g. google/owlv2-base-patch16-ensemble (chosen by its config); with --preset tiny-random a family: "
        "grounding-dino, mm-grounding-dino, owlv2 or sam3",
    )
    p.add_argument(
        "--segmenter",
        default=DEFAULT_SEGMENTER,
        help="SAM-HQ / SAM hub id, local dir or original .pth file; with --preset tiny-random a family: "
        "sam-hq, sam or sam-hq-light",
    )
    for role in ("detector", "segmenter"):
        p.add_argument(
            f"--{role}-revision",
            help=f"hub commit hash, branch or tag of --{role} (default: the default branch's commit when the "
            "job starts; a resumed job reuses the commit its first run recorded)",
        )
    p.add_argument("--hq-weights", help="fine-tuned HQ-token weights (safetensors) on top of --segmenter")
    p.add_argument("--preset", choices=PRESETS, help="tiny randomly initialised models (offline smoke runs)")
    p.add_argument(
        "--hq-token-only",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="masks from the HQ token alone instead of SAM + HQ logits (default: off)",
    )
    p.add_argument(
        "--multimask",
        choices=("off", "best"),
        default="off",
        help="off: SAM's single-mask token; best: the original SysCV release's best-of-3 SAM mask + HQ",
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="auto",
        help="autocast dtype of the models: auto (bf16 on GPUs that support it, else fp32), fp32, bf16, "
        "fp16 (GPU only); weights stay fp32 (default auto)",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the segmenter's image encoder and the Grounding DINO detector (GPU-oriented; the "
        "first batch compiles, ~40 s for ViT-L; batches are padded to the first one's size, and detector "
        "images to a canvas that only grows, so that each compiles once; not for --detector owlv2 or sam3)",
    )
    p.add_argument(
        "--preprocess",
        choices=("auto", "processor", "torch"),
        default="auto",
        help="where images are resized and normalised: processor (transformers' processors, CPU), torch (on "
        "the model's device), auto (torch on CUDA, else processor) (default auto)",
    )


def model_options(args: argparse.Namespace) -> dict:
    """``LabelerConfig`` keyword arguments of ``add_model_args``' arguments."""
    return {name: getattr(args, name) for name in MODEL_OPTIONS}
