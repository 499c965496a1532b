"""``hqlabel review LABELS``: serve the review web app over a labeling job's output (``hqlabel.review``)."""

from __future__ import annotations

import argparse
import getpass

from hqlabel.jobs.args import add_storage_args, storage_options

__all__ = ["add_parser"]


def add_parser(sub: argparse._SubParsersAction) -> None:
    """The ``review`` subcommand."""
    p = sub.add_parser(
        "review",
        help="review a labeling job's masks in the browser: accept, reject, relabel, click to fix",
        description="Serve a local web app over LABELS (a label --out): its masks ranked least trustworthy "
        "first; keys a (accept), r (reject), l (relabel); clicks re-run HQ-SAM with extra points. Decisions "
        "and corrected masks go to LABELS/review/ (append-only Parquet); `hqlabel curate --decisions "
        "LABELS/review` applies them.",
    )
    p.add_argument("labels", help="the labeling job's --out folder (local or s3://)")
    p.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)"
    )
    p.add_argument("--port", type=int, default=8765, help="port (default 8765; 0 = any free port)")
    p.add_argument(
        "--reviewer", default=None, help="name recorded with every decision (default: the login name)"
    )
    p.add_argument("--images", help="the job's input, if it has moved (default: job.json's spec.input)")
    p.add_argument(
        "--device", default="auto", help="where click fixes run HQ-SAM: auto (CUDA when present), cpu, cuda"
    )
    p.add_argument("--no-fix", action="store_true", help="no click fixes (the segmenter is not loaded)")
    p.add_argument(
        "--service",
        action="store_true",
        help="click fixes on the warm labeling service (`hqlabel serve start`; its segmenter must be the "
        "job's) instead of a model loaded here",
    )
    p.add_argument(
        "--address", help="with --service: the service's Ray cluster (default: the one serve start recorded)"
    )
    add_storage_args(p)
    p.set_defaults(func=_review)


def _review(args: argparse.Namespace) -> int:
    from hqlabel.review.server import ReviewApp, serve

    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port {args.port} is not a port number (0..65535; 0 = any free port)")
    if args.service and args.no_fix:
        raise ValueError("--service runs click fixes and --no-fix turns them off: give one of them")
    if args.service and args.device != "auto":
        raise ValueError(
            f"--device {args.device} places a local model; with --service the service's actors run on their "
            "own device (serve start --device): drop --device or --service"
        )
    if args.address is not None and not args.service:
        raise ValueError("--address names the labeling service's cluster: add --service, or drop --address")
    make_fixer = None
    if args.service:
        from hqlabel.jobs.service_client import ServiceFixer

        def make_fixer(labeler: dict) -> ServiceFixer:
            return ServiceFixer(labeler, args.address)

    app = ReviewApp(
        args.labels,
        reviewer=args.reviewer if args.reviewer is not None else getpass.getuser(),
        options=storage_options(args),
        images=args.images,
        device=None if args.no_fix else args.device,
        make_fixer=make_fixer,
    )
    serve(app, args.host, args.port)
    return 0
