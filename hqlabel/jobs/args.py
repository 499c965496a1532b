"""Command-line arguments that several ``hqlabel`` commands share."""

from __future__ import annotations

import argparse

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
